/* cli_perplexity.c - saserve perplexity (in progress). */
#include <stdio.h>

#include "cli.h"

int cli_perplexity(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "saserve perplexity: not available in this build yet\n");
    return 1;
}
