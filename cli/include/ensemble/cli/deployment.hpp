#pragma once
// A deployment file: what `ensemble up` starts — one broker, optionally an orchestrator, and
// agents (programs or scriptable agent specs) with their arguments, environment, replicas,
// readiness conditions and restart policies. The format is documented in docs/deployments.md.
//
//   auto d = ensemble::cli::load_deployment("examples/cart");   // DIR/deployment.yaml
//   for (const auto& a : d.agents) ... a.program, a.args, a.replicas ...
//
// Loading validates everything that can be checked without starting a process: types, unknown
// keys, durations, duplicate names. Relative paths (programs containing a '/', specs, stores,
// workflow files, working directories) are made absolute against the file's directory.
// Every problem of the file is found in one pass: they throw one common::config_error (a
// common::config_errors listing them all, in file order) whose where() is the first one's
// "<file>: <yaml path>" (for example "deploy/deployment.yaml: agents[1].restart.backoff"), and
// each message says what is wrong, with the line and column.
//
// Program names without a '/' are looked up when the deployment is launched, by
// find_program(): so that a file can be validated on a machine that lacks the binaries.

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/config_reader.hpp"
#include "ensemble/common/spawn.hpp"

namespace ensemble::cli {

struct restart_policy {
  enum class mode { never, on_failure };
  mode when = mode::never;
  std::chrono::milliseconds backoff{500};         // before the first restart; doubles each time
  std::chrono::milliseconds max_backoff{30'000};  // ... up to this
  int max_restarts = 5;                           // then the process stays down
};

// What every launched process has. Arguments and environment values may contain the
// placeholders {broker}, {events}, {name}, {replica} and {dir}, replaced at launch time.
struct process_spec {
  std::string program;                     // absolute path, or a name for find_program()
  std::vector<std::string> args;           // after the ones `up` adds itself
  std::map<std::string, std::string> env;  // added to the inherited environment
  std::string workdir;                     // absolute
  restart_policy restart;
  std::string where;  // "<file>: <yaml path>" of the section, for messages
};

struct broker_section : process_spec {
  std::string router = "tcp://127.0.0.1:5555";
  std::string events = "tcp://127.0.0.1:5556";
  // Where the broker stores durable streams (`--data`): `broker.data`, absolute; empty: no
  // storage. `ensemble up` fills in its default (default_data_dir) when the file declares
  // streams.
  std::string data;
  // The --streams file the launcher wrote from the deployment's `streams:` (write_streams_file);
  // empty: none.
  std::string streams_file;
};

// A durable stream the broker declares at start: an item of the deployment's `streams:` list,
// with the fields of the broker's --streams file (docs/protocol.md section 11).
struct stream_section {
  std::string name;
  std::vector<std::string> topics;  // topic prefixes
  std::chrono::milliseconds max_age{0};
  std::uint64_t max_bytes = 0;
  std::uint64_t max_events = 0;
  std::optional<std::chrono::milliseconds> duplicate_window;  // absent: the broker's default
  std::string where;                                          // "<file>: streams[i]"
};

struct orchestrator_section : process_spec {
  std::string store = ":memory:";      // absolute path, or ":memory:"
  std::vector<std::string> workflows;  // absolute paths of files and directories
  std::string clock;                   // --clock: "wall", "virtual"; empty: its default (wall)
};

// What one identity may do when the deployment runs secured (docs/protocol.md section 12):
// the lists of the broker's auth file.
struct rights {
  std::vector<std::string> offer = {};
  std::vector<std::string> call = {};
  std::vector<std::string> call_own = {};
  std::vector<std::string> publish = {};
  std::vector<std::string> subscribe = {};
  std::vector<std::string> consume = {};
  std::vector<std::string> admin = {};
  bool empty() const;
  // Adds `more`'s entries that are not there yet.
  void merge(const rights& more);
};

// `security:` — how the deployment's processes prove who they are (docs/deployments.md,
// "Security").
struct security_section {
  enum class mode { none, curve };
  mode kind = mode::none;
  // Where the key pairs are kept (absolute): `security.keys`, default `.ensemble/keys` beside
  // the deployment file. Keys found there are reused; missing ones are generated.
  std::string keys_dir;
  // Identities besides the deployment's processes and `user` (`security.identities`).
  std::map<std::string, rights> identities;
  std::string where;  // "<file>: security"
};

// What prepare_security() wrote: the files each process is started with.
struct security_files {
  std::string broker_secret;  // the broker's --curve-key
  std::string broker_public;  // its public key file: every other process's --broker-key
  std::string auth_file;      // the broker's --auth, derived from the deployment
  std::map<std::string, std::string> secret_files;  // identity -> its secret key file
};

struct agent_section : process_spec {
  std::string name;
  std::string spec;  // absolute path of a scriptable agent spec; then `program` is empty
  int replicas = 1;
  std::vector<std::string> services;  // ready once all of them are registered with the broker
  std::string ready_line;             // ... and a line containing this text was printed
  cli::rights rights;  // `rights:`, added to what is derived from its services and spec
};

struct deployment {
  std::string file;  // absolute path of the deployment file
  std::string dir;   // its directory: relative paths and {dir} resolve against it
  broker_section broker;
  std::optional<orchestrator_section> orchestrator;
  std::vector<agent_section> agents;
  std::vector<stream_section> streams;
  security_section security;
  // Filled by prepare_security() when security is on; command_for() passes the keys.
  security_files keys;
};

// `path` is a deployment file, or a directory holding deployment.yaml.
deployment load_deployment(const std::string& path);
// Parses YAML text; `file` names it in errors and its directory anchors relative paths.
deployment parse_deployment(const std::string& yaml, const std::string& file);

// Where `ensemble up` has the broker store streams when the file does not say (broker.data):
// `.ensemble/data` in the deployment file's directory when the orchestrator's state outlives
// the run (its store is a file); empty when it does not (`:memory:`, or no orchestrator), and
// `up` uses a temporary directory of its own, removed when it stops. Streams kept beside the
// file while the orchestrator forgets its instances would make a new run re-use event ids
// (`<instance>/<step>/<attempt>`) that the streams still remember and drop as duplicates.
std::string default_data_dir(const deployment& d);

// Writes the deployment's streams as a broker --streams file (JSON) to `path`. Throws
// common::config_error naming the file if it cannot be written.
void write_streams_file(const deployment& d, const std::string& path);

// What `ensemble validate --deployment PATH` checks besides workflow files: the deployment
// file and its agents' specs, without looking for programs. Returns every problem found, and
// appends the orchestrator's workflow files and directories to `workflows`.
std::vector<common::diagnostic> check_deployment(const std::string& path,
                                                 std::vector<std::string>& workflows);

// Where a program is, and where it was looked for when it is not found.
struct program_location {
  std::optional<std::string> path;
  std::vector<std::string> searched;  // directories, in order
};
// Absolute or relative (contains '/'): that file, if executable. A bare name: the directory of
// the running executable, the build's bin directory (ENSEMBLE_BIN_DIR overrides it), then PATH.
program_location find_program(const std::string& program);

// The process names of an agent section: `name` for one replica, name-1 ... name-N otherwise.
std::vector<std::string> replica_names(const agent_section& agent);

// Replaces {key} for every key of `values`; other braces are left alone.
std::string substitute(const std::string& text, const std::map<std::string, std::string>& values);

// ----- Launch plans: what `ensemble up` and the testkit's deployments start, and how.

// The lines the project's programs print when they are ready.
inline constexpr std::string_view broker_ready_text = "ensemble-broker ready ";
inline constexpr std::string_view orchestrator_ready_text = "ensemble-orchestrator ready";
inline constexpr std::string_view agent_ready_text = "ensemble-agent ready";

enum class process_role { broker, orchestrator, agent };

// One process of a deployment (each replica is its own).
struct planned_process {
  std::string name;  // "broker", "orchestrator", or the agent's replica name
  process_role kind = process_role::agent;
  const process_spec* spec = nullptr;  // its section, inside the deployment it was planned from
  int replica = 1;
  std::string program;                // resolved, absolute
  std::vector<std::string> extra;     // arguments put before the section's own
  std::vector<std::string> services;  // ready once all of them are registered with the broker
  std::string ready_text;             // ... and a line containing this was printed (if not empty)
};

// Plans every process of `d`, in start order: broker, orchestrator, agents. Resolves programs
// with find_program() and loads scriptable agent specs (their services are what readiness
// waits for); `ensemble_exe` is the `ensemble` executable that runs scriptable agents. Throws
// common::config_error naming the section when a program or spec is missing or invalid.
std::vector<planned_process> plan_processes(const deployment& d, const std::string& ensemble_exe);

// A command line, ready to exec: nothing left to compute between fork and exec.
using exec_plan = common::spawn_plan;

// The command line of one planned process, for a broker at `router`/`events` (for the broker
// itself: the endpoints to bind; empty: the deployment's). Placeholders are substituted, the
// environment is the inherited one plus the section's, and ENSEMBLE_BROKER / ENSEMBLE_EVENTS /
// ENSEMBLE_AGENT_NAME are set for everything but the broker.
exec_plan command_for(const planned_process& p, const deployment& d, const std::string& router,
                      const std::string& events);

// ----- Security (docs/deployments.md, "Security").

// The identity every user of a secured deployment's second terminal acts as: all rights.
inline constexpr std::string_view user_identity = "user";

// The rights of each identity of a secured deployment, derived from what it declares: the
// orchestrator serves `orchestrator` and has what its workflow definitions need (the commands
// of their steps and compensations, the topics they publish, their lifecycle topics, the topics
// they await or are triggered by) and consumes any stream; an agent offers its services and, for a scriptable agent, publishes the
// topics its spec publishes (up to the first `${`), receives the ones it reacts to and consumes
// its stream; each section's `rights:` is added; `user` may do everything; the file's
// `security.identities` are added as they are.
std::map<std::string, rights> derive_rights(const deployment& d,
                                            const std::vector<planned_process>& plan);

// Makes sure every identity of `plan` (and the broker, and `user`) has a key pair in
// d.security.keys_dir, generating what is missing (secret files mode 0600), writes the broker's
// auth file there from derive_rights(), and records the files in d.keys. Throws
// common::config_error naming the file that could not be read or written.
void prepare_security(deployment& d, const std::vector<planned_process>& plan);

}  // namespace ensemble::cli
