#pragma once
// The agent SDK: how a service is written, and how any program calls services and publishes
// or consumes events through an Ensemble broker.
//
//   ensemble::agent::agent a({.name = "payments", .broker = "tcp://127.0.0.1:5555"});
//   a.handle("PaymentService", "charge", [](const message& m) -> handler_result {
//     auto order = from_json_payload(m.payload());       // ensemble/agent/json.hpp
//     if (!order) return order.err();
//     return to_json_payload({{"transactionId", "t-1"}});
//   });
//   a.set_capacity("PaymentService", 4);
//   a.subscribe("order.", [](const message& e) { ... });
//   if (auto s = a.start(); !s) { ... s.err().message ... }
//   auto r = a.call("Inventory", "reserve", payload, std::chrono::seconds(2));
//
// Threads: one I/O thread owns the ZeroMQ sockets; request handlers run on a pool sized to the
// total capacity (or on the I/O thread itself with options.inline_handlers); event handlers run
// one at a time, in arrival order, on an event thread.
// Anything sent from inside a handler (call, publish) automatically carries the handled
// message's correlation and trace ids, with causation_id = the handled message's id.
//
// After a broker restart the agent registers again by itself; its subscriptions resume.
// Every blocking call has a deadline. The public headers do not include ZeroMQ or msgpack.
//
// Durable consumers (docs/agents.md, "Durable consumers"): consume() joins a named consumer of a
// broker stream; each stored event is delivered to one member at a time and redelivered until
// a handler's result acknowledges or dead-letters it (at least once: handlers are idempotent).
//   a.consume({.stream = "orders", .consumer = "billing", .capacity = 4},
//             [](const message& m) -> status { ...; return common::ok_status(); });

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ensemble/common/result.hpp"

namespace ensemble::agent {

using common::error;
using common::result;
using common::status;
using bytes = std::string;  // payload bytes; msgpack by convention (see json.hpp, msgpack.hpp)

struct options {
  std::string name;                               // agent name; random if empty
  std::string broker = "tcp://127.0.0.1:5555";    // the broker's router endpoint
  std::string events = "tcp://127.0.0.1:5556";    // the broker's events endpoint
  std::chrono::milliseconds heartbeat{1000};      // until the broker's WELCOME says otherwise
  std::uint32_t liveness = 3;                     // silent intervals before the broker is lost
  std::chrono::milliseconds start_timeout{5000};  // start() waits this long for WELCOME
  std::size_t handler_threads = 0;                // 0: total capacity, 1..64
  // Run request handlers on the I/O thread instead of the pool: no thread hand-over, so the
  // lowest latency and highest throughput, for handlers that never block (no blocking call(),
  // no disk or network I/O). A blocking handler stalls the whole agent.
  bool inline_handlers = false;
  // Backpressure (docs/agents.md, "Publishing and backpressure"). Messages the broker connection
  // cannot take yet (its ZeroMQ queue of 100,000 messages is full: the broker is slow, paused or
  // unreachable) wait in the SDK, in order; nothing is dropped. At most `send_queue` events may
  // wait there: publish() then blocks until there is room, for at most `publish_timeout`, and
  // fails with `queue_full` after that. Requests and replies wait there too but are not counted.
  std::size_t send_queue = 10'000;                  // events waiting in the SDK, at least 1
  std::chrono::milliseconds publish_timeout{5000};  // publish(): longest wait for room
  // Events received and not yet handled, at least 1 (docs/agents.md, "Receiving events"). When
  // the event handlers fall this far behind, the agent stops reading events until they catch
  // up: the backlog stays in ZeroMQ's queues and then the broker's, whose slow-subscriber
  // policy applies (past its --event-hwm this subscriber loses events: a gap in the topic's
  // seq), instead of growing this process's memory.
  std::size_t event_queue = 10'000;
  // Secured mode (docs/protocol.md section 12, docs/agents.md "Keys"): both set, or neither.
  // `key_file` is this agent's secret key file (NAME.key_secret, written by `ensemble keygen`,
  // mode 0600); `broker_key` is the broker's public key, as 40 Z85 characters or the path of a
  // certificate file holding it. With both, the connections are CURVE clients and the broker
  // knows the agent by the identity its auth file gives this key: leave `name` empty to take
  // that identity's name (name() is then the key file's name, a label for logs), or give
  // exactly the identity's name. A key the broker does not know makes start() fail at once
  // with `unauthorized`. Environment variables are the CLI's business, not the SDK's.
  std::string key_file = {};
  std::string broker_key = {};
};

// A request being handled, an event received, a reply to a call, or a delivery of a durable
// consumer (a stored event). Read-only.
class message {
 public:
  enum class kind { request, event, reply, delivery };

  kind what() const { return kind_; }
  const std::string& id() const { return id_; }
  const std::string& service() const { return service_; }
  const std::string& action() const { return action_; }
  const std::string& topic() const { return topic_; }
  const std::string& correlation_id() const { return correlation_id_; }
  const std::string& causation_id() const { return causation_id_; }
  const std::string& trace_id() const { return trace_id_; }
  const std::string& idempotency_key() const { return idempotency_key_; }
  std::uint32_t attempt() const { return attempt_; }
  std::uint64_t seq() const { return seq_; }                   // events
  std::uint64_t timestamp_us() const { return ts_; }           // events
  const std::string& publisher() const { return publisher_; }  // events
  // Requests: who sent it, as the broker stamped it (its authenticated identity when the broker
  // runs secured), and "own" when the caller may act only on what it owns (docs/protocol.md
  // section 12).
  const std::string& caller() const { return caller_; }
  const std::string& caller_scope() const { return caller_scope_; }
  const std::string& worker() const { return worker_; }  // replies
  // Events stored by a durable stream (fanned out or delivered), and publish acknowledgements
  // of stored events: the stream and the event's sequence in it (empty / 0 otherwise).
  const std::string& stream() const { return stream_; }
  std::uint64_t stream_seq() const { return stream_seq_; }
  // Deliveries: the durable consumer, and the delivery count (1 the first time, one more per
  // redelivery, kept across broker restarts).
  const std::string& consumer() const { return consumer_; }
  std::uint32_t deliveries() const { return deliveries_; }
  // Publish acknowledgements: the stream already held this event id (nothing was stored again;
  // stream_seq() is the original's).
  bool duplicate() const { return duplicate_; }
  // Requests: when the caller stops waiting.
  std::chrono::steady_clock::time_point deadline() const { return deadline_; }
  const bytes& payload() const { return payload_; }

 private:
  friend struct message_access;
  kind kind_ = kind::event;
  std::string id_, service_, action_, topic_;
  std::string correlation_id_, causation_id_, trace_id_, idempotency_key_;
  std::uint32_t attempt_ = 1;
  std::uint64_t seq_ = 0, ts_ = 0;
  std::string publisher_, worker_, caller_, caller_scope_;
  std::string stream_, consumer_;
  std::uint64_t stream_seq_ = 0;
  std::uint32_t deliveries_ = 0;
  bool duplicate_ = false;
  std::chrono::steady_clock::time_point deadline_{};
  bytes payload_;
};

// What a request handler returns: the reply payload, or an error (code, message, retryable)
// that the caller receives as an error reply. A handler that throws is answered
// `handler_failed` with the exception's message.
using handler_result = result<bytes>;
using request_handler = std::function<handler_result(const message&)>;
using event_handler = std::function<void(const message&)>;
using call_result = result<message>;
using call_callback = std::function<void(call_result)>;

// Trace context for calls and publishes. Fields left empty are filled from the message being
// handled on this thread, if any (correlation_id, trace_id; causation_id = its id), or fresh
// (trace_id, correlation_id = the new message's id).
struct send_options {
  std::string correlation_id;
  std::string causation_id;
  std::string trace_id;
  std::string idempotency_key;
  std::uint32_t attempt = 0;
  bool retryable = false;  // calls: the broker may re-dispatch once if the worker is lost
  std::string id;          // message id; generated if empty
};

struct published {
  std::string id;
  std::uint64_t seq = 0;  // 0 unless acknowledged (and 0 for a duplicate)
  // publish_acked on a topic a durable stream stores: where it stored the event. `duplicate`:
  // the stream already held this id, so stream_seq is the original's and nothing went out.
  std::string stream;
  std::uint64_t stream_seq = 0;
  bool duplicate = false;
};

// --- durable consumers (docs/protocol.md section 11, docs/streams-consumers.md) ---

// Where a new consumer starts reading its stream.
enum class consume_start {
  all,       // the first event the stream still holds
  new_only,  // only events stored after the consumer was created ("new" on the wire)
  seq,       // from consumer_config::start_seq
  time,      // from the first event stored at or after consumer_config::start_time_ms
};

// A consumer's configuration, used when the broker creates it (the first member's CONSUME).
// Only the fields set are sent; the broker's defaults apply to the others. A consumer that exists
// keeps its stored configuration: sending fields that differ from it is refused `bad_request`
// naming the field (remove it with broker.consumer_rm to change it); sending none joins it as
// it is.
struct consumer_config {
  std::optional<std::vector<std::string>> filter;     // topic prefixes; default: every event
  std::optional<consume_start> start;                 // default all
  std::optional<std::uint64_t> start_seq;             // with consume_start::seq, >= 1
  std::optional<std::uint64_t> start_time_ms;         // with consume_start::time, Unix epoch ms
  std::optional<std::chrono::milliseconds> ack_wait;  // default 30 s: redelivered after that
  std::optional<std::uint32_t> max_deliver;           // default 5: then the event is dead-lettered
  std::optional<std::uint32_t> max_ack_pending;  // default 1000: unanswered events, all members
  // A header field (correlation_id, causation_id, trace_id, idempotency_key, publisher, topic,
  // event_id): events with the same value are never in flight at once, and go in order.
  std::optional<std::string> ordered_by;
  // Delays before redeliveries after failed attempts (the last one repeats); default none.
  std::optional<std::vector<std::chrono::milliseconds>> backoff;
};

struct consume_options {
  std::string stream;    // the stream, [A-Za-z0-9_-]{1,64}
  std::string consumer;  // the consumer's name within it, [A-Za-z0-9_-]{1,64}
  // Deliveries of this consumer the agent handles at once (1..100000): what it announces to
  // the broker as this member's capacity.
  std::uint32_t capacity = 1;
  consumer_config config;
};

// What a consumer handler returns decides what the broker does with the delivery:
//   ok                         -> ACK: done for this consumer
//   error, retryable = true    -> NACK: redelivered (after the consumer's backoff), and
//                                 dead-lettered after max_deliver deliveries
//   error, retryable = false   -> TERM: dead-lettered now, with the error's code and message
// A handler that throws is a NACK with the exception's message (code `handler_failed`).
using consume_handler = std::function<status(const message&)>;

// What one consumer of this agent did, since consume() (for tests and monitoring).
struct consume_stats {
  std::uint64_t delivered = 0;    // DELIVERs received
  std::uint64_t acked = 0;        // ACKs sent (handler ok)
  std::uint64_t nacked = 0;       // NACKs sent (retryable error, or the handler threw)
  std::uint64_t termed = 0;       // TERMs sent (non-retryable error)
  std::uint64_t threw = 0;        // handlers that threw (answered NACK)
  std::uint64_t refused = 0;      // answers the broker refused (`not_pending`: already done)
  std::uint64_t joins = 0;        // CONSUMEs the broker accepted: 1 + re-joins after restarts
  std::uint64_t dropped = 0;      // deliveries not handled: still waiting for a free slot when the
                                  // broker forgot this member (it redelivers them), or stopping
  std::uint64_t redelivered = 0;  // deliveries with a count above 1
  std::uint32_t in_flight = 0;    // being handled now
};

class agent {
 public:
  explicit agent(options opts);
  ~agent();  // stop()
  agent(const agent&) = delete;
  agent& operator=(const agent&) = delete;

  // --- service side (before start(); later calls re-announce to the broker) ---
  // action "*" handles every action of the service that has no handler of its own.
  void handle(const std::string& service, const std::string& action, request_handler h);
  void set_capacity(const std::string& service, std::uint32_t capacity);  // default 1

  // --- events ---
  // Before start(): active once start() returns. After start(): returns once the broker
  // fans events of that prefix out to this agent, or an error at the deadline.
  status subscribe(const std::string& prefix, event_handler h,
                   std::chrono::milliseconds deadline = std::chrono::seconds(5));

  // --- durable consumers ---
  // Joins the consumer `o.consumer` of stream `o.stream` as a member (the broker creates it with
  // `o.config` when it does not exist); `h` handles each delivery like a request handler (on the
  // pool, or inline with options.inline_handlers; current_message() is the delivery), at most
  // `o.capacity` at once, and its result answers the broker (see consume_handler).
  // Before start(): joins when start() runs, and start() fails if the broker refuses it. After
  // start(): returns once the broker accepted it, or its refusal (`not_found`: no such stream;
  // `bad_request` naming the field; `streams_disabled`) or `deadline_exceeded`.
  // After a broker restart or a re-registration the agent joins again by itself.
  status consume(const consume_options& o, consume_handler h,
                 std::chrono::milliseconds deadline = std::chrono::seconds(5));
  // Leaves the consumer (CONSUME_STOP): what this member held goes to the other members.
  // Handlers still running finish and are answered.
  status stop_consuming(const std::string& stream, const std::string& consumer,
                        std::chrono::milliseconds deadline = std::chrono::seconds(5));
  // From a consumer handler that takes longer than the consumer's ack_wait: tells the broker it
  // is still working (PROGRESS), so the ack is due ack_wait from now instead of the delivery
  // being given to another member. `bad_request` for a message that is not a delivery.
  status progress(const message& delivery);
  // nullopt for a consumer this agent does not consume.
  std::optional<consume_stats> consumer_stats(const std::string& stream,
                                              const std::string& consumer) const;

  // Connects, registers, waits for the broker's WELCOME (options.start_timeout), and joins the
  // consumers given to consume() before. Fails at once, without waiting for the timeout, with
  // `bad_request` for unreadable keys (options.key_file, options.broker_key) and with
  // `unauthorized` when the broker refuses the connection at the CURVE handshake (a key it does
  // not know, a wrong broker key, keys given to a plain broker or none to a secured one) or
  // refuses the HELLO (the name or a service is not this identity's).
  status start();
  // Stops taking work, lets running handlers finish (up to `grace`), says BYE, joins threads.
  void stop(std::chrono::milliseconds grace = std::chrono::seconds(5));

  // --- caller side (any thread, after start()) ---
  call_result call(const std::string& service, const std::string& action, bytes payload,
                   std::chrono::milliseconds deadline, const send_options& opts = {});
  // `done` runs on the agent's I/O thread exactly once: keep it short, never block in it.
  void call_async(const std::string& service, const std::string& action, bytes payload,
                  std::chrono::milliseconds deadline, call_callback done,
                  const send_options& opts = {});
  std::future<call_result> call_future(const std::string& service, const std::string& action,
                                       bytes payload, std::chrono::milliseconds deadline,
                                       const send_options& opts = {});

  // Fire-and-forget: returns once the event is queued for the broker. Never drops an event: when
  // options.send_queue events already wait for the broker connection, it blocks until there is
  // room, and after options.publish_timeout returns `queue_full` (retryable) — the event was not
  // sent. On the agent's I/O thread (inline handlers, callbacks) it cannot wait and returns
  // `queue_full` at once. An event it accepted can still be lost if the connection to the
  // broker is replaced (the broker silent for `liveness` heartbeats) or the broker dies before
  // reading it; publish_acked / publish_async say for sure.
  result<published> publish(const std::string& topic, bytes payload, const send_options& opts = {});
  // Asks the broker for a PUBLISH_ACK; `done` runs exactly once with the acknowledgement
  // (message::id() and seq()) or an error: on the agent's I/O thread normally, or on the calling
  // thread for an error found at once. Never blocks: when options.send_queue events already wait
  // for the broker connection, `done` gets `queue_full` (retryable) at once and the event is not
  // sent. For programs that must know an event went out without blocking a thread on it.
  void publish_async(const std::string& topic, bytes payload, std::chrono::milliseconds deadline,
                     call_callback done, const send_options& opts = {});
  // Waits for the broker's PUBLISH_ACK (the event was fanned out) and returns its seq, and for a
  // topic a durable stream stores, the stream and stream_seq (the event is stored). Waits for
  // room in the send queue too, within the same deadline (`queue_full` if there is none).
  result<published> publish_acked(const std::string& topic, bytes payload,
                                  std::chrono::milliseconds deadline,
                                  const send_options& opts = {});

  // --- state ---
  const std::string& name() const;
  bool registered() const;              // WELCOME received on the current connection
  std::uint64_t registrations() const;  // WELCOMEs received since start (1 + re-registrations)
  std::string broker_id() const;        // id of the broker run we are registered with
  std::size_t queued_events() const;    // events waiting in the SDK for the connection
  std::size_t waiting_events() const;   // events received and not yet handled

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

// The message being handled on this thread, or nullptr outside handlers.
const message* current_message();

// Blocks until SIGINT or SIGTERM arrives (for an agent's main()). Returns the signal number.
int wait_for_shutdown_signal();

}  // namespace ensemble::agent
