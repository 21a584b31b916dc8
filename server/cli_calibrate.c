/* cli_calibrate.c - saserve calibrate (in progress). */
#include <stdio.h>

#include "cli.h"

int cli_calibrate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "saserve calibrate: not available in this build yet\n");
    return 1;
}
