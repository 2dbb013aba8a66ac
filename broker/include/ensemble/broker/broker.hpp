#pragma once
// The Ensemble broker: one process that carries commands (request/reply, load-balanced over
// workers) and events (publish/subscribe, fanned out through an XPUB).
//
// Usage: fill a `config`, construct a `broker` (binds its sockets, throws on a bad endpoint),
// read `endpoints()` for the actual addresses (ephemeral ports resolved), then `run()` on a
// thread of your choice. With `curve_secret_key_file` and `auth_file` it runs in secured mode
// (docs/protocol.md section 12); without, it refuses non-loopback endpoints unless `insecure`.
// `request_stop()` may be called from any thread or a signal handler; run() then answers what
// is queued with `shutting_down`, gives in-flight requests `shutdown_grace` to finish, and
// returns.
//
// Wire protocol: docs/protocol.md.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "ensemble/broker/stream_store.hpp"

namespace ensemble::broker {

struct config {
  std::string router_endpoint = "tcp://127.0.0.1:5555";
  std::string events_endpoint = "tcp://127.0.0.1:5556";
  std::chrono::milliseconds heartbeat{1000};
  std::uint32_t liveness = 3;                  // missed heartbeats before a peer is lost
  std::size_t max_message_size = 1024 * 1024;  // payload + header bytes; larger: too_large
  std::size_t queue_per_service = 10'000;      // waiting requests per service
  std::size_t queue_total = 100'000;           // waiting requests in all
  // Payload bytes (+ 256 per request) that may wait, per service and in all; over: queue_full.
  std::size_t queue_bytes_per_service = std::size_t{64} << 20;
  std::size_t queue_bytes_total = std::size_t{256} << 20;
  // What the broker holds for one worker: DISPATCHes it has not answered (nor any later one).
  // A worker over its budget gets no new requests; they go elsewhere or wait.
  std::size_t peer_budget_bytes = std::size_t{64} << 20;
  std::size_t peer_budget_messages = 10'000;
  std::chrono::milliseconds max_deadline{3'600'000};  // longer deadlines are clamped
  std::chrono::milliseconds shutdown_grace{2000};     // for in-flight requests at shutdown
  int event_hwm = 100'000;                            // per-subscriber queue on the XPUB
  int peer_hwm = 100'000;                             // per-peer queue on the ROUTER
  std::size_t journal_size = 10'000;  // trace journal records (broker.trace); 0: off
  // Topics whose per-topic seq is tracked (docs/protocol.md section 7); an idle topic beyond
  // them starts again at 1.
  std::size_t topic_seq_max = 100'000;
  // Durable streams (docs/protocol.md section 11). Without a data directory the broker has
  // no streams and refuses to create any.
  std::string data_dir;                           // --data: stream storage
  std::string streams_file;                       // --streams: streams declared at start
  streams::sync stream_sync = streams::sync::os;  // --sync: when a stored publish is acked
  // Durable consumers per stream, and members per consumer (each >= 1); over: too_many.
  std::size_t max_consumers = 1'000;         // --max-consumers
  std::size_t max_consumer_members = 1'000;  // --max-consumer-members
  // Secured mode (docs/protocol.md section 12): both or neither. The router and events sockets
  // are then CURVE servers; each connection authenticates as an identity of the auth file,
  // which says what it may do.
  std::string curve_secret_key_file;  // --curve-key: the broker's secret certificate
  std::string auth_file;              // --auth: identities, their keys and rights
  // Plain mode binds only loopback, ipc:// and inproc:// endpoints unless this is set.
  bool insecure = false;  // --insecure
};

struct endpoints {
  std::string router;
  std::string events;
};

class broker {
 public:
  // Binds both endpoints and opens the stream storage. Throws common::config_error naming the
  // endpoint, the data directory or the streams file (and the path in it) that failed.
  explicit broker(config cfg);
  ~broker();
  broker(const broker&) = delete;
  broker& operator=(const broker&) = delete;

  const endpoints& bound() const;
  // Serves until request_stop(); returns after a clean shutdown.
  void run();
  // Thread- and async-signal-safe.
  void request_stop();
  // Secured mode: read the auth file again (SIGHUP). Thread- and async-signal-safe; the loop
  // does the work. A file that does not load leaves the rights in force.
  void request_reload();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace ensemble::broker
