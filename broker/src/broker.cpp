#include "ensemble/broker/broker.hpp"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "auth.hpp"
#include "consumer_host.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/logging.hpp"
#include "journal.hpp"
#include "registry.hpp"
#include "stream_config_file.hpp"
#include "topic_sequencer.hpp"

namespace ensemble::broker {

using common::command;
namespace errc = common::errc;
using common::error;
using common::header;
using common::steady_clock;
using json = nlohmann::json;

namespace {

// docs/protocol.md section 3: ids are at most k_max_id_length bytes; "" when `id` is within it.
std::string check_id_length(std::string_view command_name, const std::string& id) {
  if (id.size() <= common::k_max_id_length) return {};
  return std::string(command_name) + " 'id' is " + std::to_string(id.size()) +
         " bytes, longer than the limit of " + std::to_string(common::k_max_id_length);
}

constexpr std::size_t k_batch = 1024;  // messages handled per socket per poll round
constexpr std::string_view k_broker_service = "broker";
constexpr std::string_view k_streams_disabled = "streams_disabled";  // no --data
constexpr std::uint64_t k_stream_read_max = 10'000;                  // records per stream_read
// Secured mode: the ZAP handler's endpoint (RFC 27) and the domain of the broker's sockets.
constexpr const char* k_zap_endpoint = "inproc://zeromq.zap.01";
constexpr const char* k_zap_domain = "ensemble";
// The connection metadata the ZAP handler adds: the public key the peer authenticated with
// (User-Id holds its identity's name). ZAP properties take precedence over what a peer sends.
constexpr const char* k_key_property = "Ensemble-Key";
// And a serial number per handshake: a message whose serial is the one learned for its
// descriptor comes from the same connection, without a system call per message.
constexpr const char* k_connection_property = "Ensemble-Connection";

struct counters {
  std::uint64_t messages_in = 0;
  std::uint64_t messages_out = 0;
  std::uint64_t bytes_in = 0;
  std::uint64_t requests = 0;
  std::uint64_t replies = 0;
  std::uint64_t events = 0;
  std::uint64_t malformed = 0;
  std::uint64_t late_replies = 0;     // worker answered after the broker gave up on it
  std::uint64_t unknown_replies = 0;  // token unknown, or not dispatched to that peer
  std::uint64_t undeliverable = 0;    // the addressed peer was gone
  std::uint64_t workers_lost = 0;
  std::uint64_t redispatched = 0;
  std::map<std::string, std::uint64_t> errors_by_code;
};

// Per stream, in broker.stats and broker.stream_info.
struct stream_counters {
  std::uint64_t stored = 0;
  std::uint64_t duplicates = 0;
  std::uint64_t storage_errors = 0;
  std::map<std::string, std::uint64_t> errors_by_code;
};

// Secured mode, in broker.stats `auth`.
struct auth_counters {
  std::uint64_t handshakes_refused = 0;
  std::array<std::uint64_t, auth::k_rights> refused{};
  std::uint64_t reloads = 0;
  std::uint64_t reload_failures = 0;
};

// A connection of a secured peer, learned from the messages it sends (libzmq gives each
// message's file descriptor): what a reload needs to close the connections of a revoked key.
// The handshake serial tells a new connection on a reused descriptor number without a system
// call per message; the socket's inode, checked before a shutdown, tells a descriptor that was
// closed and reused since it was learned.
struct connection_entry {
  std::string serial;  // of the handshake (k_connection_property)
  std::string identity;
  std::string key;
  ino_t inode = 0;
  bool events = false;  // on the XPUB (a subscriber), else on the ROUTER
};

// A PUBLISH appended to a stream in this poll batch, waiting for the batch's flush before it
// is acked and fanned out.
struct stored_publish {
  peer_id peer;
  std::string from;  // the publisher as logs name it
  header hdr;
  zmq::message_t payload;
  streams::append_result appended;
  bool wants_ack = false;
};

// The ROUTER's routing id of a connection, in hex: two connections of one agent name (an
// agent that restarted while the broker still holds its previous connection) differ here.
std::string connection_label(const peer_id& peer) {
  static constexpr char k_hex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : peer) {
    out += k_hex[c >> 4];
    out += k_hex[c & 15];
  }
  return out;
}

std::string peer_label(const worker* w, const peer_id& peer) {
  if (w != nullptr && !w->agent.empty()) return w->agent;
  return "peer:" + connection_label(peer);
}

// Peers that offer no service (the CLI, a script calling one service) come and go with each
// call: their registrations and goodbyes are logged at debug, those of workers at info.
spdlog::level::level_enum lifecycle_level(const worker* w) {
  return w != nullptr && !w->offers.empty() ? spdlog::level::info : spdlog::level::debug;
}

// Plain mode binds only what other machines cannot reach (docs/protocol.md section 12).
bool is_loopback(std::string_view endpoint) {
  return endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://") ||
         endpoint.starts_with("tcp://127.") || endpoint.starts_with("tcp://[::1]:") ||
         endpoint.starts_with("tcp://localhost:");
}

std::string bind_or_throw(zmq::socket_t& socket, const std::string& endpoint, const char* what) {
  try {
    socket.bind(endpoint);
  } catch (const zmq::error_t& e) {
    throw common::config_error(what, "cannot bind " + endpoint + ": " + e.what());
  }
  return socket.get(zmq::sockopt::last_endpoint);
}

}  // namespace

struct broker::impl {
  explicit impl(config c)
      : cfg(std::move(c)),
        ctx(1),
        router(ctx, zmq::socket_type::router),
        xpub(ctx, zmq::socket_type::xpub),
        reg(registry_limits{.queue_per_service = cfg.queue_per_service,
                            .queue_total = cfg.queue_total,
                            .queue_bytes_per_service = cfg.queue_bytes_per_service,
                            .queue_bytes_total = cfg.queue_bytes_total,
                            .peer_budget_bytes = cfg.peer_budget_bytes,
                            .peer_budget_messages = cfg.peer_budget_messages,
                            .heartbeat = cfg.heartbeat,
                            .liveness = cfg.liveness}),
        broker_id(common::random_id().substr(0, 16)),
        trace_journal(cfg.journal_size),
        log(common::component_logger("broker")) {
    if (cfg.heartbeat.count() <= 0) throw common::config_error("--heartbeat", "must be > 0 ms");
    if (cfg.liveness == 0) throw common::config_error("--liveness", "must be >= 1");
    if (cfg.max_message_size < 1024) {
      throw common::config_error("--max-message-size", "must be at least 1024 bytes");
    }
    router.set(zmq::sockopt::router_mandatory, 1);
    router.set(zmq::sockopt::sndhwm, cfg.peer_hwm);
    router.set(zmq::sockopt::rcvhwm, cfg.peer_hwm);
    router.set(zmq::sockopt::linger, 500);
    // libzmq drops a peer that sends a frame over this hard limit; below it the broker answers
    // too_large itself, so the limit is generous.
    router.set(zmq::sockopt::maxmsgsize,
               static_cast<int64_t>(cfg.max_message_size * 4 + k_max_header_slack));
    xpub.set(zmq::sockopt::sndhwm, cfg.event_hwm);
    // Every subscribe and unsubscribe (also a disconnected subscriber's) reaches us, not only a
    // prefix's first and last: stats.subscriptions counts subscribers per prefix.
    xpub.set(zmq::sockopt::xpub_verboser, 1);
    xpub.set(zmq::sockopt::linger, 500);
    secured = !cfg.curve_secret_key_file.empty() || !cfg.auth_file.empty();
    if (secured) {
      set_up_security();
    } else if (!cfg.insecure) {
      for (const auto& [endpoint, option] : {std::pair{cfg.router_endpoint, "--router"},
                                             std::pair{cfg.events_endpoint, "--events"}}) {
        if (is_loopback(endpoint)) continue;
        throw common::config_error(
            option, endpoint +
                        " is not a loopback endpoint, and without keys anyone who reaches it may "
                        "register any service, call anything and read every event. Run secured "
                        "(--curve-key FILE --auth FILE), or give --insecure to bind it anyway. "
                        "Plain mode binds tcp://127.*, tcp://[::1], tcp://localhost, ipc:// "
                        "and inproc://");
      }
    }
    eps.router = bind_or_throw(router, cfg.router_endpoint, "--router");
    eps.events = bind_or_throw(xpub, cfg.events_endpoint, "--events");
    wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) throw common::config_error("broker", "eventfd failed");
    open_streams();
  }
  ~impl() {
    if (wake_fd >= 0) ::close(wake_fd);
  }

  static constexpr std::size_t k_max_header_slack = 64 * 1024;

  config cfg;
  zmq::context_t ctx;
  zmq::socket_t router;
  zmq::socket_t xpub;
  endpoints eps;
  int wake_fd = -1;
  std::atomic<bool> stop_requested{false};
  registry reg;
  std::string broker_id;
  journal trace_journal;
  std::shared_ptr<spdlog::logger> log;
  counters stats;
  // Durable streams: null without --data. stream_topics maps each stream's prefixes to it
  // (prefixes never overlap, so a topic has at most one stream).
  std::unique_ptr<streams::stream_store> store;
  std::vector<std::pair<std::string, std::string>> stream_topics;  // prefix, stream
  std::map<std::string, stream_counters> stream_stats;
  // Durable consumers of the streams (null without --data).
  std::unique_ptr<streams::consumer_host> consumers;
  std::vector<stored_publish> stored_batch;
  steady_clock::time_point next_expire;
  topic_sequencer topic_seq{cfg.topic_seq_max};
  std::map<std::string, std::uint64_t> subscriptions;
  std::vector<zmq::message_t> in;
  std::vector<zmq::message_t> out;
  common::parse_failure failure;  // of the last message that did not parse, written whole
  std::vector<decision> decisions;
  std::uint64_t next_token = 0;
  // Secured mode (docs/protocol.md section 12).
  bool secured = false;
  std::atomic<bool> reload_requested{false};
  zmq::socket_t zap;  // the ZAP handler (REP), polled by the loop
  auth::table auth_table;
  auth_counters auth_stats;
  auth::refusal_log_limiter refusal_log;
  std::uint64_t handshakes = 0;  // accepted, numbering connections
  // The identity of the message being handled: its name (the connection's User-Id) and its
  // entry (null when a reload removed it and the connection is not closed yet).
  std::string_view sender_name;
  const auth::identity* sender = nullptr;
  std::unordered_map<int, connection_entry> connections;  // by file descriptor
  // Prefix -> refused subscriptions still connected. Refused prefixes are held by nobody else
  // (libzmq keeps only applied ones), so a peer sending ever new ones must not grow this: past
  // k_refused_prefixes_max distinct prefixes, new ones are counted in auth.refused.subscribe
  // only.
  static constexpr std::size_t k_refused_prefixes_max = 1'000;
  std::map<std::string, std::uint64_t> refused_subscriptions;
  steady_clock::time_point started = steady_clock::now();
  steady_clock::time_point next_heartbeat;
  bool stopping = false;
  steady_clock::time_point stop_deadline;

  void run();
  void open_streams();
  void set_up_security();
  void handle_zap(steady_clock::time_point now);
  void identify(zmq::message_t& frame, bool events);
  error refusal(auth::right r, const std::string& what, steady_clock::time_point now);
  bool consume_allowed(const peer_id& peer, const common::parsed_message& m,
                       steady_clock::time_point now);
  void reload_auth(steady_clock::time_point now);
  std::size_t close_connections(const std::function<bool(const connection_entry&)>& which);
  // Who a peer is, in what the broker stamps (caller, publisher, worker): its identity in
  // secured mode, else the name it gave itself.
  std::string caller_of(const worker* w, const peer_id& peer) const {
    return secured ? std::string(sender_name) : peer_label(w, peer);
  }
  std::string publisher_of(const worker* w) const {
    if (secured) return std::string(sender_name);
    return w != nullptr ? w->agent : std::string();
  }
  void handle_router(steady_clock::time_point now);
  void handle_subscription();
  void on_secured_subscription(zmq::message_t& m, bool subscribe, const std::string& prefix);
  void on_request(const peer_id& peer, const worker* w, common::parsed_message& m,
                  steady_clock::time_point now);
  void on_reply(const peer_id& peer, const worker* w, common::parsed_message& m);
  void on_oversized_reply(const peer_id& peer, const worker* w, const header& reply,
                          const error& refused);
  void on_publish(const peer_id& peer, const worker* w, common::parsed_message& m);
  void on_consumer_command(const peer_id& peer, const worker* w, common::parsed_message& m,
                           steady_clock::time_point now);
  void on_consumer_admin(const peer_id& peer, const header& request, const json& args,
                         steady_clock::time_point now);
  void forget_removed_peers(steady_clock::time_point now);
  void fan_out(header& h, zmq::message_t payload, const std::string& from);
  const std::string* stream_for(std::string_view topic) const;
  bool store_publish(const peer_id& peer, const worker* w, common::parsed_message& m,
                     const std::string& stream);
  void commit_streams();
  void refresh_stream_topics();
  void on_stream_admin(const peer_id& peer, const header& request, const json& args);
  json stream_json(const std::string& name) const;
  void on_hello(const peer_id& peer, common::parsed_message& m, steady_clock::time_point now);
  void on_admin(const peer_id& peer, const header& request, const zmq::message_t& payload);
  std::optional<json> admin_args(const peer_id& peer, const header& request,
                                 const zmq::message_t& payload);
  void journal_reply(const header& request, const std::string& worker, const header& outcome,
                     std::uint64_t duration_us);
  void execute_decisions(steady_clock::time_point now);
  void send_heartbeats();
  void begin_stop(steady_clock::time_point now);

  bool send_to(const peer_id& peer, command cmd, const header& h,
               zmq::message_t payload = zmq::message_t{});
  void reply_error(const peer_id& peer, const header& request, const error& err);
  void reply_body(const peer_id& peer, const header& request, const json& body);
  void send_error(const peer_id& peer, const error& err, const std::string& about_id);
  void count_error(const std::string& code) { ++stats.errors_by_code[code]; }
  std::string unreachable_message(const worker& gone) const;
  json services_json() const;
  json stats_json() const;
  json plain_stats_json() const;
  json auth_json() const;
  json consumers_stats_json() const;
  // A durable-consumer command refused (section 11): a REPLY when it has an id, else an ERROR,
  // repeating stream, consumer and stream_seq.
  void send_consumer_refusal(const peer_id& peer, const header& req, const error& err);
};

bool broker::impl::send_to(const peer_id& peer, command cmd, const header& h,
                           zmq::message_t payload) {
  out.clear();
  out.emplace_back(peer.data(), peer.size());
  common::build_message(out, cmd, h, std::move(payload));
  if (!common::send_frames(router, out)) {
    ++stats.undeliverable;
    return false;
  }
  ++stats.messages_out;
  return true;
}

// The broker's own answer to one of its actions: a REPLY carrying `body` as msgpack.
void broker::impl::reply_body(const peer_id& peer, const header& request, const json& body) {
  header h;
  h.id = request.id;
  h.correlation_id = request.correlation_id;
  h.trace_id = request.trace_id;
  h.worker = "broker";
  const auto bytes = json::to_msgpack(body);
  send_to(peer, command::reply, h, zmq::message_t(bytes.data(), bytes.size()));
}

void broker::impl::reply_error(const peer_id& peer, const header& request, const error& err) {
  header h;
  h.id = request.id;
  h.correlation_id = request.correlation_id;
  h.causation_id = request.causation_id;
  h.trace_id = request.trace_id;
  h.attempt = request.attempt;
  h.error_code = err.code;
  h.error_message = err.message;
  h.retryable = err.retryable;
  h.worker = std::string(k_broker_service);  // the broker answered, not a worker
  count_error(err.code);
  log->debug("{}.{} id={} correlation={} -> {}: {}", request.service, request.action, request.id,
             request.correlation_id, err.code, err.message);
  journal_reply(request, "broker", h, 0);
  send_to(peer, command::reply, h);
}

void broker::impl::send_error(const peer_id& peer, const error& err, const std::string& about_id) {
  header h;
  h.id = about_id;
  h.error_code = err.code;
  h.error_message = err.message;
  h.retryable = err.retryable;
  count_error(err.code);
  send_to(peer, command::error, h);
}

void broker::impl::run() {
  log->info("broker {} serving router={} events={} heartbeat={}ms liveness={}", broker_id,
            eps.router, eps.events, cfg.heartbeat.count(), cfg.liveness);
  next_heartbeat = steady_clock::now() + cfg.heartbeat;
  // The ZAP handler is polled only in secured mode (there is no ZAP socket otherwise).
  std::array<zmq::pollitem_t, 4> items{{
      {router.handle(), 0, ZMQ_POLLIN, 0},
      {xpub.handle(), 0, ZMQ_POLLIN, 0},
      {nullptr, wake_fd, ZMQ_POLLIN, 0},
      {secured ? zap.handle() : nullptr, 0, ZMQ_POLLIN, 0},
  }};
  const std::size_t polled = secured ? 4 : 3;
  while (true) {
    auto now = steady_clock::now();
    auto wake_at = next_heartbeat;
    if (auto d = reg.next_deadline(); d && *d < wake_at) wake_at = *d;
    if (consumers) {
      if (auto d = consumers->next_deadline(); d && *d < wake_at) wake_at = *d;
    }
    if (stopping && stop_deadline < wake_at) wake_at = stop_deadline;
    const auto timeout = wake_at <= now
                             ? std::chrono::milliseconds(0)
                             : std::chrono::ceil<std::chrono::milliseconds>(wake_at - now);
    try {
      zmq::poll(items.data(), polled, timeout);
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) log->error("poll failed: {}", e.what());
    }
    now = steady_clock::now();
    if ((items[2].revents & ZMQ_POLLIN) != 0) {
      std::uint64_t value = 0;
      [[maybe_unused]] auto n = ::read(wake_fd, &value, sizeof value);
    }
    if (stop_requested.load() && !stopping) begin_stop(now);
    if (reload_requested.exchange(false)) reload_auth(now);
    // Handshakes first: a peer waiting for its ZAP answer sends nothing until it has it.
    if (secured && (items[3].revents & ZMQ_POLLIN) != 0) handle_zap(now);

    if ((items[0].revents & ZMQ_POLLIN) != 0) {
      for (std::size_t i = 0; i < k_batch && common::recv_frames(router, in); ++i) {
        handle_router(now);
      }
      commit_streams();
    }
    if ((items[1].revents & ZMQ_POLLIN) != 0) handle_subscription();

    now = steady_clock::now();
    const auto workers_before = reg.workers().size();
    reg.expire(now, decisions);
    if (reg.workers().size() < workers_before) {
      stats.workers_lost += workers_before - reg.workers().size();
      log->info("{} peer(s) lost: silent for {} heartbeats", workers_before - reg.workers().size(),
                cfg.liveness);
    }
    execute_decisions(now);
    forget_removed_peers(now);
    if (consumers) consumers->run(now);
    if (now >= next_heartbeat) {
      send_heartbeats();
      next_heartbeat = now + cfg.heartbeat;
    }
    if (store && now >= next_expire) {
      // max_age: a flush applies the other limits; age needs the clock.
      if (auto expired = store->expire(static_cast<std::int64_t>(common::wall_clock_us() / 1000));
          !expired) {
        log->warn("stream retention failed: {} {}", expired.err().code, expired.err().message);
      } else if (expired.value() > 0) {
        log->debug("stream retention removed {} record(s) past max_age", expired.value());
      }
      next_expire = now + std::chrono::seconds(1);
    }
    if (stopping && (reg.in_flight_total() == 0 || now >= stop_deadline)) {
      reg.fail_all(error::make(errc::shutting_down, "broker is shutting down"), true, decisions);
      execute_decisions(now);
      break;
    }
  }
  log->info("broker {} stopped: {} requests, {} replies, {} events, {} malformed", broker_id,
            stats.requests, stats.replies, stats.events, stats.malformed);
}

// Opens --data and creates the streams --streams declares that it does not hold yet. A
// declared stream that is already stored keeps its stored configuration (a line says so when
// they differ): remove it with broker.stream_rm to change it.
void broker::impl::open_streams() {
  if (cfg.data_dir.empty()) {
    if (!cfg.streams_file.empty()) {
      throw common::config_error("--streams " + cfg.streams_file,
                                 "needs --data DIR, the directory streams are stored in");
    }
    return;
  }
  std::vector<streams::stream_config> declared;
  if (!cfg.streams_file.empty()) declared = streams::load_streams_file(cfg.streams_file);
  streams::file_store_options options;
  options.sync_policy = cfg.stream_sync;
  auto opened = streams::open_file_store(cfg.data_dir, options);
  if (!opened) {
    throw common::config_error("--data " + cfg.data_dir,
                               opened.err().code + ": " + opened.err().message);
  }
  store = std::move(opened.value());
  auto existing = store->list_streams();
  for (const auto& c : declared) {
    auto same = std::find_if(existing.begin(), existing.end(),
                             [&](const auto& e) { return e.name == c.name; });
    if (same != existing.end()) {
      if (same->topic_prefixes != c.topic_prefixes || same->max_age != c.max_age ||
          same->max_bytes != c.max_bytes || same->max_events != c.max_events ||
          same->duplicate_window != c.duplicate_window ||
          same->duplicate_ids_max != c.duplicate_ids_max) {
        log->warn(
            "stream {} in {} differs from the stored stream; the stored configuration is kept "
            "(remove the stream with broker.stream_rm to change it)",
            c.name, cfg.streams_file);
      }
      continue;
    }
    if (auto other = streams::overlapping_stream(c, existing)) {
      throw common::config_error(cfg.streams_file + ": stream " + c.name,
                                 "overlaps the stored stream " + *other);
    }
    if (auto st = store->create_stream(c); !st) {
      throw common::config_error(cfg.streams_file + ": stream " + c.name,
                                 st.err().code + ": " + st.err().message);
    }
    log->info("stream {} created from {}", c.name, cfg.streams_file);
    existing.push_back(c);
  }
  refresh_stream_topics();
  if (cfg.max_consumers == 0) throw common::config_error("--max-consumers", "must be >= 1");
  if (cfg.max_consumer_members == 0) {
    throw common::config_error("--max-consumer-members", "must be >= 1");
  }
  streams::host_limits limits;
  limits.max_consumers_per_stream = cfg.max_consumers;
  limits.max_members_per_consumer = cfg.max_consumer_members;
  consumers = std::make_unique<streams::consumer_host>(
      *store,
      [this](const std::string& peer, command cmd, std::string_view encoded,
             std::string_view payload) {
        out.clear();
        out.emplace_back(peer.data(), peer.size());
        common::build_encoded_message(out, cmd, encoded,
                                      zmq::message_t(payload.data(), payload.size()));
        if (!common::send_frames(router, out)) {
          ++stats.undeliverable;
          return false;
        }
        ++stats.messages_out;
        return true;
      },
      log, limits);
  consumers->load(steady_clock::now());
  for (const auto& c : existing) {
    auto i = store->info(c.name);
    if (!i) {
      log->error("stream {} is unavailable: {} {}", c.name, i.err().code, i.err().message);
      continue;
    }
    log->info("stream {} topics {} seq {}..{} ({} events, {} bytes)", c.name,
              json(c.topic_prefixes).dump(), i->first_seq, i->last_seq, i->count, i->bytes);
  }
  log->info("streams in {}: {} (sync {})", cfg.data_dir, existing.size(),
            cfg.stream_sync == streams::sync::always ? "always" : "os");
}

void broker::impl::refresh_stream_topics() {
  stream_topics.clear();
  if (!store) return;
  for (const auto& c : store->list_streams()) {
    for (const auto& prefix : c.topic_prefixes) stream_topics.emplace_back(prefix, c.name);
  }
}

void broker::impl::begin_stop(steady_clock::time_point now) {
  stopping = true;
  stop_deadline = now + cfg.shutdown_grace;
  log->info(
      "stopping: answering {} queued requests shutting_down, waiting up to {} ms for {} "
      "in flight",
      reg.queued_total(), cfg.shutdown_grace.count(), reg.in_flight_total());
  reg.fail_all(error::make(errc::shutting_down, "broker is shutting down"), false, decisions);
  execute_decisions(now);
}

void broker::impl::handle_subscription() {
  zmq::message_t m;
  for (std::size_t i = 0; i < k_batch; ++i) {
    if (!xpub.recv(m, zmq::recv_flags::dontwait)) return;
    if (m.size() == 0) continue;
    const auto* p = static_cast<const char*>(m.data());
    std::string prefix(p + 1, m.size() - 1);
    if (secured) {
      on_secured_subscription(m, p[0] == 1, prefix);
      continue;
    }
    if (p[0] == 1) {
      ++subscriptions[prefix];
      log->debug("subscription to '{}'", prefix);
    } else if (p[0] == 0) {
      auto it = subscriptions.find(prefix);
      if (it != subscriptions.end() && --it->second == 0) subscriptions.erase(it);
    }
  }
}

void broker::impl::handle_router(steady_clock::time_point now) {
  ++stats.messages_in;
  if (in.size() < 2) {
    ++stats.malformed;  // a routing id alone: nothing to answer
    return;
  }
  const peer_id peer(static_cast<const char*>(in[0].data()), in[0].size());
  // Secured: who sent it, read from this message's connection (never cached by routing id: a
  // peer may choose the routing id another used before it disconnected). The first frame the
  // peer sent carries the connection's metadata; libzmq 4.3.4 leaves it off the routing-id
  // frame when the message was prefetched by a poll.
  if (secured) identify(in[1], false);
  std::size_t bytes = 0;
  for (std::size_t i = 1; i < in.size(); ++i) bytes += in[i].size();
  stats.bytes_in += bytes;
  // max_message_size limits what the peer chose to send, header + payload (docs/protocol.md,
  // section 3); the fixed tag and command frames do not count. Read before parse_message moves
  // the payload out.
  std::size_t message_bytes = 0;
  for (std::size_t i = 3; i < in.size(); ++i) message_bytes += in[i].size();

  // Decoded into the message itself, no header moved out of a result.
  common::parsed_message m;
  const auto parsed = common::parse_message(in, 1, m, &failure);
  const bool registered = reg.touch(peer, now);
  const worker* w = registered ? reg.find_worker(peer) : nullptr;
  if (!parsed) {
    // too_large (a header over its limit) is counted in errors_by_code only, like an oversized
    // message; everything else here is malformed.
    if (failure.err.code != errc::too_large) ++stats.malformed;
    log->warn("malformed message from {} (id={}): {}", peer_label(w, peer), failure.hdr.id,
              failure.err.message);
    // docs/protocol.md section 4, "Refusals": a REQUEST whose id could be read is answered
    // with a REPLY, whatever else is wrong with it; the rest with an ERROR carrying the id
    // when it could be read.
    if (failure.command_byte == static_cast<std::uint8_t>(command::request) &&
        !failure.hdr.id.empty()) {
      reply_error(peer, failure.hdr, failure.err);
    } else {
      send_error(peer, failure.err, failure.hdr.id);
    }
    return;
  }
  if (message_bytes > cfg.max_message_size) {
    auto err = error::make(errc::too_large, common::command_name(static_cast<std::uint8_t>(m.cmd)) +
                                                " is " + std::to_string(message_bytes) +
                                                " bytes (header + payload); the limit is " +
                                                std::to_string(cfg.max_message_size));
    log->warn("{} id={} from {}: {}", common::command_name(static_cast<std::uint8_t>(m.cmd)),
              m.hdr.id, peer_label(w, peer), err.message);
    if (m.cmd == command::request && !m.hdr.id.empty()) {
      reply_error(peer, m.hdr, err);
    } else {
      send_error(peer, err, m.hdr.id);
      if (m.cmd == command::reply && registered) on_oversized_reply(peer, w, m.hdr, err);
    }
    return;
  }

  switch (m.cmd) {
    case command::request:
      on_request(peer, w, m, now);
      break;
    case command::reply:
      if (!registered) {
        send_error(peer,
                   error::make(errc::not_registered,
                               "REPLY from a peer that is not "
                               "registered; send HELLO again"),
                   m.hdr.id);
        ++stats.unknown_replies;
        return;
      }
      on_reply(peer, w, m);
      break;
    case command::publish:
      on_publish(peer, w, m);
      break;
    case command::hello:
      on_hello(peer, m, now);
      break;
    case command::heartbeat:
      if (!registered) {
        send_error(peer,
                   error::make(errc::not_registered,
                               "heartbeat from a peer that is not registered; send HELLO"),
                   {});
      }
      break;
    case command::bye:
      if (registered) {
        log->log(lifecycle_level(w), "{} (connection {}) said goodbye", peer_label(w, peer),
                 connection_label(peer));
        reg.remove_worker(peer, decisions);
        execute_decisions(now);
      }
      break;
    case command::consume:
    case command::ack:
    case command::nack:
    case command::term:
    case command::progress:
    case command::consume_stop:
      on_consumer_command(peer, w, m, now);
      break;
    case command::welcome:
    case command::dispatch:
    case command::publish_ack:
    case command::deliver:
    case command::error:
      ++stats.malformed;
      send_error(
          peer,
          error::make(errc::bad_request, common::command_name(static_cast<std::uint8_t>(m.cmd)) +
                                             " is sent by the broker, not to it"),
          m.hdr.id);
      break;
  }
}

void broker::impl::on_request(const peer_id& peer, const worker* w, common::parsed_message& m,
                              steady_clock::time_point now) {
  ++stats.requests;
  header& h = m.hdr;
  std::string problem = common::check_required(command::request, h);
  if (problem.empty()) problem = check_id_length("REQUEST", h.id);
  if (problem.empty()) problem = common::check_name("REQUEST 'service'", h.service);
  if (problem.empty()) problem = common::check_name("REQUEST 'action'", h.action);
  if (!problem.empty()) {
    ++stats.malformed;
    log->warn("bad request from {}: {}", peer_label(w, peer), problem);
    if (h.id.empty()) {
      send_error(peer, error::make(errc::bad_request, problem), {});
    } else {
      reply_error(peer, h, error::make(errc::bad_request, problem));
    }
    return;
  }
  auth::verdict allowed = auth::verdict::allowed;
  if (secured) {
    allowed = auth::check_call(sender, h.service, h.action);
    if (allowed == auth::verdict::refused) {
      const bool admin = h.service == k_broker_service;
      reply_error(peer, h,
                  refusal(admin ? auth::right::admin : auth::right::call,
                          "action '" + h.service + "." + h.action + "'", now));
      return;
    }
  }
  if (h.service == k_broker_service) {
    on_admin(peer, h, m.payload);
    return;
  }
  // Who called, for the worker; whatever the client put there is replaced.
  h.caller = caller_of(w, peer);
  if (allowed == auth::verdict::allowed_own) {
    h.caller_scope = "own";
  } else {
    h.caller_scope.clear();
  }
  if (stopping) {
    reply_error(peer, h, error::make(errc::shutting_down, "broker is shutting down"));
    return;
  }
  pending_request r;
  r.token = ++next_token;
  r.client = peer;
  r.received = now;
  const auto budget =
      std::min<std::uint64_t>(h.deadline_ms, static_cast<std::uint64_t>(cfg.max_deadline.count()));
  r.deadline = now + std::chrono::milliseconds(budget);
  if (trace_journal.enabled() && !h.correlation_id.empty()) {
    journal_entry& e = trace_journal.claim();
    e.what = journal_entry::kind::request;
    e.ts_us = common::wall_clock_us();
    e.id = h.id;
    e.correlation_id = h.correlation_id;
    e.causation_id = h.causation_id;
    e.service = h.service;
    e.action = h.action;
    e.from = secured ? sender_name : w != nullptr ? w->agent : std::string_view();
    e.attempt = h.attempt;
  }
  r.hdr = std::move(h);
  r.payload = std::move(m.payload);
  if (log->should_log(spdlog::level::debug)) {
    log->debug("request {}.{} id={} correlation={} from {} token={}", r.hdr.service, r.hdr.action,
               r.hdr.id, r.hdr.correlation_id, peer_label(w, peer), r.token);
  }
  reg.submit(std::move(r), decisions);
  execute_decisions(now);
}

void broker::impl::execute_decisions(steady_clock::time_point now) {
  // Executing a decision can produce more (a dispatch to a vanished worker loses it), so walk
  // by index while the vector grows.
  for (std::size_t i = 0; i < decisions.size(); ++i) {
    decision& d = decisions[i];
    if (d.what == decision::kind::fail) {
      reply_error(d.client, d.hdr, d.err);
      continue;
    }
    pending_request* r = reg.find(d.token);
    if (r == nullptr || r->assigned == nullptr) continue;
    // The DISPATCH is the request's header with the broker's token and the time left, stamped
    // on the pending request's own header for the encoding (no copy of every field per
    // dispatch) and taken off again: the request keeps the header as the client sent it.
    header& h = r->hdr;
    const std::uint64_t sent_deadline_ms = h.deadline_ms;
    const std::uint64_t sent_token = h.token;
    h.token = r->token;
    h.deadline_ms = std::max<std::uint64_t>(1, common::millis_until(r->deadline, now));
    zmq::message_t payload;
    if (r->hdr.retryable && !r->redispatched) {
      payload.copy(r->payload);  // shares the buffer; kept for a possible re-dispatch
    } else {
      payload = std::move(r->payload);
    }
    if (r->redispatched) ++stats.redispatched;
    const peer_id worker_peer = r->assigned->owner->id;
    log->debug("dispatch {}.{} id={} token={} to {}", h.service, h.action, h.id, h.token,
               r->assigned->owner->agent);
    const bool sent = send_to(worker_peer, command::dispatch, h, std::move(payload));
    h.token = sent_token;
    h.deadline_ms = sent_deadline_ms;
    if (!sent) {
      log->warn("{}", unreachable_message(*r->assigned->owner));
      ++stats.workers_lost;
      reg.remove_worker(worker_peer, decisions);
    }
  }
  decisions.clear();
}

// A DISPATCH could not be sent: the worker's connection is gone. When the agent has
// registered again on a new connection (it restarted faster than heartbeat x liveness), the
// line says that it is the previous connection that goes, not the agent.
std::string broker::impl::unreachable_message(const worker& gone) const {
  std::string others;
  for (const auto& [id, other] : reg.workers()) {
    if (other.get() == &gone || other->agent != gone.agent) continue;
    others += (others.empty() ? "" : ", ") + connection_label(id);
  }
  if (others.empty()) {
    return "worker " + gone.agent + " (connection " + connection_label(gone.id) +
           ") is unreachable; removing it";
  }
  return "worker " + gone.agent + ": its previous connection " + connection_label(gone.id) +
         " is unreachable; removing that connection (" + gone.agent +
         " is registered again on connection " + others + ")";
}

void broker::impl::on_reply(const peer_id& peer, const worker* w, common::parsed_message& m) {
  const std::uint64_t token = m.hdr.token;
  if (auto missing = common::check_required(command::reply, m.hdr); !missing.empty()) {
    // Not a late or stray reply but a worker that does not echo tokens: it must hear about
    // it, or it waits for nothing and its caller gets deadline_exceeded with no clue why.
    ++stats.malformed;
    const std::string problem = missing + "; this reply was dropped";
    log->warn("{} (id={}): {}", peer_label(w, peer), m.hdr.id, problem);
    send_error(peer, error::make(errc::bad_request, problem), m.hdr.id);
    return;
  }
  ++stats.replies;
  pending_request* r = reg.reply_from(peer, token);
  if (r == nullptr) {
    ++stats.unknown_replies;
    if (log->should_log(spdlog::level::debug)) {
      log->debug("reply with unknown token {} from {} dropped", token, peer_label(w, peer));
    }
    return;
  }
  auto& c = reg.counters_for(r->hdr.service);
  ++c.replies;
  if (r->state == request_state::abandoned) {
    ++stats.late_replies;
  } else {
    header& h = m.hdr;
    h.id = r->hdr.id;  // the client's id, whatever the worker echoed
    h.token = 0;
    if (secured) {
      h.worker = std::string(sender_name);  // the worker's identity, whatever it wrote
    } else if (h.worker.empty() && w != nullptr) {
      h.worker = w->agent;
    }
    if (h.is_error()) {
      ++c.errors;
      ++c.errors_by_code[h.error_code];
    }
    log->debug("reply {}.{} id={} token={} from {} {}", r->hdr.service, r->hdr.action, h.id,
               r->token, h.worker, h.is_error() ? std::string_view(h.error_code) : "ok");
    journal_reply(r->hdr, h.worker, h,
                  static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                                 steady_clock::now() - r->received)
                                                 .count()));
    send_to(r->client, command::reply, h, std::move(m.payload));
  }
  reg.finish(token, decisions);
  execute_decisions(steady_clock::now());
}

// A worker's REPLY over max_message_size cannot be forwarded. The request is still answered
// exactly once: the client gets too_large in its place, and the worker's slot is freed (the
// worker has answered; nothing more will come for that token).
void broker::impl::on_oversized_reply(const peer_id& peer, const worker* w, const header& reply,
                                      const error& refused) {
  pending_request* r = reg.reply_from(peer, reply.token);
  if (r == nullptr) {
    ++stats.unknown_replies;
    return;
  }
  ++stats.replies;
  auto& c = reg.counters_for(r->hdr.service);
  ++c.replies;
  if (r->state == request_state::abandoned) {
    ++stats.late_replies;
  } else {
    ++c.errors;
    ++c.errors_by_code[std::string(errc::too_large)];
    reply_error(r->client, r->hdr,
                error::make(errc::too_large, "the reply of worker '" + peer_label(w, peer) +
                                                 "' to " + r->hdr.service + "." + r->hdr.action +
                                                 " could not be forwarded: " + refused.message));
  }
  reg.finish(reply.token, decisions);
  execute_decisions(steady_clock::now());
}

void broker::impl::on_publish(const peer_id& peer, const worker* w, common::parsed_message& m) {
  header& h = m.hdr;
  std::string problem = common::check_required(command::publish, h);
  // The id is kept: the journal, a stream's duplicate window, the subscribers' headers.
  if (problem.empty()) problem = check_id_length("PUBLISH", h.id);
  if (problem.empty()) {
    if (problem = common::check_topic(h.topic); !problem.empty()) problem = "PUBLISH " + problem;
  }
  if (!problem.empty()) {
    ++stats.malformed;
    log->warn("bad publish from {}: {}", peer_label(w, peer), problem);
    send_error(peer, error::make(errc::bad_request, problem), h.id);
    return;
  }
  if (secured && auth::check_publish(sender, h.topic) == auth::verdict::refused) {
    send_error(peer, refusal(auth::right::publish, "topic '" + h.topic + "'", steady_clock::now()),
               h.id);
    return;
  }
  // The broker stamps these; whatever the publisher sent is dropped.
  h.stream.clear();
  h.stream_seq = 0;
  h.duplicate = false;
  if (!stream_topics.empty()) {
    if (const std::string* stream = stream_for(h.topic)) {
      store_publish(peer, w, m, *stream);
      return;
    }
  }
  const bool wants_ack = h.ack;
  h.ack = false;
  h.ts = common::wall_clock_us();
  h.publisher = publisher_of(w);
  fan_out(h, std::move(m.payload), peer_label(w, peer));
  if (wants_ack) {
    header ack;
    ack.id = h.id;
    ack.topic = h.topic;
    ack.seq = h.seq;
    send_to(peer, command::publish_ack, ack);
  }
}

// Sequences the event on its topic, journals it and hands it to the XPUB.
void broker::impl::fan_out(header& h, zmq::message_t payload, const std::string& from) {
  ++stats.events;
  // Topics starting with '_' are control topics (the SDK's subscription probes): fanned out
  // like any other, but not sequenced, so they leave no state behind.
  h.seq = h.topic[0] == '_' ? 0 : topic_seq.next(h.topic);
  out.clear();
  out.emplace_back(h.topic.data(), h.topic.size());
  thread_local std::string buffer;
  buffer.clear();
  common::encode_header(h, buffer);
  out.emplace_back(buffer.data(), buffer.size());
  if (trace_journal.enabled() && !h.correlation_id.empty() && h.seq != 0) {
    journal_entry& e = trace_journal.claim();
    e.what = journal_entry::kind::event;
    e.ts_us = h.ts;
    e.id = h.id;
    e.correlation_id = h.correlation_id;
    e.causation_id = h.causation_id;
    e.topic = h.topic;
    e.from = h.publisher;
    e.seq = h.seq;
    // Kept (small ones) so that a subscriber that was down can catch up: broker.trace with
    // payloads (the orchestrator does, after a restart).
    const auto bytes = common::as_view(payload);
    e.payload_kept = bytes.size() <= k_journal_payload_max;
    if (e.payload_kept) {
      e.payload.assign(bytes);
    } else {
      e.payload.clear();
    }
  }
  out.push_back(std::move(payload));
  common::send_frames(xpub, out);
  ++stats.messages_out;
  if (log->should_log(spdlog::level::debug)) {
    log->debug("event {} seq={} id={} correlation={} from {}{}{}", h.topic, h.seq, h.id,
               h.correlation_id, from, h.stream.empty() ? "" : " stream=",
               h.stream.empty() ? std::string() : h.stream + "#" + std::to_string(h.stream_seq));
  }
}

const std::string* broker::impl::stream_for(std::string_view topic) const {
  for (const auto& [prefix, stream] : stream_topics) {
    if (topic.starts_with(prefix)) return &stream;
  }
  return nullptr;
}

// Appends the event to its stream. It is acked and fanned out by commit_streams(), after the
// poll batch's flush; a refused append is answered now.
bool broker::impl::store_publish(const peer_id& peer, const worker* w, common::parsed_message& m,
                                 const std::string& stream) {
  header& h = m.hdr;
  stored_publish p;
  p.wants_ack = h.ack;
  h.ack = false;
  h.ts = common::wall_clock_us();
  h.publisher = publisher_of(w);
  h.seq = 0;  // per topic and per broker run: given when fanned out, not stored
  h.stream = stream;
  streams::record rec;
  rec.ts_ms = static_cast<std::int64_t>(h.ts / 1000);
  rec.topic = h.topic;
  rec.event_id = h.id;
  common::encode_header(h, rec.header);
  rec.payload.assign(common::as_view(m.payload));
  auto appended = store->append(stream, std::span<const streams::record>(&rec, 1));
  if (!appended) {
    error err = appended.err();
    err.retryable = err.code == streams::errc::storage_full;
    auto& c = stream_stats[stream];
    ++c.storage_errors;
    ++c.errors_by_code[err.code];
    log->warn("stream {}: publish {} id={} from {} refused: {} {}", stream, h.topic, h.id,
              peer_label(w, peer), err.code, err.message);
    send_error(peer, err, h.id);
    return false;
  }
  p.appended = appended.value().front();
  p.peer = peer;
  p.from = peer_label(w, peer);
  p.hdr = std::move(h);
  p.payload = std::move(m.payload);
  stored_batch.push_back(std::move(p));
  return true;
}

// One flush for the poll batch's stored publishes (with --sync always, one fdatasync per
// touched segment: group commit), then each is acked and fanned out; if the flush failed,
// none of them was stored and each publisher hears why.
void broker::impl::commit_streams() {
  if (stored_batch.empty()) return;
  auto flushed = store->flush();
  if (!flushed) {
    error err = flushed.err();
    err.retryable = err.code == streams::errc::storage_full;
    std::map<std::string, std::size_t> refused;
    for (auto& p : stored_batch) {
      auto& c = stream_stats[p.hdr.stream];
      ++c.storage_errors;
      ++c.errors_by_code[err.code];
      ++refused[p.hdr.stream];
      log->debug("stream {}: publish {} id={} from {} not stored: {}", p.hdr.stream, p.hdr.topic,
                 p.hdr.id, p.from, err.code);
      send_error(p.peer, err, p.hdr.id);
    }
    std::string which;
    for (const auto& [name, n] : refused) {
      which += (which.empty() ? "" : ", ") + name + ": " + std::to_string(n);
    }
    log->error("stream flush failed, {} publish(es) refused ({}): {} {}", stored_batch.size(),
               which, err.code, err.message);
    stored_batch.clear();
    return;
  }
  std::map<std::string, streams::sequence> last_stored;
  for (auto& p : stored_batch) {
    auto& c = stream_stats[p.hdr.stream];
    p.hdr.stream_seq = p.appended.seq;
    if (!p.appended.duplicate) {
      auto& last = last_stored[p.hdr.stream];
      last = std::max(last, p.appended.seq);
    }
    if (p.appended.duplicate) {
      ++c.duplicates;
      log->debug("stream {}: publish {} id={} from {} is a duplicate of #{}; not fanned out",
                 p.hdr.stream, p.hdr.topic, p.hdr.id, p.from, p.appended.seq);
    } else {
      ++c.stored;
      fan_out(p.hdr, std::move(p.payload), p.from);
    }
    if (p.wants_ack) {
      header ack;
      ack.id = p.hdr.id;
      ack.topic = p.hdr.topic;
      ack.seq = p.appended.duplicate ? 0 : p.hdr.seq;
      ack.stream = p.hdr.stream;
      ack.stream_seq = p.appended.seq;
      ack.duplicate = p.appended.duplicate;
      send_to(p.peer, command::publish_ack, ack);
    }
  }
  stored_batch.clear();
  if (consumers) {
    for (const auto& [stream, last] : last_stored) consumers->records_stored(stream, last);
  }
}

void broker::impl::on_hello(const peer_id& peer, common::parsed_message& m,
                            steady_clock::time_point now) {
  header& h = m.hdr;
  if (secured) {
    // Nobody registers as another agent; a refused HELLO registers nothing.
    std::optional<error> refused;
    if (!h.agent.empty() && h.agent != sender_name) {
      refused =
          refusal(auth::right::name,
                  "agent name '" + h.agent + "' (a peer's agent name is its identity's)", now);
    }
    for (std::size_t i = 0; !refused && i < h.services.size(); ++i) {
      if (auth::check_offer(sender, h.services[i].name) == auth::verdict::refused) {
        refused = refusal(auth::right::offer, "service '" + h.services[i].name + "'", now);
      }
    }
    if (refused) {
      send_error(peer, *refused, h.id);
      return;
    }
    h.agent = std::string(sender_name);
  }
  std::string agent = h.agent;
  if (agent.empty()) agent = peer_label(nullptr, peer);
  if (auto problem = common::check_name("'agent'", agent); !problem.empty()) {
    ++stats.malformed;
    log->warn("bad HELLO from {}: {}", peer_label(reg.find_worker(peer), peer), problem);
    send_error(peer, error::make(errc::bad_request, "HELLO: " + problem), {});
    return;
  }
  const bool known = reg.find_worker(peer) != nullptr;
  (void)reg.hello(peer, agent, h.services, now, decisions);
  std::string offered;
  for (const auto& s : h.services) {
    offered += (offered.empty() ? "" : ", ") + s.name + "x" + std::to_string(s.capacity);
  }
  const worker* now_registered = reg.find_worker(peer);
  log->log(lifecycle_level(now_registered), "{} {} (connection {}) offering [{}]",
           known ? "updated" : "registered", agent, connection_label(peer), offered);
  header welcome;
  welcome.broker = broker_id;
  welcome.heartbeat_ms = static_cast<std::uint32_t>(cfg.heartbeat.count());
  welcome.max_message_size = cfg.max_message_size;
  send_to(peer, command::welcome, welcome);
  execute_decisions(now);
}

void broker::impl::send_heartbeats() {
  header h;
  std::vector<peer_id> peers;
  peers.reserve(reg.workers().size());
  for (const auto& [id, w] : reg.workers()) peers.push_back(id);
  for (const auto& id : peers) send_to(id, command::heartbeat, h);
}

json broker::impl::services_json() const {
  json services = json::array();
  std::vector<const service_entry*> sorted;
  for (const auto& [name, s] : reg.services()) sorted.push_back(&s);
  std::sort(sorted.begin(), sorted.end(),
            [](const auto* a, const auto* b) { return a->name < b->name; });
  for (const auto* s : sorted) {
    json workers = json::array();
    std::uint64_t capacity = 0;
    std::uint64_t in_flight = 0;
    for (const offer* o : s->offers) {
      workers.push_back({{"agent", o->owner->agent},
                         {"capacity", o->capacity},
                         {"in_flight", o->in_flight},
                         {"held_bytes", o->owner->unconfirmed_bytes},
                         {"dispatched", o->dispatched}});
      capacity += o->capacity;
      in_flight += o->in_flight;
    }
    services.push_back({{"service", s->name},
                        {"workers", std::move(workers)},
                        {"capacity", capacity},
                        {"in_flight", in_flight},
                        {"queued", s->queued},
                        {"requests", s->counters.requests},
                        {"replies", s->counters.replies},
                        {"errors", s->counters.errors}});
  }
  return {{"services", std::move(services)}};
}

json broker::impl::stats_json() const {
  json all = plain_stats_json();
  if (secured) all["auth"] = auth_json();
  return all;
}

json broker::impl::plain_stats_json() const {
  json per_service = json::object();
  for (const auto& [name, s] : reg.services()) {
    per_service[name] = {{"requests", s.counters.requests},
                         {"replies", s.counters.replies},
                         {"errors", s.counters.errors},
                         {"errors_by_code", s.counters.errors_by_code},
                         {"queued", s.queued}};
  }
  json per_stream = json::object();
  for (const auto& [name, c] : stream_stats) {
    per_stream[name] = {{"stored", c.stored},
                        {"duplicates", c.duplicates},
                        {"storage_errors", c.storage_errors},
                        {"errors_by_code", c.errors_by_code}};
  }
  return {{"broker", broker_id},
          {"uptime_ms",
           std::chrono::duration_cast<std::chrono::milliseconds>(steady_clock::now() - started)
               .count()},
          {"messages_in", stats.messages_in},
          {"messages_out", stats.messages_out},
          {"bytes_in", stats.bytes_in},
          {"requests", stats.requests},
          {"replies", stats.replies},
          {"events", stats.events},
          {"malformed", stats.malformed},
          {"late_replies", stats.late_replies},
          {"unknown_replies", stats.unknown_replies},
          {"abandoned_released", reg.abandoned_released()},
          {"requests_of_lost_peers", reg.requests_of_lost_peers()},
          {"undeliverable", stats.undeliverable},
          {"workers_lost", stats.workers_lost},
          {"redispatched", stats.redispatched},
          {"errors_by_code", stats.errors_by_code},
          {"workers", reg.workers().size()},
          {"pending", reg.pending_count()},
          {"queued", reg.queued_total()},
          {"queued_bytes", reg.queued_bytes_total()},
          {"budget_waits", reg.budget_waits()},
          {"subscriptions", subscriptions},
          {"streams", std::move(per_stream)},
          {"stream_store", store ? json{{"flushes", store->stats().flushes},
                                        {"flush_failures", store->stats().flush_failures},
                                        {"syncs", store->stats().syncs},
                                        {"torn_records", store->stats().torn_records},
                                        {"dedup_evicted", store->stats().dedup_evicted}}
                                 : json::object()},
          {"topic_seq",
           {{"tracked", topic_seq.tracked()},
            {"max", cfg.topic_seq_max},
            {"generations", topic_seq.generations()}}},
          {"consumers", consumers_stats_json()},
          {"services", std::move(per_service)}};
}

json broker::impl::consumers_stats_json() const {
  if (!consumers) return json::object();
  const auto& c = consumers->counters();
  return {{"count", consumers->size()},
          {"deliveries_unsent", c.deliveries_unsent},
          {"dead_letters_stored", c.dead_letters_stored},
          {"dead_letter_retries", c.dead_letter_retries},
          {"state_save_failures", c.state_save_failures},
          {"confirmations_unsent", c.confirmations_unsent},
          {"consumers_refused", c.consumers_refused},
          {"members_refused", c.members_refused},
          {"max_consumers", cfg.max_consumers},
          {"max_consumer_members", cfg.max_consumer_members},
          {"visits", c.visits}};
}

void broker::impl::journal_reply(const header& request, const std::string& worker,
                                 const header& outcome, std::uint64_t duration_us) {
  if (!trace_journal.enabled() || request.correlation_id.empty()) return;
  journal_entry& e = trace_journal.claim();
  e.what = journal_entry::kind::reply;
  e.ts_us = common::wall_clock_us();
  e.id = request.id;
  e.correlation_id = request.correlation_id;
  e.causation_id.clear();
  e.service = request.service;
  e.action = request.action;
  e.worker = worker;
  e.error_code = outcome.error_code;
  e.error_message = outcome.error_message;
  e.duration_us = duration_us;
}

// The arguments of a `broker.*` action: its msgpack payload as JSON ({} when empty). A payload
// that is not msgpack is answered bad_request here, and nullopt returned.
std::optional<json> broker::impl::admin_args(const peer_id& peer, const header& request,
                                             const zmq::message_t& payload) {
  if (payload.size() == 0) return json::object();
  try {
    const auto* data = static_cast<const std::uint8_t*>(payload.data());
    return json::from_msgpack(data, data + payload.size());
  } catch (const json::exception& e) {
    reply_error(peer, request,
                error::make(errc::bad_request,
                            "broker." + request.action + ": payload is not msgpack: " + e.what()));
    return std::nullopt;
  }
}

void broker::impl::on_admin(const peer_id& peer, const header& request,
                            const zmq::message_t& payload) {
  json body;
  if (request.action == "trace") {
    auto parsed = admin_args(peer, request, payload);
    if (!parsed) return;
    json& args = *parsed;
    if (!args.is_object() || !args.contains("correlation_id") ||
        !args["correlation_id"].is_string()) {
      reply_error(
          peer, request,
          error::make(errc::bad_request,
                      "broker.trace needs {correlation_id: str, children?: bool, limit?: uint, "
                      "payloads?: bool}"));
      return;
    }
    const std::size_t limit = args.contains("limit") && args["limit"].is_number_unsigned()
                                  ? args["limit"].get<std::size_t>()
                                  : 10'000;
    const auto flag = [&](const char* name) {
      return args.contains(name) && args[name].is_boolean() && args[name].get<bool>();
    };
    body = trace_journal.query(args["correlation_id"].get<std::string>(), flag("children"), limit,
                               flag("payloads"));
  } else if (request.action == "ping") {
    body = {{"broker", broker_id},
            {"protocol", common::k_protocol_version},
            {"uptime_ms",
             std::chrono::duration_cast<std::chrono::milliseconds>(steady_clock::now() - started)
                 .count()}};
  } else if (request.action == "services") {
    body = services_json();
  } else if (request.action == "stats") {
    body = stats_json();
  } else if (request.action == "streams" || request.action.starts_with("stream_")) {
    auto args = admin_args(peer, request, payload);
    if (!args) return;
    on_stream_admin(peer, request, *args);
    return;
  } else if (request.action == "consumers" || request.action.starts_with("consumer_") ||
             request.action == "dlq_replay") {
    auto args = admin_args(peer, request, payload);
    if (!args) return;
    on_consumer_admin(peer, request, *args, steady_clock::now());
    return;
  } else {
    reply_error(
        peer, request,
        error::make(errc::unknown_action,
                    "service 'broker' has no action '" + request.action +
                        "' (ping, services, stats, trace, streams, stream_info, stream_add, "
                        "stream_rm, stream_read, consumers, consumer_info, consumer_add, "
                        "consumer_rm, dlq_replay)"));
    return;
  }
  reply_body(peer, request, body);
}

json broker::impl::stream_json(const std::string& name) const {
  auto i = store->info(name);
  if (!i) {
    return {{"name", name}, {"error_code", i.err().code}, {"error_message", i.err().message}};
  }
  const auto& c = i->config;
  json j = {{"name", c.name},
            {"topics", c.topic_prefixes},
            {"max_age_ms", c.max_age.count()},
            {"max_bytes", c.max_bytes},
            {"max_events", c.max_events},
            {"duplicate_window_ms", c.duplicate_window.count()},
            {"duplicate_ids_max", c.duplicate_ids_max},
            {"first_seq", i->first_seq},
            {"last_seq", i->last_seq},
            {"count", i->count},
            {"bytes", i->bytes},
            {"first_ts_ms", i->first_ts_ms},
            {"last_ts_ms", i->last_ts_ms}};
  const auto it = stream_stats.find(name);
  const stream_counters none;
  const auto& counters = it == stream_stats.end() ? none : it->second;
  j["stored"] = counters.stored;
  j["duplicates"] = counters.duplicates;
  j["storage_errors"] = counters.storage_errors;
  return j;
}

namespace {

// A peer's value in an error message: dump() throws on a str that is not UTF-8, and msgpack
// strs are not checked.
std::string shown(const json& value) {
  auto text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() > 64 ? text.substr(0, 64) + "..." : text;
}

// Reads the admin arguments of broker.stream_*: each check names the action and the field.
struct stream_args {
  const json& args;
  std::string action;
  std::string problem;

  bool allow(std::initializer_list<std::string_view> keys) {
    if (!args.is_object()) {
      problem = action + ": the payload must be a map";
      return false;
    }
    for (const auto& [key, value] : args.items()) {
      if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
        std::string known;
        for (auto k : keys) known += (known.empty() ? "" : ", ") + std::string(k);
        problem = action + ": unknown field '" + key + "' (known: " + known + ")";
        return false;
      }
    }
    return true;
  }
  std::optional<std::string> name() {
    if (!args.contains("name") || !args["name"].is_string()) {
      problem = action + " needs 'name', the stream's name (a str)";
      return std::nullopt;
    }
    return args["name"].get<std::string>();
  }
  // An optional unsigned field; false (and `problem`) when present and not a uint.
  bool uint(const char* key, std::uint64_t& out) {
    if (!args.contains(key)) return true;
    if (!args[key].is_number_unsigned()) {
      problem = action + ": '" + key + "' must be a whole number >= 0, got " + shown(args[key]);
      return false;
    }
    out = args[key].get<std::uint64_t>();
    return true;
  }
};

error store_error(const error& e) {
  error out = e;
  out.retryable = e.code == streams::errc::storage_full;
  return out;
}

}  // namespace

void broker::impl::on_stream_admin(const peer_id& peer, const header& request, const json& args) {
  const std::string action = "broker." + request.action;
  if (!store) {
    if (request.action == "streams") {
      reply_body(peer, request, {{"streams", json::array()}, {"enabled", false}});
      return;
    }
    reply_error(peer, request,
                error::make(k_streams_disabled,
                            action + ": this broker has no stream storage; start it with "
                                     "--data DIR to use streams"));
    return;
  }
  // What this batch appended is flushed first: a read sees it, a removal does not race it.
  commit_streams();
  stream_args a{args, action, {}};
  json body;
  if (request.action == "streams") {
    body = {{"streams", json::array()}, {"enabled", true}};
    for (const auto& c : store->list_streams()) body["streams"].push_back(stream_json(c.name));
  } else if (request.action == "stream_info") {
    auto name = a.allow({"name"}) ? a.name() : std::nullopt;
    if (!name) return reply_error(peer, request, error::make(errc::bad_request, a.problem));
    auto i = store->info(*name);
    if (!i) return reply_error(peer, request, store_error(i.err()));
    body = stream_json(*name);
  } else if (request.action == "stream_add") {
    streams::stream_config c;
    std::uint64_t max_age_ms = 0;
    std::uint64_t window_ms = static_cast<std::uint64_t>(c.duplicate_window.count());
    auto name = a.allow({"name", "topics", "max_age_ms", "max_bytes", "max_events",
                         "duplicate_window_ms", "duplicate_ids_max"})
                    ? a.name()
                    : std::nullopt;
    if (name) {
      c.name = *name;
      if (auto problem = streams::check_stream_name(c.name); !problem.empty()) {
        a.problem = action + ": " + problem;
      } else if (!args.contains("topics") || !args["topics"].is_array() || args["topics"].empty()) {
        a.problem = action + " needs 'topics', a non-empty array of topic prefixes (str)";
      } else {
        for (std::size_t i = 0; i < args["topics"].size() && a.problem.empty(); ++i) {
          const auto& t = args["topics"][i];
          if (!t.is_string()) {
            a.problem =
                action + ": topics[" + std::to_string(i) + "] must be a str, got " + shown(t);
          } else if (auto bad = streams::check_topic_prefix(t.get<std::string>()); !bad.empty()) {
            a.problem = action + ": topics[" + std::to_string(i) + "]: " + bad;
          } else {
            c.topic_prefixes.push_back(t.get<std::string>());
          }
        }
      }
      if (a.problem.empty() && a.uint("max_age_ms", max_age_ms) &&
          a.uint("max_bytes", c.max_bytes) && a.uint("max_events", c.max_events) &&
          a.uint("duplicate_window_ms", window_ms) &&
          a.uint("duplicate_ids_max", c.duplicate_ids_max)) {
        if (c.duplicate_ids_max == 0) a.problem = action + ": 'duplicate_ids_max' must be >= 1";
        c.max_age = std::chrono::milliseconds(
            static_cast<std::int64_t>(std::min<std::uint64_t>(max_age_ms, INT64_MAX)));
        c.duplicate_window = std::chrono::milliseconds(
            static_cast<std::int64_t>(std::min<std::uint64_t>(window_ms, INT64_MAX)));
        if (auto other = streams::overlapping_stream(c, store->list_streams())) {
          a.problem = action + ": stream " + c.name + " overlaps stream " + *other +
                      "; a topic is stored by one stream";
        }
      }
    }
    if (!a.problem.empty()) {
      log->warn("{} refused: {}", action, a.problem);
      return reply_error(peer, request, error::make(errc::bad_request, a.problem));
    }
    if (auto st = store->create_stream(c); !st) {
      log->warn("{} {} refused: {} {}", action, c.name, st.err().code, st.err().message);
      return reply_error(peer, request, store_error(st.err()));
    }
    refresh_stream_topics();
    log->info("stream {} added: topics {} max_age={}ms max_bytes={} max_events={}", c.name,
              json(c.topic_prefixes).dump(), c.max_age.count(), c.max_bytes, c.max_events);
    body = stream_json(c.name);
  } else if (request.action == "stream_rm") {
    auto name = a.allow({"name"}) ? a.name() : std::nullopt;
    if (!name) return reply_error(peer, request, error::make(errc::bad_request, a.problem));
    if (auto st = store->delete_stream(*name); !st) {
      return reply_error(peer, request, store_error(st.err()));
    }
    stream_stats.erase(*name);
    consumers->stream_removed(*name);
    refresh_stream_topics();
    log->info("stream {} removed", *name);
    body = {{"name", *name}, {"removed", true}};
  } else if (request.action == "stream_read") {
    std::uint64_t from = 0;
    std::uint64_t since_ms = 0;
    std::uint64_t limit = 100;
    auto name = a.allow({"name", "from_seq", "since_ms", "limit"}) ? a.name() : std::nullopt;
    if (name && a.uint("from_seq", from) && a.uint("since_ms", since_ms) &&
        a.uint("limit", limit)) {
      if (args.contains("from_seq") && args.contains("since_ms")) {
        a.problem = action + ": give 'from_seq' or 'since_ms', not both";
      } else if (limit == 0 || limit > k_stream_read_max) {
        a.problem = action + ": 'limit' must be 1.." + std::to_string(k_stream_read_max) +
                    ", got " + std::to_string(limit);
      }
    }
    if (!name || !a.problem.empty()) {
      return reply_error(peer, request, error::make(errc::bad_request, a.problem));
    }
    if (args.contains("since_ms")) {
      auto at = store->seq_at_time(
          *name, static_cast<std::int64_t>(std::min<std::uint64_t>(since_ms, INT64_MAX)));
      if (!at) return reply_error(peer, request, store_error(at.err()));
      from = at.value();
    }
    const std::size_t budget = std::max<std::size_t>(1024, cfg.max_message_size * 3 / 4);
    auto records = store->read(*name, std::max<std::uint64_t>(from, 1), limit, budget);
    if (!records) return reply_error(peer, request, store_error(records.err()));
    auto i = store->info(*name);
    if (!i) return reply_error(peer, request, store_error(i.err()));
    json list = json::array();
    for (auto& r : records.value()) {
      json hdr;
      try {
        hdr = json::from_msgpack(r.header);
      } catch (const json::exception& e) {
        hdr = json::object();
        log->warn("stream {} #{}: stored header does not decode: {}", *name, r.seq, e.what());
      }
      // A dead letter's header names the original event's stream_seq; keep it.
      if (!hdr.contains("stream_seq")) hdr["stream_seq"] = r.seq;
      list.push_back({{"stream_seq", r.seq},
                      {"ts_ms", r.ts_ms},
                      {"topic", r.topic},
                      {"id", r.event_id},
                      {"header", std::move(hdr)},
                      {"payload", json::binary(std::vector<std::uint8_t>(r.payload.begin(),
                                                                         r.payload.end()))}});
    }
    const auto next =
        list.empty() ? std::max<std::uint64_t>(from, i->first_seq) : records.value().back().seq + 1;
    body = {{"stream", *name},
            {"first_seq", i->first_seq},
            {"last_seq", i->last_seq},
            {"next_seq", next},
            {"records", std::move(list)}};
  } else {
    return reply_error(
        peer, request,
        error::make(errc::unknown_action, "service 'broker' has no action '" + request.action +
                                              "' (streams, stream_info, stream_add, stream_rm, "
                                              "stream_read)"));
  }
  reply_body(peer, request, body);
}

broker::broker(config cfg) : impl_(std::make_unique<impl>(std::move(cfg))) {}
broker::~broker() = default;
const endpoints& broker::bound() const {
  return impl_->eps;
}
void broker::run() {
  impl_->run();
}

void broker::request_stop() {
  impl_->stop_requested.store(true);
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(impl_->wake_fd, &one, sizeof one);
}

void broker::request_reload() {
  impl_->reload_requested.store(true);
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(impl_->wake_fd, &one, sizeof one);
}

}  // namespace ensemble::broker

namespace ensemble::broker {

void broker::impl::forget_removed_peers(steady_clock::time_point now) {
  auto removed = reg.take_removed();
  if (!consumers) return;
  for (const auto& peer : removed) consumers->peer_gone(peer, now);
}

// CONSUME, CONSUME_STOP, ACK, NACK, TERM, PROGRESS (docs/protocol.md "Durable consumers").
void broker::impl::on_consumer_command(const peer_id& peer, const worker* w,
                                       common::parsed_message& m, steady_clock::time_point now) {
  if (secured && m.cmd == command::consume && !consume_allowed(peer, m, now)) return;
  const header& req = m.hdr;
  // Answers without an id are confirmed only when refused, and then with an ERROR.
  const auto refuse = [&](const error& err) {
    log->debug("{} {}/{} #{} from {} refused: {} {}",
               common::command_name(static_cast<std::uint8_t>(m.cmd)), req.stream, req.consumer,
               req.stream_seq, peer_label(w, peer), err.code, err.message);
    send_consumer_refusal(peer, req, err);
  };
  const auto confirm = [&](const json& body) {
    if (req.id.empty()) return;
    header h;
    h.id = req.id;
    h.stream = req.stream;
    h.consumer = req.consumer;
    h.stream_seq = req.stream_seq;
    h.worker = std::string(k_broker_service);
    const auto bytes = json::to_msgpack(body);
    send_to(peer, command::reply, h, zmq::message_t(bytes.data(), bytes.size()));
  };
  const std::string what = common::command_name(static_cast<std::uint8_t>(m.cmd));
  if (!consumers) {
    return refuse(
        error::make(k_streams_disabled, what + ": this broker has no stream storage; start it with "
                                               "--data DIR to use durable consumers"));
  }
  if (w == nullptr) {
    return refuse(error::make(errc::not_registered,
                              what + " from a peer that is not registered; send HELLO first "
                                     "(members are tracked by heartbeat)"));
  }
  if (auto missing = common::check_required(m.cmd, req); !missing.empty()) {
    ++stats.malformed;
    return refuse(error::make(errc::bad_request, missing));
  }
  // What this turn appended is flushed first, so that a new consumer sees it.
  commit_streams();
  if (m.cmd == command::consume) {
    json config = json::object();
    if (m.payload.size() > 0) {
      try {
        const auto* data = static_cast<const std::uint8_t*>(m.payload.data());
        config = json::from_msgpack(data, data + m.payload.size());
      } catch (const json::exception& e) {
        ++stats.malformed;
        return refuse(error::make(errc::bad_request,
                                  "CONSUME: the payload (the consumer's configuration) is not a "
                                  "msgpack map: " +
                                      std::string(e.what())));
      }
    }
    auto joined = consumers->join(peer, w->agent, req, config, now);
    if (!joined) return refuse(joined.err());
    return confirm(joined.value());
  }
  if (m.cmd == command::consume_stop) {
    if (auto st = consumers->leave(peer, req, now); !st) return refuse(st.err());
    return confirm(json::object());
  }
  // An accepted answer with an id is confirmed by the host once it is saved.
  if (auto st = consumers->answer(peer, m.cmd, req, now); !st) return refuse(st.err());
}

void broker::impl::on_consumer_admin(const peer_id& peer, const header& request, const json& args,
                                     steady_clock::time_point now) {
  const std::string action = "broker." + request.action;
  if (!consumers) {
    return reply_error(peer, request,
                       error::make(k_streams_disabled,
                                   action + ": this broker has no stream storage; start it with "
                                            "--data DIR to use durable consumers"));
  }
  commit_streams();
  if (!args.is_object()) {
    return reply_error(peer, request,
                       error::make(errc::bad_request, action + ": arguments must be a map"));
  }
  const auto str = [&](const char* key) -> std::optional<std::string> {
    if (!args.contains(key) || !args[key].is_string()) return std::nullopt;
    return args[key].get<std::string>();
  };
  const auto need = [&](const char* key) {
    reply_error(
        peer, request,
        error::make(errc::bad_request, action + " needs '" + std::string(key) + "' (" +
                                           (std::string(key) == "seq" ? "uint" : "str") + ")"));
  };
  const auto stream = str("stream");
  if (!stream) return need("stream");
  common::result<json> answer = json::object();
  if (request.action == "consumers") {
    answer = consumers->list(*stream);
  } else if (request.action == "dlq_replay") {
    if (!args.contains("seq") || !args["seq"].is_number_unsigned() || args["seq"] == 0) {
      return need("seq");
    }
    answer = consumers->dlq_replay(*stream, args["seq"].get<std::uint64_t>(), now);
  } else {
    const auto name = str("name");
    if (!name) return need("name");
    if (request.action == "consumer_info") {
      answer = consumers->info(*stream, *name);
    } else if (request.action == "consumer_add") {
      answer = consumers->add(*stream, *name, args, now);
    } else if (request.action == "consumer_rm") {
      answer = consumers->remove(*stream, *name);
    } else {
      return reply_error(
          peer, request,
          error::make(errc::unknown_action, "service 'broker' has no action '" + request.action +
                                                "' (consumers, consumer_info, consumer_add, "
                                                "consumer_rm, dlq_replay)"));
    }
  }
  if (!answer) return reply_error(peer, request, answer.err());
  reply_body(peer, request, answer.value());
}

}  // namespace ensemble::broker

// Secured mode (docs/protocol.md section 12): the handshake, the sender's identity, refusals
// and reloads. Nothing here runs in plain mode.
namespace ensemble::broker {

void broker::impl::set_up_security() {
  if (cfg.curve_secret_key_file.empty()) {
    throw common::config_error("--auth " + cfg.auth_file,
                               "needs --curve-key FILE, the broker's secret key (ensemble keygen "
                               "broker): secured mode takes both");
  }
  if (cfg.auth_file.empty()) {
    throw common::config_error("--curve-key " + cfg.curve_secret_key_file,
                               "needs --auth FILE, the identities that may connect and their "
                               "rights: secured mode takes both");
  }
  if (!common::curve_available()) {
    throw common::config_error("--curve-key", "this libzmq was built without CURVE support");
  }
  const auto keys = common::read_curve_key_file(cfg.curve_secret_key_file,
                                                "--curve-key " + cfg.curve_secret_key_file, true);
  auth_table = auth::load_auth_file(cfg.auth_file);
  // The ZAP handler is bound before the CURVE sockets: libzmq lets every handshake through
  // when nobody serves ZAP.
  zap = zmq::socket_t(ctx, zmq::socket_type::rep);
  zap.set(zmq::sockopt::linger, 0);
  try {
    zap.bind(k_zap_endpoint);
  } catch (const zmq::error_t& e) {
    throw common::config_error("--curve-key", std::string("cannot bind the ZAP handler ") +
                                                  k_zap_endpoint + ": " + e.what());
  }
  for (zmq::socket_t* s : {&router, &xpub}) {
    s->set(zmq::sockopt::curve_server, 1);
    s->set(zmq::sockopt::curve_secretkey, keys.secret_key);
    s->set(zmq::sockopt::zap_domain, k_zap_domain);
  }
  // Every subscription is checked before it is applied (set(subscribe) after reading it).
  xpub.set(zmq::sockopt::xpub_manual, 1);
  log->info("secured mode: broker key {} ({}), {} identities from {}", keys.public_key,
            cfg.curve_secret_key_file, auth_table.identities().size(), cfg.auth_file);
}

// ZAP requests (RFC 27): [version][request id][domain][address][routing id][mechanism]
// [client public key]; the answer is [version][request id][status][text][user id][metadata].
void broker::impl::handle_zap(steady_clock::time_point now) {
  std::vector<zmq::message_t> req;
  for (std::size_t i = 0; i < k_batch && common::recv_frames(zap, req); ++i) {
    std::string status = "400";
    std::string text = "unknown key";
    std::string user;
    std::string metadata;
    std::string key;
    const bool well_formed = req.size() >= 7 && common::as_view(req[0]) == "1.0";
    if (well_formed && common::as_view(req[5]) == "CURVE" && req[6].size() == 32) {
      std::array<char, 41> z85{};
      zmq_z85_encode(z85.data(), static_cast<const std::uint8_t*>(req[6].data()), 32);
      key.assign(z85.data(), 40);
      if (const auth::identity* id = auth_table.by_key(key)) {
        status = "200";
        text = "OK";
        user = id->name;
        // ZMTP properties: name length (1 byte), name, value length (4 bytes, big endian),
        // value.
        const auto property = [&](std::string_view name, const std::string& value) {
          metadata += static_cast<char>(name.size());
          metadata += name;
          for (int shift = 24; shift >= 0; shift -= 8) {
            metadata += static_cast<char>((value.size() >> shift) & 0xff);
          }
          metadata += value;
        };
        property(k_key_property, key);
        property(k_connection_property, std::to_string(++handshakes));
      }
    } else if (well_formed) {
      text = "CURVE is required";
    }
    if (status != "200") {
      ++auth_stats.handshakes_refused;
      // Handshakes have no identity: their lines share one budget of the refusal limiter (the
      // key cannot be an identity's name, which has no parentheses).
      std::uint64_t suppressed = 0;
      if (refusal_log.admit("(handshake)", now, suppressed)) {
        log->warn(
            "handshake refused ({}): key {} from {} (domain {}){}", text, key.empty() ? "-" : key,
            req.size() > 3 ? std::string(common::as_view(req[3])) : "?",
            req.size() > 2 ? std::string(common::as_view(req[2])) : "?",
            suppressed > 0
                ? " (" + std::to_string(suppressed) + " more handshake refusals were not logged)"
                : std::string());
      }
    } else if (log->should_log(spdlog::level::debug)) {
      log->debug("handshake of {} from {} accepted", user, std::string(common::as_view(req[3])));
    }
    std::vector<zmq::message_t> answer;
    answer.emplace_back("1.0", 3);
    if (req.size() > 1) {
      answer.emplace_back(req[1].data(), req[1].size());
    } else {
      answer.emplace_back();
    }
    answer.emplace_back(status.data(), status.size());
    answer.emplace_back(text.data(), text.size());
    answer.emplace_back(user.data(), user.size());
    answer.emplace_back(metadata.data(), metadata.size());
    common::send_frames(zap, answer);
  }
}

// The identity of the message this frame is part of (libzmq attaches the connection's
// metadata to the frames a peer sent), and the connection it came on, for a reload that must
// close it.
void broker::impl::identify(zmq::message_t& frame, bool events) {
  const char* user = zmq_msg_gets(frame.handle(), "User-Id");
  sender_name = user != nullptr ? std::string_view(user) : std::string_view();
  sender = auth_table.by_name(sender_name);
  const int fd = zmq_msg_get(frame.handle(), ZMQ_SRCFD);
  const char* serial = zmq_msg_gets(frame.handle(), k_connection_property);
  if (fd < 0 || serial == nullptr) return;
  connection_entry& c = connections[fd];
  if (c.serial == serial) return;  // the connection learned already
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    connections.erase(fd);
    return;
  }
  const char* key = zmq_msg_gets(frame.handle(), k_key_property);
  c.serial = serial;
  c.identity = std::string(sender_name);
  c.key = key != nullptr ? key : "";
  c.inode = st.st_ino;
  c.events = events;
  // A connection first seen after a reload revoked its key (it had sent nothing before, so the
  // reload could not know it): it is closed now, and this message has no identity's rights.
  const auth::identity* owner = auth_table.by_key(c.key);
  if (owner == nullptr || owner->name != sender_name) {
    sender = nullptr;
    ::shutdown(fd, SHUT_RDWR);
    log->info("closed the {} connection of {} (key {}): the key is no longer {}'s",
              events ? "events" : "router", c.identity, c.key, c.identity);
    connections.erase(fd);
  }
}

void broker::impl::on_secured_subscription(zmq::message_t& m, bool subscribe,
                                           const std::string& prefix) {
  if (zmq_msg_gets(m.handle(), "User-Id") == nullptr) {
    // libzmq reports the subscriptions of a connection that closed without metadata, the
    // refused ones too: uncount a refused one first. Which one it was cannot be told, but each
    // report is one subscription gone, so the counts come back to zero with the subscribers.
    if (subscribe) return;
    for (auto* counts : {&refused_subscriptions, &subscriptions}) {
      auto it = counts->find(prefix);
      if (it == counts->end()) continue;
      if (--it->second == 0) counts->erase(it);
      break;
    }
    return;
  }
  identify(m, true);
  const bool allowed = auth::check_subscribe(sender, prefix) == auth::verdict::allowed;
  if (!subscribe) {
    // The same verdict as when it subscribed: a change of the right closes the connection.
    xpub.set(zmq::sockopt::unsubscribe, prefix);
    auto& counts = allowed ? subscriptions : refused_subscriptions;
    auto it = counts.find(prefix);
    if (it != counts.end() && --it->second == 0) counts.erase(it);
    return;
  }
  if (!allowed) {
    if (refused_subscriptions.size() < k_refused_prefixes_max ||
        refused_subscriptions.contains(prefix)) {
      ++refused_subscriptions[prefix];
    }
    (void)refusal(auth::right::subscribe, "prefix '" + prefix + "' (not applied)",
                  steady_clock::now());
    return;
  }
  xpub.set(zmq::sockopt::subscribe, prefix);  // applies to the connection just read
  ++subscriptions[prefix];
  log->debug("subscription of {} to '{}'", sender_name, prefix);
}

error broker::impl::refusal(auth::right r, const std::string& what, steady_clock::time_point now) {
  ++auth_stats.refused[static_cast<std::size_t>(r)];
  auto message = auth::refusal_message(sender_name, r, what);
  std::uint64_t suppressed = 0;
  if (refusal_log.admit(sender_name, now, suppressed)) {
    if (suppressed > 0) {
      log->warn("refused: {} ({} more refusals of '{}' were not logged)", message, suppressed,
                sender_name);
    } else {
      log->warn("refused: {}", message);
    }
  }
  return error::make(errc::unauthorized, std::move(message));
}

void broker::impl::send_consumer_refusal(const peer_id& peer, const header& req, const error& err) {
  header h;
  h.id = req.id;
  h.stream = req.stream;
  h.consumer = req.consumer;
  h.stream_seq = req.stream_seq;
  h.error_code = err.code;
  h.error_message = err.message;
  h.retryable = err.retryable;
  h.worker = std::string(k_broker_service);
  count_error(err.code);
  send_to(peer, req.id.empty() ? command::error : command::reply, h);
}

// CONSUME needs the consume right on its stream; the refusal has the form of section 11's
// (a REPLY with the id, else an ERROR, repeating stream, consumer and stream_seq).
bool broker::impl::consume_allowed(const peer_id& peer, const common::parsed_message& m,
                                   steady_clock::time_point now) {
  const header& req = m.hdr;
  if (auth::check_consume(sender, req.stream) == auth::verdict::allowed) return true;
  send_consumer_refusal(peer, req,
                        refusal(auth::right::consume, "stream '" + req.stream + "'", now));
  return false;
}

json broker::impl::auth_json() const {
  json refused = json::object();
  for (std::size_t r = 0; r < auth::k_rights; ++r) {
    const auto which = static_cast<auth::right>(r);
    if (which == auth::right::call_own) continue;  // a refused call is counted under call
    refused[std::string(auth::right_name(which))] = auth_stats.refused[r];
  }
  return {{"identities", auth_table.identities().size()},
          {"handshakes_refused", auth_stats.handshakes_refused},
          {"refused", std::move(refused)},
          {"refused_subscriptions", refused_subscriptions},
          {"reloads", auth_stats.reloads},
          {"reload_failures", auth_stats.reload_failures}};
}

// SIGHUP. Connections of identities whose entry did not change are not touched.
void broker::impl::reload_auth(steady_clock::time_point now) {
  if (!secured) {
    log->info("reload requested, but the broker runs without --auth: nothing to reload");
    return;
  }
  auth::table next;
  try {
    next = auth::load_auth_file(cfg.auth_file);
  } catch (const common::config_error& e) {
    ++auth_stats.reload_failures;
    log->error("reload of {} failed; the previous rights stay in force: {}", cfg.auth_file,
               e.what());
    return;
  }
  const auto changes = auth::diff(auth_table, next);
  auth_table = std::move(next);
  sender = nullptr;
  sender_name = {};
  ++auth_stats.reloads;
  const auto listed = [](const std::vector<std::string>& names, std::string_view name) {
    return std::find(names.begin(), names.end(), name) != names.end();
  };
  // An identity whose rights changed is unregistered as if lost: its HELLO is checked again.
  std::vector<peer_id> unregister;
  for (const auto& [id, w] : reg.workers()) {
    if (listed(changes.changed, w->agent)) unregister.push_back(id);
  }
  for (const auto& id : unregister) reg.remove_worker(id, decisions);
  execute_decisions(now);
  forget_removed_peers(now);
  const auto closed = close_connections([&](const connection_entry& c) {
    return listed(changes.closed_keys, c.key) ||
           (c.events && listed(changes.subscribe_changed, c.identity));
  });
  std::string names;
  for (const auto& n : changes.changed) names += (names.empty() ? "" : ", ") + n;
  log->info(
      "reloaded {}: {} identities; rights changed for [{}] ({} peer(s) unregistered); {} key(s) "
      "no longer listed, {} connection(s) closed",
      cfg.auth_file, auth_table.identities().size(), names, unregister.size(),
      changes.closed_keys.size(), closed);
}

// Shuts down the matching connections' sockets: libzmq then drops them (an XPUB reports their
// subscriptions gone) and a peer that reconnects goes through the handshake again. A
// descriptor whose socket is not the one learned (closed, and the number reused) is left alone.
std::size_t broker::impl::close_connections(
    const std::function<bool(const connection_entry&)>& which) {
  std::size_t closed = 0;
  for (auto it = connections.begin(); it != connections.end();) {
    if (!which(it->second)) {
      ++it;
      continue;
    }
    struct stat st {};
    if (::fstat(it->first, &st) == 0 && st.st_ino == it->second.inode && S_ISSOCK(st.st_mode)) {
      ::shutdown(it->first, SHUT_RDWR);
      ++closed;
      log->info("closed the {} connection of {} (key {})", it->second.events ? "events" : "router",
                it->second.identity, it->second.key);
    }
    it = connections.erase(it);
  }
  return closed;
}

}  // namespace ensemble::broker
