#pragma once
// Stop signals (SIGINT, SIGTERM) belong to a program's main thread, which waits for them with
// sigwait (agent::wait_for_shutdown_signal). Every other thread must have them blocked, or the
// kernel may deliver a signal to a library thread and the default action kills the process
// without a clean stop. Two ways to get there, one helper each:
//   - block_stop_signals() first thing in main(), before any thread exists: threads inherit it;
//   - spawn_quiet() for library threads, whatever the caller's mask is.

#include <pthread.h>
#include <signal.h>

#include <thread>
#include <utility>

namespace ensemble::common {

// The set {SIGINT, SIGTERM}.
inline sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// Blocks SIGINT and SIGTERM in the calling thread (and the threads it starts from now on).
inline void block_stop_signals() {
  const sigset_t set = stop_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

// Starts a thread with SIGINT and SIGTERM blocked, leaving the caller's mask as it was.
template <class F>
std::thread spawn_quiet(F&& f) {
  const sigset_t block = stop_signals();
  sigset_t previous;
  pthread_sigmask(SIG_BLOCK, &block, &previous);
  std::thread t(std::forward<F>(f));
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return t;
}

}  // namespace ensemble::common
