// `ensemble keygen NAME`: a CURVE key pair for secured mode (docs/protocol.md section 12,
// docs/agents.md "Keys"), in ZeroMQ's certificate format.
#include <iostream>
#include <memory>
#include <string>

#include "ensemble/cli/cli.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::cli {
namespace {

struct keygen_args {
  std::string name;
  std::string dir = ".";
  bool force = false;
};

int run_keygen(const keygen_args& args) {
  try {
    const auto keys = common::generate_curve_keys();
    const auto files = common::write_curve_key_files(args.dir, args.name, keys, args.force);
    std::cout << "public key: " << keys.public_key << "\n"
              << "  " << files.public_file
              << "  (public: list it under the identity's `keys` in the broker's auth file)\n"
              << "  " << files.secret_file
              << "  (secret, mode 0600: give it to the process with --key; never share it)\n";
    return 0;
  } catch (const common::config_error& e) {
    const std::string what = e.what();
    const bool exists = what.find("exists already") != std::string::npos;
    std::cerr << "ensemble keygen: " << what << (exists ? " (--force replaces it)" : "") << "\n";
    return 2;
  }
}

}  // namespace

void add_key_commands(CLI::App& app, context& ctx) {
  auto args = std::make_shared<keygen_args>();
  auto* cmd = app.add_subcommand("keygen", "write a CURVE key pair for a secured broker");
  cmd->footer(
      "Writes DIR/NAME.key (the public key, mode 0644) and DIR/NAME.key_secret (both keys, mode "
      "0600) in ZeroMQ's certificate format, and prints the public key. The broker takes its own "
      "pair with --curve-key NAME.key_secret; an agent takes its secret file with --key, and the "
      "broker's public key (its 40 characters, or its .key file) with --broker-key. Existing "
      "files are kept unless --force (exit code 2).");
  cmd->add_option("name", args->name, "key name: the files are NAME.key and NAME.key_secret")
      ->required();
  cmd->add_option("--dir", args->dir, "directory to write them in (created if missing)")
      ->capture_default_str();
  cmd->add_flag("--force", args->force, "replace existing key files");
  cmd->callback([args, &ctx] { ctx.exit_code = run_keygen(*args); });
}

}  // namespace ensemble::cli
