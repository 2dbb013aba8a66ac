// The broker's memory bound for a peer that does not read (docs/protocol.md section 10): a
// real ensemble-broker process, a worker that registers with a large capacity and keeps
// heartbeating but never reads its DISPATCHes, and a client that floods 1 MiB requests. What
// the broker holds is its peer budget (DISPATCHes it cannot get rid of) plus its byte-bounded
// queue; every request beyond that is answered queue_full, and the broker process's resident
// memory stays under that sum plus an allowance. A memory bound, not a timing threshold.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "registry.hpp"
#include "support/raw_peer.hpp"

namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using ensemble::test::raw_peer;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t k_mib = std::size_t{1} << 20;
constexpr std::size_t k_payload = k_mib;
constexpr std::size_t k_budget = 16 * k_mib;  // --peer-budget-bytes
constexpr std::size_t k_queue = 16 * k_mib;   // --queue-bytes-per-service and -total
constexpr int k_requests = 200;               // 200 MiB offered; without the bound all held
// Over budget + queue, the broker's own memory may grow by this much: its baseline is measured
// before the flood; this covers requests in the middle of being read and refused, libzmq's
// buffers and the allocator's slack. Without the budget the broker would hold ~200 MiB more.
constexpr std::size_t k_allowance = 48 * k_mib;

// A field of /proc/PID/status ("VmRSS", "VmHWM") in bytes; 0 if it cannot be read.
std::size_t proc_status_bytes(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::stoull(line.substr(field.size() + 1)) * 1024;  // "VmRSS:   1234 kB"
    }
  }
  return 0;
}

// How many requests of `charge` bytes fit in `limit` by the registry's rule.
std::size_t fitting(std::size_t limit, std::size_t charge) {
  return limit / charge;
}

TEST(broker_budget_test, a_worker_that_never_reads_cannot_grow_the_broker_without_bound) {
  auto broker = tk::broker_process::start({"--max-message-size", std::to_string(2 * k_mib),
                                           "--peer-budget-bytes", std::to_string(k_budget),
                                           "--queue-bytes-per-service", std::to_string(k_queue),
                                           "--queue-bytes-total", std::to_string(k_queue)});
  const pid_t pid = broker->proc().pid();
  zmq::context_t ctx(1);

  // The worker: libzmq reads at most one message ahead and the kernel buffers little, so what
  // the broker sends it stays in the broker.
  zmq::socket_t worker(ctx, zmq::socket_type::dealer);
  worker.set(zmq::sockopt::linger, 0);
  worker.set(zmq::sockopt::rcvhwm, 1);
  worker.set(zmq::sockopt::rcvbuf, 64 * 1024);
  worker.connect(broker->router());
  auto send = [&](command cmd, const header& h) {
    std::vector<zmq::message_t> frames;
    ec::build_message(frames, cmd, h);
    ASSERT_TRUE(ec::send_frames(worker, frames, zmq::send_flags::none));
  };
  header hello;
  hello.agent = "sink-worker";
  hello.services = {{"Sink", 100'000}};
  send(command::hello, hello);
  {
    std::vector<zmq::message_t> frames;
    zmq::pollitem_t item{worker.handle(), 0, ZMQ_POLLIN, 0};
    ASSERT_EQ(zmq::poll(&item, 1, 5s), 1) << "no WELCOME within 5 s";
    ASSERT_TRUE(ec::recv_frames(worker, frames));
    auto welcome = ec::parse_message(frames, 0);
    ASSERT_TRUE(welcome && welcome->cmd == command::welcome);
  }
  // From here on the worker only sends heartbeats.

  raw_peer client(ctx, broker->router());
  const std::size_t rss_before = proc_status_bytes(pid, "VmRSS");
  ASSERT_GT(rss_before, 0u) << "cannot read /proc/" << pid << "/status";

  const std::string payload(k_payload, 'x');
  for (int i = 0; i < k_requests; ++i) {
    header h;
    h.id = "r-" + std::to_string(i);
    h.service = "Sink";
    h.action = "swallow";
    h.deadline_ms = 120'000;  // nothing may expire while the test runs
    client.send(command::request, h, payload);
  }

  // The registry's arithmetic: each request charges its payload plus the header allowance; the
  // first requests go to the worker until its budget is held, the next wait until the queue's
  // bytes are, and the rest are refused.
  const std::size_t charge = k_payload + ensemble::broker::k_header_allowance;
  const auto dispatched = static_cast<int>(fitting(k_budget, charge));
  const auto queued = static_cast<int>(fitting(k_queue, charge));
  std::set<std::string> expected_full;
  for (int i = dispatched + queued; i < k_requests; ++i)
    expected_full.insert("r-" + std::to_string(i));

  std::set<std::string> full;
  const auto until = std::chrono::steady_clock::now() + 60s;  // only reached when broken
  while (full.size() < expected_full.size() && std::chrono::steady_clock::now() < until) {
    send(command::heartbeat, header{});  // alive, but not reading
    auto answer = client.next_answer(200ms);
    if (!answer) continue;
    EXPECT_EQ(answer->error_code, ec::errc::queue_full)
        << answer->id << ": " << answer->error_code << " " << answer->error_message;
    full.insert(answer->id);
  }
  EXPECT_EQ(full, expected_full);

  // What the broker says it holds.
  header stats_request;
  stats_request.id = "stats";
  stats_request.service = "broker";
  stats_request.action = "stats";
  stats_request.deadline_ms = 5000;
  client.send(command::request, stats_request);
  auto stats_reply = client.expect(command::reply);
  ASSERT_EQ(stats_reply.hdr.id, "stats");
  const json stats = json::from_msgpack(stats_reply.payload);
  EXPECT_EQ(stats["queued"], queued) << stats.dump();
  EXPECT_LE(stats["queued_bytes"].get<std::size_t>(), k_queue);
  EXPECT_GE(stats["budget_waits"].get<std::uint64_t>(), 1u);

  const std::size_t rss_after = proc_status_bytes(pid, "VmRSS");
  const std::size_t rss_peak = proc_status_bytes(pid, "VmHWM");
  const std::size_t bound = rss_before + k_budget + k_queue + k_allowance;
  std::printf(
      "broker RSS: before %zu KiB, after %zu KiB, peak %zu KiB; bound %zu KiB (before + budget "
      "%zu MiB + queue %zu MiB + allowance %zu MiB); offered %d x %zu KiB\n",
      rss_before / 1024, rss_after / 1024, rss_peak / 1024, bound / 1024, k_budget / k_mib,
      k_queue / k_mib, k_allowance / k_mib, k_requests, k_payload / 1024);
  EXPECT_LE(rss_peak, bound);
  EXPECT_LE(rss_after, bound);
  if (HasFailure()) std::cerr << "broker output:\n" << broker->proc().tail() << "\n";
}

}  // namespace
