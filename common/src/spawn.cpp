#include "ensemble/common/spawn.hpp"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

namespace ensemble::common {

namespace {

// Everything the child needs, prepared before fork(): afterwards the child of a multithreaded
// process may only make async-signal-safe calls, so nothing in run_child may allocate.
struct child_setup {
  const char* path;
  char* const* argv;
  char* const* envp;
  const char* workdir;  // nullptr: the parent's
  int stdin_fd;         // /dev/null
  int output_fd;        // write end of the stdout+stderr pipe
  int status_fd;        // write end of the CLOEXEC status pipe
  pid_t parent;
};

// What the child writes to the status pipe when it cannot exec. A successful exec closes the
// pipe (CLOEXEC) without a word: the parent reads EOF.
struct child_failure {
  spawn_step step;
  int err;
};

[[noreturn]] void run_child(const child_setup& s) {
  auto fail = [&s](spawn_step step, int err) {
    const child_failure f{step, err};
    [[maybe_unused]] auto n = ::write(s.status_fd, &f, sizeof f);
    ::_exit(127);
  };
  ::setpgid(0, 0);
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail(spawn_step::setup, errno);
  // The parent may have died before prctl took effect; then nobody would ever kill us.
  if (::getppid() != s.parent) ::_exit(127);
  // Start from a clean signal state: a blocked mask and ignored signals survive exec, and a
  // parent that blocks or ignores SIGTERM must not produce a child that cannot be stopped.
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
  }
  if (s.workdir != nullptr && ::chdir(s.workdir) != 0) fail(spawn_step::chdir, errno);
  if (::dup2(s.stdin_fd, STDIN_FILENO) < 0 || ::dup2(s.output_fd, STDOUT_FILENO) < 0 ||
      ::dup2(s.output_fd, STDERR_FILENO) < 0) {
    fail(spawn_step::setup, errno);
  }
#if defined(SYS_close_range)
  // Nothing of the parent's (sockets, epoll, other children's pipes) leaks into the child.
  ::syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */);
#endif
  ::execve(s.path, s.argv, s.envp);
  fail(spawn_step::exec, errno);
  ::_exit(127);  // not reached
}

[[noreturn]] void throw_prepare(const std::string& what, int err) {
  throw spawn_error(spawn_step::prepare, err, what + ": " + std::strerror(err));
}

// execve takes char* const[]; it writes through none of them.
std::vector<char*> c_strings(const std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (const auto& s : strings) out.push_back(const_cast<char*>(s.c_str()));
  out.push_back(nullptr);
  return out;
}

}  // namespace

spawned_child spawn_child(const spawn_plan& plan) {
  const auto argv = c_strings(plan.argv);
  const auto envp = c_strings(plan.env);

  int output[2];
  int status[2];
  if (::pipe2(output, O_CLOEXEC) != 0) throw_prepare("pipe", errno);
  if (::pipe2(status, O_CLOEXEC) != 0) {
    const int err = errno;
    ::close(output[0]);
    ::close(output[1]);
    throw_prepare("pipe", err);
  }
  const int dev_null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (dev_null < 0) {
    const int err = errno;
    for (int fd : {output[0], output[1], status[0], status[1]}) ::close(fd);
    throw_prepare("open /dev/null", err);
  }

  const child_setup setup{.path = plan.path.c_str(),
                          .argv = argv.data(),
                          .envp = envp.data(),
                          .workdir = plan.workdir.empty() ? nullptr : plan.workdir.c_str(),
                          .stdin_fd = dev_null,
                          .output_fd = output[1],
                          .status_fd = status[1],
                          .parent = ::getpid()};
  const pid_t pid = ::fork();
  if (pid == 0) run_child(setup);
  const int fork_errno = errno;
  ::close(output[1]);
  ::close(status[1]);
  ::close(dev_null);
  if (pid < 0) {
    ::close(output[0]);
    ::close(status[0]);
    throw spawn_error(spawn_step::fork, fork_errno,
                      std::string("fork: ") + std::strerror(fork_errno));
  }
  // Also set the group from here, so that a group kill cannot miss a child that has not run its
  // own setpgid yet (EACCES once it has exec'd is harmless).
  ::setpgid(pid, pid);

  child_failure failure{};
  ssize_t n;
  do {
    n = ::read(status[0], &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  ::close(status[0]);
  if (n > 0) {
    // The child reported a failure and exits with 127: reap it before throwing.
    int ignored = 0;
    while (::waitpid(pid, &ignored, 0) < 0 && errno == EINTR) {
    }
    ::close(output[0]);
    std::string what;
    switch (failure.step) {
      case spawn_step::chdir:
        what = "cannot change to directory " + plan.workdir;
        break;
      case spawn_step::exec:
        what = "cannot execute " + plan.path;
        break;
      default:
        what = "cannot set up the child process";
        break;
    }
    throw spawn_error(failure.step, failure.err, what + ": " + std::strerror(failure.err));
  }
  return {pid, output[0]};
}

}  // namespace ensemble::common
