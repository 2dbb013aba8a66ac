#pragma once
// Process plumbing for the benchmarks (bench_all.cpp).
//
// Every role of a scenario (publisher, subscriber, proxy, worker, client, broker) runs in its
// own process, so that the numbers include what a real deployment pays: TCP loopback, one
// ZeroMQ I/O thread per process, and the scheduler sharing the cores. The orchestrating
// parent starts each role by re-executing this binary with `--role <name>` (or the broker
// executable next to it), and talks to it over two pipes:
//
//   child stdout -> parent   one line per fact: "endpoint ...", "ready", "result k=v ..."
//   parent -> child stdin    commands: "go", "done <n>", "quit"
//
// stderr is inherited, so a child's errors and the broker's log reach the terminal. Every
// wait has a deadline; a child that misbehaves is killed, never waited on forever. The
// testkit's process helpers are not used on purpose: the benchmark must not depend on code
// it is not measuring, and it needs the CPU accounting (/proc/<pid>/stat) that they lack.

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace ensemble::bench {

using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The running executable, so that roles can be re-executed and the broker found beside it.
inline std::string self_exe() {
  std::vector<char> buf(4096);
  const auto n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) throw std::runtime_error("cannot read /proc/self/exe");
  return std::string(buf.data(), static_cast<std::size_t>(n));
}

// A program in the same directory as this one (all executables go to <build>/bin).
inline std::string sibling_exe(const std::string& name) {
  const std::string self = self_exe();
  return self.substr(0, self.rfind('/') + 1) + name;
}

// User + system CPU seconds of one /proc stat file (a process or a thread); 0 if gone.
inline double stat_cpu_seconds(const std::string& stat_path, std::string* comm = nullptr) {
  std::ifstream in(stat_path);
  std::string line;
  if (!std::getline(in, line)) return 0;
  // The command name is parenthesised and may contain spaces; after it, utime and stime are
  // fields 14 and 15 of the file.
  const auto open = line.find('(');
  const auto close = line.rfind(')');
  if (open == std::string::npos || close == std::string::npos) return 0;
  if (comm != nullptr) *comm = line.substr(open + 1, close - open - 1);
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::stod(field);
  }
  return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

inline double process_cpu_seconds(pid_t pid) {
  return stat_cpu_seconds("/proc/" + std::to_string(pid) + "/stat");
}

// Machine-wide CPU seconds from /proc/stat: busy (all but idle and iowait) and steal (time
// the hypervisor gave our virtual CPUs to someone else).
struct machine_cpu {
  double busy = 0;
  double steal = 0;
};
inline machine_cpu machine_cpu_seconds() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  return {(user + nice + system + irq + softirq + steal) / tick, steal / tick};
}

// CPU seconds per thread of a process, by thread id, with the thread's name.
struct thread_cpu {
  std::string comm;
  double seconds = 0;
};
inline std::map<std::string, thread_cpu> threads_cpu_seconds(pid_t pid) {
  std::map<std::string, thread_cpu> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    thread_cpu t;
    t.seconds = stat_cpu_seconds(dir + "/" + e->d_name + "/stat", &t.comm);
    out[e->d_name] = t;
  }
  ::closedir(d);
  return out;
}

// A temporary directory, removed with everything in it.
class temp_dir {
 public:
  explicit temp_dir(const std::string& what) {
    namespace fs = std::filesystem;
    std::string tmpl = (fs::temp_directory_path() / ("bench-" + what + ".XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      throw std::runtime_error("cannot create a temporary directory " + tmpl + ": " +
                               std::strerror(errno));
    }
    path_ = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path);
}

// The executable `name` would run as (a path is taken as it is), or "" if there is none.
inline std::string find_on_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = dir + "/" + name;
    if (!dir.empty() && ::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A child that exited (and is a zombie until reaped) can no longer answer.
inline bool has_exited(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return true;
  const auto close = line.rfind(')');
  return close == std::string::npos || close + 2 >= line.size() || line[close + 2] == 'Z';
}

// Parses "result a=1 b=x" (after the first word) into a map.
inline std::map<std::string, std::string> parse_fields(const std::string& line) {
  std::map<std::string, std::string> out;
  std::istringstream in(line);
  std::string word;
  in >> word;  // the line's kind
  while (in >> word) {
    const auto eq = word.find('=');
    if (eq != std::string::npos) out[word.substr(0, eq)] = word.substr(eq + 1);
  }
  return out;
}

inline double field_num(const std::map<std::string, std::string>& f, const std::string& key) {
  auto it = f.find(key);
  return it == f.end() ? 0.0 : std::stod(it->second);
}

// Reads lines from a file descriptor with a deadline per wait.
class line_reader {
 public:
  explicit line_reader(int fd) : fd_(fd) {}
  // A complete line (without '\n'), or nullopt at the deadline or at end of file.
  std::optional<std::string> next(std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (true) {
      if (auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      if (eof_) return std::nullopt;
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock_type::now());
      pollfd p{fd_, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(std::max<std::int64_t>(0, left.count())));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return std::nullopt;
      char chunk[4096];
      const auto n = ::read(fd_, chunk, sizeof chunk);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        eof_ = true;
        continue;
      }
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }
  bool eof() const { return eof_ && buffer_.find('\n') == std::string::npos; }
  int fd() const { return fd_; }

 private:
  int fd_;
  std::string buffer_;
  bool eof_ = false;
};

// One child process with pipes on its stdin and stdout.
class child {
 public:
  static std::unique_ptr<child> spawn(std::string label, const std::string& program,
                                      const std::vector<std::string>& args) {
    int to_child[2];
    int from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0 || ::pipe2(from_child, O_CLOEXEC) != 0) {
      throw std::runtime_error("pipe failed for " + label);
    }
    std::vector<std::string> argv_storage{program};
    argv_storage.insert(argv_storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_storage) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed for " + label);
    if (pid == 0) {
      // A benchmark killed half-way must not leave brokers and publishers spinning.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::dup2(to_child[0], STDIN_FILENO);
      ::dup2(from_child[1], STDOUT_FILENO);
      ::execv(program.c_str(), argv.data());
      std::fprintf(stderr, "bench: cannot exec %s: %s\n", program.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    return std::unique_ptr<child>(new child(std::move(label), pid, to_child[1], from_child[0]));
  }

  ~child() {
    if (!reaped_) {
      ::kill(pid_, SIGKILL);
      reap(2s);
    }
    if (stdin_fd_ >= 0) ::close(stdin_fd_);
    ::close(out_.fd());
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& label() const { return label_; }

  // The next line starting with `prefix` (earlier lines are skipped); throws at the deadline,
  // because a role that does not answer makes the whole scenario meaningless.
  std::string expect(std::string_view prefix, std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (true) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock_type::now());
      auto line = out_.next(std::max(0ms, left));
      if (!line) {
        throw std::runtime_error(label_ + ": no '" + std::string(prefix) + "' line within " +
                                 std::to_string(timeout.count()) + " ms" +
                                 (out_.eof() ? " (it exited)" : ""));
      }
      if (line->rfind(prefix, 0) == 0) return *line;
    }
  }

  // Like expect(), but nullopt at the deadline; for waits that do something in between.
  std::optional<std::string> try_expect(std::string_view prefix,
                                        std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (true) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock_type::now());
      auto line = out_.next(std::max(0ms, left));
      if (!line) return std::nullopt;
      if (line->rfind(prefix, 0) == 0) return line;
    }
  }

  void send_line(const std::string& line) {
    const std::string text = line + "\n";
    if (stdin_fd_ >= 0) {
      [[maybe_unused]] auto n = ::write(stdin_fd_, text.data(), text.size());
    }
  }

  double cpu_seconds() const { return reaped_ ? final_cpu_ : process_cpu_seconds(pid_); }

  // Asks the child to end (a signal, or "quit" on stdin when sig == 0), waits up to
  // `timeout`, then kills it. Returns the exit status as wait() reports it.
  int finish(int sig, std::chrono::milliseconds timeout) {
    if (reaped_) return status_;
    if (sig == 0) {
      send_line("quit");
    } else {
      ::kill(pid_, sig);
    }
    if (!reap(timeout)) {
      std::fprintf(stderr, "bench: %s did not exit within %lld ms; killing it\n", label_.c_str(),
                   static_cast<long long>(timeout.count()));
      ::kill(pid_, SIGKILL);
      reap(5s);
    }
    return status_;
  }

 private:
  child(std::string label, pid_t pid, int in_fd, int out_fd)
      : label_(std::move(label)), pid_(pid), stdin_fd_(in_fd), out_(out_fd) {
    // A child that dies must not kill us with SIGPIPE when we write its stdin.
    ::signal(SIGPIPE, SIG_IGN);
  }

  // wait4 has no timeout; a child exits within milliseconds of being asked, so polling it
  // every 2 ms against a deadline costs nothing.
  bool reap(std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (true) {
      rusage usage{};
      int status = 0;
      const pid_t r = ::wait4(pid_, &status, WNOHANG, &usage);
      if (r == pid_) {
        reaped_ = true;
        status_ = status;
        final_cpu_ = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                     static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
        return true;
      }
      if (r < 0 && errno != EINTR) {
        reaped_ = true;
        return true;
      }
      if (clock_type::now() >= deadline) return false;
      std::this_thread::sleep_for(2ms);
    }
  }

  std::string label_;
  pid_t pid_;
  int stdin_fd_;
  line_reader out_;
  bool reaped_ = false;
  int status_ = 0;
  double final_cpu_ = 0;
};

// CPU used by each process of a scenario over its measured window, and by its busiest
// thread: the evidence for "what limits it". A thread near 1.0 core is a serial bottleneck;
// a sum near the machine's core count means the machine is saturated.
class cpu_window {
 public:
  void begin(const std::vector<child*>& procs) {
    procs_ = procs;
    samples_.clear();
    sample();
  }
  // Records where every process stands now; the orchestrator calls this while it waits, so
  // that the window can end at a moment a role reports afterwards (a subscriber's last event).
  void sample() {
    snapshot s;
    s.at = clock_type::now();
    s.machine = machine_cpu_seconds();
    for (auto* p : procs_) {
      s.threads.push_back(threads_cpu_seconds(p->pid()));
      s.totals.push_back(process_cpu_seconds(p->pid()));
    }
    samples_.push_back(std::move(s));
  }
  // "pub=0.97[0.80 raw_pub] sub=..." in cores (CPU seconds per wall second) from begin() to
  // `until` (the last sample before it; default now); the bracket names the busiest thread.
  std::string end(std::optional<clock_type::time_point> until = std::nullopt) {
    sample();
    const snapshot& first = samples_.front();
    const snapshot* last = &samples_.back();
    if (until) {
      for (const auto& s : samples_) {
        if (&s != &first && s.at <= *until) last = &s;
      }
    }
    const double wall = std::chrono::duration<double>(last->at - first.at).count();
    std::string out;
    double ours = 0;
    for (std::size_t i = 0; i < procs_.size(); ++i) {
      // The process total includes threads that ended during the window.
      const double total = last->totals[i] - first.totals[i];
      ours += total;
      thread_cpu busiest;
      for (const auto& [tid, now] : last->threads[i]) {
        auto before = first.threads[i].find(tid);
        const double used =
            now.seconds - (before == first.threads[i].end() ? 0 : before->second.seconds);
        if (used > busiest.seconds) busiest = {now.comm, used};
      }
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s%s=%.2f[%.2f %s]", out.empty() ? "" : " ",
                    procs_[i]->label().c_str(), wall > 0 ? total / wall : 0.0,
                    wall > 0 ? busiest.seconds / wall : 0.0, busiest.comm.c_str());
      out += buf;
    }
    // Everything else the machine did meanwhile (other users, the orchestrator itself), and
    // the time the hypervisor took away: how noisy this window was.
    if (wall > 0) {
      others_ = std::max(0.0, (last->machine.busy - first.machine.busy - ours) / wall);
      char buf[96];
      std::snprintf(buf, sizeof buf, " | others=%.2f steal=%.2f", others_,
                    (last->machine.steal - first.machine.steal) / wall);
      out += buf;
    }
    return out;
  }
  // Cores used by everything else during the last window end() measured.
  double others() const { return others_; }

 private:
  struct snapshot {
    clock_type::time_point at;
    machine_cpu machine;
    std::vector<std::map<std::string, thread_cpu>> threads;
    std::vector<double> totals;
  };
  std::vector<child*> procs_;
  std::vector<snapshot> samples_;
  double others_ = 0;
};

// Nearest-rank percentile of nanosecond samples, in microseconds. Sorts in place.
inline double percentile_us(std::vector<std::int64_t>& ns, double p) {
  if (ns.empty()) return 0;
  std::sort(ns.begin(), ns.end());
  auto rank = static_cast<std::size_t>(p / 100.0 * static_cast<double>(ns.size()));
  if (rank >= ns.size()) rank = ns.size() - 1;
  return static_cast<double>(ns[rank]) / 1000.0;
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace ensemble::bench
