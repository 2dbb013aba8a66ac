// bench_streams: Ensemble's durable streams and NATS JetStream side by side, in one run.
//
// For each sync policy and payload size, a fresh server of each kind (the real ensemble-broker
// with --data/--streams, a real nats-server -js with file storage), each with its own temporary
// data directory, and on each:
//
//   rtt      acked publish round trip, 1 in flight: p50/p99 latency and rate
//   window   acked publish with `window` in flight: acks/s
//   consume  the stream those publishes filled, read by one durable consumer with explicit
//            acks: events/s from joining until the server confirmed the last ack
//
// and, last, the non-durable event path with and without a stream declared for other topics,
// which is bench_all's event scenario run twice (bench_all --broker-data/--broker-streams).
//
// The Ensemble client is a minimal raw-protocol DEALER (HELLO, PUBLISH, CONSUME, DELIVER, ACK
// from common/protocol.hpp and frames.hpp), not the SDK: the bench measures the broker against
// nats-server, and does not depend on SDK work. The JetStream client is libnats (js_Publish,
// js_PublishAsync, a durable push consumer with explicit acks).
//
// Without libnats at build time, or without nats-server on PATH, the JetStream side is skipped
// with a note and the Ensemble figures are still measured (scripts/install-deps.sh --nats).
// Every wait has a deadline; an ack that does not come, a refused publish, an event consumed
// twice or never: the bench says so loudly and exits 1.

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "harness.hpp"
#include "nats_peer.hpp"

namespace ensemble::bench {
namespace {

namespace fs = std::filesystem;

constexpr const char* k_stream = "bench";
constexpr const char* k_consumer = "bench-durable";
constexpr const char* k_topic = "bench.stream.e";  // Ensemble: stream prefix "bench.stream."
constexpr const char* k_subjects = "bench.stream.>";
constexpr auto k_start_timeout = 15s;
constexpr auto k_reply_timeout = 10s;  // one ack, one delivery: later than this counts as lost
constexpr auto k_phase_timeout = 120s;

struct options {
  std::vector<std::size_t> sizes{64, 1024};
  std::size_t rtt = 2'000;      // round trips, 1 in flight
  std::size_t events = 20'000;  // publishes with `window` in flight
  std::size_t window = 100;
  std::size_t warmup = 200;
  std::uint32_t max_ack_pending = 1'000;  // both consumers; Ensemble's member capacity too
  std::string sync = "both";              // os, always or both
  std::size_t always_rtt = 300;           // round trips under --sync always (each an fdatasync)
  std::size_t event_messages = 20'000;    // the event-path comparison (d), per run
  int event_repeat = 2;
  int repeat = 2;  // runs of each side, size and sync policy; the table shows medians
  bool skip_event_path = false;
  bool skip_nats = false;
  std::string nats_server;           // default: nats-server on PATH
  std::string js_consumer = "push";  // the faster of the two here (docs/benchmarks.md)
  std::string log_level = "warn";
  // Ensemble only: consumers without members created on the stream before measuring (durable
  // consumers whose services are down), which the broker must not pay for on every turn.
  std::size_t idle_consumers = 0;
};

// ---------------------------------------------------------------------------------------------
// Plumbing

std::string make_payload(std::size_t size, std::uint64_t index) {
  std::string p(std::max<std::size_t>(size, sizeof index), 'x');
  std::memcpy(p.data(), &index, sizeof index);
  return p;
}

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
std::string fixed(double v, int digits = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}
std::string size_label(std::size_t size) {
  return size % 1024 == 0 ? std::to_string(size / 1024) + " KiB" : std::to_string(size) + " B";
}
double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// What one side measured for one payload size and sync policy. A phase that failed keeps its
// counts, and `failures` says what went wrong, in words.
struct side_run {
  bool ran = false;
  std::string skipped;  // why this side did not run
  double rtt_p50 = 0, rtt_p99 = 0, rtt_rate = 0;
  double window_rate = 0;
  double consume_rate = 0;
  bool rtt_ok = false, window_ok = false, consume_ok = false;  // the phase completed
  std::size_t stored = 0;       // events acked as stored: what the consumer must get
  std::size_t consumed = 0;     // distinct events delivered and acked
  std::size_t redelivered = 0;  // deliveries of an event already delivered
  double cpu_rtt = 0, cpu_window = 0, cpu_consume = 0;           // server cores during each phase
  double client_rtt = 0, client_window = 0, client_consume = 0;  // this process's cores
  double others =
      0;  // cores the rest of the machine used meanwhile (not this bench, not its server)
  std::vector<std::string> failures;

  void fail(std::string what) {
    std::printf("  FAILED: %s\n", what.c_str());
    std::fflush(stdout);
    failures.push_back(std::move(what));
  }
};

// Server and client cores over a phase: CPU seconds used / wall seconds. The client is this
// process (libnats' threads included).
class server_cpu {
 public:
  explicit server_cpu(child& c)
      : c_(c),
        cpu0_(c.cpu_seconds()),
        self0_(process_cpu_seconds(::getpid())),
        t0_(clock_type::now()) {}
  double cores() const {
    const double wall = seconds_since(t0_);
    return wall > 0 ? (c_.cpu_seconds() - cpu0_) / wall : 0;
  }
  double client_cores() const {
    const double wall = seconds_since(t0_);
    return wall > 0 ? (process_cpu_seconds(::getpid()) - self0_) / wall : 0;
  }

 private:
  child& c_;
  double cpu0_;
  double self0_;
  clock_type::time_point t0_;
};

// What everything but this process and its server used, in cores, over one side's run: how
// noisy the shared machine was meanwhile.
class machine_noise {
 public:
  explicit machine_noise(child& server)
      : server_(server),
        t0_(clock_type::now()),
        busy0_(machine_cpu_seconds().busy),
        ours0_(process_cpu_seconds(::getpid()) + server.cpu_seconds()) {}
  double others() const {
    const double wall = seconds_since(t0_);
    const double ours = process_cpu_seconds(::getpid()) + server_.cpu_seconds() - ours0_;
    return wall > 0 ? std::max(0.0, (machine_cpu_seconds().busy - busy0_ - ours) / wall) : 0;
  }

 private:
  child& server_;
  clock_type::time_point t0_;
  double busy0_;
  double ours0_;
};

// ---------------------------------------------------------------------------------------------
// Ensemble: the real broker, and a raw-protocol peer

struct ens_broker {
  std::unique_ptr<temp_dir> dir;
  std::unique_ptr<child> proc;
  std::string router;
};

ens_broker start_ensemble(const options& o, const std::string& sync) {
  ens_broker b;
  b.dir = std::make_unique<temp_dir>("ensemble");
  const std::string streams = b.dir->file("streams.yaml");
  write_file(streams,
             std::string("streams:\n  - name: ") + k_stream + "\n    topics: [bench.stream.]\n");
  b.proc = child::spawn(
      "ensemble-broker", sibling_exe("ensemble-broker"),
      {"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", "--log-level", o.log_level,
       "--data", b.dir->file("data"), "--streams", streams, "--sync", sync});
  b.router = parse_fields(b.proc->expect("ensemble-broker ready", k_start_timeout))["router"];
  return b;
}

// One DEALER speaking the wire protocol of docs/protocol.md directly.
class ens_peer {
 public:
  ens_peer(zmq::context_t& ctx, const std::string& router)
      : socket_(ctx, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(router);
  }

  void send(common::command cmd, const common::header& h, std::string_view payload = {}) {
    frames_.clear();
    common::build_message(frames_, cmd, h, zmq::message_t(payload.data(), payload.size()));
    common::send_frames(socket_, frames_, zmq::send_flags::none);
    last_send_ = clock_type::now();
  }

  // The next message other than a HEARTBEAT, or nullopt at the deadline.
  std::optional<common::parsed_message> recv(std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    while (true) {
      if (common::recv_frames(socket_, in_)) {
        auto m = common::parse_message(in_, 0);
        if (!m)
          throw std::runtime_error("unreadable message from the broker: " + m.err().to_string());
        if (m->cmd == common::command::heartbeat) continue;
        return std::move(*m);
      }
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - clock_type::now());
      if (left.count() <= 0) return std::nullopt;
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::min(left, std::chrono::milliseconds(heartbeat_)));
      heartbeat_if_due();
    }
  }

  // HELLO, then WELCOME: a consumer's member must be registered, and then heartbeat.
  void hello(const std::string& agent) {
    common::header h;
    h.agent = agent;
    send(common::command::hello, h);
    auto m = recv(k_reply_timeout);
    if (!m || m->cmd != common::command::welcome) {
      throw std::runtime_error("ensemble-broker: no WELCOME to " + agent + "'s HELLO");
    }
    heartbeat_ = std::chrono::milliseconds(std::max<std::uint32_t>(m->hdr.heartbeat_ms, 10));
    registered_ = true;
  }
  void heartbeat_if_due() {
    if (registered_ && clock_type::now() - last_send_ >= heartbeat_) {
      send(common::command::heartbeat, common::header{});
    }
  }

  // A call to the broker's own service; the reply's payload as JSON, or an error in words.
  common::result<nlohmann::json> broker_call(const std::string& action,
                                             const nlohmann::json& body) {
    common::header h;
    h.id = "admin-" + std::to_string(++calls_);
    h.service = "broker";
    h.action = action;
    h.deadline_ms = 5000;
    const auto payload = nlohmann::json::to_msgpack(body);
    send(common::command::request, h,
         std::string_view(reinterpret_cast<const char*>(payload.data()), payload.size()));
    const auto deadline = clock_type::now() + k_reply_timeout;
    while (clock_type::now() < deadline) {
      auto m = recv(std::chrono::ceil<std::chrono::milliseconds>(deadline - clock_type::now()));
      if (!m) break;
      if (m->cmd != common::command::reply || m->hdr.id != h.id) continue;
      if (m->hdr.is_error()) {
        return common::error::make(m->hdr.error_code,
                                   "broker." + action + ": " + m->hdr.error_message);
      }
      const auto* p = static_cast<const std::uint8_t*>(m->payload.data());
      return nlohmann::json::from_msgpack(p, p + m->payload.size(), true, false);
    }
    return common::error::make(common::errc::deadline_exceeded,
                               "broker." + action + ": no reply within 10 s");
  }

 private:
  zmq::socket_t socket_;
  std::vector<zmq::message_t> frames_;
  std::vector<zmq::message_t> in_;
  clock_type::time_point last_send_ = clock_type::now();
  std::chrono::milliseconds heartbeat_{1000};
  bool registered_ = false;
  std::uint64_t calls_ = 0;
};

// Checks one PUBLISH_ACK (or ERROR) against the publish it answers; "" when it is right.
std::string check_ens_ack(const common::parsed_message& m, const std::string& id,
                          std::uint64_t expected_seq) {
  if (m.cmd == common::command::error) {
    return "publish " + m.hdr.id + " refused: " + m.hdr.error_code + ": " + m.hdr.error_message;
  }
  if (m.cmd != common::command::publish_ack) {
    return "expected PUBLISH_ACK for " + id + ", got " +
           common::command_name(static_cast<std::uint8_t>(m.cmd));
  }
  if (m.hdr.id != id || m.hdr.stream != k_stream || m.hdr.stream_seq != expected_seq ||
      m.hdr.duplicate) {
    return "PUBLISH_ACK for " + id + " expected stream " + k_stream + " stream_seq " +
           std::to_string(expected_seq) + ", got id " + m.hdr.id + " stream '" + m.hdr.stream +
           "' stream_seq " + std::to_string(m.hdr.stream_seq) +
           (m.hdr.duplicate ? " duplicate" : "");
  }
  return "";
}

common::header publish_header(const std::string& id) {
  common::header h;
  h.id = id;
  h.topic = k_topic;
  h.ack = true;
  return h;
}

void ensemble_publish(ens_peer& peer, side_run& r, const options& o, std::size_t size,
                      std::size_t rtt_calls, child& server) {
  std::uint64_t next_seq = 1;
  // Warm-up and round trips: one in flight.
  std::vector<std::int64_t> rtt;
  rtt.reserve(rtt_calls);
  std::optional<server_cpu> cpu;
  clock_type::time_point rtt_t0;
  for (std::size_t i = 0; i < o.warmup + rtt_calls; ++i) {
    if (i == o.warmup) {
      cpu.emplace(server);
      rtt_t0 = clock_type::now();
    }
    const std::string id = "r" + std::to_string(i);
    const auto payload = make_payload(size, i);
    const auto t0 = clock_type::now();
    peer.send(common::command::publish, publish_header(id), payload);
    auto m = peer.recv(k_reply_timeout);
    if (!m) {
      r.fail("Ensemble: no PUBLISH_ACK for " + id + " within 10 s (round trip " +
             std::to_string(i) + ")");
      return;
    }
    if (auto bad = check_ens_ack(*m, id, next_seq); !bad.empty()) {
      r.fail("Ensemble: " + bad);
      return;
    }
    ++next_seq;
    if (i >= o.warmup) rtt.push_back((clock_type::now() - t0).count());
  }
  const double rtt_s = seconds_since(rtt_t0);
  r.cpu_rtt = cpu ? cpu->cores() : 0;
  r.client_rtt = cpu ? cpu->client_cores() : 0;
  r.rtt_rate = rtt_s > 0 ? static_cast<double>(rtt_calls) / rtt_s : 0;
  r.rtt_p50 = percentile_us(rtt, 50);
  r.rtt_p99 = percentile_us(rtt, 99);
  r.rtt_ok = true;

  // `window` in flight: each ack lets the next publish go.
  cpu.emplace(server);
  const auto t0 = clock_type::now();
  std::size_t sent = 0;
  std::size_t acked = 0;
  auto send_next = [&] {
    const std::string id = "w" + std::to_string(sent);
    peer.send(common::command::publish, publish_header(id), make_payload(size, sent));
    ++sent;
  };
  while (sent < std::min(o.window, o.events)) send_next();
  while (acked < o.events) {
    auto m = peer.recv(k_reply_timeout);
    if (!m) {
      r.fail("Ensemble: " + std::to_string(sent - acked) + " PUBLISH_ACKs missing after 10 s (" +
             std::to_string(acked) + " of " + std::to_string(o.events) + " acked)");
      return;
    }
    if (auto bad = check_ens_ack(*m, "w" + std::to_string(acked), next_seq); !bad.empty()) {
      r.fail("Ensemble: " + bad);
      return;
    }
    ++next_seq;
    ++acked;
    if (sent < o.events) send_next();
  }
  const double window_s = seconds_since(t0);
  r.cpu_window = cpu->cores();
  r.client_window = cpu->client_cores();
  r.window_rate = static_cast<double>(o.events) / window_s;
  r.window_ok = true;
  r.stored = next_seq - 1;
}

void ensemble_consume(ens_peer& peer, side_run& r, const options& o, child& server) {
  const std::size_t total = r.stored;
  std::vector<bool> seen(total + 1, false);
  server_cpu cpu(server);
  const auto t0 = clock_type::now();
  peer.hello("bench-consumer");
  common::header join;
  join.id = "consume-1";
  join.stream = k_stream;
  join.consumer = k_consumer;
  join.capacity = o.max_ack_pending;
  const auto config = nlohmann::json::to_msgpack(
      nlohmann::json{{"ack_wait_ms", 30'000}, {"max_ack_pending", o.max_ack_pending}});
  peer.send(common::command::consume, join,
            std::string_view(reinterpret_cast<const char*>(config.data()), config.size()));
  bool joined = false;
  bool confirmed = false;  // the REPLY to the last ACK: every ACK before it was handled
  const std::string last_ack_id = "ack-last";
  const auto deadline = t0 + k_phase_timeout;
  while (!confirmed) {
    if (clock_type::now() > deadline) {
      r.fail("Ensemble: consume phase over " + std::to_string(k_phase_timeout.count()) + " s");
      return;
    }
    auto m = peer.recv(k_reply_timeout);
    if (!m) {
      r.fail("Ensemble: nothing from the broker for 10 s while consuming (" +
             std::to_string(r.consumed) + " of " + std::to_string(total) + " events acked" +
             (joined ? "" : "; CONSUME was never answered") + ")");
      return;
    }
    if (m->cmd == common::command::reply && m->hdr.id == join.id) {
      if (m->hdr.is_error()) {
        r.fail("Ensemble: CONSUME refused: " + m->hdr.error_code + ": " + m->hdr.error_message);
        return;
      }
      joined = true;
      continue;
    }
    if (m->cmd == common::command::reply && m->hdr.id == last_ack_id) {
      if (m->hdr.is_error()) {
        r.fail("Ensemble: last ACK refused: " + m->hdr.error_code + ": " + m->hdr.error_message);
        return;
      }
      confirmed = true;
      continue;
    }
    if (m->cmd == common::command::error) {
      r.fail("Ensemble: ERROR while consuming: " + m->hdr.error_code + ": " + m->hdr.error_message +
             " (stream_seq " + std::to_string(m->hdr.stream_seq) + ")");
      return;
    }
    if (m->cmd != common::command::deliver) {
      r.fail("Ensemble: unexpected " + common::command_name(static_cast<std::uint8_t>(m->cmd)) +
             " while consuming");
      return;
    }
    const auto seq = m->hdr.stream_seq;
    if (seq == 0 || seq > total || m->hdr.stream != k_stream) {
      r.fail("Ensemble: DELIVER of stream '" + m->hdr.stream + "' stream_seq " +
             std::to_string(seq) + ", outside the " + std::to_string(total) + " stored");
      return;
    }
    if (seen[seq]) {
      ++r.redelivered;
    } else {
      seen[seq] = true;
      ++r.consumed;
    }
    common::header ack;
    ack.stream = k_stream;
    ack.consumer = k_consumer;
    ack.stream_seq = seq;
    if (r.consumed == total) ack.id = last_ack_id;
    peer.send(common::command::ack, ack);
  }
  const double seconds = seconds_since(t0);
  r.cpu_consume = cpu.cores();
  r.client_consume = cpu.client_cores();
  r.consume_rate = static_cast<double>(total) / seconds;
  // The broker's own word: nothing pending, the ack floor at the last event.
  auto info = peer.broker_call("consumer_info", {{"stream", k_stream}, {"name", k_consumer}});
  if (!info) {
    r.fail("Ensemble: " + info.err().to_string());
    return;
  }
  const auto floor = info->value("ack_floor", std::uint64_t{0});
  const auto pending = info->value("ack_pending", std::uint64_t{0});
  r.consume_ok = floor == total && pending == 0;
  if (!r.consume_ok) {
    r.fail("Ensemble: after the last ack, consumer_info says ack_floor " + std::to_string(floor) +
           " and ack_pending " + std::to_string(pending) + "; expected " + std::to_string(total) +
           " and 0: " + info->dump());
  }
}

side_run run_ensemble(const options& o, std::size_t size, const std::string& sync) {
  side_run r;
  r.ran = true;
  auto broker = start_ensemble(o, sync);
  const machine_noise noise(*broker.proc);
  zmq::context_t ctx(1);
  if (o.idle_consumers > 0) {
    ens_peer admin(ctx, broker.router);
    for (std::size_t i = 0; i < o.idle_consumers && r.failures.empty(); ++i) {
      auto added = admin.broker_call(
          "consumer_add",
          {{"stream", k_stream}, {"name", "idle-" + std::to_string(i)}, {"start", "new"}});
      if (!added)
        r.fail("Ensemble: idle consumer " + std::to_string(i) + ": " + added.err().message);
    }
    ::sync();  // their state files are written back now, not during the measurement
  }
  {
    ens_peer publisher(ctx, broker.router);
    ensemble_publish(publisher, r, o, size, sync == "always" ? o.always_rtt : o.rtt, *broker.proc);
  }
  if (r.failures.empty()) {
    ens_peer consumer(ctx, broker.router);
    ensemble_consume(consumer, r, o, *broker.proc);
  }
  r.others = noise.others();
  if (const int status = broker.proc->finish(SIGTERM, 10s); status != 0) {
    r.fail("Ensemble: ensemble-broker exited with status " + std::to_string(status));
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// JetStream: a real nats-server, and libnats

nats_settings jetstream_settings(bool sync_always) {
  nats_settings s;
  s.jetstream = true;
  s.sync_always = sync_always;
  return s;
}

// Why the JetStream side cannot run, or "" when it can.
std::string nats_skipped(const options& o) {
  if (o.skip_nats) return "skipped (--skip-nats)";
  const auto why = nats_unavailable(o.nats_server.empty() ? "nats-server" : o.nats_server);
  return why.empty() ? "" : "skipped: " + why;
}

#if ENSEMBLE_BENCH_HAVE_NATS

// Asynchronous publish acks, counted on libnats' thread.
struct async_acks {
  std::atomic<std::uint64_t> acked{0};
  std::atomic<std::uint64_t> next_seq{0};  // the stream_seq the next ack must carry
  std::atomic<std::uint64_t> bad{0};
  std::mutex mutex;
  std::string first_error;

  static void on_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
    auto* self = static_cast<async_acks*>(closure);
    std::string problem;
    if (pa == nullptr) {
      problem =
          "publish refused: " +
          std::string(pae != nullptr && pae->ErrText != nullptr ? pae->ErrText : "unknown error");
    } else if (pa->Sequence != self->next_seq.load() || pa->Duplicate ||
               std::string_view(pa->Stream) != k_stream) {
      problem = "ack with stream " + std::string(pa->Stream) + " sequence " +
                std::to_string(pa->Sequence) + ", expected " + std::to_string(self->next_seq);
    }
    if (problem.empty()) {
      self->next_seq.fetch_add(1);
      self->acked.fetch_add(1);
    } else {
      self->bad.fetch_add(1);
      std::lock_guard lock(self->mutex);
      if (self->first_error.empty()) self->first_error = problem;
    }
    natsMsg_Destroy(msg);
  }
};

// Owns a connection and its JetStream context.
struct nats_client {
  natsConnection* nc = nullptr;
  jsCtx* js = nullptr;
  jsOptions opts{};
  ~nats_client() {
    if (js != nullptr) jsCtx_Destroy(js);
    if (nc != nullptr) natsConnection_Destroy(nc);
  }
};

void nats_publish(nats_client& c, side_run& r, const options& o, std::size_t size,
                  std::size_t rtt_calls, child& server, async_acks& acks) {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  std::uint64_t next_seq = 1;
  std::vector<std::int64_t> rtt;
  rtt.reserve(rtt_calls);
  std::optional<server_cpu> cpu;
  clock_type::time_point rtt_t0;
  for (std::size_t i = 0; i < o.warmup + rtt_calls; ++i) {
    if (i == o.warmup) {
      cpu.emplace(server);
      rtt_t0 = clock_type::now();
    }
    // The same de-duplication work as Ensemble's, which de-duplicates every event by its id.
    const std::string id = "r" + std::to_string(i);
    const auto payload = make_payload(size, i);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = id.c_str();
    po.MaxWait = std::chrono::milliseconds(k_reply_timeout).count();
    jsPubAck* pa = nullptr;
    const auto t0 = clock_type::now();
    const natsStatus s = js_Publish(&pa, c.js, k_topic, payload.data(),
                                    static_cast<int>(payload.size()), &po, &jerr);
    const auto t1 = clock_type::now();
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error(("js_Publish " + id).c_str(), s, jerr));
      return;
    }
    const bool right =
        pa->Sequence == next_seq && !pa->Duplicate && std::string_view(pa->Stream) == k_stream;
    const std::string got = std::string(pa->Stream) + " sequence " + std::to_string(pa->Sequence);
    jsPubAck_Destroy(pa);
    if (!right) {
      r.fail("JetStream: ack for " + id + " expected stream bench sequence " +
             std::to_string(next_seq) + ", got " + got);
      return;
    }
    ++next_seq;
    if (i >= o.warmup) rtt.push_back((t1 - t0).count());
  }
  const double rtt_s = seconds_since(rtt_t0);
  r.cpu_rtt = cpu ? cpu->cores() : 0;
  r.client_rtt = cpu ? cpu->client_cores() : 0;
  r.rtt_rate = rtt_s > 0 ? static_cast<double>(rtt_calls) / rtt_s : 0;
  r.rtt_p50 = percentile_us(rtt, 50);
  r.rtt_p99 = percentile_us(rtt, 99);
  r.rtt_ok = true;

  // js_PublishAsync with PublishAsync.MaxPending = window: it blocks while `window` are in flight.
  acks.next_seq = next_seq;
  cpu.emplace(server);
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < o.events; ++i) {
    const std::string id = "w" + std::to_string(i);
    const auto payload = make_payload(size, i);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = id.c_str();
    const natsStatus s =
        js_PublishAsync(c.js, k_topic, payload.data(), static_cast<int>(payload.size()), &po);
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error(("js_PublishAsync " + id).c_str(), s));
      return;
    }
  }
  jsPubOptions done;
  jsPubOptions_Init(&done);
  done.MaxWait = std::chrono::milliseconds(k_phase_timeout).count();
  const natsStatus s = js_PublishAsyncComplete(c.js, &done);
  const double window_s = seconds_since(t0);
  r.cpu_window = cpu->cores();
  r.client_window = cpu->client_cores();
  if (s != NATS_OK || acks.acked != o.events || acks.bad != 0) {
    std::lock_guard lock(acks.mutex);
    r.fail("JetStream: " + std::to_string(acks.acked.load()) + " of " + std::to_string(o.events) +
           " async publishes acked, " + std::to_string(acks.bad.load()) + " bad" +
           (s != NATS_OK ? "; " + nats_error("js_PublishAsyncComplete", s) : "") +
           (acks.first_error.empty() ? "" : "; first: " + acks.first_error));
    return;
  }
  r.window_rate = static_cast<double>(o.events) / window_s;
  r.window_ok = true;
  r.stored = acks.next_seq - 1;
}

void nats_consume(nats_client& c, side_run& r, const options& o, child& server) {
  const std::size_t total = r.stored;
  std::vector<bool> seen(total + 1, false);
  jsErrCode jerr = static_cast<jsErrCode>(0);
  server_cpu cpu(server);
  const auto t0 = clock_type::now();
  // A durable push consumer: the server sends up to MaxAckPending unacked messages.
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = k_stream;
  so.ManualAck = true;
  so.Config.Durable = k_consumer;
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.DeliverPolicy = js_DeliverAll;
  so.Config.MaxAckPending = o.max_ack_pending;
  so.Config.AckWait = std::chrono::nanoseconds(30s).count();
  natsSubscription* sub = nullptr;
  const bool pull = o.js_consumer == "pull";
  natsStatus s = pull ? js_PullSubscribe(&sub, c.js, k_subjects, k_consumer, &c.opts, &so, &jerr)
                      : js_SubscribeSync(&sub, c.js, k_subjects, &c.opts, &so, &jerr);
  if (s != NATS_OK) {
    r.fail("JetStream: " + nats_error(pull ? "js_PullSubscribe" : "js_SubscribeSync", s, jerr));
    return;
  }
  // Pull: batches of up to max_ack_pending, each acked before the next fetch. Push: one at a time.
  natsMsgList batch{};
  int batch_next = 0;
  auto next_message = [&](natsMsg** msg) -> natsStatus {
    if (!pull) {
      return natsSubscription_NextMsg(msg, sub, std::chrono::milliseconds(k_reply_timeout).count());
    }
    if (batch_next == batch.Count) {
      natsMsgList_Destroy(&batch);
      batch_next = 0;
      const auto want = std::min<std::size_t>(o.max_ack_pending, total - r.consumed);
      const natsStatus f =
          natsSubscription_Fetch(&batch, sub, static_cast<int>(std::max<std::size_t>(want, 1)),
                                 std::chrono::milliseconds(k_reply_timeout).count(), &jerr);
      if (f != NATS_OK) return f;
    }
    *msg = batch.Msgs[batch_next];
    batch.Msgs[batch_next++] = nullptr;  // ours now; natsMsgList_Destroy skips it
    return NATS_OK;
  };
  const auto deadline = t0 + k_phase_timeout;
  bool confirmed = false;
  while (!confirmed) {
    natsMsg* msg = nullptr;
    s = next_message(&msg);
    if (s != NATS_OK) {
      r.fail("JetStream: " +
             nats_error(pull ? "natsSubscription_Fetch" : "natsSubscription_NextMsg", s, jerr) +
             " (" + std::to_string(r.consumed) + " of " + std::to_string(total) + " events acked)");
      break;
    }
    jsMsgMetaData* meta = nullptr;
    s = natsMsg_GetMetaData(&meta, msg);
    if (s != NATS_OK) {
      natsMsg_Destroy(msg);
      r.fail("JetStream: " + nats_error("natsMsg_GetMetaData", s));
      break;
    }
    const auto seq = meta->Sequence.Stream;
    jsMsgMetaData_Destroy(meta);
    if (seq == 0 || seq > total) {
      natsMsg_Destroy(msg);
      r.fail("JetStream: delivery of stream sequence " + std::to_string(seq) + ", outside the " +
             std::to_string(total) + " stored");
      break;
    }
    if (seen[seq]) {
      ++r.redelivered;
    } else {
      seen[seq] = true;
      ++r.consumed;
    }
    if (r.consumed == total) {
      // Waits for the server's answer: the acks before it on this connection were handled.
      s = natsMsg_AckSync(msg, &c.opts, &jerr);
      if (s != NATS_OK) r.fail("JetStream: " + nats_error("natsMsg_AckSync (last ack)", s, jerr));
      confirmed = true;
    } else {
      s = natsMsg_Ack(msg, nullptr);  // with jsOptions.Wait set, libnats waits for each ack
      if (s != NATS_OK) r.fail("JetStream: " + nats_error("natsMsg_Ack", s));
    }
    natsMsg_Destroy(msg);
    if (!r.failures.empty()) break;
    if (clock_type::now() > deadline) {
      r.fail("JetStream: consume phase over " + std::to_string(k_phase_timeout.count()) + " s");
      break;
    }
  }
  const double seconds = seconds_since(t0);
  r.cpu_consume = cpu.cores();
  r.client_consume = cpu.client_cores();
  if (r.failures.empty()) r.consume_rate = static_cast<double>(total) / seconds;
  // The server's own word. Its ack floor can trail the last AckSync by a moment: polled (not
  // timed) until it is there or the deadline.
  const auto info_deadline = clock_type::now() + k_reply_timeout;
  while (r.failures.empty()) {
    jsConsumerInfo* ci = nullptr;
    s = js_GetConsumerInfo(&ci, c.js, k_stream, k_consumer, &c.opts, &jerr);
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error("js_GetConsumerInfo", s, jerr));
      break;
    }
    const auto floor = ci->AckFloor.Stream;
    const auto pending = ci->NumAckPending;
    jsConsumerInfo_Destroy(ci);
    if (floor == total && pending == 0) {
      r.consume_ok = true;
      break;
    }
    if (clock_type::now() > info_deadline) {
      r.fail("JetStream: after the last ack, consumer info says ack floor " +
             std::to_string(floor) + " and " + std::to_string(pending) + " pending; expected " +
             std::to_string(total) + " and 0");
      break;
    }
    std::this_thread::sleep_for(5ms);  // polling the server's state between requests
  }
  natsMsgList_Destroy(&batch);
  natsSubscription_Destroy(sub);
}

side_run run_nats(const options& o, const nats_facts& facts, std::size_t size, bool sync_always) {
  side_run r;
  r.ran = true;
  auto server = start_nats(facts, jetstream_settings(sync_always));
  const machine_noise noise(*server.proc);
  async_acks acks;
  {
    nats_client c;
    natsStatus s = natsConnection_ConnectTo(&c.nc, server.url.c_str());
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error(("connect " + server.url).c_str(), s));
      return r;
    }
    jsOptions_Init(&c.opts);
    c.opts.Wait = std::chrono::milliseconds(k_reply_timeout).count();
    c.opts.PublishAsync.MaxPending = static_cast<int64_t>(o.window);
    c.opts.PublishAsync.AckHandler = &async_acks::on_ack;
    c.opts.PublishAsync.AckHandlerClosure = &acks;
    c.opts.PublishAsync.StallWait = std::chrono::milliseconds(k_reply_timeout).count();
    s = natsConnection_JetStream(&c.js, c.nc, &c.opts);
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error("natsConnection_JetStream", s));
      return r;
    }
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = k_stream;
    const char* subjects[] = {k_subjects};
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    jsStreamInfo* si = nullptr;
    s = js_AddStream(&si, c.js, &cfg, &c.opts, &jerr);
    if (s != NATS_OK) {
      r.fail("JetStream: " + nats_error("js_AddStream", s, jerr));
      return r;
    }
    jsStreamInfo_Destroy(si);
    nats_publish(c, r, o, size, sync_always ? o.always_rtt : o.rtt, *server.proc, acks);
    if (r.failures.empty()) nats_consume(c, r, o, *server.proc);
  }
  r.others = noise.others();
  // nats-server exits 0 on SIGINT (1 on SIGTERM).
  if (const int status = server.proc->finish(SIGINT, 10s); status != 0) {
    r.fail("JetStream: nats-server exited with status " + std::to_string(status) + " (log " +
           server.dir->file("nats.log") + ")");
  }
  return r;
}

#endif  // ENSEMBLE_BENCH_HAVE_NATS

// ---------------------------------------------------------------------------------------------
// (d) The event path with and without a stream for other topics: bench_all's event scenario

struct event_path_run {
  std::map<std::string, double> rate;  // by bench_all's kind: ens-sdk-sub, ens-plain-sub
  double lost = 0, failed = 0;
  bool ok = false;
};

event_path_run run_event_path(const options& o, std::size_t size, bool with_stream) {
  std::vector<std::string> args{"--only",
                                "events",
                                "--only-ensemble",
                                "--repeat",
                                "1",
                                "--quiet-wait",
                                "0",
                                "--messages",
                                std::to_string(o.event_messages),
                                "--sizes",
                                std::to_string(size),
                                "--result-lines"};
  std::unique_ptr<temp_dir> dir;
  if (with_stream) {
    dir = std::make_unique<temp_dir>("event-path");
    // A stream for other topics than the events measured (bench.event).
    write_file(dir->file("streams.yaml"), "streams:\n  - name: orders\n    topics: [orders.]\n");
    args.insert(args.end(), {"--broker-data", dir->file("data"), "--broker-streams",
                             dir->file("streams.yaml")});
  }
  auto bench = child::spawn("bench_all", sibling_exe("bench_all"), args);
  event_path_run r;
  for (int kinds = 0; kinds < 2; ++kinds) {
    auto line = bench->try_expect("result-events", k_phase_timeout);
    if (!line) break;
    auto f = parse_fields(*line);
    r.rate[f["kind"]] = field_num(f, "rate");
    r.lost += field_num(f, "lost");
    r.failed += field_num(f, "failed");
  }
  const int status = bench->finish(0, k_phase_timeout);  // it exits by itself; "quit" is ignored
  r.ok = status == 0 && r.rate.size() == 2;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Report

// A figure of a phase that completed, or "-".
std::string figure(bool ok, double v, bool rate = true) {
  if (!ok) return "-";
  return rate ? thousands(v) : fixed(v);
}
std::string ratio(bool ok, double ens, double js) {
  return ok && js > 0 && ens > 0 ? fixed(ens / js, 2) + "x" : "-";
}

void print_row(const std::string& size, const std::string& metric, const std::string& a,
               const std::string& b, const std::string& c, const std::string& note = "") {
  std::printf("%-7s %-34s %13s %13s %8s  %s\n", size.c_str(), metric.c_str(), a.c_str(), b.c_str(),
              c.c_str(), note.c_str());
}

void print_side_line(const char* side, std::size_t size, int rep, const side_run& r) {
  if (!r.ran) return;
  std::printf(
      "  %-9s %-7s run %d: rtt p50 %s us p99 %s us, %s/s | window %s/s | consume %s/s (%s of %s "
      "acked, %s redelivered)\n            cores server/client: rtt %.2f/%.2f, window %.2f/%.2f, "
      "consume %.2f/%.2f | "
      "others on the machine %.2f\n",
      side, size_label(size).c_str(), rep + 1, fixed(r.rtt_p50).c_str(), fixed(r.rtt_p99).c_str(),
      thousands(r.rtt_rate).c_str(), thousands(r.window_rate).c_str(),
      thousands(r.consume_rate).c_str(), thousands(static_cast<double>(r.consumed)).c_str(),
      thousands(static_cast<double>(r.stored)).c_str(),
      thousands(static_cast<double>(r.redelivered)).c_str(), r.cpu_rtt, r.client_rtt, r.cpu_window,
      r.client_window, r.cpu_consume, r.client_consume, r.others);
  std::fflush(stdout);
}

// The runs of one side for one size and sync policy: medians of the phases that completed in
// every run.
struct side_series {
  std::vector<side_run> runs;
  std::string skipped;
  bool ran() const { return !runs.empty(); }
  template <class F>
  bool all(F ok) const {
    return ran() && std::all_of(runs.begin(), runs.end(), ok);
  }
  template <class F>
  double med(F value) const {
    std::vector<double> v;
    for (const auto& r : runs) v.push_back(value(r));
    return median(v);
  }
};

void print_table(const options& o, const std::string& sync_title,
                 const std::map<std::size_t, std::pair<side_series, side_series>>& series) {
  std::printf("\n%s; median of %d run(s)\n", sync_title.c_str(), o.repeat);
  print_row("size", "metric", "Ensemble", "JetStream", "Ens/JS");
  for (auto size : o.sizes) {
    const auto& [es, js] = series.at(size);
    side_run e, j;  // the medians
    for (const auto& x : {std::make_pair(&es, &e), std::make_pair(&js, &j)}) {
      const side_series& s = *x.first;
      side_run& m = *x.second;
      m.ran = s.ran();
      m.skipped = s.skipped;
      m.rtt_ok = s.all([](const side_run& r) { return r.rtt_ok; });
      m.window_ok = s.all([](const side_run& r) { return r.window_ok; });
      m.consume_ok = s.all([](const side_run& r) { return r.consume_ok; });
      m.rtt_p50 = s.med([](const side_run& r) { return r.rtt_p50; });
      m.rtt_p99 = s.med([](const side_run& r) { return r.rtt_p99; });
      m.rtt_rate = s.med([](const side_run& r) { return r.rtt_rate; });
      m.window_rate = s.med([](const side_run& r) { return r.window_rate; });
      m.consume_rate = s.med([](const side_run& r) { return r.consume_rate; });
      m.stored = s.ran() ? s.runs.front().stored : 0;
    }
    const std::string sz = size_label(size);
    const bool rtt = e.rtt_ok && j.rtt_ok;
    const bool window = e.window_ok && j.window_ok;
    const bool consume = e.consume_ok && j.consume_ok;
    print_row(sz, "acked publish RTT p50 us, 1 in flight", figure(e.rtt_ok, e.rtt_p50, false),
              figure(j.rtt_ok, j.rtt_p50, false), ratio(rtt, e.rtt_p50, j.rtt_p50),
              "lower is better");
    print_row("", "acked publish RTT p99 us, 1 in flight", figure(e.rtt_ok, e.rtt_p99, false),
              figure(j.rtt_ok, j.rtt_p99, false), ratio(rtt, e.rtt_p99, j.rtt_p99),
              "lower is better");
    print_row("", "acked publishes/s, 1 in flight", figure(e.rtt_ok, e.rtt_rate),
              figure(j.rtt_ok, j.rtt_rate), ratio(rtt, e.rtt_rate, j.rtt_rate));
    print_row("", "acked publishes/s, " + std::to_string(o.window) + " in flight",
              figure(e.window_ok, e.window_rate), figure(j.window_ok, j.window_rate),
              ratio(window, e.window_rate, j.window_rate));
    print_row("", "durable consume + ack, events/s", figure(e.consume_ok, e.consume_rate),
              figure(j.consume_ok, j.consume_rate), ratio(consume, e.consume_rate, j.consume_rate),
              "(" + thousands(static_cast<double>(std::max(e.stored, j.stored))) + " events)");
    if (!j.ran) print_row("", "", "", "", "", "JetStream " + j.skipped);
  }
}

int orchestrate(const options& o) {
  std::printf(
      "bench_streams: %u cores, load average %s; TCP loopback; each server its own process with "
      "its own temporary data directory\n",
      std::thread::hardware_concurrency(),
      [] {
        std::ifstream in("/proc/loadavg");
        std::string a, b, c;
        in >> a >> b >> c;
        return a + " " + b + " " + c;
      }()
          .c_str());
  std::printf(
      "per size: %zu warm-up + %zu acked publishes 1 in flight (%zu under --sync always), %zu "
      "with %zu in flight; then one durable consumer (explicit acks, max_ack_pending %u) reads "
      "all of them\n",
      o.warmup, o.rtt, o.always_rtt, o.events, o.window, o.max_ack_pending);
  std::printf(
      "Ensemble client: a minimal raw-protocol DEALER (HELLO, PUBLISH ack:true, CONSUME, "
      "DELIVER, ACK), not the SDK\n");

  nats_facts facts;
  bool nats_sync_always = false;  // whether that nats-server knows `sync_interval: always`
  std::string nats_skip = nats_skipped(o);
  if (nats_skip.empty()) {
    facts = probe_nats(o.nats_server.empty() ? "nats-server" : o.nats_server);
    nats_sync_always = nats_accepts(facts, jetstream_settings(true));
    std::printf(
        "JetStream client: libnats %s (js_Publish; js_PublishAsync with MaxPending %zu; a durable "
        "%s consumer, AckExplicit, natsMsg_Ack); server %s %s, file storage; every publish "
        "carries a Nats-Msg-Id, as Ensemble de-duplicates every event by id\n",
        libnats_version().c_str(), o.window,
        o.js_consumer == "pull" ? "pull (natsSubscription_Fetch of max-ack-pending)" : "push",
        facts.path.c_str(), facts.version.c_str());
  } else {
    std::printf("JetStream: %s\n", nats_skip.c_str());
  }
  std::fflush(stdout);

  struct policy {
    std::string ensemble_sync;
    bool js_sync_always;
    std::string title;
  };
  std::vector<policy> policies;
  if (o.sync == "os" || o.sync == "both") {
    policies.push_back(
        {"os", false,
         "SYNC OS: Ensemble --sync os (acked = written to the kernel, no fdatasync) vs JetStream "
         "default (acked = written to the kernel; fsync every 2 min, sync_interval default)"});
  }
  if (o.sync == "always" || o.sync == "both") {
    policies.push_back(
        {"always", true,
         "SYNC ALWAYS: Ensemble --sync always (fdatasync once per poll batch before the acks) vs "
         "JetStream sync_interval: always (fsync per write)"});
  }

  bool failed = false;
  const auto t0 = clock_type::now();
  std::vector<double> others;
  std::vector<std::pair<std::string, std::map<std::size_t, std::pair<side_series, side_series>>>>
      tables;
  for (const auto& p : policies) {
    std::printf("\n--sync %s\n", p.ensemble_sync.c_str());
    std::string js_skip = nats_skip;
    if (js_skip.empty() && p.js_sync_always && !nats_sync_always) {
      js_skip = "not run: nats-server " + facts.version +
                " does not know `jetstream { sync_interval: always }` (nats-server 2.10 added it)";
      std::printf("  JetStream %s\n", js_skip.c_str());
    }
    std::map<std::size_t, std::pair<side_series, side_series>> series;
    for (int rep = 0; rep < o.repeat; ++rep) {
      for (auto size : o.sizes) {
        // The two sides alternate per size, so that drift in the machine's load hits both alike.
        auto& [es, js] = series[size];
        side_run e = run_ensemble(o, size, p.ensemble_sync);
        print_side_line("Ensemble", size, rep, e);
        failed = failed || !e.failures.empty();
        others.push_back(e.others);
        es.runs.push_back(std::move(e));
        if (!js_skip.empty()) {
          js.skipped = js_skip;
          continue;
        }
#if ENSEMBLE_BENCH_HAVE_NATS
        side_run j = run_nats(o, facts, size, p.js_sync_always);
        print_side_line("JetStream", size, rep, j);
        failed = failed || !j.failures.empty();
        others.push_back(j.others);
        js.runs.push_back(std::move(j));
#endif
      }
    }
    tables.emplace_back(p.title, std::move(series));
  }

  // (d) bench_all's event scenario (SDK publisher, SDK and plain SUB subscribers), on a broker
  // without streams and on one with --data and a stream for other topics; alternating.
  std::map<std::size_t, std::pair<std::vector<event_path_run>, std::vector<event_path_run>>> paths;
  if (!o.skip_event_path) {
    std::printf("\nevent path: bench_all's event scenario, %s events per run, %d run(s) each\n",
                thousands(static_cast<double>(o.event_messages)).c_str(), o.event_repeat);
    for (int rep = 0; rep < o.event_repeat; ++rep) {
      for (auto size : o.sizes) {
        for (bool with_stream : {false, true}) {
          auto r = run_event_path(o, size, with_stream);
          std::printf(
              "  %-7s %-26s run %d: SDK sub %s/s, plain SUB %s/s, lost %s, publish failed %s%s\n",
              size_label(size).c_str(), with_stream ? "stream for other topics" : "no streams",
              rep + 1, thousands(r.rate["ens-sdk-sub"]).c_str(),
              thousands(r.rate["ens-plain-sub"]).c_str(), thousands(r.lost).c_str(),
              thousands(r.failed).c_str(), r.ok ? "" : "  FAILED (bench_all failed)");
          std::fflush(stdout);
          if (!r.ok || r.lost != 0 || r.failed != 0) failed = true;
          (with_stream ? paths[size].second : paths[size].first).push_back(std::move(r));
        }
      }
    }
  }

  for (const auto& [title, runs] : tables) print_table(o, title, runs);
  if (!paths.empty()) {
    std::printf(
        "\nEVENT PATH (no durability): delivered events/s, median of %d; ratio = with a stream "
        "declared for other topics / without streams\n",
        o.event_repeat);
    print_row("size", "subscriber", "no streams", "with stream", "ratio");
    for (auto size : o.sizes) {
      for (const char* kind : {"ens-sdk-sub", "ens-plain-sub"}) {
        std::vector<double> plain, stream;
        for (auto& r : paths[size].first) plain.push_back(r.rate[kind]);
        for (auto& r : paths[size].second) stream.push_back(r.rate[kind]);
        const double a = median(plain), b = median(stream);
        print_row(kind == std::string("ens-sdk-sub") ? size_label(size) : "",
                  kind == std::string("ens-sdk-sub") ? "SDK subscriber" : "plain SUB", thousands(a),
                  thousands(b), ratio(true, b, a));
      }
    }
  }
  const double others_max = others.empty() ? 0 : *std::max_element(others.begin(), others.end());
  std::printf(
      "\nother processes on the machine used %.2f cores (median of the side runs), %.2f at "
      "most%s\n",
      median(others), others_max,
      others_max > 0.25 ? ": the machine was not quiet, figures are noisy" : "");
  std::printf("bench wall time %.1f s\n", seconds_since(t0));
  if (failed) {
    std::printf(
        "FAILED: some acks, deliveries or events did not arrive, or a server refused them (see "
        "the FAILED lines above); figures from those runs are not results\n");
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace ensemble::bench

int main(int argc, char** argv) {
  ensemble::bench::options o;
  CLI::App app{
      "bench_streams: Ensemble's durable streams vs NATS JetStream, side by side. See "
      "docs/benchmarks.md."};
  app.add_option("--sizes", o.sizes, "payload sizes in bytes")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--rtt", o.rtt, "acked publishes with 1 in flight")->capture_default_str();
  app.add_option("--always-rtt", o.always_rtt, "the same under --sync always")
      ->capture_default_str();
  app.add_option("--events", o.events, "acked publishes with --window in flight")
      ->capture_default_str();
  app.add_option("--window", o.window, "publishes in flight")->capture_default_str();
  app.add_option("--warmup", o.warmup, "acked publishes before measuring")->capture_default_str();
  app.add_option("--max-ack-pending", o.max_ack_pending,
                 "deliveries a consumer may hold unacked (both sides)")
      ->capture_default_str();
  app.add_option("--sync", o.sync, "os, always or both")
      ->check(CLI::IsMember({"os", "always", "both"}))
      ->capture_default_str();
  app.add_option("--repeat", o.repeat, "runs of each side, size and sync policy (medians)")
      ->capture_default_str()
      ->check(CLI::Range(1, 20));
  app.add_option("--event-messages", o.event_messages,
                 "events per run of the event-path comparison")
      ->capture_default_str();
  app.add_option("--event-repeat", o.event_repeat, "runs of the event-path comparison")
      ->capture_default_str();
  app.add_flag("--skip-event-path", o.skip_event_path, "skip the event-path comparison");
  app.add_flag("--skip-nats", o.skip_nats, "measure Ensemble only");
  app.add_option("--js-consumer", o.js_consumer,
                 "JetStream's durable consumer: pull (fetch batches of max-ack-pending) or push")
      ->check(CLI::IsMember({"pull", "push"}))
      ->capture_default_str();
  app.add_option("--nats-server", o.nats_server, "the nats-server executable (default: on PATH)");
  app.add_option("--log-level", o.log_level, "the broker's log level")->capture_default_str();
  app.add_option("--idle-consumers", o.idle_consumers,
                 "Ensemble: consumers without members created on the stream before measuring "
                 "(at most 999 under the broker's default --max-consumers)")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{0}, std::size_t{999}));
  CLI11_PARSE(app, argc, argv);
  try {
    return ensemble::bench::orchestrate(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_streams: %s\n", e.what());
    return 1;
  }
}
