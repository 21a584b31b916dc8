/*
 * config_docs.c - prints the generated parts of the documentation from the
 * config registry, so they never drift from the code ("make config-docs"):
 *
 *   config_docs markdown   the README's table of keys
 *   config_docs example    config/saserve.example.json
 *
 * The config suite fails when the committed files differ from this output.
 */
#include <stdio.h>
#include <string.h>

#include "config.h"

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "markdown")) {
        config_print_markdown(stdout);
    } else if (argc == 2 && !strcmp(argv[1], "example")) {
        config_print_example(stdout);
    } else {
        fprintf(stderr, "usage: config_docs markdown|example\n");
        return 2;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
