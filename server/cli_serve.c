/* cli_serve.c - saserve serve (in progress). */
#include <stdio.h>

#include "cli.h"

int cli_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "saserve serve: not available in this build yet\n");
    return 1;
}
