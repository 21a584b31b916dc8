/*
 * testutil.h - helpers shared by the unit suites.
 */
#ifndef SASERVE_TESTUTIL_H
#define SASERVE_TESTUTIL_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>

/* Directory with the reference models (SASERVE_SHARED, else ../shared), or
 * NULL when absent: callers skip with skip_msg(). */
const char *shared_dir(void);
/* Path under shared_dir() into buf; NULL (and a printed skip notice naming
 * the test) when the file does not exist. */
const char *shared_path(char *buf, size_t cap, const char *rel, const char *test);
/* Reads a whole file; caller frees.  NULL on failure. */
char *read_file(const char *path, size_t *len);
/* Prints "SKIP <test>: <why>" once per test to stderr. */
void skip_msg(const char *test, const char *why);
/* The saserve binary under test (SASERVE_BIN, else build/saserve). */
const char *saserve_bin(void);

#endif
