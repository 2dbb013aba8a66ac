#pragma once
// Real processes for integration tests: spawn a program, watch its output for a readiness
// line, signal it, and always reap it. A child never outlives the test process: it is put in
// its own process group, asked to die with its parent (PR_SET_PDEATHSIG), and killed by the
// destructor if still running.
//
// These are the building blocks of the testkit's deployments; they throw only while setting
// up (a program that cannot be started), and every wait takes a deadline.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ensemble::testkit {

using namespace std::chrono_literals;

struct process_options {
  std::string program;                     // absolute path, or a name looked up on PATH
  std::vector<std::string> args;           // not including argv[0]
  std::map<std::string, std::string> env;  // added to (or replacing in) the parent's environment
  std::string working_dir;                 // empty: the parent's
  std::string name;                        // label for diagnostics; defaults to the program name
};

class process {
 public:
  // Starts the program with stdout and stderr captured. Throws std::runtime_error naming the
  // program if it cannot be started.
  static std::unique_ptr<process> spawn(process_options opts);
  ~process();  // SIGKILL and reap if still running
  process(const process&) = delete;
  process& operator=(const process&) = delete;

  pid_t pid() const;
  const std::string& name() const;

  // Waits until a line of stdout or stderr contains `text` and returns that line; nullopt if
  // the deadline passes or the process exits first.
  std::optional<std::string> wait_for_line(std::string_view text,
                                           std::chrono::milliseconds deadline);
  // Every line seen so far (stdout and stderr interleaved in arrival order).
  std::vector<std::string> lines() const;
  // The last `n` lines, for diagnostics when a test fails.
  std::string tail(std::size_t n = 30) const;

  void signal(int sig);  // to the process (not its group)
  void kill();           // SIGKILL
  // SIGSTOP, then waits until every thread of the process has stopped (the kernel's stop
  // notification to its parent), so that nothing it does after stop() returns is the process's
  // own doing. False if it did not stop within the deadline or is not running.
  bool stop(std::chrono::milliseconds deadline = std::chrono::seconds(5));
  // SIGCONT, then waits until the kernel reports the process continued. False as stop().
  bool resume(std::chrono::milliseconds deadline = std::chrono::seconds(5));
  bool running();
  // Waits for the process to exit; returns its exit code, or -signal if killed by one;
  // nullopt at the deadline (the process keeps running).
  std::optional<int> wait_exit(std::chrono::milliseconds deadline);

 private:
  struct impl;
  explicit process(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// Where the project's executables are (ensemble-broker, example agents, ...): the directory
// from the ENSEMBLE_BIN_DIR environment variable if set, else the build tree's.
std::string binary_path(const std::string& name);

// Starts a broker — the command line `make(router, endpoints)` returns — and waits for its ready
// line; returns the process and the endpoints it bound (a `*` port resolved). A relaunch on
// concrete endpoints can race the kernel releasing the previous broker's port: that bind
// failure is retried until `deadline`. Throws std::runtime_error with the process's output.
struct launched_broker {
  std::unique_ptr<process> proc;
  std::string router;
  std::string events;
};
launched_broker launch_broker(const std::function<process_options(const std::string& router,
                                                                  const std::string& events)>& make,
                              const std::string& router, const std::string& events,
                              std::chrono::milliseconds deadline);

// A real ensemble-broker process on ephemeral 127.0.0.1 ports (or given endpoints).
class broker_process {
 public:
  // Starts `ensemble-broker` with `extra_args` and waits for its ready line. Throws
  // std::runtime_error with the process's output if it is not ready within `deadline`.
  static std::unique_ptr<broker_process> start(std::vector<std::string> extra_args = {},
                                               std::chrono::milliseconds deadline = 10s);
  const std::string& router() const { return router_; }
  const std::string& events() const { return events_; }
  process& proc() { return *proc_; }
  // SIGKILLs the broker (if running) and starts a new one on the same endpoints.
  void restart(std::chrono::milliseconds deadline = 10s);

 private:
  broker_process() = default;
  void launch(const std::string& router, const std::string& events,
              std::chrono::milliseconds deadline);
  std::vector<std::string> extra_args_;
  std::unique_ptr<process> proc_;
  std::string router_;
  std::string events_;
};

// Polls `condition` every `poll_interval` until it holds or `deadline` passes; returns
// whether it held. For conditions that have no event to wait on (a counter in another
// process, a file appearing).
bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds deadline,
                std::chrono::milliseconds poll_interval = 5ms);

}  // namespace ensemble::testkit
