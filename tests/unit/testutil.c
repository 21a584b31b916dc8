/*
 * testutil.c - see testutil.h.
 */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

const char *shared_dir(void) {
    const char *d = getenv("SASERVE_SHARED");
    if (!d) d = "../shared";
    struct stat st;
    if (stat(d, &st) != 0 || !S_ISDIR(st.st_mode)) return NULL;
    return d;
}

void skip_msg(const char *test, const char *why) { fprintf(stderr, "SKIP %s: %s\n", test, why); }

const char *shared_path(char *buf, size_t cap, const char *rel, const char *test) {
    const char *d = shared_dir();
    if (!d) {
        skip_msg(test, "reference directory ../shared not found (set SASERVE_SHARED)");
        return NULL;
    }
    snprintf(buf, cap, "%s/%s", d, rel);
    if (access(buf, R_OK) != 0) {
        char why[512];
        snprintf(why, sizeof why, "%s not found", buf);
        skip_msg(test, why);
        return NULL;
    }
    return buf;
}

char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        if (len) *len = (size_t)n;
    }
    return buf;
}

const char *saserve_bin(void) {
    const char *b = getenv("SASERVE_BIN");
    return b ? b : "build/saserve";
}
