/*
 * main.c - runs every Check suite in tests/ (the list is generated from the
 * "Suite *NAME_suite(void)" definitions) and ends with Check's summary line.
 *
 *   build/test_runner              all suites
 *   CK_RUN_SUITE=gguf build/test_runner    one suite (Check's own variables)
 */
#include <check.h>
#include <stdlib.h>

#include "suites.h.in"

int main(void) {
    SRunner *sr = srunner_create(NULL);
#define X(fn) srunner_add_suite(sr, fn());
#include "suites.h"
#undef X
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
