#pragma once
// The engine's clock: the one place the orchestrator's engine reads the time from.
//
// Two readings, both microseconds since the Unix epoch:
//   - now_us(): workflow time. Timers (waits, step timeouts, retry backoffs, workflow deadlines,
//     compensation backoffs), history timestamps, `started_us`/`ended_us`, buffered events'
//     age. A wall clock follows real time; a virtual clock moves only when told (advance()),
//     which is what lets a test skip a day-long wait in milliseconds.
//   - real_us(): real time, for what is compared with other processes' clocks (the broker's
//     journal timestamps after a restart) and for the engine's own pacing (store retries, log
//     rate limits), which must not stall while workflow time stands still.
//
// The engine is given one (orchestrator::options::clock picks which); a test of the engine can
// hand it a virtual_clock and move it itself.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>

#include "ensemble/common/clock.hpp"

namespace ensemble::orchestrator {

class clock {
 public:
  virtual ~clock() = default;
  virtual std::int64_t now_us() const = 0;
  virtual std::int64_t real_us() const {
    return static_cast<std::int64_t>(common::wall_clock_us());
  }
  // True when now_us() moves only by advance(): the engine then never sleeps towards a timer.
  virtual bool is_virtual() const = 0;
};

class wall_clock final : public clock {
 public:
  std::int64_t now_us() const override { return real_us(); }
  bool is_virtual() const override { return false; }
};

// Starts where it is told and moves only forward, only by set(). Any thread may read it.
class virtual_clock final : public clock {
 public:
  explicit virtual_clock(std::int64_t start_us) : now_(start_us) {}
  std::int64_t now_us() const override { return now_.load(std::memory_order_acquire); }
  bool is_virtual() const override { return true; }
  // Moves to `us` if that is later than now; never backwards.
  void set(std::int64_t us) {
    auto cur = now_.load(std::memory_order_relaxed);
    while (us > cur && !now_.compare_exchange_weak(cur, us, std::memory_order_acq_rel)) {
    }
  }

 private:
  std::atomic<std::int64_t> now_;
};

// `--clock`: "wall" (the default) or "virtual".
enum class clock_kind { wall, virtual_ };
std::string_view to_string(clock_kind k);
std::optional<clock_kind> parse_clock_kind(std::string_view s);

}  // namespace ensemble::orchestrator
