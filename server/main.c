/*
 * main.c - saserve's entry point: the OpenBLAS core check, then dispatch to a
 * subcommand (serve, run, perplexity, calibrate, bench).
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "cpu.h"
#include "engine.h"

static void usage(FILE *f) {
    fprintf(f,
            "saserve %s - OpenAI-compatible LLM inference server with Shared Attention\n"
            "\n"
            "usage: saserve COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  serve       serve the OpenAI API over HTTP (saserve serve --help)\n"
            "  run         generate a continuation of one prompt to stdout\n"
            "  perplexity  perplexity of a text or token file, and KV bytes per token\n"
            "  calibrate   measure which layers can share attention\n"
            "  bench       prompt-processing and decode speed\n"
            "\n"
            "  saserve --version | --help\n",
            SASERVE_VERSION);
}

int main(int argc, char **argv) {
    /* Before anything touches OpenBLAS: it may re-execute us with a better
     * OPENBLAS_CORETYPE. */
    cpu_fix_blas_core(argc, argv);
    /* A model file truncated under us: a clear message, not "Bus error". */
    engine_guard_sigbus();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V") || !strcmp(cmd, "version")) {
        printf("saserve %s\n", SASERVE_VERSION);
        return 0;
    }
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {{"serve", cli_serve},           {"run", cli_run},         {"perplexity", cli_perplexity},
                {"calibrate", cli_calibrate}, {"bench", cli_bench}};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(cmd, cmds[i].name)) return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "saserve: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
