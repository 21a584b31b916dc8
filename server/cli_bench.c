/* cli_bench.c - saserve bench (in progress). */
#include <stdio.h>

#include "cli.h"

int cli_bench(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "saserve bench: not available in this build yet\n");
    return 1;
}
