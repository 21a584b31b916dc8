/*
 * cli.h - the saserve subcommands.  Each takes the arguments after its name
 * and returns the process exit status (0 ok, 1 runtime failure, 2 usage).
 */
#ifndef SASERVE_CLI_H
#define SASERVE_CLI_H

int cli_serve(int argc, char **argv);
int cli_run(int argc, char **argv);
int cli_perplexity(int argc, char **argv);
int cli_calibrate(int argc, char **argv);
int cli_bench(int argc, char **argv);

#endif
