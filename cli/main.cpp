// ensemble: the command line (see ensemble/cli/cli.hpp).
#include "ensemble/cli/cli.hpp"

int main(int argc, char** argv) { return ensemble::cli::run(argc, argv); }
