#pragma once
// The broker's bookkeeping, without any I/O: which peers are registered, which services they
// offer with what capacity, which requests are queued or in flight, and when things expire.
//
// The broker loop feeds it what arrives (hello, request, reply, bye, the clock) and executes
// the decisions it returns (dispatch this request, answer that one with an error). Keeping the
// policy here makes it testable with a hand-driven clock and no sockets.
//
// Dispatch policy: each service keeps the offers (worker x service) that have free capacity in
// least-recently-used order; a request goes to the front one, which moves to the back if it
// still has capacity. When none has capacity, requests wait in a bounded per-service FIFO
// until an offer frees up or their deadline passes.
//
// Memory budget: what the broker holds for a peer that does not read is bounded. Every
// DISPATCH stays charged to its worker (its payload bytes plus k_header_allowance, and one
// message) until the worker replies to it or to a request dispatched after it (the
// connection is FIFO, so the DISPATCH has then left the broker), or is lost. Abandoning a
// request gives its capacity slot back but not its charge: the broker cannot tell whether the
// DISPATCH still sits in its send queue. An offer whose worker is over its budget is passed
// over; a worker with nothing charged always takes one request, however large. Waiting
// requests are bounded in count and in bytes, per service and in all.

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/clock.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::broker {

using common::time_point;
using peer_id = std::string;  // the ROUTER routing id, as bytes

// Charged per message on top of its payload: the header and the frames around it.
inline constexpr std::size_t k_header_allowance = 256;

struct registry_limits {
  std::size_t queue_per_service = 10'000;
  std::size_t queue_total = 100'000;
  std::size_t queue_bytes_per_service = std::size_t{64} << 20;
  std::size_t queue_bytes_total = std::size_t{256} << 20;
  std::size_t peer_budget_bytes = std::size_t{64} << 20;
  std::size_t peer_budget_messages = 10'000;
  std::chrono::milliseconds heartbeat{1000};
  std::uint32_t liveness = 3;  // heartbeats a peer may miss before it is declared lost
};

struct worker;

// One service offered by one worker.
struct offer {
  worker* owner = nullptr;
  std::string service;
  std::uint32_t capacity = 1;
  std::uint32_t in_flight = 0;
  bool listed_idle = false;  // present in its service's idle list
  std::uint64_t dispatched = 0;
};

// A registered peer (it sent HELLO). It may offer no service at all: a pure client that wants
// heartbeats and a name on its events.
struct worker {
  peer_id id;
  std::string agent;
  time_point last_seen;
  std::vector<std::unique_ptr<offer>> offers;
  std::unordered_set<std::uint64_t> in_flight;  // tokens dispatched to this worker
  // DISPATCHes not yet known to have left the broker: dispatch sequence -> bytes charged.
  std::map<std::uint64_t, std::size_t> unconfirmed;
  std::size_t unconfirmed_bytes = 0;
};

struct service_counters {
  std::uint64_t requests = 0;
  std::uint64_t replies = 0;
  std::uint64_t errors = 0;
  std::map<std::string, std::uint64_t> errors_by_code;
};

struct service_entry {
  std::string name;
  std::vector<offer*> offers;
  std::deque<offer*> idle;          // offers with free capacity, least recently used first
  std::deque<std::uint64_t> queue;  // tokens; may hold stale ones (already answered)
  std::size_t queued = 0;           // live tokens in `queue`
  std::size_t queued_bytes = 0;     // what the live tokens charge (payload + header allowance)
  bool ever_offered = false;
  service_counters counters;
};

enum class request_state { queued, dispatched, abandoned };

struct pending_request {
  std::uint64_t token = 0;
  peer_id client;
  common::header hdr;      // as the client sent it
  zmq::message_t payload;  // kept while queued, and for retryable requests while in flight
  time_point received;
  time_point deadline;
  request_state state = request_state::queued;
  offer* assigned = nullptr;
  bool redispatched = false;
  std::size_t bytes = 0;           // charged to queues and workers; set by submit()
  std::uint64_t dispatch_seq = 0;  // order of its last DISPATCH, for the worker's budget
};

struct decision {
  enum class kind { dispatch, fail };
  kind what = kind::dispatch;
  std::uint64_t token = 0;
  // For fail: who to answer and with what. The request is already gone from the registry
  // unless it is still occupying a worker (abandoned).
  peer_id client;
  common::header hdr;
  common::error err;
};

class registry {
 public:
  explicit registry(registry_limits limits) : limits_(limits) {}

  // HELLO: registers the peer, or adds to / updates the capacity of what it already offers.
  common::status hello(const peer_id& peer, std::string agent,
                       const std::vector<common::service_offer>& services, time_point now,
                       std::vector<decision>& out);
  // BYE or expiry: the peer's in-flight requests are re-dispatched once if retryable,
  // otherwise answered worker_lost.
  void remove_worker(const peer_id& peer, std::vector<decision>& out);
  worker* find_worker(const peer_id& peer);
  // The peers removed (BYE, expiry, a send that failed) since the last call, for what else the
  // broker keeps per peer (durable-consumer members).
  std::vector<peer_id> take_removed() { return std::exchange(removed_, {}); }
  // Any message from a registered peer proves it alive. Returns false for unknown peers.
  bool touch(const peer_id& peer, time_point now);

  // A new request. Answers queue_full at once when the queue limits (count or bytes) are
  // reached.
  void submit(pending_request request, std::vector<decision>& out);
  pending_request* find(std::uint64_t token);

  // The worker's reply to `token` arrived. Returns the request when `peer` was the worker it
  // was dispatched to: the caller forwards the reply if the state is `dispatched` (not yet
  // answered), then calls finish(token).
  pending_request* reply_from(const peer_id& peer, std::uint64_t token);
  // Releases the worker's capacity, forgets the request, and dispatches what was waiting.
  void finish(std::uint64_t token, std::vector<decision>& out);

  // Expires deadlines and silent workers.
  void expire(time_point now, std::vector<decision>& out);
  // When expire() next has something to do.
  std::optional<time_point> next_deadline();

  // Shutdown: answers every queued request, and every dispatched one when `dispatched_too`.
  void fail_all(const common::error& err, bool dispatched_too, std::vector<decision>& out);

  // Introspection for the broker service and tests.
  const std::unordered_map<std::string, service_entry>& services() const { return services_; }
  const std::unordered_map<peer_id, std::unique_ptr<worker>>& workers() const { return workers_; }
  service_counters& counters_for(const std::string& service);
  std::size_t pending_count() const { return pending_.size(); }
  std::size_t queued_total() const { return queued_total_; }
  std::size_t queued_bytes_total() const { return queued_bytes_total_; }
  // Requests that waited because every offer with free capacity was over its peer budget.
  std::uint64_t budget_waits() const { return budget_waits_; }
  std::size_t in_flight_total() const;
  // Slots given back because a worker never answered a request past its deadline plus
  // heartbeat x liveness (its DISPATCH was probably lost on the way).
  std::uint64_t abandoned_released() const { return abandoned_released_; }
  // Requests dropped because the peer that sent them was lost (queued or in flight).
  std::uint64_t requests_of_lost_peers() const { return requests_of_lost_peers_; }

 private:
  service_entry& service(const std::string& name);
  void try_dispatch(service_entry& s, std::vector<decision>& out);
  void assign(pending_request& r, offer& o, std::vector<decision>& out);
  void release(offer& o);
  // When the slot of an abandoned request (answered to its client, still on its worker) is
  // taken back if the worker has not replied.
  time_point abandon_release(const pending_request& r) const;
  void drop_requests_of(const peer_id& client);
  void fail(std::uint64_t token, common::error err, std::vector<decision>& out);
  void enqueue(service_entry& s, pending_request& r, bool front);
  void dequeued(service_entry& s, const pending_request& r);
  bool within_budget(const worker& w, const pending_request& r) const;
  void confirm(worker& w, std::uint64_t dispatch_seq);
  void compact(service_entry& s);
  void maybe_forget_service(const std::string& name);

  registry_limits limits_;
  std::unordered_map<peer_id, std::unique_ptr<worker>> workers_;
  std::unordered_map<std::string, service_entry> services_;
  std::unordered_map<std::uint64_t, pending_request> pending_;
  std::size_t queued_total_ = 0;
  std::size_t queued_bytes_total_ = 0;
  std::uint64_t next_dispatch_seq_ = 0;
  std::uint64_t budget_waits_ = 0;
  std::uint64_t abandoned_released_ = 0;
  std::uint64_t requests_of_lost_peers_ = 0;
  std::vector<peer_id> removed_;

  using timer = std::pair<time_point, std::uint64_t>;
  std::priority_queue<timer, std::vector<timer>, std::greater<>> deadlines_;
  time_point next_liveness_check_{};
};

}  // namespace ensemble::broker
