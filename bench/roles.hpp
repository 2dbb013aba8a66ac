#pragma once
// What bench_all's roles share, whatever they talk through (libzmq, the SDK, libnats): the
// lines they send the orchestrator, the index every payload carries, how a subscriber counts
// loss and reordering, how a publisher is paced, and the command clients' result line. One
// definition, so that every scenario is measured and counted the same way.

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "harness.hpp"

namespace ensemble::bench {

constexpr auto k_reply_timeout = 10s;  // clients: a reply this late counts as lost
constexpr auto k_idle_end = 1s;        // subscriber: after "done", silence this long ends it

// One line to the orchestrator; flushed, because it waits on it.
template <class... Args>
void say(const char* fmt, Args... args) {
  std::printf(fmt, args...);
  std::printf("\n");
  std::fflush(stdout);
}

// Payloads carry their index in the first 8 bytes, so that receivers can find loss,
// duplicates and reordering, and replies can be matched to requests.
inline std::string make_payload(std::size_t size, std::uint64_t index) {
  std::string p(std::max<std::size_t>(size, sizeof index), 'x');
  std::memcpy(p.data(), &index, sizeof index);
  return p;
}
inline void stamp(std::string& payload, std::uint64_t index) {
  std::memcpy(payload.data(), &index, sizeof index);
}
inline std::uint64_t index_of(const void* data, std::size_t size) {
  std::uint64_t index = UINT64_MAX;
  if (size >= sizeof index) std::memcpy(&index, data, sizeof index);
  return index;
}

// Counts events at a subscriber: how many, first and last arrival, and whether the payload
// indexes came in order without gaps.
struct event_tally {
  std::uint64_t received = 0;
  std::uint64_t next_index = 0;
  std::uint64_t gaps = 0;          // events skipped (an index jumped ahead)
  std::uint64_t out_of_order = 0;  // an index at or below one already seen
  std::int64_t first_ns = 0;
  std::int64_t last_ns = 0;

  void add(std::uint64_t index) {
    const auto now = clock_type::now().time_since_epoch().count();
    if (received == 0) first_ns = now;
    last_ns = now;
    ++received;
    if (index == next_index) {
      ++next_index;
    } else if (index > next_index) {
      gaps += index - next_index;
      next_index = index + 1;
    } else {
      ++out_of_order;
    }
  }
  void report(const char* extra = "") const {
    const double span = static_cast<double>(last_ns - first_ns) / 1e9;
    const double rate = received > 1 && span > 0 ? static_cast<double>(received - 1) / span : 0;
    say("result received=%" PRIu64 " span_s=%.6f rate=%.1f gaps=%" PRIu64 " out_of_order=%" PRIu64
        " last_ns=%" PRId64 "%s",
        received, span, rate, gaps, out_of_order, last_ns, extra);
  }
};

// The same pacing for every publisher. With a target rate, event i is not sent before
// t0 + i / rate (checked every 16 events, so sleeps are few and bursts short); at rate 0 the
// publisher sends as fast as it can.
class pacer {
 public:
  explicit pacer(double rate) : rate_(rate), t0_(clock_type::now()) {}
  void wait_turn(std::uint64_t i) const {
    if (rate_ <= 0 || (i & 15) != 0) return;
    const auto due = t0_ + std::chrono::nanoseconds(
                               static_cast<std::int64_t>(static_cast<double>(i) * 1e9 / rate_));
    if (clock_type::now() < due) std::this_thread::sleep_until(due);
  }

 private:
  double rate_;
  clock_type::time_point t0_;
};

inline void wait_for_quit(line_reader& in) {
  while (!in.eof()) {
    auto line = in.next(1000ms);
    if (line && *line == "quit") return;
  }
}

struct latency_summary {
  double p50 = 0, p99 = 0, mean = 0;
};
inline latency_summary summarize(std::vector<std::int64_t>& ns) {
  latency_summary s;
  if (ns.empty()) return s;
  double sum = 0;
  for (auto v : ns) sum += static_cast<double>(v);
  s.mean = sum / static_cast<double>(ns.size()) / 1000.0;
  s.p50 = percentile_us(ns, 50);
  s.p99 = percentile_us(ns, 99);
  return s;
}

// Both clients print the same result line, so that the orchestrator treats them alike.
inline void report_commands(latency_summary rtt, std::size_t rtt_ok, std::size_t rtt_failed,
                            double tput, latency_summary loaded, std::size_t tput_ok,
                            std::size_t tput_failed, const std::string& first_error) {
  say("result rtt_p50=%.2f rtt_p99=%.2f rtt_mean=%.2f rtt_ok=%zu rtt_failed=%zu tput=%.1f "
      "tput_p50=%.2f tput_p99=%.2f tput_ok=%zu tput_failed=%zu first_error=%s",
      rtt.p50, rtt.p99, rtt.mean, rtt_ok, rtt_failed, tput, loaded.p50, loaded.p99, tput_ok,
      tput_failed, first_error.empty() ? "-" : first_error.c_str());
}

}  // namespace ensemble::bench
