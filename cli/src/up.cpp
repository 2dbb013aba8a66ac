// `ensemble up [FILE]`: launches a deployment (docs/deployments.md) — broker, orchestrator,
// agents — as child processes, waits until all of it is ready, multiplexes the children's
// output with name prefixes, restarts what crashes (per policy), and stops everything in
// order on SIGINT/SIGTERM.
//
// One thread runs everything: an Asio io_context with a coroutine for the start-up and
// shutdown sequences, and callbacks for child output, child exits (SIGCHLD), restarts and the
// stop signals. The only other threads belong to the probe, an SDK agent that asks the
// broker whether it answers and which services are registered; its callbacks post back here.
//
// No orphans: every child (common::spawn_child) gets its own process group (signals go to the
// group, so whatever a child started goes with it) and PR_SET_PDEATHSIG(SIGKILL), so that it dies
// with us even if we are SIGKILLed. Children are forked from this (main) thread, which lives as
// long as the process: PDEATHSIG fires when the forking thread ends.
// clang-format off
#include <utility>  // first: boost 1.74's asio/awaitable.hpp uses std::exchange without it
// clang-format on

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "client.hpp"
#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/cli/cli.hpp"
#include "ensemble/cli/deployment.hpp"
#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/spawn.hpp"
#include "run_file.hpp"

namespace ensemble::cli {

namespace {

namespace asio = boost::asio;
using steady = std::chrono::steady_clock;
using millis = std::chrono::milliseconds;
using namespace std::chrono_literals;

constexpr std::string_view k_broker_ready = broker_ready_text;
constexpr std::string_view k_orchestrator_ready = orchestrator_ready_text;
constexpr std::string_view k_agent_ready = agent_ready_text;
constexpr std::size_t k_recent_lines = 20;           // kept per child for error reports
constexpr std::size_t k_max_line_bytes = 64 * 1024;  // longer "lines" are cut
constexpr auto k_services_poll = 100ms;              // while waiting for registrations
constexpr auto k_probe_deadline = 2s;
constexpr auto k_output_drain = 500ms;  // after a child exits, for a grandchild's pipe end
constexpr auto k_kill_wait = 5s;        // after SIGKILL: the kernel's turn
constexpr auto k_settle = 1s;           // an agent with no readiness condition: alive this long

struct up_options {
  std::string file;
  std::string timeout_text = "30s";
  std::string grace_text = "5s";
  std::string data;  // --data: where the broker stores streams, over the file's broker.data
  bool no_color = false;
  millis timeout{30'000};
  millis grace{5'000};
};

std::string describe_status(int status) {
  if (status >= 0) return "exited with code " + std::to_string(status);
  const int sig = -status;
  const char* text = ::strsignal(sig);
  return "was killed by signal " + std::to_string(sig) +
         (text != nullptr ? " (" + std::string(text) + ")" : std::string());
}

int decode_wait_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return -1;
}

// "KEY=VALUE" words after `marker` in a ready line.
std::map<std::string, std::string> ready_fields(const std::string& line, std::string_view marker) {
  std::map<std::string, std::string> out;
  const auto at = line.find(marker);
  if (at == std::string::npos) return out;
  std::istringstream words(line.substr(at + marker.size()));
  std::string word;
  while (words >> word) {
    const auto eq = word.find('=');
    if (eq != std::string::npos) out[word.substr(0, eq)] = word.substr(eq + 1);
  }
  return out;
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, sep)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : sep) + i;
  return out;
}

std::string format_duration(millis d) {
  if (d.count() % 1000 == 0) return std::to_string(d.count() / 1000) + "s";
  return std::to_string(d.count()) + "ms";
}

// write(2) all of it, through EINTR and short writes; a closed stdout is ignored (SIGPIPE is).
void write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const auto n = ::write(fd, text.data() + done, text.size() - done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, 100);
    } else {
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The launcher

using role = process_role;

// One process of the deployment (a replica is its own child): its plan, then its run state. It
// lives for the whole run; a restart reuses it with a new pid and a new output pipe.
struct child : planned_process {
  std::string color;

  // Current run.
  pid_t pid = -1;
  bool running = false;            // spawned and not yet finished (reaped + output drained)
  bool reaped = false;             // waitpid has returned for pid
  std::optional<int> exit_status;  // of the last run: code, or -signal
  steady::time_point started_at;
  bool ready_seen = false;
  std::string ready_line;
  std::deque<std::string> recent;
  int restarts = 0;
  bool gave_up = false;
  std::unique_ptr<asio::steady_timer> restart_timer;
  std::unique_ptr<asio::steady_timer> drain_timer;

  // The read end of the current output pipe, shared with the pending read.
  struct output {
    explicit output(asio::io_context& io, int fd) : stream(io, fd) {}
    asio::posix::stream_descriptor stream;
    std::array<char, 16384> buffer{};
    std::string partial;
    bool closed = false;
  };
  std::shared_ptr<output> out;
};

class launcher {
 public:
  launcher(deployment d, up_options o) : d_(std::move(d)), opts_(std::move(o)) {}
  ~launcher() {
    forget_endpoints();
    kill_everything();
  }
  launcher(const launcher&) = delete;
  launcher& operator=(const launcher&) = delete;

  // Resolves the programs (throws common::config_error naming what was not found and where it
  // was looked for), then runs until stopped. Returns the exit code.
  int run();

 private:
  void plan_children();

  asio::awaitable<void> main_flow();
  // Says so and returns true if a process that was started has exited before `up` was ready.
  bool report_early_exit();
  asio::awaitable<bool> start_broker(steady::time_point deadline);
  asio::awaitable<bool> start_probe(steady::time_point deadline);
  asio::awaitable<bool> start_orchestrator(steady::time_point deadline);
  asio::awaitable<bool> start_agents(steady::time_point deadline);
  asio::awaitable<void> shutdown();
  asio::awaitable<void> stop_group(const std::vector<child*>& group);

  // Waits until something changes (a line, an exit, a signal, a probe answer) or `until`;
  // returns at once if something changed since `seen`.
  asio::awaitable<void> wait_change(std::uint64_t seen, steady::time_point until);
  void notify() {
    ++changes_;
    wake_.cancel();
  }
  asio::awaitable<common::result<nlohmann::json>> probe_call(const std::string& service,
                                                             const std::string& action);

  bool launch(child& c);  // false (and says why) if it could not be started
  exec_plan plan_for(const child& c) const;
  void read_output(child& c, std::shared_ptr<child::output> out);
  void consume(child& c, const char* data, std::size_t size);
  void line(child& c, std::string text);
  void close_output(child& c);
  void on_sigchld();
  void reap(child& c, int status);
  void finished(child& c);
  void schedule_restart(child& c);
  void on_stop_signal(int sig);
  void signal_group(const child& c, int sig);
  void kill_everything();

  // The run file (run_file.hpp): written once ready, unless another running `up` owns it.
  // Returns what to say about it, after the ready line (which scripts parse the table up to).
  std::string record_endpoints();
  void forget_endpoints();

  void say(const std::string& text);    // "ensemble up: ..." on stdout
  void error(const std::string& text);  // "ensemble up: ..." on stderr
  std::string tail(const child& c) const;
  std::string prefix(const child& c) const;

  std::vector<child*> with_role(role r);
  bool any_running(const std::vector<child*>& group) const;

  deployment d_;
  up_options opts_;
  asio::io_context io_;
  asio::signal_set stop_signals_{io_};
  asio::signal_set child_signals_{io_};
  asio::steady_timer wake_{io_};
  std::uint64_t changes_ = 0;
  std::vector<std::unique_ptr<child>> children_;  // broker, orchestrator, agents in order
  std::unique_ptr<agent::agent> probe_;
  std::map<std::string, std::size_t> registered_;  // service -> workers, from the last probe
  std::string router_;
  std::string events_;
  bool color_ = false;
  std::size_t name_width_ = 0;
  bool ready_ = false;
  bool stopping_ = false;
  bool stop_requested_ = false;
  int exit_code_ = 0;
  std::filesystem::path run_file_;  // set while this `up` owns the run file
};

void launcher::plan_children() {
  std::error_code ec;
  const std::string self_exe = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  static const std::array<const char*, 9> k_palette = {"32", "33", "34", "91", "92",
                                                       "93", "94", "95", "96"};
  std::size_t next_color = 0;
  auto plan = plan_processes(d_, self_exe);
  prepare_security(d_, plan);  // secured: keys and the broker's auth file
  for (auto& p : plan) {
    auto c = std::make_unique<child>();
    static_cast<planned_process&>(*c) = std::move(p);
    switch (c->kind) {
      case role::broker:
        c->color = "36";
        break;
      case role::orchestrator:
        c->color = "35";
        break;
      case role::agent:
        c->color = k_palette[next_color++ % k_palette.size()];
        break;
    }
    name_width_ = std::max(name_width_, c->name.size());
    children_.push_back(std::move(c));
  }
}

exec_plan launcher::plan_for(const child& c) const {
  // A broker restart binds the endpoints its first run resolved, so that peers find it again.
  return command_for(c, d_, router_, events_);
}

// ----- output

std::string launcher::prefix(const child& c) const {
  std::string name = c.name;
  name.resize(name_width_, ' ');
  if (!color_) return name + " | ";
  return "\x1b[" + c.color + "m" + name + " |\x1b[0m ";
}

void launcher::say(const std::string& text) {
  write_all(STDOUT_FILENO,
            (color_ ? "\x1b[1mensemble up:\x1b[0m " : "ensemble up: ") + text + "\n");
}

void launcher::error(const std::string& text) {
  write_all(STDERR_FILENO,
            (color_ ? "\x1b[1;31mensemble up:\x1b[0m " : "ensemble up: ") + text + "\n");
}

std::string launcher::tail(const child& c) const {
  if (c.recent.empty()) return "  (" + c.name + " printed nothing)\n";
  std::string out;
  for (const auto& l : c.recent) out += "  " + c.name + " | " + l + "\n";
  return out;
}

void launcher::read_output(child& c, std::shared_ptr<child::output> out) {
  auto* raw = out.get();
  raw->stream.async_read_some(
      asio::buffer(raw->buffer),
      [this, &c, out = std::move(out)](const boost::system::error_code& ec, std::size_t n) mutable {
        if (out->closed || out != c.out) return;  // closed, or a previous run's pipe
        if (n > 0) consume(c, out->buffer.data(), n);
        if (ec) {
          close_output(c);
          return;
        }
        read_output(c, std::move(out));
      });
}

void launcher::consume(child& c, const char* data, std::size_t size) {
  auto& partial = c.out->partial;
  partial.append(data, size);
  std::size_t start = 0;
  while (true) {
    const auto newline = partial.find('\n', start);
    if (newline == std::string::npos) break;
    line(c, partial.substr(start, newline - start));
    start = newline + 1;
  }
  partial.erase(0, start);
  if (partial.size() >= k_max_line_bytes) {
    line(c, std::move(partial));
    partial.clear();
  }
}

void launcher::line(child& c, std::string text) {
  if (!text.empty() && text.back() == '\r') text.pop_back();
  if (!c.ready_seen && !c.ready_text.empty() && text.find(c.ready_text) != std::string::npos) {
    c.ready_seen = true;
    c.ready_line = text;
    notify();
  }
  write_all(STDOUT_FILENO, prefix(c) + text + "\n");
  c.recent.push_back(std::move(text));
  if (c.recent.size() > k_recent_lines) c.recent.pop_front();
}

void launcher::close_output(child& c) {
  if (!c.out || c.out->closed) return;
  if (!c.out->partial.empty()) {
    line(c, std::move(c.out->partial));
    c.out->partial.clear();
  }
  c.out->closed = true;
  boost::system::error_code ignored;
  c.out->stream.close(ignored);
  if (c.drain_timer) c.drain_timer->cancel();
  if (c.reaped && c.running) finished(c);
}

// ----- processes

bool launcher::launch(child& c) {
  try {
    // From this (main) thread, for PR_SET_PDEATHSIG: see the top of this file.
    const auto sp = common::spawn_child(plan_for(c));
    ::fcntl(sp.output_fd, F_SETFL, ::fcntl(sp.output_fd, F_GETFL) | O_NONBLOCK);  // for Asio
    c.pid = sp.pid;
    c.started_at = steady::now();
    c.running = true;
    c.reaped = false;
    c.ready_seen = false;
    c.ready_line.clear();
    c.out = std::make_shared<child::output>(io_, sp.output_fd);
    read_output(c, c.out);
    return true;
  } catch (const std::exception& e) {
    error("cannot start " + c.name + " (" + c.program + "): " + e.what());
    c.exit_status = 127;
    return false;
  }
}

void launcher::on_sigchld() {
  for (auto& c : children_) {
    if (!c->running || c->reaped) continue;
    int status = 0;
    pid_t r;
    do {
      r = ::waitpid(c->pid, &status, WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == c->pid) {
      reap(*c, decode_wait_status(status));
    } else if (r < 0 && errno == ECHILD) {
      reap(*c, -1);
    }
  }
}

void launcher::reap(child& c, int status) {
  c.reaped = true;
  c.exit_status = status;
  if (c.out && !c.out->closed) {
    // Its last lines are in the pipe: let the reader take them, unless something the child
    // started still holds the write end.
    c.drain_timer = std::make_unique<asio::steady_timer>(io_, k_output_drain);
    c.drain_timer->async_wait([this, &c](const boost::system::error_code& ec) {
      if (!ec) close_output(c);
    });
    return;
  }
  finished(c);
}

// The child has exited and its output is drained.
void launcher::finished(child& c) {
  c.running = false;
  notify();
  const auto status = c.exit_status.value_or(-1);
  if (stopping_ || !ready_) {
    // Start-up failures are reported by the start-up sequence; exits while stopping are the
    // expected outcome.
    if (stopping_) say(c.name + " stopped (" + describe_status(status) + ")");
    return;
  }
  const bool failed = status != 0;
  const auto& policy = c.spec->restart;
  std::string what = c.name + " (pid " + std::to_string(c.pid) + ") " + describe_status(status);
  if (policy.when == restart_policy::mode::on_failure && failed) {
    if (c.restarts < policy.max_restarts) {
      say(what);
      schedule_restart(c);
      return;
    }
    c.gave_up = true;
    what += "; restarted " + std::to_string(c.restarts) + " times already (max_restarts " +
            std::to_string(policy.max_restarts) + "): it stays down";
  } else if (policy.when == restart_policy::mode::on_failure) {
    what += "; not restarted (restart: on-failure, and it did not fail)";
  } else {
    what += "; it stays down (restart: never)";
  }
  if (c.kind == role::broker) {
    error(what + "; without the broker nothing works: stopping the deployment");
    exit_code_ = 1;
    stop_requested_ = true;
    notify();
    return;
  }
  error(what);
}

void launcher::schedule_restart(child& c) {
  const auto& policy = c.spec->restart;
  auto delay = policy.backoff;
  for (int i = 0; i < c.restarts && delay < policy.max_backoff; ++i) delay *= 2;
  delay = std::min(delay, policy.max_backoff);
  ++c.restarts;
  say("restarting " + c.name + " in " + format_duration(delay) + " (restart " +
      std::to_string(c.restarts) + " of " + std::to_string(policy.max_restarts) + ")");
  c.restart_timer = std::make_unique<asio::steady_timer>(io_, delay);
  c.restart_timer->async_wait([this, &c](const boost::system::error_code& ec) {
    if (ec || stopping_) return;
    if (launch(c)) {
      say(c.name + " restarted pid=" + std::to_string(c.pid));
    } else if (c.restarts < c.spec->restart.max_restarts) {
      schedule_restart(c);
    } else {
      c.gave_up = true;
      error(c.name + " could not be restarted; it stays down");
    }
  });
}

void launcher::signal_group(const child& c, int sig) {
  // Only while unreaped: then the pid (and group id) cannot have been reused.
  if (!c.running || c.reaped || c.pid <= 0) return;
  if (::kill(-c.pid, sig) != 0) ::kill(c.pid, sig);
}

void launcher::on_stop_signal(int sig) {
  if (stopping_ || stop_requested_) {
    say("received " + std::string(sig == SIGINT ? "SIGINT" : "SIGTERM") +
        " again: killing everything now");
    for (auto& c : children_) signal_group(*c, SIGKILL);
    return;
  }
  say("received " + std::string(sig == SIGINT ? "SIGINT" : "SIGTERM") + ", stopping");
  stop_requested_ = true;
  notify();
}

void launcher::kill_everything() {
  // The last resort (an exception, the destructor): nothing may outlive us.
  for (auto& c : children_) {
    if (c->running && !c->reaped && c->pid > 0) {
      ::kill(-c->pid, SIGKILL);
      ::kill(c->pid, SIGKILL);
      int status = 0;
      while (::waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
      }
      c->reaped = true;
      c->running = false;
    }
  }
}

std::vector<child*> launcher::with_role(role r) {
  std::vector<child*> out;
  for (auto& c : children_) {
    if (c->kind == r) out.push_back(c.get());
  }
  return out;
}

bool launcher::any_running(const std::vector<child*>& group) const {
  return std::any_of(group.begin(), group.end(), [](const child* c) { return c->running; });
}

// ----- waiting

asio::awaitable<void> launcher::wait_change(std::uint64_t seen, steady::time_point until) {
  if (changes_ != seen) co_return;
  wake_.expires_at(until);
  boost::system::error_code ec;
  co_await wake_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
}

asio::awaitable<common::result<nlohmann::json>> launcher::probe_call(const std::string& service,
                                                                     const std::string& action) {
  struct pending {
    explicit pending(asio::io_context& io) : timer(io, steady::time_point::max()) {}
    asio::steady_timer timer;
    std::optional<agent::call_result> answer;
  };
  auto state = std::make_shared<pending>(io_);
  probe_->call_async(service, action, agent::to_json_payload(nlohmann::json::object()),
                     k_probe_deadline, [state, &io = io_](agent::call_result r) {
                       // On the probe's I/O thread: hand the answer over to ours.
                       asio::post(io, [state, r = std::move(r)]() mutable {
                         state->answer = std::move(r);
                         state->timer.cancel();
                       });
                     });
  while (!state->answer) {
    boost::system::error_code ec;
    co_await state->timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  auto& r = *state->answer;
  if (!r) co_return r.err();
  co_return agent::from_json_payload(r->payload());
}

// ----- start-up

bool launcher::report_early_exit() {
  for (const auto& c : children_) {
    if (c->running || c->pid <= 0) continue;
    const std::string who = c->kind == role::agent ? "agent " + c->name : "the " + c->name;
    error(who + " " + describe_status(c->exit_status.value_or(-1)) +
          " during start-up; its last output:\n" + tail(*c));
    return true;
  }
  return false;
}

asio::awaitable<bool> launcher::start_broker(steady::time_point deadline) {
  auto& b = *children_.front();
  if (!launch(b)) co_return false;
  while (true) {
    const auto seen = changes_;
    if (stop_requested_) co_return false;
    if (b.ready_seen) break;
    if (!b.running) {
      // The common case: an endpoint already in use ("cannot bind ENDPOINT: REASON").
      for (const auto& l : b.recent) {
        const auto at = l.find("cannot bind ");
        if (at == std::string::npos) continue;
        const auto rest = l.substr(at + 12);
        const auto sep = rest.find(": ");
        const auto endpoint = rest.substr(0, sep);
        const auto reason = sep == std::string::npos ? std::string() : rest.substr(sep + 2);
        if (reason.find("in use") != std::string::npos) {
          error("cannot start the broker: endpoint " + endpoint +
                " is already in use (another deployment or program is bound to it); stop it or "
                "choose other endpoints in " +
                d_.file +
                " (broker.router, broker.events; "
                "tcp://127.0.0.1:* picks a free port)");
        } else {
          error("cannot start the broker: cannot bind " + endpoint + ": " + reason);
        }
        write_all(STDERR_FILENO, tail(b));
        co_return false;
      }
      error("the broker " + describe_status(b.exit_status.value_or(-1)) +
            " before it was ready; its last output:\n" + tail(b));
      co_return false;
    }
    if (steady::now() >= deadline) {
      error("the broker was not ready within " + format_duration(opts_.timeout) +
            " (no \"ensemble-broker ready\" line); its last output:\n" + tail(b));
      co_return false;
    }
    co_await wait_change(seen, deadline);
  }
  const auto fields = ready_fields(b.ready_line, k_broker_ready);
  const auto r = fields.find("router");
  const auto e = fields.find("events");
  if (r == fields.end() || e == fields.end()) {
    error("cannot read the endpoints from the broker's ready line: " + b.ready_line);
    co_return false;
  }
  router_ = r->second;
  events_ = e->second;
  co_return true;
}

asio::awaitable<bool> launcher::start_probe(steady::time_point deadline) {
  agent::options o;
  o.name = "ensemble-up-" + common::random_id().substr(0, 8);
  o.broker = router_;
  o.events = events_;
  if (!d_.keys.auth_file.empty()) {
    // Secured: the probe asks broker.services as the deployment's `user` (every right).
    o.name.clear();  // the identity's name
    o.key_file = d_.keys.secret_files.at(std::string(user_identity));
    o.broker_key = d_.keys.broker_public;
  }
  o.start_timeout =
      std::max<millis>(1000ms, std::chrono::duration_cast<millis>(deadline - steady::now()));
  // The probe's threads take no signals: SIGCHLD and the stop signals belong to this thread,
  // whose io_context handles them (and whose blocking calls are the only ones to see EINTR).
  sigset_t all;
  sigset_t previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  probe_ = std::make_unique<agent::agent>(o);
  auto started = probe_->start();
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (!started) {
    error("cannot connect to the broker at " + router_ + ": " + started.err().to_string());
    co_return false;
  }
  while (true) {
    auto pong = co_await probe_call("broker", "ping");
    if (pong) co_return true;
    if (stop_requested_) co_return false;
    if (steady::now() >= deadline) {
      error("the broker at " + router_ + " does not answer ping: " + pong.err().to_string());
      co_return false;
    }
  }
}

asio::awaitable<bool> launcher::start_orchestrator(steady::time_point deadline) {
  auto group = with_role(role::orchestrator);
  if (group.empty()) co_return true;
  auto& o = *group.front();
  if (!launch(o)) co_return false;
  while (true) {
    const auto seen = changes_;
    if (stop_requested_) co_return false;
    if (o.ready_seen) break;
    if (!o.running) {
      error("the orchestrator " + describe_status(o.exit_status.value_or(-1)) +
            " during start-up; its last output:\n" + tail(o));
      co_return false;
    }
    if (steady::now() >= deadline) {
      error("not ready within " + format_duration(opts_.timeout) +
            ": the orchestrator (no \"ensemble-orchestrator ready\" line); its last output:\n" +
            tail(o));
      co_return false;
    }
    co_await wait_change(seen, deadline);
  }
  const auto fields = ready_fields(o.ready_line, k_orchestrator_ready);
  if (auto s = fields.find("service"); s != fields.end()) o.services = {s->second};
  co_return true;
}

asio::awaitable<bool> launcher::start_agents(steady::time_point deadline) {
  auto agents = with_role(role::agent);
  for (auto* a : agents) {
    if (!launch(*a)) co_return false;
  }
  // A service is ready when at least as many workers serve it as agents declare it.
  auto required = [&] {
    std::map<std::string, std::size_t> need;
    for (auto* a : agents) {
      for (const auto& s : a->services) ++need[s];
    }
    return need;
  };
  auto missing_services = [&](const child& a) {
    const auto need = required();
    std::vector<std::string> out;
    for (const auto& s : a.services) {
      const auto have = registered_.find(s);
      if (have == registered_.end() || have->second < need.at(s)) out.push_back(s);
    }
    return out;
  };
  bool probed = false;
  while (true) {
    const auto seen = changes_;
    if (stop_requested_) co_return false;
    if (report_early_exit()) co_return false;
    bool lines_ready = true;
    for (auto* a : agents) {
      if (!a->ready_text.empty() && !a->ready_seen) lines_ready = false;
      if (a->ready_seen && a->ready_text == k_agent_ready && a->services.empty()) {
        // A scriptable agent says which services it offers.
        a->services = split(ready_fields(a->ready_line, k_agent_ready)["services"], ',');
      }
    }
    // An agent with nothing to watch for (no services, no ready line) counts as started once
    // it has kept running for k_settle: that catches the ones that die at once (bad arguments,
    // missing libraries), which is all that can be known about them.
    auto settle_at = steady::time_point::min();
    for (auto* a : agents) {
      if (a->ready_text.empty() && a->services.empty()) {
        settle_at = std::max(settle_at, a->started_at + k_settle);
      }
    }
    const bool settled = steady::now() >= settle_at;
    bool all_registered = false;
    if (lines_ready) {
      auto answer = co_await probe_call("broker", "services");
      probed = true;
      if (answer && answer->contains("services") && (*answer)["services"].is_array()) {
        registered_.clear();
        for (const auto& s : (*answer)["services"]) {
          if (!s.contains("service") || !s["service"].is_string()) continue;
          registered_[s["service"].get<std::string>()] =
              s.contains("workers") && s["workers"].is_array() ? s["workers"].size() : 0;
        }
      }
      all_registered = std::all_of(agents.begin(), agents.end(),
                                   [&](const child* a) { return missing_services(*a).empty(); });
    }
    if (lines_ready && all_registered && settled) co_return true;
    if (steady::now() >= deadline) {
      std::string what;
      for (auto* a : agents) {
        std::vector<std::string> problems;
        if (!a->ready_text.empty() && !a->ready_seen) {
          problems.push_back("no line containing \"" + a->ready_text + "\"");
        }
        if (probed) {
          const auto missing = missing_services(*a);
          if (!missing.empty()) {
            problems.push_back("service(s) not registered with the broker: " + join(missing, ", "));
          }
        }
        if (a->ready_text.empty() && a->services.empty() && !settled) {
          problems.push_back("has not been running for " + format_duration(k_settle) + " yet");
        }
        if (!problems.empty()) what += "\n  " + a->name + ": " + join(problems, "; ");
      }
      error("not ready within " + format_duration(opts_.timeout) + ":" + what);
      co_return false;
    }
    auto until = deadline;
    if (lines_ready && !all_registered) until = std::min(until, steady::now() + k_services_poll);
    if (!settled) until = std::min(until, settle_at);
    co_await wait_change(seen, until);
  }
}

asio::awaitable<void> launcher::main_flow() {
  const auto deadline = steady::now() + opts_.timeout;
  const bool up = (co_await start_broker(deadline)) && (co_await start_probe(deadline)) &&
                  (co_await start_orchestrator(deadline)) && (co_await start_agents(deadline));
  // Nothing may have died while the last check was being answered: from here on, exits go
  // to the restart policy.
  if (up && !report_early_exit()) {
    ready_ = true;
    std::ostringstream table;
    std::size_t services_width = 8;
    for (const auto& c : children_) {
      services_width = std::max(services_width, join(c->services, ",").size());
    }
    auto row = [&](const std::string& name, const std::string& pid, const std::string& services,
                   const std::string& state) {
      std::string n = name;
      std::string s = services;
      std::string p = pid;
      n.resize(std::max(name_width_, std::size_t{4}), ' ');
      p.resize(8, ' ');
      s.resize(services_width, ' ');
      table << n << "  " << p << s << "  " << state << "\n";
    };
    row("NAME", "PID", "SERVICES", "ENDPOINT / STATE");
    for (const auto& c : children_) {
      std::string state = "ready";
      if (c->kind == role::broker) {
        state = "router=" + router_ + " events=" + events_;
        if (!d_.broker.data.empty()) state += " data=" + d_.broker.data;
      }
      if (c->kind == role::orchestrator) state = "ready store=" + d_.orchestrator->store;
      row(c->name, std::to_string(c->pid), c->services.empty() ? "-" : join(c->services, ","),
          state);
    }
    write_all(STDOUT_FILENO, table.str());
    const auto recorded = record_endpoints();
    say("ready router=" + router_ + " events=" + events_);
    if (!d_.keys.auth_file.empty()) {
      say("secured (CURVE): keys and the broker's auth file in " + d_.security.keys_dir +
          "; commands of other terminals act as identity '" + std::string(user_identity) +
          "' (--key " + d_.keys.secret_files.at(std::string(user_identity)) + " --broker-key " +
          d_.keys.broker_public + ")");
    }
    say(recorded);
    while (!stop_requested_) co_await wait_change(changes_, steady::time_point::max());
  } else if (!stop_requested_) {
    exit_code_ = 1;
  }
  co_await shutdown();
}

// ----- the run file

std::string launcher::record_endpoints() {
  const auto file = run_file_path();
  try {
    if (const auto other = read_run_file(file);
        other && other->pid != ::getpid() && process_alive(other->pid)) {
      return "endpoints not recorded: " + file.string() +
             " belongs to another `ensemble up` (pid " + std::to_string(other->pid) + ", " +
             other->deployment + "); give other commands --broker " + router_ + " --events " +
             events_;
    }
  } catch (const common::config_error&) {
    // Not a run file, or unreadable: replaced below (or the write fails and says so).
  }
  try {
    run_record record{router_, events_, d_.file, ::getpid()};
    if (!d_.keys.auth_file.empty()) {
      record.key = d_.keys.secret_files.at(std::string(user_identity));
      record.broker_key = common::read_public_key(d_.keys.broker_public, "the broker's key");
    }
    write_run_file(file, record);
  } catch (const std::exception& e) {
    return std::string("endpoints not recorded: ") + e.what() + "; give other commands --broker " +
           router_ + " --events " + events_;
  }
  run_file_ = file;
  return "endpoints recorded in " + file.string() + ": `ensemble` commands run in " +
         file.parent_path().parent_path().string() + " use this deployment (until it stops)";
}

void launcher::forget_endpoints() {
  if (run_file_.empty()) return;
  remove_run_file(run_file_, ::getpid());
  run_file_.clear();
}

// ----- shutdown

asio::awaitable<void> launcher::stop_group(const std::vector<child*>& group) {
  if (!any_running(group)) co_return;
  for (auto* c : group) {
    if (c->running) {
      say("stopping " + c->name + " (pid " + std::to_string(c->pid) + ")");
      signal_group(*c, SIGTERM);
    }
  }
  auto until = steady::now() + opts_.grace;
  while (any_running(group) && steady::now() < until) {
    co_await wait_change(changes_, until);
  }
  if (!any_running(group)) co_return;
  for (auto* c : group) {
    if (c->running) {
      say(c->name + " did not stop within " + format_duration(opts_.grace) + ": SIGKILL");
      signal_group(*c, SIGKILL);
    }
  }
  until = steady::now() + k_kill_wait;
  while (any_running(group) && steady::now() < until) {
    co_await wait_change(changes_, until);
  }
}

asio::awaitable<void> launcher::shutdown() {
  stopping_ = true;
  forget_endpoints();  // from now on, other commands must not take this deployment for running
  for (auto& c : children_) {
    if (c->restart_timer) c->restart_timer->cancel();
  }
  if (probe_) {
    probe_->stop(1s);
    probe_.reset();
  }
  co_await stop_group(with_role(role::agent));
  co_await stop_group(with_role(role::orchestrator));
  co_await stop_group(with_role(role::broker));
}

int launcher::run() {
  plan_children();  // may throw config_error: nothing has started yet
  const char* no_color = std::getenv("NO_COLOR");
  const char* term = std::getenv("TERM");
  color_ = !opts_.no_color && ::isatty(STDOUT_FILENO) != 0 &&
           (no_color == nullptr || *no_color == '\0') &&
           (term == nullptr || std::string_view(term) != "dumb");
  ::signal(SIGPIPE, SIG_IGN);

  stop_signals_.add(SIGINT);
  stop_signals_.add(SIGTERM);
  child_signals_.add(SIGCHLD);
  std::function<void()> wait_stop = [this, &wait_stop] {
    stop_signals_.async_wait([this, &wait_stop](const boost::system::error_code& ec, int sig) {
      if (ec) return;
      on_stop_signal(sig);
      wait_stop();
    });
  };
  std::function<void()> wait_child = [this, &wait_child] {
    child_signals_.async_wait([this, &wait_child](const boost::system::error_code& ec, int) {
      if (ec) return;
      on_sigchld();
      wait_child();
    });
  };
  wait_stop();
  wait_child();

  say("starting " + d_.file);
  asio::co_spawn(io_, main_flow(), [this](std::exception_ptr e) {
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        error(std::string("internal error: ") + x.what());
      }
      exit_code_ = 1;
    }
    io_.stop();
  });
  io_.run();

  probe_.reset();
  forget_endpoints();
  kill_everything();
  boost::system::error_code ignored;
  stop_signals_.cancel(ignored);
  child_signals_.cancel(ignored);
  for (auto& c : children_) {
    if (c->out && !c->out->closed) {
      c->out->closed = true;
      c->out->stream.close(ignored);
    }
  }
  if (exit_code_ == 0) say("stopped");
  return exit_code_;
}

int run_up(const up_options& o) {
  deployment d;
  try {
    d = load_deployment(o.file);
  } catch (const common::config_error& e) {
    std::cerr << "ensemble up: invalid deployment: " << e.what() << "\n";
    return 2;
  }
  // Durable streams: the broker stores them where broker.data or --data says; else beside the
  // deployment when the orchestrator's store is a file, so that both outlive this `up`; else in
  // a temporary directory of this run (default_data_dir says why). The file's `streams:` reach
  // the broker as a --streams file, for this run only.
  std::filesystem::path streams_file;
  std::filesystem::path run_data;  // the temporary data directory, removed on exit
  struct remove_on_exit {
    std::filesystem::path& file;
    std::filesystem::path& dir;
    ~remove_on_exit() {
      std::error_code ignored;
      if (!file.empty()) std::filesystem::remove(file, ignored);
      if (!dir.empty()) std::filesystem::remove_all(dir, ignored);
    }
  } cleanup{streams_file, run_data};
  if (!o.data.empty()) {
    d.broker.data = std::filesystem::absolute(o.data).lexically_normal().string();
  } else if (d.broker.data.empty() && !d.streams.empty()) {
    d.broker.data = default_data_dir(d);
    if (d.broker.data.empty()) {
      std::string tmpl =
          (std::filesystem::temp_directory_path() / "ensemble-up-data-XXXXXX").string();
      if (::mkdtemp(tmpl.data()) == nullptr) {
        std::cerr << "ensemble up: cannot create a temporary data directory in "
                  << std::filesystem::temp_directory_path() << ": " << std::strerror(errno) << "\n";
        return 1;
      }
      run_data = tmpl;
      d.broker.data = tmpl;
    }
  }
  try {
    if (!d.broker.data.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(d.broker.data, ec);
      if (ec) {
        throw common::config_error(
            d.broker.where + ".data",
            "cannot create the data directory " + d.broker.data + ": " + ec.message());
      }
    }
    if (!d.streams.empty()) {
      streams_file = std::filesystem::temp_directory_path() /
                     ("ensemble-up-" + std::to_string(::getpid()) + "-streams.json");
      write_streams_file(d, streams_file.string());
      d.broker.streams_file = streams_file.string();
    }
    launcher l(std::move(d), o);
    return l.run();
  } catch (const common::config_error& e) {
    std::cerr << "ensemble up: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace

void add_up_commands(CLI::App& app, context& ctx) {
  auto opts = std::make_shared<up_options>();
  auto* up = app.add_subcommand(
      "up",
      "launch a deployment (broker, orchestrator, agents) and keep it running until SIGINT or "
      "SIGTERM; see docs/deployments.md");
  up->add_option("file", opts->file,
                 "deployment file, or a directory holding deployment.yaml (default: "
                 "./deployment.yaml)");
  up->add_option("--timeout", opts->timeout_text,
                 "how long everything may take to become ready (e.g. 30s, 1m)")
      ->capture_default_str();
  up->add_option("--grace", opts->grace_text,
                 "on stop, how long each process gets after SIGTERM before SIGKILL")
      ->capture_default_str();
  up->add_option("--data", opts->data,
                 "where the broker stores durable streams (default: broker.data; else, when "
                 "the file declares streams, .ensemble/data beside it if the orchestrator's "
                 "store is a file, or a temporary directory of this run)");
  up->add_flag("--no-color", opts->no_color, "no colours in the output (also: NO_COLOR)");
  up->callback([opts, &ctx] {
    opts->timeout = parse_duration_arg("--timeout", opts->timeout_text);
    opts->grace = parse_duration_arg("--grace", opts->grace_text);
    ctx.exit_code = run_up(*opts);
  });
}

}  // namespace ensemble::cli
