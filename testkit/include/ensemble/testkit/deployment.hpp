#pragma once
// A whole Ensemble deployment — broker, orchestrator, agents — as real processes, for one test.
//
//   auto d = ensemble::testkit::deployment::from_file("examples/order-fulfillment");
//   d.start();                                   // every process ready, or throws with its logs
//   ensemble::testkit::workflow_client wf(d.router(), d.events());
//   auto done = wf.run("OrderFulfillment", {{"orderId", "o-1"}}, 30s);
//   d.kill("payments-2");                        // faults: kill / pause / resume / restart
//
// It starts exactly what `ensemble up` would for the same file (ensemble::cli::plan_processes),
// but on fresh endpoints — ephemeral 127.0.0.1 ports, or ipc:// sockets in its own temp dir —
// so tests run side by side. The same model can be built in code instead of a file.
//
// Teardown always happens: the destructor stops agents, then the orchestrator, then the broker
// (SIGTERM, SIGKILL after a grace period) and removes the temp dir; every child is in its own
// process group and dies with the test process (PR_SET_PDEATHSIG), so a test that fails,
// throws or is itself killed leaves no orphans. When the running GoogleTest test has failed,
// the destructor prints each process's last log lines.
//
// Start, restart and kill processes from the test's own thread: a child is told to die when
// the thread that started it ends (that is how PR_SET_PDEATHSIG works).

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/cli/deployment.hpp"
#include "ensemble/testkit/fault_proxy.hpp"
#include "ensemble/testkit/process.hpp"

namespace ensemble::testkit {

enum class transport { tcp, ipc };

struct deployment_options {
  // tcp: 127.0.0.1 with ephemeral ports; ipc: sockets in the deployment's temp dir.
  testkit::transport transport = transport::tcp;
  std::chrono::milliseconds ready_timeout{30'000};  // start() and each restart()
  std::chrono::milliseconds stop_grace{3'000};      // SIGTERM to SIGKILL at teardown
  std::size_t log_lines = 30;                       // per process, printed when a test fails
  // Secured (docs/protocol.md section 12): the broker runs with CURVE and an auth file derived
  // from the deployment (docs/deployments.md, "Security"), every process with its own key
  // pair, kept in the deployment's temp dir. A file's `security: curve` turns it on as well.
  bool secured = false;
  // The orchestrator runs with --clock virtual (as a file's `orchestrator: {clock: virtual}`
  // does): workflow time stands still until advance() moves it (docs/testing.md, "Time
  // skipping").
  bool virtual_clock = false;
};

class deployment {
 public:
  // A broker only; add an orchestrator and agents with the builders below.
  explicit deployment(deployment_options opts = {});
  // The deployment file (or DIR/deployment.yaml) that `ensemble up` would run. Its broker
  // endpoints are replaced by fresh ones. Throws common::config_error as `ensemble up` would.
  static deployment from_file(const std::string& path, deployment_options opts = {});
  ~deployment();
  deployment(deployment&&) noexcept;
  deployment& operator=(deployment&&) noexcept;

  // --- Before start(): what to run. `model()` is the full deployment model (docs/deployments.md)
  // for anything the builders do not cover (arguments, environment, restart policies).
  cli::deployment& model();
  deployment& broker_args(std::vector<std::string> args);  // appended to the broker's
  // An orchestrator loading `workflows` (files or directories). `store` ":memory:", an absolute
  // path, or "file" for a SQLite file in the temp dir (what crash tests want).
  deployment& orchestrator(std::vector<std::string> workflows, std::string store = "file");
  // A program started with `args` ({broker}, {events}, {name}, {replica}, {dir} substituted);
  // ready once every one of `services` has this replica registered with the broker (and, if
  // not empty, a line containing `ready_line` was printed).
  deployment& agent(const std::string& name, const std::string& program,
                    std::vector<std::string> args, std::vector<std::string> services,
                    int replicas = 1, std::string ready_line = {});
  // A scriptable agent (docs/agents.md) from a spec file, or from YAML text written to the
  // temp dir when `spec` does not name an existing file.
  deployment& scriptable_agent(const std::string& name, const std::string& spec, int replicas = 1);
  // The named process (an agent replica or "orchestrator") talks to the broker through its
  // own fault_proxy, available as proxy(name) once started.
  deployment& through_proxy(const std::string& name);

  // Secured deployments: an identity with exactly these rights (and a key of its own), for a
  // test that acts as a peer with limited rights through connect_as(name).
  deployment& identity(const std::string& name, cli::rights r);

  // Starts everything in order and waits until each process is ready. Throws
  // std::runtime_error naming what did not become ready, with the last lines of its log.
  void start();
  // Stops everything (agents, orchestrator, broker). Also done by the destructor.
  void stop();

  // --- Running.
  const std::string& router() const;  // the broker's endpoints, for clients of the test
  const std::string& events() const;
  const std::string& dir() const;  // the temp dir (stores, ipc sockets, written specs)
  bool secured() const;
  // SDK options that connect to this deployment's broker as `identity`: endpoints, agent name
  // and, when secured, the identity's key and the broker's public key. "user" has every right;
  // any process name or identity() works too. Plain deployments: the endpoints and the name.
  agent::options connect_as(const std::string& identity = "user") const;
  // Options with a fresh key pair the broker does not know: its handshake is refused.
  agent::options connect_as_stranger() const;
  std::vector<std::string> names() const;  // every process, in start order
  process& proc(const std::string& name);  // its current run
  fault_proxy& proxy(const std::string& name);

  void kill(const std::string& name);  // SIGKILL, and reaped
  // SIGSTOP / SIGCONT, returning once the kernel reports the process stopped / continued
  // (throws std::runtime_error naming the process if that takes over 10 s or it is not running).
  void pause(const std::string& name);
  void resume(const std::string& name);
  // Starts the process again (SIGKILL first if it runs); with `wait_ready`, waits for the new
  // run to be ready. A restarted broker binds the same endpoints. Note: the broker forgets a
  // killed worker only after heartbeat x liveness (protocol.md §5); until then it may still
  // dispatch to it, and answers `worker_lost` — or re-dispatches retryable requests.
  void restart(const std::string& name, bool wait_ready = true);

  // Time skipping (orchestrator with a virtual clock): moves workflow time forward by `by`,
  // firing in order every timer that falls due (waits, step timeouts, retry backoffs, workflow
  // deadlines, compensation backoffs). Returns the orchestrator's answer {from_us, now_us,
  // fired} once what those timers did is committed; an error (bad_request) when its clock is
  // the wall clock.
  common::result<nlohmann::json> advance(
      std::chrono::milliseconds by, std::chrono::milliseconds deadline = std::chrono::seconds(10));

  // The last `lines` lines of every process, each under its name.
  std::string logs(std::size_t lines = 30) const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace ensemble::testkit
