#include "nats_peer.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <climits>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "roles.hpp"

namespace ensemble::bench {
namespace {

constexpr auto k_start_timeout = 15s;

std::string config_text(const temp_dir& dir, const nats_settings& s) {
  std::string out = "listen: \"127.0.0.1:-1\"\n";
  if (s.max_pending > 0) out += "max_pending: " + std::to_string(s.max_pending) + "\n";
  if (!s.write_deadline.empty()) out += "write_deadline: \"" + s.write_deadline + "\"\n";
  if (s.jetstream) {
    out += "jetstream {\n  store_dir: \"" + dir.file("js") + "\"\n" +
           (s.sync_always ? "  sync_interval: always\n" : "") + "}\n";
  }
  return out;
}

}  // namespace

std::string nats_unavailable(const std::string& program) {
#if !ENSEMBLE_BENCH_HAVE_NATS
  (void)program;
  return "built without libnats (install it with scripts/install-deps.sh --nats, then re-run "
         "cmake)";
#else
  if (find_on_path(program).empty()) {
    return (program.find('/') != std::string::npos ? "no executable " + program
                                                   : "no " + program + " on PATH") +
           " (scripts/install-deps.sh --nats installs nats-server)";
  }
  return "";
#endif
}

nats_facts probe_nats(const std::string& program) {
  nats_facts f;
  f.path = find_on_path(program);
  auto v = child::spawn("nats-server --version", f.path, {"--version"});
  f.version = v->expect("nats-server", k_start_timeout);  // "nats-server: v2.9.10"
  if (auto sp = f.version.find(' '); sp != std::string::npos) f.version = f.version.substr(sp + 1);
  v->finish(SIGTERM, 5s);
  return f;
}

std::string libnats_version() {
#if ENSEMBLE_BENCH_HAVE_NATS
  return nats_GetVersion();
#else
  return "-";
#endif
}

bool nats_accepts(const nats_facts& facts, const nats_settings& settings) {
  // `-t` checks a configuration and exits: 0 when it knows every field. Its complaint goes to
  // its stdout here (through sh), not to the terminal.
  temp_dir dir("nats-probe");
  write_file(dir.file("nats.conf"), config_text(dir, settings));
  auto t = child::spawn("nats-server -t", "/bin/sh",
                        {"-c", "exec \"$0\" -t -c \"$1\" 2>&1", facts.path, dir.file("nats.conf")});
  return t->finish(0, 10s) == 0;  // it ignores the "quit" on its stdin
}

nats_server start_nats(const nats_facts& facts, const nats_settings& settings) {
  nats_server s;
  s.dir = std::make_unique<temp_dir>(settings.jetstream ? "jetstream" : "nats");
  write_file(s.dir->file("nats.conf"), config_text(*s.dir, settings));
  s.proc = child::spawn(
      "nats-server", facts.path,
      {"-c", s.dir->file("nats.conf"), "-l", s.log(), "--ports_file_dir", s.dir->path().string()});
  // It writes its real port to <dir>/nats-server_<pid>.ports once it listens.
  const std::string ports = s.dir->file("nats-server_" + std::to_string(s.proc->pid()) + ".ports");
  const auto deadline = clock_type::now() + k_start_timeout;
  while (true) {
    std::ifstream in(ports);
    if (in) {
      try {
        const auto j = nlohmann::json::parse(in);
        s.url = j.at("nats").at(0).get<std::string>();
        return s;
      } catch (const std::exception&) {
        // written but not complete yet
      }
    }
    if (has_exited(s.proc->pid())) {
      throw std::runtime_error("nats-server exited at start; its log: " + s.log());
    }
    if (clock_type::now() > deadline) {
      throw std::runtime_error("nats-server wrote no ports file " + ports + " within 15 s");
    }
    std::this_thread::sleep_for(5ms);  // polling a file another process writes
  }
}

std::size_t nats_slow_consumer_reports(const nats_server& server) {
  std::ifstream in(server.log());
  std::size_t n = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.find("Slow Consumer") != std::string::npos) ++n;
  }
  return n;
}

std::int64_t nats_max_pending(int hwm, std::size_t size) {
  // Per message the server also holds the MSG line (subject, sid, reply, length): 128 bytes
  // cover it. nats-server refuses a max_pending below its max_payload (1 MB).
  return std::max<std::int64_t>(
      static_cast<std::int64_t>(hwm) * static_cast<std::int64_t>(size + 128), 1 << 20);
}

#if !ENSEMBLE_BENCH_HAVE_NATS

int run_nats_role(const std::string& role, const nats_role_options&) {
  std::fprintf(stderr, "bench: role '%s' needs libnats, and this bench was built without it\n",
               role.c_str());
  return 2;
}

#else

std::string nats_error(const char* what, natsStatus s, jsErrCode code) {
  std::string out = std::string(what) + ": " + natsStatus_GetText(s);
  if (code != 0) out += " (JetStream error " + std::to_string(static_cast<int>(code)) + ")";
  const char* last = nats_GetLastError(nullptr);
  if (last != nullptr && *last != '\0') out += " [" + std::string(last) + "]";
  return out;
}

namespace {

constexpr const char* k_event_subject = "bench.event";
constexpr const char* k_event_subscription = "bench.>";
constexpr const char* k_echo_rtt = "bench.echo.rtt";
constexpr const char* k_echo_tput = "bench.echo.tput";
constexpr std::int64_t k_reply_timeout_ms =
    std::chrono::duration_cast<std::chrono::milliseconds>(k_reply_timeout).count();

void check(natsStatus s, const std::string& what) {
  if (s != NATS_OK) throw std::runtime_error(nats_error(what.c_str(), s));
}

// A word for the result line, whose fields are separated by spaces.
std::string error_word(natsStatus s) {
  std::string w = natsStatus_GetText(s);
  std::replace(w.begin(), w.end(), ' ', '_');
  return w;
}

// One connection to the server. It does not reconnect: a connection the server closes (a slow
// consumer) ends what it carried, and the loss is counted like any other. What libnats reports
// on its own threads is counted and said once on stderr.
class nats_connection {
 public:
  nats_connection(const nats_role_options& o, bool send_asap, std::string role)
      : role_(std::move(role)) {
    check(natsOptions_Create(&opts_), "natsOptions_Create");
    check(natsOptions_SetURL(opts_, o.url.c_str()), "natsOptions_SetURL " + o.url);
    check(natsOptions_SetSendAsap(opts_, send_asap), "natsOptions_SetSendAsap");
    check(natsOptions_SetAllowReconnect(opts_, false), "natsOptions_SetAllowReconnect");
    check(natsOptions_SetErrorHandler(opts_, &nats_connection::on_error, this),
          "natsOptions_SetErrorHandler");
    check(natsOptions_SetDisconnectedCB(opts_, &nats_connection::on_disconnected, this),
          "natsOptions_SetDisconnectedCB");
    check(natsConnection_Connect(&nc_, opts_), "connect " + o.url);
  }
  ~nats_connection() {
    closing_ = true;
    if (nc_ != nullptr) natsConnection_Destroy(nc_);
    natsOptions_Destroy(opts_);
  }
  nats_connection(const nats_connection&) = delete;
  nats_connection& operator=(const nats_connection&) = delete;

  natsConnection* get() const { return nc_; }
  std::uint64_t slow_consumer() const { return slow_consumer_.load(); }
  std::uint64_t disconnects() const { return disconnects_.load(); }

 private:
  static void on_error(natsConnection*, natsSubscription*, natsStatus err, void* closure) {
    auto* self = static_cast<nats_connection*>(closure);
    if (err == NATS_SLOW_CONSUMER) {
      if (self->slow_consumer_.fetch_add(1) == 0) {
        std::fprintf(stderr,
                     "bench %s: libnats: slow consumer, a subscription's pending limit was "
                     "reached and messages were dropped\n",
                     self->role_.c_str());
      }
      return;
    }
    std::fprintf(stderr, "bench %s: libnats: %s\n", self->role_.c_str(), natsStatus_GetText(err));
  }
  static void on_disconnected(natsConnection*, void* closure) {
    auto* self = static_cast<nats_connection*>(closure);
    if (self->closing_) return;
    if (self->disconnects_.fetch_add(1) == 0) {
      std::fprintf(stderr,
                   "bench %s: nats-server closed the connection (a slow consumer? see its log)\n",
                   self->role_.c_str());
    }
  }

  std::string role_;
  natsOptions* opts_ = nullptr;
  natsConnection* nc_ = nullptr;
  std::atomic<bool> closing_{false};
  std::atomic<std::uint64_t> slow_consumer_{0};
  std::atomic<std::uint64_t> disconnects_{0};
};

// Pending limits of a subscription as bench_all raises every raw high-water mark: room for the
// whole run, so that libnats does not drop by design.
void raise_pending_limits(natsSubscription* sub, const nats_role_options& o) {
  const auto bytes = std::min<std::int64_t>(INT_MAX, nats_max_pending(o.hwm, o.size));
  check(natsSubscription_SetPendingLimits(sub, o.hwm, static_cast<int>(bytes)),
        "natsSubscription_SetPendingLimits");
}

// A line from the orchestrator; false if it went away first.
bool wait_for_line(line_reader& in, const std::string& want) {
  while (true) {
    auto line = in.next(1000ms);
    if (line && *line == want) return true;
    if (in.eof()) return false;
  }
}

int role_nats_pub(const nats_role_options& o) {
  nats_connection c(o, false, "nats_pub");
  line_reader in(STDIN_FILENO);
  // The subscriber's interest reached the server before the orchestrator says "go": no probes.
  if (!wait_for_line(in, "go")) return 1;
  std::string payload = make_payload(o.size, 0);
  std::size_t failed = 0;
  const auto t0 = clock_type::now();
  const pacer pace(o.event_rate);
  for (std::uint64_t i = 0; i < o.messages; ++i) {
    pace.wait_turn(i);
    stamp(payload, i);
    const natsStatus s = natsConnection_Publish(c.get(), k_event_subject, payload.data(),
                                                static_cast<int>(payload.size()));
    if (s != NATS_OK && ++failed == 1) {
      std::fprintf(stderr, "bench nats_pub: %s\n",
                   nats_error(("publish " + std::to_string(i)).c_str(), s).c_str());
    }
  }
  // Everything buffered reaches the server, which answers the PING behind it.
  if (const natsStatus s = natsConnection_FlushTimeout(c.get(), k_reply_timeout_ms); s != NATS_OK) {
    std::fprintf(stderr, "bench nats_pub: %s\n", nats_error("flush", s).c_str());
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  say("result sent=%zu failed=%zu seconds=%.6f probes=0", o.messages, failed, seconds);
  wait_for_quit(in);
  return 0;
}

// The subscriber's tally, fed on libnats' delivery thread; the mutex makes the final read safe
// whatever that thread is doing then.
struct event_sink {
  std::mutex mutex;
  event_tally tally;
  std::atomic<std::uint64_t> received{0};

  static void on_event(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    auto* self = static_cast<event_sink*>(closure);
    {
      std::lock_guard lock(self->mutex);
      self->tally.add(
          index_of(natsMsg_GetData(msg), static_cast<std::size_t>(natsMsg_GetDataLength(msg))));
      self->received.store(self->tally.received, std::memory_order_release);
    }
    natsMsg_Destroy(msg);
  }
};

int role_nats_sub(const nats_role_options& o) {
  event_sink sink;  // outlives the connection, whose threads call into it
  nats_connection c(o, false, "nats_sub");
  natsSubscription* sub = nullptr;
  check(natsConnection_Subscribe(&sub, c.get(), k_event_subscription, &event_sink::on_event, &sink),
        std::string("subscribe ") + k_event_subscription);
  raise_pending_limits(sub, o);
  // The server has the subscription once it answered the PING sent after it.
  check(natsConnection_Flush(c.get()), "flush after subscribe");
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
  std::uint64_t seen = sink.received.load(std::memory_order_acquire);
  auto quiet_since = clock_type::now();
  while (seen < expected && clock_type::now() - quiet_since < k_idle_end) {
    std::this_thread::sleep_for(1ms);  // polling an atomic another thread advances
    const auto now_seen = sink.received.load(std::memory_order_acquire);
    if (now_seen != seen) quiet_since = clock_type::now();
    seen = now_seen;
  }
  say("drained");
  std::int64_t dropped = 0;
  (void)natsSubscription_GetDropped(sub, &dropped);
  (void)natsSubscription_Unsubscribe(sub);
  event_tally tally;
  {
    std::lock_guard lock(sink.mutex);
    tally = sink.tally;
  }
  char extra[128];
  std::snprintf(extra, sizeof extra,
                " dropped=%" PRId64 " slow_consumer=%" PRIu64 " disconnects=%" PRIu64, dropped,
                c.slow_consumer(), c.disconnects());
  tally.report(extra);
  natsSubscription_Destroy(sub);
  return 0;
}

void on_request(natsConnection* nc, natsSubscription*, natsMsg* msg, void*) {
  // A reply that cannot be sent is a reply the client never gets: it counts it as lost.
  if (const char* reply = natsMsg_GetReply(msg); reply != nullptr) {
    (void)natsConnection_Publish(nc, reply, natsMsg_GetData(msg), natsMsg_GetDataLength(msg));
  }
  natsMsg_Destroy(msg);
}

// Answers on two connections: send-asap for the round trips 1 in flight (each reply written at
// once), buffered for the pipelined requests (replies written in batches by libnats' flusher).
int role_nats_echo(const nats_role_options& o) {
  nats_connection rtt(o, true, "nats_echo");
  nats_connection tput(o, false, "nats_echo");
  natsSubscription* rtt_sub = nullptr;
  natsSubscription* tput_sub = nullptr;
  check(natsConnection_Subscribe(&rtt_sub, rtt.get(), k_echo_rtt, &on_request, nullptr),
        std::string("subscribe ") + k_echo_rtt);
  check(natsConnection_Subscribe(&tput_sub, tput.get(), k_echo_tput, &on_request, nullptr),
        std::string("subscribe ") + k_echo_tput);
  raise_pending_limits(rtt_sub, o);
  raise_pending_limits(tput_sub, o);
  check(natsConnection_Flush(rtt.get()), "flush after subscribe");
  check(natsConnection_Flush(tput.get()), "flush after subscribe");
  say("ready");
  line_reader in(STDIN_FILENO);
  wait_for_quit(in);
  natsSubscription_Destroy(rtt_sub);
  natsSubscription_Destroy(tput_sub);
  return 0;
}

int role_nats_client(const nats_role_options& o) {
  nats_connection rtt_conn(o, true, "nats_client");
  nats_connection tput_conn(o, false, "nats_client");
  std::string first_error;
  for (std::size_t i = 0; i < o.warmup; ++i) {
    const auto payload = make_payload(o.size, i);
    natsMsg* reply = nullptr;
    check(natsConnection_Request(&reply, rtt_conn.get(), k_echo_rtt, payload.data(),
                                 static_cast<int>(payload.size()), k_reply_timeout_ms),
          "warm-up request");
    natsMsg_Destroy(reply);
  }

  say("phase rtt begin");
  std::vector<std::int64_t> rtt;
  rtt.reserve(o.rtt_calls);
  std::size_t rtt_failed = 0;
  for (std::size_t i = 0; i < o.rtt_calls; ++i) {
    const auto payload = make_payload(o.size, i);  // built outside the timed span
    natsMsg* reply = nullptr;
    const auto t0 = clock_type::now();
    const natsStatus s =
        natsConnection_Request(&reply, rtt_conn.get(), k_echo_rtt, payload.data(),
                               static_cast<int>(payload.size()), k_reply_timeout_ms);
    const auto t1 = clock_type::now();
    if (s != NATS_OK) {
      if (first_error.empty()) first_error = error_word(s);
      if (s == NATS_TIMEOUT) {  // as the raw client: the rest are not tried
        rtt_failed += o.rtt_calls - i;
        break;
      }
      ++rtt_failed;
      continue;
    }
    const auto got =
        index_of(natsMsg_GetData(reply), static_cast<std::size_t>(natsMsg_GetDataLength(reply)));
    natsMsg_Destroy(reply);
    if (got != i) {
      ++rtt_failed;
      if (first_error.empty()) first_error = "wrong_payload";
      continue;
    }
    rtt.push_back((t1 - t0).count());
  }
  say("phase rtt end");
  auto rtt_summary = summarize(rtt);

  // Pipelined: requests published with a reply subject, replies read from an inbox.
  natsInbox* inbox = nullptr;
  check(natsInbox_Create(&inbox), "natsInbox_Create");
  natsSubscription* replies = nullptr;
  check(natsConnection_SubscribeSync(&replies, tput_conn.get(), inbox), "subscribe to the inbox");
  raise_pending_limits(replies, o);
  check(natsConnection_Flush(tput_conn.get()), "flush after subscribe");
  std::string payload = make_payload(o.size, 0);
  std::size_t failed = 0;
  auto send_request = [&](std::uint64_t index) {
    stamp(payload, index);
    const natsStatus s = natsConnection_PublishRequest(
        tput_conn.get(), k_echo_tput, inbox, payload.data(), static_cast<int>(payload.size()));
    if (s != NATS_OK && first_error.empty()) first_error = error_word(s);
  };
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
    natsMsg* msg = nullptr;
    const natsStatus s = natsSubscription_NextMsg(&msg, replies, k_reply_timeout_ms);
    if (s != NATS_OK) {
      if (first_error.empty()) first_error = error_word(s);
      break;
    }
    ++answered;
    const auto now = clock_type::now();
    const auto got =
        index_of(natsMsg_GetData(msg), static_cast<std::size_t>(natsMsg_GetDataLength(msg)));
    natsMsg_Destroy(msg);
    if (got < o.pipelined) {
      ++ok;
      loaded.push_back((now - sent_at[got]).count());
    } else {
      ++failed;
      if (first_error.empty()) first_error = "wrong_payload";
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
  report_commands(rtt_summary, rtt.size(), rtt_failed, static_cast<double>(ok) / seconds,
                  loaded_summary, ok, failed, first_error);
  natsSubscription_Destroy(replies);
  natsInbox_Destroy(inbox);
  return 0;
}

}  // namespace

int run_nats_role(const std::string& role, const nats_role_options& o) {
  if (role == "nats_pub") return role_nats_pub(o);
  if (role == "nats_sub") return role_nats_sub(o);
  if (role == "nats_echo") return role_nats_echo(o);
  if (role == "nats_client") return role_nats_client(o);
  std::fprintf(stderr, "bench: unknown role '%s'\n", role.c_str());
  return 2;
}

#endif  // ENSEMBLE_BENCH_HAVE_NATS

}  // namespace ensemble::bench
