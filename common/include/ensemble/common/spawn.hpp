#pragma once
// Starting a child process that never outlives its parent: what `ensemble up` and the testkit
// both do with the programs they launch.
//
//   common::spawn_plan plan{"/usr/bin/env", {"env"}, {"A=1"}, "/tmp"};
//   auto child = common::spawn_child(plan);  // throws common::spawn_error if it cannot start
//   ... read child.output_fd until EOF, waitpid(child.pid, ...), close(child.output_fd) ...
//
// The child is put in its own process group (so that a signal to the group reaches whatever it
// starts), gets PR_SET_PDEATHSIG(SIGKILL) (so that it dies with its parent, even a SIGKILLed
// one), starts from a clean signal state, runs in `workdir`, reads /dev/null and writes stdout
// and stderr to one pipe, and inherits no other file descriptor. spawn_child returns once the
// program has been exec'd, or throws saying which step failed and why.
//
// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: call
// spawn_child from a thread that lives as long as the children may (`up` uses its main
// thread, the testkit a dedicated fork thread).

#include <sys/types.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace ensemble::common {

// A command line, ready to exec: nothing left to compute between fork and exec.
struct spawn_plan {
  std::string path;               // what to execve: no PATH lookup; relative is after the chdir
  std::vector<std::string> argv;  // including argv[0]
  std::vector<std::string> env;   // KEY=VALUE: the child's whole environment
  std::string workdir;            // empty: the parent's
};

struct spawned_child {
  pid_t pid = -1;
  int output_fd = -1;  // read end of the child's stdout+stderr pipe (blocking, CLOEXEC); yours
};

// Where starting a child failed: in the parent (prepare: pipes, /dev/null; fork), or in the
// child before its program ran (setup, chdir, exec). The child, if any, has been reaped.
enum class spawn_step { prepare, fork, setup, chdir, exec };

class spawn_error : public std::runtime_error {
 public:
  spawn_error(spawn_step step, int err, const std::string& what)
      : std::runtime_error(what), step_(step), err_(err) {}
  spawn_step step() const { return step_; }
  int error_number() const { return err_; }  // the errno of the failed call

 private:
  spawn_step step_;
  int err_;
};

// Forks and execs `plan`. Throws spawn_error whose what() is, by step: "pipe: <why>",
// "open /dev/null: <why>", "fork: <why>", "cannot set up the child process: <why>",
// "cannot change to directory <workdir>: <why>", "cannot execute <path>: <why>".
spawned_child spawn_child(const spawn_plan& plan);

}  // namespace ensemble::common
