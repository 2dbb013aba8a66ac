#include "ensemble/testkit/process.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "ensemble/common/spawn.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace ensemble::testkit {

namespace {

using steady = std::chrono::steady_clock;

// A child that writes megabytes of log must not exhaust the test's memory: beyond this many
// lines the oldest are forgotten (they are rarely what a failing test needs to show).
constexpr std::size_t k_max_lines = 200'000;
// A "line" without a newline is cut here, so that binary garbage cannot grow one string forever.
constexpr std::size_t k_max_line_bytes = 1 << 20;
// Used by wait_exit only where pidfd_open is unavailable (kernels before 5.3).
constexpr auto k_exit_poll_interval = 2ms;
// How long wait_exit() waits, once the child has exited, for the rest of its output.
constexpr auto k_output_drain = 5s;
// How often a relaunch checks whether the old broker's ports are free again.
constexpr auto k_port_poll_interval = 5ms;

// Whether a tcp://HOST:PORT endpoint can be bound now (with SO_REUSEADDR, as libzmq binds).
// Other transports have no port to wait for: true.
bool endpoint_bindable(const std::string& endpoint) {
  if (endpoint.rfind("tcp://", 0) != 0) return true;
  const auto colon = endpoint.rfind(':');
  if (colon == std::string::npos || colon < 6) return true;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(std::atoi(endpoint.c_str() + colon + 1)));
  if (::inet_pton(AF_INET, endpoint.substr(6, colon - 6).c_str(), &addr.sin_addr) != 1) {
    return true;  // not an IPv4 literal: let the broker itself try
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return true;
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const bool ok = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

std::string errno_text(int err) {
  return std::strerror(err);
}

[[noreturn]] void throw_errno(const std::string& what, int err) {
  throw std::runtime_error(what + ": " + errno_text(err));
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return -1;
}

int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  const long fd = ::syscall(SYS_pidfd_open, pid, 0);
  if (fd >= 0) {
    ::fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);
    return static_cast<int>(fd);
  }
#else
  (void)pid;
#endif
  return -1;
}

// Resolves `program` the way execvp would, but in the parent: after fork() the child of a
// multithreaded process may only call async-signal-safe functions, which rules out searching
// PATH with allocations there.
std::string resolve_program(const std::string& program, const std::string& path_var) {
  if (program.empty()) throw std::runtime_error("process: empty program name");
  if (program.find('/') != std::string::npos) return program;
  std::stringstream dirs(path_var);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + program;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  throw std::runtime_error("process: '" + program + "' not found on PATH");
}

// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process. A
// child forked from a short-lived thread (std::async, a helper that starts agents in
// parallel) would be killed as soon as that thread returned. So every fork happens on this
// one thread, which lives as long as the test process; children then die with the process.
class fork_thread {
 public:
  static fork_thread& instance() {
    // Leaked on purpose: it must outlive any static that still owns a process at exit.
    static fork_thread* const instance = new fork_thread();
    return *instance;
  }

  // Runs `job` (which forks) on the dedicated thread; rethrows what it throws.
  void run(const std::function<void()>& job) {
    std::lock_guard one_at_a_time(call_mutex_);
    std::unique_lock lock(mutex_);
    job_ = &job;
    error_ = nullptr;
    done_ = false;
    changed_.notify_all();
    changed_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  fork_thread() {
    // The thread takes no process-directed signals: they belong to the test's own threads.
    sigset_t all;
    sigset_t previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    std::thread([this] { loop(); }).detach();
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  void loop() {
    std::unique_lock lock(mutex_);
    while (true) {
      changed_.wait(lock, [this] { return job_ != nullptr; });
      try {
        (*job_)();
      } catch (...) {
        error_ = std::current_exception();
      }
      job_ = nullptr;
      done_ = true;
      changed_.notify_all();
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable changed_;
  const std::function<void()>* job_ = nullptr;
  std::exception_ptr error_;
  bool done_ = false;
};

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

struct process::impl {
  pid_t pid = -1;
  std::string name;
  int output_fd = -1;         // read end of the child's stdout+stderr pipe; owned by the reader
  int stop_fd[2] = {-1, -1};  // tells the reader to drain what is left and finish
  int pidfd = -1;             // readable once the child has exited; -1 if the kernel lacks pidfd
  bool echo = false;          // ENSEMBLE_TESTKIT_ECHO: copy the child's lines to our stderr
  std::thread reader;

  // Output, filled by the reader thread.
  mutable std::mutex lines_mutex;
  std::condition_variable lines_changed;
  std::deque<std::string> lines;
  std::size_t dropped = 0;  // lines forgotten from the front (k_max_lines)
  bool output_closed = false;

  // Reaping. waitpid() happens only under this mutex, and signals are sent only under it
  // while the child is unreaped, so a pid is never signalled after it may have been reused.
  std::mutex reap_mutex;
  std::optional<int> exit_status;
  bool stopped = false;  // stopped by stop(), not yet resumed by resume()

  ~impl() {
    {
      std::lock_guard lock(reap_mutex);
      if (!exit_status && pid > 0) {
        // The whole group: whatever the child started goes with it.
        ::kill(-pid, SIGKILL);
        ::kill(pid, SIGKILL);
        int status = 0;
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        exit_status = decode_status(status);
      }
    }
    if (reader.joinable()) {
      // The child is gone, but a grandchild that escaped the group could still hold the pipe
      // open; the stop pipe makes the reader take what is buffered and finish regardless.
      const char byte = 1;
      [[maybe_unused]] auto n = ::write(stop_fd[1], &byte, 1);
      reader.join();
    }
    close_fd(output_fd);
    close_fd(stop_fd[0]);
    close_fd(stop_fd[1]);
    close_fd(pidfd);
  }

  void add_line(std::string line) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (echo) std::cerr << "[" << name << "] " << line << "\n";
    lines.push_back(std::move(line));
    if (lines.size() > k_max_lines) {
      lines.pop_front();
      ++dropped;
    }
  }

  void read_output() {
    std::string partial;
    char buffer[65536];
    auto consume = [&](const char* data, std::size_t size) {
      std::lock_guard lock(lines_mutex);
      partial.append(data, size);
      std::size_t start = 0;
      while (true) {
        const auto newline = partial.find('\n', start);
        if (newline == std::string::npos) break;
        add_line(partial.substr(start, newline - start));
        start = newline + 1;
      }
      partial.erase(0, start);
      if (partial.size() >= k_max_line_bytes) {
        add_line(std::move(partial));
        partial.clear();
      }
      lines_changed.notify_all();
    };
    auto finish = [&] {
      std::lock_guard lock(lines_mutex);
      if (!partial.empty()) add_line(std::move(partial));
      output_closed = true;
      lines_changed.notify_all();
    };

    std::array<pollfd, 2> fds{{{output_fd, POLLIN, 0}, {stop_fd[0], POLLIN, 0}}};
    while (true) {
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        break;
      }
      if ((fds[1].revents & POLLIN) != 0) {
        // Stopping: take what is already in the pipe, without waiting for more.
        ::fcntl(output_fd, F_SETFL, ::fcntl(output_fd, F_GETFL) | O_NONBLOCK);
        while (true) {
          const auto n = ::read(output_fd, buffer, sizeof buffer);
          if (n > 0) {
            consume(buffer, static_cast<std::size_t>(n));
          } else if (n < 0 && errno == EINTR) {
            continue;
          } else {
            break;
          }
        }
        break;
      }
      if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
        const auto n = ::read(output_fd, buffer, sizeof buffer);
        if (n > 0) {
          consume(buffer, static_cast<std::size_t>(n));
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        break;  // EOF: every writer (the child and anything it started) is gone
      }
    }
    finish();
  }

  // Reaps the child if it has exited (or blocks until it does, with flags 0).
  void try_reap_locked(int flags) {
    if (exit_status) return;
    int status = 0;
    pid_t r;
    do {
      r = ::waitpid(pid, &status, flags);
    } while (r < 0 && errno == EINTR);
    if (r == pid) {
      exit_status = decode_status(status);
    } else if (r < 0 && errno == ECHILD) {
      exit_status = -1;  // reaped by someone else (a SIGCHLD handler set to SIG_IGN)
    }
  }

  void send(int sig) {
    std::lock_guard lock(reap_mutex);
    try_reap_locked(WNOHANG);
    if (!exit_status) ::kill(pid, sig);
  }

  // Sends `sig` (SIGSTOP or SIGCONT) and waits for the matching state change, which waitid()
  // reports once the whole thread group has stopped (WSTOPPED) or has been continued
  // (WCONTINUED). kill() returns as soon as the signal is queued, before the threads take it.
  // No other code of the testkit waits for these notifications, so none is stolen; an exit
  // meanwhile is seen by try_reap_locked.
  // A process already in the wanted state (paused twice, resumed while running) gets the
  // signal, which changes nothing, and no new report comes: that is success at once.
  bool send_and_wait(int sig, int state, std::chrono::milliseconds deadline) {
    const auto until = steady::now() + deadline;
    const bool want_stopped = sig == SIGSTOP;
    {
      std::lock_guard lock(reap_mutex);
      try_reap_locked(WNOHANG);
      if (exit_status) return false;
      ::kill(pid, sig);
      if (stopped == want_stopped) return true;
    }
    while (true) {
      {
        std::lock_guard lock(reap_mutex);
        try_reap_locked(WNOHANG);
        if (exit_status) return false;
        siginfo_t info{};
        int r;
        do {
          r = ::waitid(P_PID, static_cast<id_t>(pid), &info, state | WNOHANG);
        } while (r < 0 && errno == EINTR);
        if (r == 0 && info.si_pid == pid) {
          stopped = want_stopped;
          return true;
        }
        if (r < 0) return false;
      }
      if (steady::now() >= until) return false;
      std::this_thread::sleep_for(k_exit_poll_interval);
    }
  }
};

process::process(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
process::~process() = default;

std::unique_ptr<process> process::spawn(process_options opts) {
  auto p = std::make_unique<impl>();
  p->name = opts.name.empty() ? base_name(opts.program) : opts.name;
  const char* echo = std::getenv("ENSEMBLE_TESTKIT_ECHO");
  p->echo = echo != nullptr && *echo != '\0' && std::string_view(echo) != "0";

  // The child's environment, path and arguments are built here: common::spawn_child execs
  // them as they are.
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    const auto eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    env[std::string(entry.substr(0, eq))] = std::string(entry.substr(eq + 1));
  }
  for (const auto& [k, v] : opts.env) env[k] = v;
  common::spawn_plan plan;
  plan.path = resolve_program(opts.program, env.count("PATH") ? env["PATH"] : "");
  plan.argv.push_back(opts.program);
  plan.argv.insert(plan.argv.end(), opts.args.begin(), opts.args.end());
  plan.env.reserve(env.size());
  for (const auto& [k, v] : env) plan.env.push_back(k + "=" + v);
  plan.workdir = opts.working_dir;

  if (::pipe2(p->stop_fd, O_CLOEXEC) != 0) throw_errno("process: pipe", errno);
  common::spawned_child child;
  try {
    fork_thread::instance().run([&] { child = common::spawn_child(plan); });
  } catch (const common::spawn_error& e) {
    switch (e.step()) {
      case common::spawn_step::prepare:
        throw std::runtime_error(std::string("process: ") + e.what());
      case common::spawn_step::fork:
        throw_errno("process: fork for " + p->name, e.error_number());
      default:
        throw std::runtime_error("process: cannot start " + p->name + ": " + e.what());
    }
  }
  p->pid = child.pid;
  p->pidfd = open_pidfd(child.pid);
  p->output_fd = child.output_fd;

  impl* raw = p.get();
  p->reader = std::thread([raw] { raw->read_output(); });
  return std::unique_ptr<process>(new process(std::move(p)));
}

pid_t process::pid() const {
  return impl_->pid;
}
const std::string& process::name() const {
  return impl_->name;
}

std::optional<std::string> process::wait_for_line(std::string_view text,
                                                  std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  std::unique_lock lock(impl_->lines_mutex);
  // Absolute line number of the next line to look at, so that each line is scanned once even
  // while old lines are being dropped from the front.
  std::size_t next = impl_->dropped;
  std::optional<std::string> found;
  auto scan = [&] {
    next = std::max(next, impl_->dropped);
    const std::size_t end = impl_->dropped + impl_->lines.size();
    for (; next < end; ++next) {
      const std::string& line = impl_->lines[next - impl_->dropped];
      if (line.find(text) != std::string::npos) {
        found = line;
        return true;
      }
    }
    return impl_->output_closed;
  };
  impl_->lines_changed.wait_until(lock, until, scan);
  return found;
}

std::vector<std::string> process::lines() const {
  std::lock_guard lock(impl_->lines_mutex);
  return {impl_->lines.begin(), impl_->lines.end()};
}

std::string process::tail(std::size_t n) const {
  std::lock_guard lock(impl_->lines_mutex);
  const auto& lines = impl_->lines;
  std::string out;
  for (std::size_t i = lines.size() > n ? lines.size() - n : 0; i < lines.size(); ++i) {
    out += lines[i];
    out += '\n';
  }
  return out;
}

void process::signal(int sig) {
  impl_->send(sig);
}
void process::kill() {
  impl_->send(SIGKILL);
}
bool process::stop(std::chrono::milliseconds deadline) {
  return impl_->send_and_wait(SIGSTOP, WSTOPPED, deadline);
}
bool process::resume(std::chrono::milliseconds deadline) {
  return impl_->send_and_wait(SIGCONT, WCONTINUED, deadline);
}

bool process::running() {
  std::lock_guard lock(impl_->reap_mutex);
  impl_->try_reap_locked(WNOHANG);
  return !impl_->exit_status;
}

std::optional<int> process::wait_exit(std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  while (true) {
    {
      std::lock_guard lock(impl_->reap_mutex);
      impl_->try_reap_locked(WNOHANG);
      if (impl_->exit_status) break;
    }
    const auto now = steady::now();
    if (now >= until) return std::nullopt;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - now);
    if (impl_->pidfd >= 0) {
      // Readable once the child has exited; the loop then reaps it.
      pollfd fd{impl_->pidfd, POLLIN, 0};
      ::poll(&fd, 1,
             static_cast<int>(std::min<std::chrono::milliseconds::rep>(
                 left.count(), std::numeric_limits<int>::max())));
    } else {
      std::this_thread::sleep_for(std::min<steady::duration>(left, k_exit_poll_interval));
    }
  }
  // The child has exited, but what it wrote last may still be in the pipe, unread by the
  // reader thread: wait for its end of output, so that tail() right after this call holds
  // every line (a refused start's error message is often the last one). A grandchild that
  // escaped the group could keep the pipe open: then this gives up after k_output_drain.
  {
    std::unique_lock lock(impl_->lines_mutex);
    impl_->lines_changed.wait_until(lock, steady::now() + k_output_drain,
                                    [this] { return impl_->output_closed; });
  }
  std::lock_guard lock(impl_->reap_mutex);
  return impl_->exit_status;
}

std::string binary_path(const std::string& name) {
  const char* dir = std::getenv("ENSEMBLE_BIN_DIR");
  const std::string base = dir != nullptr && *dir != '\0' ? dir : ENSEMBLE_BUILD_BIN_DIR;
  return base + "/" + name;
}

std::unique_ptr<broker_process> broker_process::start(std::vector<std::string> extra_args,
                                                      std::chrono::milliseconds deadline) {
  std::unique_ptr<broker_process> b(new broker_process());
  b->extra_args_ = std::move(extra_args);
  b->launch("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", deadline);
  return b;
}

void broker_process::restart(std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  if (proc_) {
    proc_->kill();
    if (!proc_->wait_exit(deadline)) {
      throw std::runtime_error("broker_process: the old broker did not die on SIGKILL:\n" +
                               proc_->tail());
    }
    proc_.reset();
  }
  launch(router_, events_,
         std::chrono::ceil<std::chrono::milliseconds>(
             std::max(until - steady::now(), steady::duration::zero())));
}

void broker_process::launch(const std::string& router, const std::string& events,
                            std::chrono::milliseconds deadline) {
  auto launched = launch_broker(
      [this](const std::string& r, const std::string& e) {
        std::vector<std::string> args{"--router", r, "--events", e};
        args.insert(args.end(), extra_args_.begin(), extra_args_.end());
        return process_options{binary_path("ensemble-broker"), args, {}, {}, "ensemble-broker"};
      },
      router, events, deadline);
  proc_ = std::move(launched.proc);
  router_ = std::move(launched.router);
  events_ = std::move(launched.events);
}

launched_broker launch_broker(const std::function<process_options(const std::string& router,
                                                                  const std::string& events)>& make,
                              const std::string& router, const std::string& events,
                              std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  constexpr std::string_view k_ready = "ensemble-broker ready ";

  while (true) {
    auto proc = process::spawn(make(router, events));
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(
        std::max(until - steady::now(), steady::duration::zero()));
    if (auto line = proc->wait_for_line(k_ready, left)) {
      launched_broker out;
      std::istringstream words(line->substr(line->find(k_ready) + k_ready.size()));
      std::string word;
      while (words >> word) {
        if (word.rfind("router=", 0) == 0) out.router = word.substr(7);
        if (word.rfind("events=", 0) == 0) out.events = word.substr(7);
      }
      if (out.router.empty() || out.events.empty()) {
        throw std::runtime_error("broker: cannot parse the ready line '" + *line + "':\n" +
                                 proc->tail());
      }
      out.proc = std::move(proc);
      return out;
    }
    // Not ready. A relaunch on concrete endpoints can race the kernel releasing the old
    // broker's port: that is the one failure worth another try while time is left.
    const auto code =
        proc->wait_exit(std::chrono::milliseconds(std::max<std::chrono::milliseconds::rep>(
            0, std::chrono::ceil<std::chrono::milliseconds>(until - steady::now()).count())));
    const std::string output = proc->tail();
    const bool bind_failed = code.has_value() && output.find("cannot bind") != std::string::npos;
    if (bind_failed) {
      // Wait for the condition itself — both ports bindable — then relaunch.
      const auto time_left = std::chrono::ceil<std::chrono::milliseconds>(until - steady::now());
      if (time_left.count() > 0 &&
          wait_until([&] { return endpoint_bindable(router) && endpoint_bindable(events); },
                     time_left, k_port_poll_interval)) {
        continue;
      }
    }
    throw std::runtime_error(
        "broker " + proc->name() + " " +
        std::string(code ? "exited with " + std::to_string(*code) : "was not ready in time") +
        " (router " + router + ", events " + events + "):\n" + output);
  }
}

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds deadline,
                std::chrono::milliseconds poll_interval) {
  const auto until = steady::now() + deadline;
  while (true) {
    if (condition()) return true;
    const auto now = steady::now();
    if (now >= until) return false;
    std::this_thread::sleep_for(std::min<steady::duration>(until - now, poll_interval));
  }
}

}  // namespace ensemble::testkit
