// bench_all: raw libzmq and Ensemble side by side, in one run, over TCP loopback.
//
// Scenarios (each role its own process; see docs/benchmarks.md for the exact definitions):
//
//   events    raw PUB -> SUB direct; raw PUB -> zmq_proxy(XSUB/XPUB) -> SUB;
//             Ensemble agent::publish -> ensemble-broker -> subscriber (SDK or plain SUB)
//   commands  raw DEALER -> zmq_proxy(ROUTER/DEALER) -> DEALER echo worker;
//             Ensemble agent::call / call_async -> ensemble-broker -> echo agent
//   NATS      the same events and commands through a nats-server, with libnats (nats_peer.hpp;
//             optional: skipped, with a line saying why, when either is missing)
//
// and prints each Ensemble figure as a ratio to the raw proxy's, with the targets of the issue,
// and to NATS's. With --curve the proxy and Ensemble scenarios also run with CURVE (the proxy's
// sockets CURVE servers, the broker in secured mode), and the report adds what CURVE costs each
// of them.
// Without --role this process is the orchestrator; with --role it is one of the roles,
// re-executed from the orchestrator (harness.hpp describes the pipes between them).

#include <CLI/CLI.hpp>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/clock.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/protocol.hpp"
#include "harness.hpp"
#include "nats_peer.hpp"
#include "roles.hpp"

namespace ensemble::bench {
namespace {

constexpr std::string_view k_event_topic = "bench.event";
constexpr std::string_view k_event_prefix = "bench.";
// Publishers send this until the orchestrator says "go"; a subscriber that sees one knows its
// subscriptions (made before it) are active. A valid Ensemble topic, so it works through the
// broker too; the SDK subscriber does not need it (subscribe() waits by itself).
constexpr std::string_view k_probe_topic = "_probe";
constexpr std::string_view k_service = "Echo";
constexpr std::string_view k_action = "echo";
constexpr auto k_call_deadline = std::chrono::milliseconds(30'000);

struct options {
  // User-facing.
  bool quick = false;
  std::size_t messages = 0;   // events per run and payload size; 0: default
  std::size_t rtt_calls = 0;  // round trips with 1 in flight
  std::size_t pipelined = 0;  // requests with `window` in flight
  std::size_t window = 100;
  std::size_t warmup = 0;
  std::vector<std::size_t> sizes{64, 1024};
  int hwm = 0;        // 0: messages + 10%, so that no queue bound drops an event by design
  long journal = -1;  // the broker's --journal; -1: its default (10,000)
  int repeat = 0;
  std::string only = "all";
  double event_rate = 0;  // events/s per publisher; 0: unpaced
  std::uint32_t capacity = 100;
  std::size_t handler_threads = 1;
  bool handler_pool = false;  // echo agent: handlers on the SDK's pool instead of the I/O thread
  bool only_ensemble = false;
  int quiet_wait = -1;  // seconds to wait for an idle machine before each run; -1: default
  std::string log_level = "error";
  // The broker with durable streams (--data, --streams): bench_streams measures the event path
  // with a stream declared for other topics through these.
  std::string broker_data;
  std::string broker_streams;
  bool result_lines = false;  // one "result-events k=v ..." line per run, for bench_streams
  bool curve = false;         // also run the proxy and Ensemble scenarios with CURVE
  bool no_nats = false;
  std::string nats_server = "nats-server";
  std::string nats_path;  // set by the orchestrator: the nats-server it runs; "": no NATS runs

  // Role plumbing.
  std::string role;
  std::string endpoint;  // raw: where to connect (or bind, with --bind)
  std::string router;    // Ensemble: broker endpoints
  std::string events;
  bool bind = false;
  std::size_t size = 64;
  // CURVE: the role's own secret key file (a proxy's: the server's), and the public key (or
  // its file) of the proxy or broker a client role connects to. Empty: plain TCP.
  std::string key_file;
  std::string server_key;
};

// CURVE on a raw socket (docs/protocol.md section 12, "Connecting"), before it binds or
// connects; nothing without --key-file. A client sets the server's public key and its own pair;
// a server only its secret key, and no ZAP domain: nobody serves ZAP in a raw role, so libzmq
// lets every client with the server's public key through.
void curve_client(zmq::socket_t& s, const options& o) {
  if (o.key_file.empty()) return;
  const auto keys = common::read_curve_key_file(o.key_file, "--key-file", true);
  s.set(zmq::sockopt::curve_serverkey, common::read_public_key(o.server_key, "--server-key"));
  s.set(zmq::sockopt::curve_publickey, keys.public_key);
  s.set(zmq::sockopt::curve_secretkey, keys.secret_key);
}
void curve_server(zmq::socket_t& s, const options& o) {
  if (o.key_file.empty()) return;
  s.set(zmq::sockopt::curve_server, 1);
  s.set(zmq::sockopt::curve_secretkey,
        common::read_curve_key_file(o.key_file, "--key-file", true).secret_key);
}

// The raw scenarios send frames of the same count and size as Ensemble's, so that the
// comparison measures the broker and the SDK, not bytes on the wire. These are headers as the
// broker emits them for an event and as the SDK sends them for a request.
std::string representative_event_header() {
  common::header h;
  h.id = "9f86d081884c7d65-30d40";
  h.topic = std::string(k_event_topic);
  h.correlation_id = h.id;
  h.trace_id = h.id;
  h.seq = 200'000;
  h.ts = common::wall_clock_us();
  h.publisher = "bench-pub";
  return common::encode_header(h);
}
std::string representative_request_header() {
  common::header h;
  h.id = "9f86d081884c7d65-30d40";
  h.service = std::string(k_service);
  h.action = std::string(k_action);
  h.deadline_ms = 30'000;
  h.correlation_id = h.id;
  h.trace_id = h.id;
  return common::encode_header(h);
}

// ---------------------------------------------------------------------------------------------
// Roles: events

// Publishes probes every 5 ms until "go" arrives on stdin; returns the probes sent, or -1 if
// the orchestrator went away.
template <class Send>
long probe_until_go(line_reader& in, Send send_probe) {
  long probes = 0;
  while (true) {
    send_probe();
    ++probes;
    auto line = in.next(5ms);
    if (line && *line == "go") return probes;
    if (in.eof()) return -1;
  }
}

int role_raw_pub(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t pub(ctx, zmq::socket_type::pub);
  pub.set(zmq::sockopt::sndhwm, o.hwm);
  curve_client(pub, o);
  if (o.bind) {
    pub.bind("tcp://127.0.0.1:*");
    say("endpoint addr=%s", pub.get(zmq::sockopt::last_endpoint).c_str());
  } else {
    pub.connect(o.endpoint);
  }
  const std::string header = representative_event_header();
  std::string payload = make_payload(o.size, 0);
  auto send_event = [&](std::string_view topic) {
    pub.send(zmq::buffer(topic), zmq::send_flags::sndmore);
    pub.send(zmq::buffer(header), zmq::send_flags::sndmore);
    pub.send(zmq::buffer(payload), zmq::send_flags::none);
  };
  line_reader in(STDIN_FILENO);
  const long probes = probe_until_go(in, [&] { send_event(k_probe_topic); });
  if (probes < 0) return 1;
  const auto t0 = clock_type::now();
  const pacer pace(o.event_rate);
  for (std::uint64_t i = 0; i < o.messages; ++i) {
    pace.wait_turn(i);
    stamp(payload, i);
    send_event(k_event_topic);  // PUB never blocks: above the HWM it drops, and we count that
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  say("result sent=%zu failed=0 seconds=%.6f probes=%ld", o.messages, seconds, probes);
  wait_for_quit(in);
  pub.set(zmq::sockopt::linger, 0);
  return 0;
}

int role_raw_sub(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t sub(ctx, zmq::socket_type::sub);
  sub.set(zmq::sockopt::rcvhwm, o.hwm);
  sub.set(zmq::sockopt::subscribe, k_event_prefix);
  sub.set(zmq::sockopt::subscribe, k_probe_topic);  // after: once it arrives, both are active
  curve_client(sub, o);
  sub.connect(o.endpoint);
  line_reader in(STDIN_FILENO);
  event_tally tally;
  bool ready = false;
  std::optional<std::uint64_t> expected;
  auto quiet_since = clock_type::now();
  std::vector<zmq::message_t> frames;
  std::size_t header_bytes = 0;  // what the publisher (or the broker) really sent, for the report
  zmq::pollitem_t items[] = {{sub.handle(), 0, ZMQ_POLLIN, 0},
                             {nullptr, STDIN_FILENO, ZMQ_POLLIN, 0}};
  while (true) {
    zmq::poll(items, 2, std::chrono::milliseconds(50));
    if ((items[1].revents & ZMQ_POLLIN) != 0) {
      if (auto line = in.next(0ms); line && line->rfind("done ", 0) == 0) {
        expected = std::stoull(line->substr(5));
        quiet_since = clock_type::now();
      }
      if (in.eof()) return 1;
    }
    if ((items[0].revents & ZMQ_POLLIN) != 0) {
      for (int i = 0; i < 4096 && common::recv_frames(sub, frames); ++i) {
        if (frames.size() < 3) continue;
        if (common::as_view(frames[0]) == k_probe_topic) {
          if (!ready) say("ready");
          ready = true;
          continue;
        }
        header_bytes = frames[1].size();
        tally.add(index_of(frames[2].data(), frames[2].size()));
      }
      quiet_since = clock_type::now();
    }
    if (expected && (tally.received >= *expected || clock_type::now() - quiet_since > k_idle_end)) {
      break;
    }
  }
  say("drained");
  char extra[64];
  std::snprintf(extra, sizeof extra, " header_bytes=%zu", header_bytes);
  tally.report(extra);
  return 0;
}

int role_raw_event_proxy(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t xsub(ctx, zmq::socket_type::xsub);
  zmq::socket_t xpub(ctx, zmq::socket_type::xpub);
  xsub.set(zmq::sockopt::rcvhwm, o.hwm);
  xpub.set(zmq::sockopt::sndhwm, o.hwm);
  curve_server(xsub, o);
  curve_server(xpub, o);
  xsub.bind("tcp://127.0.0.1:*");
  xpub.bind("tcp://127.0.0.1:*");
  say("endpoints xsub=%s xpub=%s", xsub.get(zmq::sockopt::last_endpoint).c_str(),
      xpub.get(zmq::sockopt::last_endpoint).c_str());
  zmq::proxy(xsub, xpub);  // until SIGTERM
  return 0;
}

agent::options agent_options(const options& o, const char* name) {
  agent::options a;
  a.name = name;
  a.broker = o.router;
  a.events = o.events;
  a.handler_threads = o.handler_threads;
  a.inline_handlers = !o.handler_pool;
  a.key_file = o.key_file;  // secured broker: `name` is the identity the auth file gives the key
  a.broker_key = o.server_key;
  return a;
}

int role_ens_pub(const options& o) {
  agent::agent a(agent_options(o, "bench-pub"));
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "bench-pub: start: %s\n", s.err().to_string().c_str());
    return 1;
  }
  line_reader in(STDIN_FILENO);
  const std::string probe_topic(k_probe_topic);
  const std::string topic(k_event_topic);
  const long probes =
      probe_until_go(in, [&] { (void)a.publish(probe_topic, make_payload(o.size, 0)); });
  if (probes < 0) return 1;
  std::string payload = make_payload(o.size, 0);
  std::size_t failed = 0;
  const auto t0 = clock_type::now();
  const pacer pace(o.event_rate);
  for (std::uint64_t i = 0; i < o.messages; ++i) {
    pace.wait_turn(i);
    stamp(payload, i);
    // publish() waits for room when the broker falls behind; an error means the event was not
    // sent (reported, not lost). The first one says why.
    if (auto r = a.publish(topic, payload); !r && ++failed == 1) {
      std::fprintf(stderr, "bench-pub: publish %" PRIu64 ": %s\n", i, r.err().to_string().c_str());
    }
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  say("result sent=%zu failed=%zu seconds=%.6f probes=%ld", o.messages, failed, seconds, probes);
  wait_for_quit(in);
  a.stop(1s);
  return 0;
}

int role_ens_sub(const options& o) {
  agent::agent a(agent_options(o, "bench-sub"));
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "bench-sub: start: %s\n", s.err().to_string().c_str());
    return 1;
  }
  // Handlers run one at a time on the SDK's event thread; `received` is published last with
  // release order so that the main thread reads a consistent tally once it sees the count.
  event_tally tally;
  std::atomic<std::uint64_t> received{0};
  auto handler = [&](const agent::message& m) {
    tally.add(index_of(m.payload().data(), m.payload().size()));
    received.store(tally.received, std::memory_order_release);
  };
  if (auto s = a.subscribe(std::string(k_event_prefix), handler, 10s); !s) {
    std::fprintf(stderr, "bench-sub: subscribe: %s\n", s.err().to_string().c_str());
    return 1;
  }
  say("ready");
  line_reader in(STDIN_FILENO);
  std::uint64_t expected = 0;
  while (true) {
    auto line = in.next(1000ms);
    if (line && line->rfind("done ", 0) == 0) {
      expected = std::stoull(line->substr(5));
      break;
    }
    if (in.eof()) return 1;
  }
  std::uint64_t seen = received.load(std::memory_order_acquire);
  auto quiet_since = clock_type::now();
  while (seen < expected && clock_type::now() - quiet_since < k_idle_end) {
    std::this_thread::sleep_for(1ms);  // polling an atomic another thread advances
    const auto now_seen = received.load(std::memory_order_acquire);
    if (now_seen != seen) quiet_since = clock_type::now();
    seen = now_seen;
  }
  say("drained");  // before stop(): the orchestrator reads our threads' CPU while they exist
  a.stop(1s);      // joins the event thread: the tally is final and safe to read
  tally.report();
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Roles: commands

int role_raw_cmd_proxy(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t frontend(ctx, zmq::socket_type::router);
  zmq::socket_t backend(ctx, zmq::socket_type::dealer);
  for (auto* s : {&frontend, &backend}) {
    s->set(zmq::sockopt::sndhwm, o.hwm);
    s->set(zmq::sockopt::rcvhwm, o.hwm);
    curve_server(*s, o);
  }
  frontend.bind("tcp://127.0.0.1:*");
  backend.bind("tcp://127.0.0.1:*");
  say("endpoints frontend=%s backend=%s", frontend.get(zmq::sockopt::last_endpoint).c_str(),
      backend.get(zmq::sockopt::last_endpoint).c_str());
  zmq::proxy(frontend, backend);  // until SIGTERM
  return 0;
}

// Echoes every message, envelope included, so that the proxy routes it back to its client.
int role_raw_worker(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t worker(ctx, zmq::socket_type::dealer);
  curve_client(worker, o);
  worker.connect(o.endpoint);
  say("ready");
  std::vector<zmq::message_t> frames;
  while (common::recv_frames(worker, frames, zmq::recv_flags::none)) {
    common::send_frames(worker, frames, zmq::send_flags::none);
  }
  return 0;
}

int role_raw_client(const options& o) {
  zmq::context_t ctx(1);
  zmq::socket_t client(ctx, zmq::socket_type::dealer);
  curve_client(client, o);
  client.connect(o.endpoint);
  const std::string tag(common::k_protocol_tag);
  const std::uint8_t request_byte = static_cast<std::uint8_t>(common::command::request);
  const std::string header = representative_request_header();
  std::string payload = make_payload(o.size, 0);
  // [tag][command][header][payload]: the frames an Ensemble client sends.
  auto send_request = [&](std::uint64_t index) {
    stamp(payload, index);
    client.send(zmq::buffer(tag), zmq::send_flags::sndmore);
    client.send(zmq::buffer(&request_byte, 1), zmq::send_flags::sndmore);
    client.send(zmq::buffer(header), zmq::send_flags::sndmore);
    client.send(zmq::buffer(payload), zmq::send_flags::none);
  };
  std::vector<zmq::message_t> frames;
  zmq::pollitem_t item{client.handle(), 0, ZMQ_POLLIN, 0};
  // The index echoed back, or nullopt when nothing came within the timeout.
  auto receive_reply = [&]() -> std::optional<std::uint64_t> {
    if (!common::recv_frames(client, frames)) {
      if (zmq::poll(&item, 1, std::chrono::milliseconds(k_reply_timeout)) <= 0) return std::nullopt;
      if (!common::recv_frames(client, frames)) return std::nullopt;
    }
    if (frames.size() != 4) return UINT64_MAX;
    return index_of(frames[3].data(), frames[3].size());
  };

  std::size_t failed = 0;
  for (std::size_t i = 0; i < o.warmup; ++i) {
    send_request(i);
    if (!receive_reply()) return 1;
  }
  say("phase rtt begin");
  std::vector<std::int64_t> rtt;
  rtt.reserve(o.rtt_calls);
  std::size_t rtt_failed = 0;
  for (std::size_t i = 0; i < o.rtt_calls; ++i) {
    const auto t0 = clock_type::now();
    send_request(i);
    auto got = receive_reply();
    if (!got) {
      rtt_failed += o.rtt_calls - i;
      break;
    }
    if (*got != i) ++rtt_failed;
    rtt.push_back((clock_type::now() - t0).count());
  }
  say("phase rtt end");
  auto rtt_summary = summarize(rtt);

  say("phase tput begin");
  std::vector<clock_type::time_point> sent_at(o.pipelined);
  std::vector<std::int64_t> loaded;
  loaded.reserve(o.pipelined);
  std::size_t next = 0;
  std::size_t ok = 0;
  const auto t0 = clock_type::now();
  for (; next < std::min(o.window, o.pipelined); ++next) {
    sent_at[next] = clock_type::now();
    send_request(next);
  }
  std::size_t answered = 0;
  while (answered < o.pipelined) {
    auto got = receive_reply();
    if (!got) break;
    ++answered;
    const auto now = clock_type::now();
    if (*got < o.pipelined) {
      ++ok;
      loaded.push_back((now - sent_at[*got]).count());
    } else {
      ++failed;
    }
    if (next < o.pipelined) {
      sent_at[next] = clock_type::now();
      send_request(next++);
    }
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  say("phase tput end");
  failed += o.pipelined - answered;
  auto loaded_summary = summarize(loaded);
  report_commands(rtt_summary, rtt.size() - rtt_failed, rtt_failed,
                  static_cast<double>(ok) / seconds, loaded_summary, ok, failed,
                  failed > 0 ? "lost_or_garbled" : "");
  client.set(zmq::sockopt::linger, 0);
  return 0;
}

int role_ens_worker(const options& o) {
  agent::agent a(agent_options(o, "bench-worker"));
  a.handle(std::string(k_service), std::string(k_action),
           [](const agent::message& m) -> agent::handler_result { return m.payload(); });
  a.set_capacity(std::string(k_service), o.capacity);
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "bench-worker: start: %s\n", s.err().to_string().c_str());
    return 1;
  }
  say("ready");
  line_reader in(STDIN_FILENO);
  wait_for_quit(in);
  a.stop(1s);
  return 0;
}

// call_async pipelining: `window` calls are started, and each completion (on the SDK's I/O
// thread) starts the next one, as the SDK intends callbacks to pipeline.
class call_pipeline {
 public:
  call_pipeline(agent::agent& a, std::size_t total, std::size_t size)
      : agent_(a), total_(total), size_(size), sent_at_(total), latency_ns_(total, -1) {}

  double run(std::size_t window) {
    const auto t0 = clock_type::now();
    for (std::size_t i = 0; i < window && i < total_; ++i) issue(next_.fetch_add(1));
    auto done = all_done_.get_future();
    if (done.wait_for(k_call_deadline + 10s) != std::future_status::ready) {
      giving_up_ = true;  // late callbacks must not start more calls
      return 0;
    }
    return std::chrono::duration<double>(last_ - t0).count();
  }
  std::size_t ok() const { return ok_.load(); }
  std::size_t failed() const { return total_ - ok_.load(); }
  std::string first_error() {
    std::lock_guard lock(mutex_);
    return first_error_;
  }
  std::vector<std::int64_t> latencies() const {
    std::vector<std::int64_t> out;
    for (auto v : latency_ns_) {
      if (v >= 0) out.push_back(v);
    }
    return out;
  }

 private:
  void issue(std::size_t i) {
    if (i >= total_) return;
    if (giving_up_) {
      // Never sent: counted as failed without a call, so that the run still completes.
      complete(clock_type::now());
      return;
    }
    sent_at_[i] = clock_type::now();
    agent_.call_async(std::string(k_service), std::string(k_action), make_payload(size_, i),
                      k_call_deadline,
                      [this, i](agent::call_result r) { on_reply(i, std::move(r)); });
  }
  void on_reply(std::size_t i, agent::call_result r) {
    const auto now = clock_type::now();
    if (r && index_of(r->payload().data(), r->payload().size()) == i) {
      latency_ns_[i] = (now - sent_at_[i]).count();
      ok_.fetch_add(1);
    } else {
      // The agent is stopping: a refused call_async answers at once on this thread, so
      // issuing more would recurse through every remaining call.
      if (!r && r.err().code == common::errc::broker_lost) giving_up_ = true;
      std::lock_guard lock(mutex_);
      if (first_error_.empty()) first_error_ = r ? std::string("wrong_payload") : r.err().code;
    }
    issue(next_.fetch_add(1));
    complete(now);
  }
  void complete(clock_type::time_point now) {
    if (completed_.fetch_add(1) + 1 == total_) {
      last_ = now;
      all_done_.set_value();
    }
  }

  agent::agent& agent_;
  std::size_t total_;
  std::size_t size_;
  std::vector<clock_type::time_point> sent_at_;
  std::vector<std::int64_t> latency_ns_;
  std::atomic<std::size_t> next_{0};
  std::atomic<std::size_t> completed_{0};
  std::atomic<std::size_t> ok_{0};
  std::atomic<bool> giving_up_{false};
  clock_type::time_point last_;
  std::promise<void> all_done_;
  std::mutex mutex_;
  std::string first_error_;
};

int role_ens_client(const options& o) {
  agent::agent a(agent_options(o, "bench-client"));
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "bench-client: start: %s\n", s.err().to_string().c_str());
    return 1;
  }
  const std::string service(k_service);
  const std::string action(k_action);
  std::string first_error;
  for (std::size_t i = 0; i < o.warmup; ++i) {
    auto r = a.call(service, action, make_payload(o.size, i), k_call_deadline);
    if (!r) {
      std::fprintf(stderr, "bench-client: warm-up call: %s\n", r.err().to_string().c_str());
      return 1;
    }
  }
  say("phase rtt begin");
  std::vector<std::int64_t> rtt;
  rtt.reserve(o.rtt_calls);
  std::size_t rtt_failed = 0;
  for (std::size_t i = 0; i < o.rtt_calls; ++i) {
    auto payload = make_payload(o.size, i);  // built outside the timed span, as the raw client's
    const auto t0 = clock_type::now();
    auto r = a.call(service, action, std::move(payload), k_call_deadline);
    const auto t1 = clock_type::now();
    if (!r || index_of(r->payload().data(), r->payload().size()) != i) {
      ++rtt_failed;
      if (first_error.empty()) first_error = r ? "wrong_payload" : r.err().code;
      continue;
    }
    rtt.push_back((t1 - t0).count());
  }
  say("phase rtt end");
  auto rtt_summary = summarize(rtt);

  say("phase tput begin");
  call_pipeline pipeline(a, o.pipelined, o.size);
  const double seconds = pipeline.run(o.window);
  say("phase tput end");
  auto loaded = pipeline.latencies();
  auto loaded_summary = summarize(loaded);
  if (first_error.empty()) first_error = pipeline.first_error();
  report_commands(rtt_summary, rtt.size(), rtt_failed,
                  seconds > 0 ? static_cast<double>(pipeline.ok()) / seconds : 0, loaded_summary,
                  pipeline.ok(), pipeline.failed(), first_error);
  a.stop(1s);
  return 0;
}

int run_role(const options& o) {
  common::set_log_level(o.log_level);
  // Names the role's threads (the SDK's inherit it) so that `perf report --sort comm` and
  // `top -H` tell the roles apart.
  ::prctl(PR_SET_NAME, o.role.c_str());
  if (o.role == "raw_pub") return role_raw_pub(o);
  if (o.role == "raw_sub") return role_raw_sub(o);
  if (o.role == "raw_event_proxy") return role_raw_event_proxy(o);
  if (o.role == "ens_pub") return role_ens_pub(o);
  if (o.role == "ens_sub") return role_ens_sub(o);
  if (o.role == "raw_cmd_proxy") return role_raw_cmd_proxy(o);
  if (o.role == "raw_worker") return role_raw_worker(o);
  if (o.role == "raw_client") return role_raw_client(o);
  if (o.role == "ens_worker") return role_ens_worker(o);
  if (o.role == "ens_client") return role_ens_client(o);
  if (o.role.rfind("nats_", 0) == 0) {
    return run_nats_role(o.role, {.url = o.endpoint,
                                  .size = o.size,
                                  .messages = o.messages,
                                  .rtt_calls = o.rtt_calls,
                                  .pipelined = o.pipelined,
                                  .window = o.window,
                                  .warmup = o.warmup,
                                  .event_rate = o.event_rate,
                                  .hwm = o.hwm});
  }
  std::fprintf(stderr, "bench: unknown role '%s'\n", o.role.c_str());
  return 2;
}

// ---------------------------------------------------------------------------------------------
// Orchestrator

constexpr auto k_start_timeout = 15s;
constexpr auto k_run_timeout = 300s;

// --curve: the key pairs and the broker's auth file of one bench run, in a private temporary
// directory that goes away with it. The raw proxy and the broker are CURVE servers with a key
// pair each; each client role has one key pair, which its raw and its Ensemble variant both use,
// and which the auth file makes an identity with exactly the rights that role needs. The
// orchestrator reads the broker's counters as one more identity, allowed `broker.stats` only.
class curve_setup {
 public:
  curve_setup() {
    if (!common::curve_available()) {
      throw std::runtime_error("--curve: this libzmq was built without CURVE");
    }
    std::string path = (std::filesystem::temp_directory_path() / "bench_all-curve-XXXXXX").string();
    if (::mkdtemp(path.data()) == nullptr) {
      throw std::runtime_error("--curve: cannot create a temporary directory " + path + ": " +
                               std::strerror(errno));
    }
    dir_ = path;
    for (const char* name : {"proxy", "broker", "bench-pub", "bench-sub", "bench-worker",
                             "bench-client", "bench-stats"}) {
      common::write_curve_key_files(dir_, name, common::generate_curve_keys());
    }
    // Public keys are given as certificate files, relative to the auth file.
    const std::string event_prefix(k_event_prefix);
    const std::string probe_topic(k_probe_topic);
    const std::string service(k_service);
    std::ofstream auth(auth_file());
    auth << "identities:\n"
         << "  bench-pub:\n    keys: [bench-pub.key]\n"
         << "    publish: [\"" << event_prefix << "\", \"" << probe_topic << "\"]\n"
         << "  bench-sub:  # the SDK subscriber, and the plain SUB that waits for a probe\n"
         << "    keys: [bench-sub.key]\n"
         << "    subscribe: [\"" << event_prefix << "\", \"" << probe_topic << "\"]\n"
         << "  bench-worker:\n    keys: [bench-worker.key]\n    offer: [" << service << "]\n"
         << "  bench-client:\n    keys: [bench-client.key]\n"
         << "    call: [" << service << "." << k_action << "]\n"
         << "  bench-stats:\n    keys: [bench-stats.key]\n    admin: [stats]\n";
    auth.close();
    if (!auth) throw std::runtime_error("--curve: cannot write " + auth_file());
  }
  ~curve_setup() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  curve_setup(const curve_setup&) = delete;
  curve_setup& operator=(const curve_setup&) = delete;

  // A proxy role's options: its server key.
  std::vector<std::string> server_args(const std::string& server) const {
    return {"--key-file", secret_file(server)};
  }
  // A client role's options: its own key and the public key of `server` (proxy or broker).
  std::vector<std::string> client_args(const std::string& role, const std::string& server) const {
    return {"--key-file", secret_file(role), "--server-key", public_file(server)};
  }
  std::vector<std::string> broker_args() const {
    return {"--curve-key", secret_file("broker"), "--auth", auth_file()};
  }
  // Makes `s` a CURVE client of the broker as the bench-stats identity.
  void stats_client(zmq::socket_t& s) const {
    const auto keys = common::read_curve_key_file(secret_file("bench-stats"), "--curve", true);
    s.set(zmq::sockopt::curve_serverkey, common::read_public_key(public_file("broker"), "--curve"));
    s.set(zmq::sockopt::curve_publickey, keys.public_key);
    s.set(zmq::sockopt::curve_secretkey, keys.secret_key);
  }

 private:
  std::string secret_file(const std::string& name) const {
    return dir_ + "/" + name + ".key_secret";
  }
  std::string public_file(const std::string& name) const { return dir_ + "/" + name + ".key"; }
  std::string auth_file() const { return dir_ + "/auth.yaml"; }

  std::string dir_;
};

// The CURVE options of a role, or none for a plain run.
std::vector<std::string> client_keys(const curve_setup* curve, const std::string& role,
                                     const std::string& server) {
  return curve != nullptr ? curve->client_args(role, server) : std::vector<std::string>{};
}

std::unique_ptr<child> spawn_role(const options& o, const std::string& label,
                                  const std::string& role, std::vector<std::string> args) {
  args.insert(args.begin(),
              {"--role", role, "--log-level", o.log_level, "--size", std::to_string(o.size),
               "--hwm", std::to_string(o.hwm), "--event-rate", std::to_string(o.event_rate)});
  return child::spawn(label, self_exe(), args);
}

struct broker_handle {
  std::unique_ptr<child> proc;
  std::string router;
  std::string events;
};

broker_handle start_broker(const options& o, const curve_setup* curve) {
  broker_handle b;
  std::vector<std::string> args{
      "--router",    "tcp://127.0.0.1:*",
      "--events",    "tcp://127.0.0.1:*",
      "--log-level", o.log_level == "error" ? "warn" : o.log_level,
      "--event-hwm", std::to_string(o.hwm),
      "--journal",   o.journal < 0 ? std::string("10000") : std::to_string(o.journal)};
  if (!o.broker_data.empty()) args.insert(args.end(), {"--data", o.broker_data});
  if (!o.broker_streams.empty()) args.insert(args.end(), {"--streams", o.broker_streams});
  if (curve != nullptr) {
    const auto secured = curve->broker_args();
    args.insert(args.end(), secured.begin(), secured.end());
  }
  b.proc = child::spawn("broker", sibling_exe("ensemble-broker"), args);
  auto fields = parse_fields(b.proc->expect("ensemble-broker ready", k_start_timeout));
  b.router = fields["router"];
  b.events = fields["events"];
  return b;
}

// The broker's own counters (service "broker", action "stats"), to locate any loss.
nlohmann::json broker_stats(const std::string& router, const curve_setup* curve) {
  zmq::context_t ctx(1);
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  if (curve != nullptr) curve->stats_client(s);
  s.connect(router);
  std::vector<zmq::message_t> frames;
  common::header h;
  h.id = "bench-stats";
  h.service = "broker";
  h.action = "stats";
  h.deadline_ms = 5000;
  common::build_message(frames, common::command::request, h);
  common::send_frames(s, frames, zmq::send_flags::none);
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  if (zmq::poll(&item, 1, std::chrono::milliseconds(5000)) <= 0) return {};
  if (!common::recv_frames(s, frames) || frames.size() < 4) return {};
  const auto* p = static_cast<const std::uint8_t*>(frames[3].data());
  return nlohmann::json::from_msgpack(p, p + frames[3].size(), true, false);
}

std::uint64_t stat_u64(const nlohmann::json& j, const char* key) {
  return j.is_object() && j.contains(key) ? j[key].get<std::uint64_t>() : 0;
}

// Waits for a line from `c`, sampling CPU every 50 ms meanwhile.
std::string wait_sampling(child& c, std::string_view prefix, cpu_window& cpu) {
  const auto deadline = clock_type::now() + k_run_timeout;
  while (clock_type::now() < deadline) {
    if (auto line = c.try_expect(prefix, 50ms)) return *line;
    cpu.sample();
  }
  return c.expect(prefix, 0ms);  // throws, naming the role
}

enum class event_kind { raw_direct, raw_proxy, ensemble_sdk, ensemble_plain, nats };
constexpr int k_event_kinds = 5;
constexpr int k_command_kinds = 3;
bool is_raw(event_kind k) {
  return k == event_kind::raw_direct || k == event_kind::raw_proxy;
}
enum class command_kind { raw_proxy, ensemble, nats };

// A nats-server of its own for one run, with limits that do not drop by design (nats_peer.hpp).
nats_server start_nats_for_run(const options& o) {
  return start_nats({.path = o.nats_path, .version = {}},
                    {.max_pending = nats_max_pending(o.hwm, o.size), .write_deadline = "60s"});
}

struct event_run {
  double sent = 0, failed = 0, received = 0, rate = 0, publish_rate = 0, gaps = 0, out_of_order = 0;
  // Events the publisher was told went out (sent - failed) that the subscriber never got:
  // silent loss. A failed publish was reported to its caller and is not counted here.
  double lost() const { return sent - failed - received; }
  double broker_in = -1;    // Ensemble: events the broker received (stats delta, probes removed)
  double header_bytes = 0;  // header frame size seen by a plain SUB (0: SDK subscriber)
  std::string cpu;
  double others = 0;  // cores other processes used meanwhile
};

struct command_run {
  double rtt_p50 = 0, rtt_p99 = 0, rtt_mean = 0, rtt_failed = 0;
  double tput = 0, tput_p50 = 0, tput_p99 = 0, tput_failed = 0;
  std::string first_error, cpu_rtt, cpu_tput;
  double others = 0;  // cores other processes used meanwhile (the larger of the two phases)
};

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// `curve`: the run's keys for a CURVE run (not for raw_direct), or nullptr for plain TCP.
event_run run_events(const options& o, event_kind kind, const curve_setup* curve) {
  const std::vector<std::string> count{"--messages", std::to_string(o.messages)};
  std::unique_ptr<child> middle;  // the proxy or the broker
  std::unique_ptr<child> pub;
  std::unique_ptr<child> sub;
  std::string router;
  bool sub_ready = false;
  nlohmann::json before;
  std::optional<nats_server> nats;
  if (kind == event_kind::raw_direct) {
    pub = spawn_role(o, "pub", "raw_pub", std::vector<std::string>{"--bind"} + count);
    const auto endpoint = parse_fields(pub->expect("endpoint", k_start_timeout))["addr"];
    sub = spawn_role(o, "sub", "raw_sub", {"--endpoint", endpoint});
  } else if (kind == event_kind::raw_proxy) {
    middle =
        spawn_role(o, "proxy", "raw_event_proxy",
                   curve != nullptr ? curve->server_args("proxy") : std::vector<std::string>{});
    auto f = parse_fields(middle->expect("endpoints", k_start_timeout));
    sub = spawn_role(o, "sub", "raw_sub",
                     std::vector<std::string>{"--endpoint", f["xpub"]} +
                         client_keys(curve, "bench-sub", "proxy"));
    pub = spawn_role(o, "pub", "raw_pub",
                     std::vector<std::string>{"--endpoint", f["xsub"]} + count +
                         client_keys(curve, "bench-pub", "proxy"));
  } else if (kind == event_kind::nats) {
    nats = start_nats_for_run(o);
    middle = std::move(nats->proc);
    sub = spawn_role(o, "sub", "nats_sub", {"--endpoint", nats->url});
    sub->expect("ready", k_start_timeout);  // subscribed, and the server answered a PING after it
    sub_ready = true;
    pub =
        spawn_role(o, "pub", "nats_pub", std::vector<std::string>{"--endpoint", nats->url} + count);
  } else {
    auto b = start_broker(o, curve);
    middle = std::move(b.proc);
    router = b.router;
    const std::vector<std::string> eps{"--router", b.router, "--events", b.events};
    const auto sub_keys = client_keys(curve, "bench-sub", "broker");
    if (kind == event_kind::ensemble_sdk) {
      sub = spawn_role(o, "sub", "ens_sub", eps + sub_keys);
      sub->expect("ready", k_start_timeout);  // subscribe() returned: the broker fans out to it
      sub_ready = true;
    } else {
      sub = spawn_role(o, "sub", "raw_sub",
                       std::vector<std::string>{"--endpoint", b.events} + sub_keys);
    }
    before = broker_stats(router, curve);
    pub = spawn_role(o, "pub", "ens_pub", eps + count + client_keys(curve, "bench-pub", "broker"));
  }
  if (!sub_ready) sub->expect("ready", k_start_timeout);  // a probe got through

  std::vector<child*> procs{pub.get()};
  if (middle) procs.push_back(middle.get());
  procs.push_back(sub.get());
  cpu_window cpu;
  cpu.begin(procs);
  pub->send_line("go");
  auto pf = parse_fields(wait_sampling(*pub, "result", cpu));
  // The subscriber waits for the events that went out; a failed publish never did.
  sub->send_line("done " + std::to_string(static_cast<std::uint64_t>(field_num(pf, "sent") -
                                                                     field_num(pf, "failed"))));
  wait_sampling(*sub, "drained", cpu);
  auto sf = parse_fields(sub->expect("result", k_run_timeout));
  event_run run;
  // The window ends at the last event the subscriber got, not after its idle wait for events
  // that never came (steady_clock is the same clock in every process).
  run.cpu = cpu.end(clock_type::time_point(
      clock_type::duration(static_cast<std::int64_t>(field_num(sf, "last_ns")))));
  run.others = cpu.others();

  run.sent = field_num(pf, "sent");
  run.failed = field_num(pf, "failed");
  run.publish_rate = run.sent / std::max(1e-9, field_num(pf, "seconds"));
  run.received = field_num(sf, "received");
  run.rate = field_num(sf, "rate");
  run.gaps = field_num(sf, "gaps");
  run.header_bytes = field_num(sf, "header_bytes");
  run.out_of_order = field_num(sf, "out_of_order");
  if (!router.empty()) {
    const auto after = broker_stats(router, curve);
    run.broker_in = static_cast<double>(stat_u64(after, "events") - stat_u64(before, "events")) -
                    field_num(pf, "probes");
  }
  pub->finish(0, 5s);
  sub->finish(0, 5s);
  if (middle) middle->finish(SIGTERM, 5s);
  if (nats) {
    if (const auto n = nats_slow_consumer_reports(*nats); n > 0) {
      std::printf("  nats-server logged %zu slow consumer report(s) in this run\n", n);
    }
  }
  return run;
}

command_run run_commands(const options& o, command_kind kind, const curve_setup* curve) {
  const std::vector<std::string> load{
      "--rtt-calls", std::to_string(o.rtt_calls), "--pipelined", std::to_string(o.pipelined),
      "--window",    std::to_string(o.window),    "--warmup",    std::to_string(o.warmup)};
  std::unique_ptr<child> middle;
  std::unique_ptr<child> worker;
  std::unique_ptr<child> client;
  std::string router;
  std::optional<nats_server> nats;
  if (kind == command_kind::raw_proxy) {
    middle =
        spawn_role(o, "proxy", "raw_cmd_proxy",
                   curve != nullptr ? curve->server_args("proxy") : std::vector<std::string>{});
    auto f = parse_fields(middle->expect("endpoints", k_start_timeout));
    worker = spawn_role(o, "worker", "raw_worker",
                        std::vector<std::string>{"--endpoint", f["backend"]} +
                            client_keys(curve, "bench-worker", "proxy"));
    worker->expect("ready", k_start_timeout);
    // The warm-up round trips wait until the worker's connection is up: no race to lose.
    client = spawn_role(o, "client", "raw_client",
                        std::vector<std::string>{"--endpoint", f["frontend"]} + load +
                            client_keys(curve, "bench-client", "proxy"));
  } else if (kind == command_kind::nats) {
    nats = start_nats_for_run(o);
    middle = std::move(nats->proc);
    worker = spawn_role(o, "worker", "nats_echo", {"--endpoint", nats->url});
    // Subscribed, and the server answered a PING sent after the subscriptions.
    worker->expect("ready", k_start_timeout);
    client = spawn_role(o, "client", "nats_client",
                        std::vector<std::string>{"--endpoint", nats->url} + load);
  } else {
    auto b = start_broker(o, curve);
    middle = std::move(b.proc);
    router = b.router;
    const std::vector<std::string> eps{"--router", b.router, "--events", b.events};
    std::vector<std::string> worker_args{"--capacity", std::to_string(o.capacity),
                                         "--handler-threads", std::to_string(o.handler_threads)};
    if (o.handler_pool) worker_args.push_back("--handler-pool");
    worker = spawn_role(o, "worker", "ens_worker",
                        eps + worker_args + client_keys(curve, "bench-worker", "broker"));
    worker->expect("ready", k_start_timeout);  // start() returned: registered with the broker
    client = spawn_role(o, "client", "ens_client",
                        eps + load + client_keys(curve, "bench-client", "broker"));
  }
  command_run run;
  cpu_window cpu;
  const std::vector<child*> procs{client.get(), middle.get(), worker.get()};
  client->expect("phase rtt begin", k_run_timeout);
  cpu.begin(procs);
  client->expect("phase rtt end", k_run_timeout);
  run.cpu_rtt = cpu.end();
  run.others = cpu.others();
  client->expect("phase tput begin", k_run_timeout);
  cpu.begin(procs);
  client->expect("phase tput end", k_run_timeout);
  run.cpu_tput = cpu.end();
  run.others = std::max(run.others, cpu.others());
  auto f = parse_fields(client->expect("result", k_run_timeout));
  run.rtt_p50 = field_num(f, "rtt_p50");
  run.rtt_p99 = field_num(f, "rtt_p99");
  run.rtt_mean = field_num(f, "rtt_mean");
  run.rtt_failed = field_num(f, "rtt_failed");
  run.tput = field_num(f, "tput");
  run.tput_p50 = field_num(f, "tput_p50");
  run.tput_p99 = field_num(f, "tput_p99");
  run.tput_failed = field_num(f, "tput_failed");
  run.first_error = f["first_error"];
  client->finish(0, 10s);
  if (kind == command_kind::raw_proxy) {
    worker->finish(SIGTERM, 5s);
  } else {
    worker->finish(0, 5s);
  }
  middle->finish(SIGTERM, 5s);
  return run;
}

// ---------------------------------------------------------------------------------------------
// Report

std::string thousands(double v) {
  const auto n = static_cast<long long>(std::llround(v));
  std::string digits = std::to_string(n < 0 ? -n : n);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string size_label(std::size_t size) {
  return size % 1024 == 0 ? std::to_string(size / 1024) + " KiB" : std::to_string(size) + " B";
}

std::string fixed(double v, int digits = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string ratio(double ens, double raw) {
  return raw > 0 ? fixed(ens / raw, 2) + "x" : "-";
}

// One table row: a label column, value columns of the given width, then free text.
void print_row(const std::string& size, const std::string& metric,
               const std::vector<std::string>& values, int width, const std::string& target,
               const std::string& verdict) {
  std::printf("%-6s %-27s", size.c_str(), metric.c_str());
  for (const auto& v : values) std::printf(" %*s", width, v.c_str());
  std::printf("  %-10s %s\n", target.c_str(), verdict.c_str());
}

struct event_series {
  std::vector<event_run> runs;
  bool empty() const { return runs.empty(); }
  double rate() const {
    std::vector<double> v;
    for (const auto& r : runs) v.push_back(r.rate);
    return median(v);
  }
  double lost() const {
    double n = 0;
    for (const auto& r : runs) n += r.lost();
    return n;
  }
  double failed() const {
    double n = 0;
    for (const auto& r : runs) n += r.failed;
    return n;
  }
  double sent() const {
    double n = 0;
    for (const auto& r : runs) n += r.sent;
    return n;
  }
};

struct command_series {
  std::vector<command_run> runs;
  bool empty() const { return runs.empty(); }
  template <class F>
  double med(F f) const {
    std::vector<double> v;
    for (const auto& r : runs) v.push_back(f(r));
    return median(v);
  }
  double failed() const {
    double n = 0;
    for (const auto& r : runs) n += r.rtt_failed + r.tput_failed;
    return n;
  }
};

void print_event_line(const char* name, std::size_t size, int rep, const event_run& r) {
  std::printf(
      "  events   %-7s %-13s run %d: sent %s (publish failed %s) received %s lost %s (gaps %s, "
      "reordered %s)",
      size_label(size).c_str(), name, rep + 1, thousands(r.sent).c_str(),
      thousands(r.failed).c_str(), thousands(r.received).c_str(), thousands(r.lost()).c_str(),
      thousands(r.gaps).c_str(), thousands(r.out_of_order).c_str());
  if (r.broker_in >= 0) std::printf(", broker got %s", thousands(r.broker_in).c_str());
  if (r.header_bytes > 0) std::printf("; header frame %.0f B", r.header_bytes);
  std::printf("\n           delivered %s msg/s, publisher %s msg/s; cpu in cores: %s\n",
              thousands(r.rate).c_str(), thousands(r.publish_rate).c_str(), r.cpu.c_str());
  if (r.lost() != 0) {
    // Loud on purpose: an event the publisher was told went out never arrived.
    std::printf("  LOST %s of %s events (%s %s, run %d)", thousands(r.lost()).c_str(),
                thousands(r.sent - r.failed).c_str(), size_label(size).c_str(), name, rep + 1);
    if (r.broker_in >= 0) {
      std::printf(": %s before the broker, %s after it",
                  thousands(r.sent - r.failed - r.broker_in).c_str(),
                  thousands(r.broker_in - r.received).c_str());
    }
    std::printf("\n");
  }
  std::fflush(stdout);
}

void print_command_line(const char* name, std::size_t size, int rep, const command_run& r) {
  const bool error = !r.first_error.empty() && r.first_error != "-";
  std::printf(
      "  commands %-7s %-13s run %d: rtt p50 %s us p99 %s us; %s req/s (p50 %s us, "
      "p99 %s us); failed %s%s%s\n           cpu in cores, rtt: %s | pipelined: %s\n",
      size_label(size).c_str(), name, rep + 1, fixed(r.rtt_p50).c_str(), fixed(r.rtt_p99).c_str(),
      thousands(r.tput).c_str(), fixed(r.tput_p50).c_str(), fixed(r.tput_p99).c_str(),
      thousands(r.rtt_failed + r.tput_failed).c_str(), error ? ", first error: " : "",
      error ? r.first_error.c_str() : "", r.cpu_rtt.c_str(), r.cpu_tput.c_str());
  std::fflush(stdout);
}

using event_table = std::map<std::size_t, std::array<event_series, k_event_kinds>>;
using command_table = std::map<std::size_t, std::array<command_series, k_command_kinds>>;

// --curve: the CURVE figures, each beside its ratio to the raw CURVE proxy, and what CURVE costs
// every scenario (its figure with CURVE / without). Returns false if a CURVE run lost or failed
// anything.
bool print_curve_report(const options& o, const event_table& ev, const event_table& ev_curve,
                        const command_table& cmd, const command_table& cmd_curve, bool events,
                        bool commands) {
  auto or_dash = [](bool empty, const std::string& v) { return empty ? std::string("-") : v; };
  bool pass = true;
  if (events) {
    std::printf(
        "CURVE EVENTS: rate delivered to the subscriber with CURVE, median of %d; Ens/proxy = "
        "Ensemble CURVE (SDK subscriber / plain SUB) / raw proxy CURVE; CURVE/plain = the same "
        "scenario with CURVE / without\n",
        o.repeat);
    print_row("size", "metric", {"raw proxy", "Ens SDK sub", "Ens plain SUB", "Ens/proxy"}, 13,
              "target", "verdict");
    const auto proxy = static_cast<std::size_t>(event_kind::raw_proxy);
    const auto sdk = static_cast<std::size_t>(event_kind::ensemble_sdk);
    const auto plain = static_cast<std::size_t>(event_kind::ensemble_plain);
    for (auto size : o.sizes) {
      const auto& c = ev_curve.at(size);
      const auto& p = ev.at(size);
      std::vector<std::string> rates, cost, lost, failed;
      for (auto k : {proxy, sdk, plain}) {
        rates.push_back(or_dash(c[k].empty(), thousands(c[k].rate())));
        cost.push_back(ratio(c[k].rate(), p[k].rate()));
        lost.push_back(or_dash(c[k].empty(), thousands(c[k].lost())));
        failed.push_back(or_dash(c[k].empty(), thousands(c[k].failed())));
      }
      const double raw = c[proxy].rate();
      rates.push_back(
          raw > 0 ? fixed(c[sdk].rate() / raw, 2) + "/" + fixed(c[plain].rate() / raw, 2) : "-");
      cost.push_back("");
      lost.push_back("");
      failed.push_back("");
      const bool no_loss = c[proxy].lost() + c[sdk].lost() + c[plain].lost() == 0;
      const bool no_fail = c[sdk].failed() + c[plain].failed() == 0;
      pass = pass && no_loss && no_fail;
      print_row(size_label(size), "delivered msg/s", rates, 13, "", "");
      print_row("", "CURVE/plain", cost, 13, "", "");
      print_row("", "lost (all runs)", lost, 13, "0", no_loss ? "PASS" : "MISS");
      print_row("", "publish failed (all runs)", failed, 13, "0",
                no_fail ? "PASS" : "MISS (reported to the publisher)");
    }
    std::printf("\n");
  }
  if (commands) {
    std::printf(
        "CURVE COMMANDS: client -> proxy/broker -> echo worker with CURVE, median of %d; "
        "CURVE/plain = the same scenario with CURVE / without\n",
        o.repeat);
    print_row("size", "metric", {"raw proxy", "Ensemble", "Ens/proxy"}, 15, "target", "verdict");
    const std::string window = std::to_string(o.window) + " in flight";
    struct figure {
      std::string name;
      double (*of)(const command_run&);
      bool count;  // printed as a count (req/s), not in microseconds
    };
    const figure figures[] = {
        {"RTT p50 us, 1 in flight", [](const command_run& r) { return r.rtt_p50; }, false},
        {"RTT p99 us, 1 in flight", [](const command_run& r) { return r.rtt_p99; }, false},
        {"req/s, " + window, [](const command_run& r) { return r.tput; }, true},
        {"p50 us, " + window, [](const command_run& r) { return r.tput_p50; }, false},
        {"p99 us, " + window, [](const command_run& r) { return r.tput_p99; }, false},
    };
    for (auto size : o.sizes) {
      const auto& c = cmd_curve.at(size);
      const auto& p = cmd.at(size);
      bool first = true;
      for (const auto& f : figures) {
        const double raw = c[0].med(f.of);
        const double ens = c[1].med(f.of);
        auto show = [&](double v) { return f.count ? thousands(v) : fixed(v); };
        print_row(first ? size_label(size) : "", f.name,
                  {or_dash(c[0].empty(), show(raw)), show(ens), ratio(ens, raw)}, 15, "", "");
        print_row("", "  CURVE/plain", {ratio(raw, p[0].med(f.of)), ratio(ens, p[1].med(f.of)), ""},
                  15, "", "");
        first = false;
      }
      const bool no_fail = c[1].failed() == 0;
      pass = pass && no_fail;
      print_row("", "failed or lost (all runs)",
                {or_dash(c[0].empty(), thousands(c[0].failed())), thousands(c[1].failed()), ""}, 15,
                "0", no_fail ? "PASS" : "MISS");
    }
    std::printf("\n");
  }
  return pass;
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

// "MISS (12% short)": how far a figure is from its target, in the target's own terms.
std::string verdict(bool pass, double shortfall_percent, const char* word) {
  return pass ? "PASS" : "MISS (" + fixed(shortfall_percent, 0) + "% " + word + ")";
}

// On a shared machine someone else's compile can take a core for a minute: waits until the
// machine has been nearly idle for 300 ms before a run starts, for at most `limit`. Returns
// false if it gave up (the run's "others" figure then shows how much it was disturbed).
bool wait_for_quiet(std::chrono::seconds limit) {
  const auto deadline = clock_type::now() + limit;
  while (clock_type::now() < deadline) {
    const auto before = machine_cpu_seconds();
    const auto t0 = clock_type::now();
    std::this_thread::sleep_for(300ms);  // a measuring interval, not a guess at readiness
    const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();
    if ((machine_cpu_seconds().busy - before.busy) / wall < 0.15) return true;
  }
  return false;
}

// Finds the nats-server to run (o.nats_path) and says which, or why NATS is skipped.
void print_nats_line(options& o) {
  if (o.no_nats || o.only_ensemble) {
    std::printf("NATS: skipped (%s)\n", o.no_nats ? "--no-nats" : "--only-ensemble");
    return;
  }
  if (const auto why = nats_unavailable(o.nats_server); !why.empty()) {
    std::printf("NATS: skipped: %s\n", why.c_str());
    return;
  }
  const auto facts = probe_nats(o.nats_server);
  o.nats_path = facts.path;
  std::printf(
      "NATS: %s %s, a server per run (max_pending HWM x (size + 128) B, write_deadline 60s); "
      "libnats %s clients (no reconnect; every subscription's pending limits HWM messages and "
      "HWM x (size + 128) B); send-asap for "
      "the round trips 1 in flight, buffered for events and pipelined requests\n",
      facts.path.c_str(), facts.version.c_str(), libnats_version().c_str());
}

int orchestrate(options o) {
  if (o.messages == 0) o.messages = o.quick ? 20'000 : 200'000;
  if (o.rtt_calls == 0) o.rtt_calls = o.quick ? 2'000 : 20'000;
  if (o.pipelined == 0) o.pipelined = o.quick ? 20'000 : 200'000;
  if (o.warmup == 0) o.warmup = o.quick ? 200 : 2'000;
  if (o.repeat == 0) o.repeat = o.quick ? 1 : 3;
  if (o.quiet_wait < 0) o.quiet_wait = o.quick ? 0 : 10;
  if (o.hwm == 0) o.hwm = static_cast<int>(o.messages + o.messages / 10);
  const bool events = o.only == "all" || o.only == "events";
  const bool commands = o.only == "all" || o.only == "commands";

  std::printf("bench_all: %u cores, load average %s; TCP loopback, every role its own process\n",
              std::thread::hardware_concurrency(), load_average().c_str());
  std::printf("events: %s per run, %s, HWM %s on the raw sockets and the broker's XPUB\n",
              thousands(static_cast<double>(o.messages)).c_str(),
              o.event_rate > 0 ? ("paced at " + thousands(o.event_rate) + "/s").c_str() : "unpaced",
              thousands(o.hwm).c_str());
  std::printf(
      "commands: %s round trips 1 in flight, %s requests %zu in flight (after %zu "
      "warm-up); echo agent capacity %u, handlers %s\n",
      thousands(static_cast<double>(o.rtt_calls)).c_str(),
      thousands(static_cast<double>(o.pipelined)).c_str(), o.window, o.warmup, o.capacity,
      o.handler_pool ? ("on a pool of " + std::to_string(o.handler_threads) + " thread(s)").c_str()
                     : "inline on the SDK's I/O thread");
  print_nats_line(o);
  if (o.curve) {
    std::printf(
        "curve: the proxy and Ensemble scenarios also run with CURVE (raw proxy: CURVE server, no "
        "ZAP handler; broker: secured mode, an identity per role)\n");
  }
  std::printf("%d run(s) of each; figures are medians, loss is summed over runs\n\n", o.repeat);
  std::fflush(stdout);

  event_table ev;
  command_table cmd;
  const char* event_names[] = {"raw-direct", "raw-proxy", "ens-sdk-sub", "ens-plain-sub", "nats"};
  const char* command_names[] = {"raw-proxy", "ensemble", "nats"};
  // --curve: the same scenarios with CURVE (raw-direct and NATS have no CURVE variant).
  std::unique_ptr<curve_setup> curve = o.curve ? std::make_unique<curve_setup>() : nullptr;
  event_table ev_curve;
  command_table cmd_curve;
  const char* curve_event_names[] = {"-", "raw-proxy-curve", "ens-sdk-curve", "ens-plain-curve",
                                     "-"};
  const char* curve_command_names[] = {"raw-proxy-curve", "ensemble-curve", "-"};
  const auto t0 = clock_type::now();
  for (int rep = 0; rep < o.repeat; ++rep) {
    for (auto size : o.sizes) {
      o.size = size;
      // Raw and Ensemble alternate within a repetition, so that drift in the machine's load
      // hits both alike.
      auto quiet = [&] {
        if (o.quiet_wait > 0 && !wait_for_quiet(std::chrono::seconds(o.quiet_wait))) {
          std::printf("  (machine still busy after %d s of waiting; running anyway)\n",
                      o.quiet_wait);
        }
      };
      for (int k = 0; events && k < k_event_kinds; ++k) {
        if (o.only_ensemble && is_raw(static_cast<event_kind>(k))) continue;
        if (static_cast<event_kind>(k) == event_kind::nats && o.nats_path.empty()) continue;
        quiet();
        auto r = run_events(o, static_cast<event_kind>(k), nullptr);
        print_event_line(event_names[k], size, rep, r);
        if (o.result_lines) {
          say("result-events kind=%s size=%zu run=%d rate=%.1f sent=%.0f failed=%.0f "
              "received=%.0f lost=%.0f",
              event_names[k], size, rep + 1, r.rate, r.sent, r.failed, r.received, r.lost());
        }
        ev[size][k].runs.push_back(r);
      }
      // CURVE variants after the plain ones (raw proxy, then Ensemble), in the same repetition.
      for (int k = 0; curve && events && k < k_event_kinds; ++k) {
        const auto kind = static_cast<event_kind>(k);
        if (kind == event_kind::raw_direct || kind == event_kind::nats ||
            (o.only_ensemble && is_raw(kind))) {
          continue;
        }
        quiet();
        auto r = run_events(o, kind, curve.get());
        print_event_line(curve_event_names[k], size, rep, r);
        if (o.result_lines) {
          say("result-events kind=%s size=%zu run=%d rate=%.1f sent=%.0f failed=%.0f "
              "received=%.0f lost=%.0f",
              curve_event_names[k], size, rep + 1, r.rate, r.sent, r.failed, r.received, r.lost());
        }
        ev_curve[size][k].runs.push_back(r);
      }
      for (int k = 0; commands && k < k_command_kinds; ++k) {
        if (o.only_ensemble && k == 0) continue;
        if (static_cast<command_kind>(k) == command_kind::nats && o.nats_path.empty()) continue;
        quiet();
        auto r = run_commands(o, static_cast<command_kind>(k), nullptr);
        print_command_line(command_names[k], size, rep, r);
        cmd[size][k].runs.push_back(r);
      }
      for (int k = 0; curve && commands && k < k_command_kinds; ++k) {
        if ((o.only_ensemble && k == 0) || static_cast<command_kind>(k) == command_kind::nats) {
          continue;
        }
        quiet();
        auto r = run_commands(o, static_cast<command_kind>(k), curve.get());
        print_command_line(curve_command_names[k], size, rep, r);
        cmd_curve[size][k].runs.push_back(r);
      }
    }
  }
  const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();
  std::vector<double> others;
  for (const auto& [size, kinds] : ev) {
    for (const auto& k : kinds) {
      for (const auto& r : k.runs) others.push_back(r.others);
    }
  }
  for (const auto& [size, kinds] : cmd) {
    for (const auto& k : kinds) {
      for (const auto& r : k.runs) others.push_back(r.others);
    }
  }
  for (const auto& [size, kinds] : ev_curve) {
    for (const auto& k : kinds) {
      for (const auto& r : k.runs) others.push_back(r.others);
    }
  }
  for (const auto& [size, kinds] : cmd_curve) {
    for (const auto& k : kinds) {
      for (const auto& r : k.runs) others.push_back(r.others);
    }
  }

  auto or_dash = [](bool empty, const std::string& v) { return empty ? std::string("-") : v; };
  bool all_pass = true;
  std::printf("\n");
  if (events) {
    std::printf(
        "EVENTS: rate delivered to the subscriber (first to last event), median of %d; "
        "ratio = Ensemble (SDK subscriber / plain SUB) / raw proxy, and / NATS\n",
        o.repeat);
    print_row("size", "metric",
              {"raw PUB->SUB", "raw proxy", "Ens SDK sub", "Ens plain SUB", "NATS", "Ens/proxy",
               "Ens/NATS"},
              13, "target", "verdict (SDK subscriber)");
    for (auto size : o.sizes) {
      const auto& s = ev[size];
      const double proxy = s[1].rate();
      const double sdk = s[2].rate();
      const double plain = s[3].rate();
      const double r = proxy > 0 ? sdk / proxy : 0;
      const bool rate_pass = r >= 0.9;
      const bool no_loss =
          s[2].lost() == 0 && s[3].lost() == 0 && s[2].failed() == 0 && s[3].failed() == 0;
      all_pass = all_pass && rate_pass && no_loss;
      std::vector<std::string> rates;
      for (const auto& x : s) rates.push_back(or_dash(x.empty(), thousands(x.rate())));
      rates.push_back(proxy > 0 ? fixed(sdk / proxy, 2) + "/" + fixed(plain / proxy, 2) : "-");
      const double nats = s[4].rate();
      rates.push_back(nats > 0 ? fixed(sdk / nats, 2) + "/" + fixed(plain / nats, 2) : "-");
      print_row(size_label(size), "delivered msg/s", rates, 13, ">= 0.90x",
                verdict(rate_pass, (1 - r / 0.9) * 100, "short"));
      std::vector<std::string> lost;
      for (const auto& x : s) lost.push_back(or_dash(x.empty(), thousands(x.lost())));
      lost.insert(lost.end(), {"", ""});
      const double ens_lost = s[2].lost() + s[3].lost();
      print_row("", "lost (all runs)", lost, 13, "0",
                ens_lost == 0
                    ? "PASS"
                    : "MISS (" +
                          fixed(100 * ens_lost / std::max(1.0, s[2].sent() + s[3].sent()), 3) +
                          "% of events)");
      std::vector<std::string> failed;
      for (const auto& x : s) failed.push_back(or_dash(x.empty(), thousands(x.failed())));
      failed.insert(failed.end(), {"", ""});
      print_row("", "publish failed (all runs)", failed, 13, "0",
                s[2].failed() + s[3].failed() == 0 ? "PASS" : "MISS (reported to the publisher)");
    }
    std::printf("\n");
  }
  if (commands) {
    std::printf("COMMANDS: client -> proxy/broker/nats-server -> echo worker, median of %d\n",
                o.repeat);
    print_row("size", "metric", {"raw proxy", "Ensemble", "NATS", "Ens/proxy", "Ens/NATS"}, 15,
              "target", "verdict");
    auto p50 = [](const command_run& r) { return r.rtt_p50; };
    auto p99 = [](const command_run& r) { return r.rtt_p99; };
    auto tput = [](const command_run& r) { return r.tput; };
    auto lp50 = [](const command_run& r) { return r.tput_p50; };
    auto lp99 = [](const command_run& r) { return r.tput_p99; };
    for (auto size : o.sizes) {
      const auto& s = cmd[size];
      const bool no_raw = s[0].empty();
      const bool no_nats = s[2].empty();
      const double raw50 = s[0].med(p50);
      const double ens50 = s[1].med(p50);
      // Targets (docs/benchmarks.md): RTT p50 <= 1.1x the raw proxy's and NATS's; pipelined
      // >= 0.8x the raw proxy and >= 1.0x NATS. A peer that did not run is not judged.
      const double nats50 = s[2].med(p50);
      const double over50 =
          std::max(raw50 > 0 ? ens50 / raw50 / 1.1 : 0, nats50 > 0 ? ens50 / nats50 / 1.1 : 0);
      const bool rtt_pass = ens50 > 0 && over50 <= 1;
      print_row(size_label(size), "RTT p50 us, 1 in flight",
                {or_dash(no_raw, fixed(raw50)), fixed(ens50), or_dash(no_nats, fixed(nats50)),
                 ratio(ens50, raw50), ratio(ens50, nats50)},
                15, "<=1.1x both", verdict(rtt_pass, (over50 - 1) * 100, "over"));
      print_row("", "RTT p99 us, 1 in flight",
                {or_dash(no_raw, fixed(s[0].med(p99))), fixed(s[1].med(p99)),
                 or_dash(no_nats, fixed(s[2].med(p99))), ratio(s[1].med(p99), s[0].med(p99)),
                 ratio(s[1].med(p99), s[2].med(p99))},
                15, "", "");
      const double raw_tput = s[0].med(tput);
      const double ens_tput = s[1].med(tput);
      const double nats_tput = s[2].med(tput);
      const double short_tput = std::max(raw_tput > 0 ? 1 - ens_tput / (0.8 * raw_tput) : 0,
                                         nats_tput > 0 ? 1 - ens_tput / nats_tput : 0);
      const bool tput_pass = ens_tput > 0 && short_tput <= 0;
      print_row("", "req/s, " + std::to_string(o.window) + " in flight",
                {or_dash(no_raw, thousands(raw_tput)), thousands(ens_tput),
                 or_dash(no_nats, thousands(nats_tput)), ratio(ens_tput, raw_tput),
                 ratio(ens_tput, nats_tput)},
                15, ">=.8x r,1x N", verdict(tput_pass, short_tput * 100, "short"));
      print_row("", "p50/p99 us, " + std::to_string(o.window) + " in flight",
                {or_dash(no_raw, fixed(s[0].med(lp50)) + "/" + fixed(s[0].med(lp99))),
                 fixed(s[1].med(lp50)) + "/" + fixed(s[1].med(lp99)),
                 or_dash(no_nats, fixed(s[2].med(lp50)) + "/" + fixed(s[2].med(lp99))), "", ""},
                15, "", "");
      const bool no_fail = s[1].failed() == 0;
      print_row("", "failed or lost (all runs)",
                {or_dash(no_raw, thousands(s[0].failed())), thousands(s[1].failed()),
                 or_dash(no_nats, thousands(s[2].failed())), "", ""},
                15, "0", no_fail ? "PASS" : "MISS");
      all_pass = all_pass && rtt_pass && tput_pass && no_fail;
    }
    std::printf("\n");
  }
  if (curve) {
    all_pass = print_curve_report(o, ev, ev_curve, cmd, cmd_curve, events, commands) && all_pass;
  }
  const double others_max = others.empty() ? 0 : *std::max_element(others.begin(), others.end());
  std::printf(
      "other processes on the machine used %.2f cores (median of the measured windows), "
      "%.2f at most%s\n",
      median(others), others_max,
      others_max > 0.25 ? ": the machine was not quiet, figures are pessimistic" : "");
  std::printf("%s; bench wall time %.1f s\n", all_pass ? "all targets met" : "some targets missed",
              wall);
  // Silent loss fails the run (exit code 1), whatever the other figures: a number that was
  // measured while events vanished is not a result.
  double lost = 0, sent = 0;
  for (const auto* table : {&ev, &ev_curve}) {
    for (const auto& [size, kinds] : *table) {
      for (const auto& k : kinds) {
        lost += k.lost();
        sent += k.sent() - k.failed();
      }
    }
  }
  if (lost != 0) {
    std::printf("LOST %s of %s events that publishers were told went out (all event runs)\n",
                thousands(lost).c_str(), thousands(sent).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace ensemble::bench

int main(int argc, char** argv) {
  ensemble::bench::options o;
  CLI::App app{
      "bench_all: raw libzmq vs Ensemble, events and commands, over TCP loopback. "
      "See docs/benchmarks.md."};
  app.add_flag("--quick", o.quick, "small counts, one run: a smoke test");
  app.add_option("--messages", o.messages, "events per run and payload size (default 200000)");
  app.add_option("--event-rate", o.event_rate,
                 "pace every publisher at this many events/s (default: unpaced)");
  app.add_option("--rtt-calls", o.rtt_calls, "round trips with 1 in flight (default 20000)");
  app.add_option("--pipelined", o.pipelined, "requests in the pipelined phase (default 200000)");
  app.add_option("--window", o.window, "requests in flight in the pipelined phase")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "round trips before measuring (default 2000)");
  app.add_option("--sizes", o.sizes, "payload sizes in bytes")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--journal", o.journal,
                 "the broker's trace journal size (0: off), to measure what it costs");
  app.add_option("--hwm", o.hwm, "high-water mark of every event queue (default messages+10%)");
  app.add_option("--repeat", o.repeat, "runs of each scenario (default 3)");
  app.add_option("--only", o.only, "all, events or commands")
      ->check(CLI::IsMember({"all", "events", "commands"}))
      ->capture_default_str();
  app.add_flag("--only-ensemble", o.only_ensemble, "skip the raw scenarios (for profiling)");
  app.add_option("--capacity", o.capacity, "capacity the echo agent declares")
      ->capture_default_str();
  app.add_flag("--handler-pool", o.handler_pool,
               "run the echo handler on the SDK's thread pool, not inline on its I/O thread");
  app.add_option("--handler-threads", o.handler_threads, "threads of that pool")
      ->capture_default_str();
  app.add_option("--quiet-wait", o.quiet_wait,
                 "seconds to wait for an idle machine before each run (default 10, 0 with "
                 "--quick)");
  app.add_option("--log-level", o.log_level, "log level of the roles and the broker")
      ->capture_default_str();
  app.add_option("--broker-data", o.broker_data,
                 "start the broker with durable streams stored in this directory (--data)");
  app.add_option("--broker-streams", o.broker_streams,
                 "the broker's stream declarations (--streams; with --broker-data)");
  app.add_flag("--result-lines", o.result_lines,
               "also print one machine-readable 'result-events' line per event run");
  app.add_flag("--curve", o.curve,
               "also run the proxy and Ensemble scenarios with CURVE, and report what it costs");
  app.add_flag("--no-nats", o.no_nats, "skip the NATS peer (nats-server and libnats)");
  app.add_option("--nats-server", o.nats_server, "the nats-server to run for the NATS peer")
      ->capture_default_str();
  const std::string internal;  // role plumbing, set by the orchestrator only: hidden from --help
  app.add_option("--role", o.role)->group(internal);
  app.add_option("--endpoint", o.endpoint)->group(internal);
  app.add_option("--router", o.router)->group(internal);
  app.add_option("--events", o.events)->group(internal);
  app.add_flag("--bind", o.bind)->group(internal);
  app.add_option("--key-file", o.key_file)->group(internal);
  app.add_option("--server-key", o.server_key)->group(internal);
  app.add_option("--size", o.size)->group(internal);
  CLI11_PARSE(app, argc, argv);
  try {
    if (!o.role.empty()) return ensemble::bench::run_role(o);
    return ensemble::bench::orchestrate(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_all%s%s: %s\n", o.role.empty() ? "" : " ", o.role.c_str(),
                 e.what());
    return 1;
  }
}
