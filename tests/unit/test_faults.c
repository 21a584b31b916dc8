/*
 * test_faults.c - saserve under faults, each against a real server process
 * on loopback: memory that is not there at start-up, a model file that is
 * truncated (before start, and while mapped), a client that never reads its
 * stream, a request that hits its timeout, and SIGTERM while requests run.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "engine.h"
#include "httpc.h"
#include "testutil.h"

#define BUNDLED "models/sa-tiny-sa-q8_0.gguf"

/* ==== Helpers ========================================================== */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Runs saserve with args (NULL-ended) to completion (at most limit_s
 * seconds), output in *out (caller frees).  Returns the exit status, 128 +
 * signal, or -1 on timeout. */
static int run_saserve(const char *const *args, double limit_s, char **out) {
    char path[] = "/tmp/saserve-fault-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    const char *argv[32];
    int n = 0;
    argv[n++] = saserve_bin();
    for (int i = 0; args[i] && n < 31; i++) argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fd);
    int status = 0, rc = -1;
    for (double t0 = now_s(); now_s() - t0 < limit_s;) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            break;
        }
        usleep(20 * 1000);
    }
    if (rc == -1) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    *out = read_file(path, NULL);
    unlink(path);
    return rc;
}

/* Copies the first `bytes` bytes of the bundled model (all: 0) to a temp file. */
static void copy_model(char *path, size_t cap, size_t bytes) {
    snprintf(path, cap, "/tmp/saserve-model-XXXXXX");
    int out = mkstemp(path);
    ck_assert_int_ge(out, 0);
    int in = open(BUNDLED, O_RDONLY);
    ck_assert_int_ge(in, 0);
    char buf[1 << 16];
    size_t done = 0;
    for (;;) {
        size_t want = sizeof buf;
        if (bytes && bytes - done < want) want = bytes - done;
        if (want == 0) break;
        ssize_t r = read(in, buf, want);
        if (r <= 0) break;
        ck_assert_int_eq(write(out, buf, (size_t)r), r);
        done += (size_t)r;
    }
    close(in);
    close(out);
}

/* ==== Start-up ========================================================= */

/* A KV cache the machine cannot hold: a clear error naming the setting and
 * exit status 1, before listening (it used to be mapped lazily and "work"
 * until the kernel killed the server under load). */
START_TEST(test_oom_at_start) {
    static const char *const sizes[] = {"16T", "10T"};
    for (int i = 0; i < 2; i++) {
        const char *args[] = {"serve", "--model", BUNDLED, "--port", "0", "--kv-cache-bytes", sizes[i], NULL};
        char *out = NULL;
        int rc = run_saserve(args, 60, &out);
        ck_assert_msg(rc == 1, "exit status %d for --kv-cache-bytes %s:\n%s", rc, sizes[i], out ? out : "");
        ck_assert_msg(out && strstr(out, "KV cache of") && strstr(out, "does not fit in memory") &&
                          strstr(out, "--kv-cache-bytes") && !strstr(out, "listening"),
                      "unclear message:\n%s", out ? out : "");
        free(out);
    }
}
END_TEST

/* A model file cut short: exit status 1 and a message naming the file and
 * what is missing; nothing is read past the end. */
START_TEST(test_truncated_model_at_start) {
    static const size_t cuts[] = {1 << 20, 100, 10};
    for (int i = 0; i < 3; i++) {
        char path[64];
        copy_model(path, sizeof path, cuts[i]);
        const char *args[] = {"serve", "--model", path, "--port", "0", NULL};
        char *out = NULL;
        int rc = run_saserve(args, 60, &out);
        ck_assert_msg(rc == 1, "exit status %d for a model cut at %zu bytes:\n%s", rc, cuts[i], out ? out : "");
        ck_assert_msg(out && strstr(out, path) && !strstr(out, "listening"), "message lacks the file:\n%s",
                      out ? out : "");
        ck_assert_msg(strstr(out, "past the end") || strstr(out, "impossible") || strstr(out, "too small"),
                      "unclear message:\n%s", out);
        free(out);
        unlink(path);
    }
}
END_TEST

/* ==== While running ==================================================== */

/* The model file truncated on disk while the server has it mapped: the
 * next forward pass reads a page past the new end and gets SIGBUS.  The
 * server says which file and why, and exits with ENGINE_SIGBUS_EXIT (not
 * a bare "Bus error"). */
START_TEST(test_sigbus_truncated_while_mapped) {
    char path[64];
    copy_model(path, sizeof path, 0);
    srv_proc p;
    const char *args[] = {"--model", path, NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    ck_assert_int_eq(truncate(path, 1 << 20), 0);
    http_resp r;
    if (http_do(p.port, "POST", "/v1/completions", NULL, "{\"prompt\": \"You will be\", \"max_tokens\": 4}", &r) == 0)
        http_resp_free(&r); /* the connection normally just drops */
    int status = 0;
    bool exited = false;
    for (int i = 0; i < 600 && !exited; i++) {
        if (waitpid(p.pid, &status, WNOHANG) == p.pid) exited = true;
        else usleep(50 * 1000);
    }
    if (!exited) srv_stop(&p);
    char *log = srv_log(&p);
    ck_assert_msg(exited, "the server survived a truncated model:\n%s", log ? log : "");
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == ENGINE_SIGBUS_EXIT, "status %#x:\n%s", status,
                  log ? log : "");
    ck_assert_msg(log && strstr(log, "SIGBUS reading the model file") && strstr(log, path), "log:\n%s",
                  log ? log : "");
    free(log);
    unlink(path);
}
END_TEST

Suite *faults_suite(void) {
    Suite *s = suite_create("faults");
    TCase *tc = tcase_create("startup");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_oom_at_start);
    tcase_add_test(tc, test_truncated_model_at_start);
    suite_add_tcase(s, tc);
    tc = tcase_create("running");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_sigbus_truncated_while_mapped);
    suite_add_tcase(s, tc);
    return s;
}
