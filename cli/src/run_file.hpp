#pragma once
// The run file: how a running `ensemble up` tells the other `ensemble` commands where its broker
// is, so that a second terminal in the same directory needs neither --broker nor
// ENSEMBLE_BROKER (the example deployments bind ephemeral ports).
//
// `up` writes `.ensemble/up.json` in its working directory once the deployment is ready and
// removes it when it stops. A command given neither --broker nor ENSEMBLE_BROKER reads the one
// in its own working directory (app.cpp). The file records the pid of `up`: a file left behind
// by an `up` that was killed is recognised as stale and reported with its path, instead of a
// broker that does not answer.
#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>

namespace ensemble::cli {

struct run_record {
  std::string router;      // the broker's router endpoint, ports resolved
  std::string events;      // the broker's events endpoint
  std::string deployment;  // the deployment file `up` runs
  pid_t pid = 0;           // of `ensemble up`
  // A secured deployment: the broker's public key (40 Z85 characters), and the secret key file
  // its commands use (absolute, or relative to the run file's directory's parent: the directory
  // `up` runs in). Empty for a plain broker; written only when set.
  std::string broker_key = {};
  std::string key = {};
};

// `.ensemble/up.json` under `dir` (default: the working directory), absolute.
std::filesystem::path run_file_path(const std::filesystem::path& dir = {});

// The record in `file`; nullopt if there is no such file. Throws common::config_error naming
// the file if it cannot be read or is not a run file.
std::optional<run_record> read_run_file(const std::filesystem::path& file);

// Writes `r` to `file` (creating its directory) atomically: a reader sees the old file or the
// new one. Throws std::runtime_error naming the file on failure.
void write_run_file(const std::filesystem::path& file, const run_record& r);

// Removes `file` if it still records `owner` (another `up` may have taken it over since).
void remove_run_file(const std::filesystem::path& file, pid_t owner);

// Whether a process with this pid exists (kill(pid, 0)).
bool process_alive(pid_t pid);

}  // namespace ensemble::cli
