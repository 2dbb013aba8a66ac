#pragma once
// A fault proxy: sits between peers (agents, the orchestrator) and a broker, and delays, drops
// or duplicates their messages by rule, so that integration tests can check what the system
// does when the network misbehaves ("a duplicated DISPATCH must not run a step's effect
// twice", "a delayed event must not complete an instance twice").
//
//   auto broker = broker_process::start();
//   auto proxy = fault_proxy::start(broker->router(), broker->events(), /*seed=*/7);
//   agent_options.broker = proxy->router();   // instead of broker->router()
//   agent_options.events = proxy->events();   // instead of broker->events()
//   proxy->add_rule({.dir = direction::from_broker,
//                    .commands = command_bytes({common::command::dispatch}),
//                    .duplicate = 1.0});
//
// The proxy binds a ROUTER and an XPUB on fresh tcp://127.0.0.1 ports. Each peer that connects
// to its ROUTER gets its own DEALER to the broker, so the broker sees every proxied peer as a
// distinct peer, exactly as without the proxy. Events come from the broker through an XSUB and
// go out on the XPUB; subscriptions go upstream unchanged and are never faulted.
//
// Rules are consulted in the order they were added; the first whose filters all match a
// message decides its fate (a rule with no faults therefore exempts the messages it matches
// from later rules). Random choices come from one generator seeded with `seed`: the same
// messages in the same order get the same faults. A message the proxy cannot parse (no
// protocol tag, a header that is not msgpack, ...) is forwarded unchanged and never faulted.
//
// Filter narrowly: a rule without `commands` also hits HELLO, WELCOME and HEARTBEAT (delay
// those past heartbeat * liveness and the agent reconnects), and an events rule without
// `topic_prefix` also hits the SDK's subscription probes (`_ensemble.sync.`), which
// agent::subscribe() and agent::start() wait for.
//
// Peers are told apart by the routing id the proxy's ROUTER gives each connection. A peer that
// reconnects (the SDK replaces its DEALER after `liveness` silent intervals) is a new peer with
// a new upstream DEALER, just as the broker would see it directly. An upstream DEALER is closed
// when the broker sends something its peer can no longer receive (the peer disconnected), or
// after 60 s without a message either way (a peer that never registered and went away).
//
// Delayed copies wait in a time-ordered queue of at most 50,000 messages and 64 MiB; beyond
// that a copy is sent at once and counted `undelayed`.
//
// One background thread does all the I/O; the destructor stops it at once (through an inproc
// PAIR socket that the thread polls with everything else) and discards messages still waiting
// out a delay.

#include <chrono>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/protocol.hpp"

namespace ensemble::testkit {

// The broker's ROUTER endpoint (commands) or its XPUB endpoint (events).
enum class channel { commands, events };
enum class direction { to_broker, from_broker };

// What a rule sees of a message. The views are valid only during the rule's `match` call.
struct message_view {
  channel chan = channel::commands;
  direction dir = direction::to_broker;
  std::uint8_t command = 0;    // protocol command byte (common::command); 0 for events
  std::string_view topic{};    // the event's topic, or the header's (PUBLISH, PUBLISH_ACK)
  std::string_view service{};  // REQUEST, DISPATCH
  std::string_view action{};   // REQUEST, DISPATCH
  std::string_view id{};       // the header's id (request, reply, event id), may be empty
  std::string_view idempotency_key{};
  std::string_view correlation_id{};
};

// Every field has a default member initializer, so that a rule can be written with designated
// initializers naming only what it needs, without -Wmissing-field-initializers.
struct fault_rule {
  std::optional<channel> chan{};         // unset: both
  std::optional<direction> dir{};        // unset: both (events only ever flow from the broker)
  std::vector<std::uint8_t> commands{};  // empty: any; else one of these command bytes
                                         // (see command_bytes); events have command 0
  std::string topic_prefix{};            // non-empty: only messages whose topic starts with it
  // Extra predicate, called on the proxy's thread only for messages that pass the filters
  // above. It must be quick, must not call back into the proxy, and must synchronise what it
  // shares with the test (an atomic counter, ...). If it throws, the rule does not match.
  std::function<bool(const message_view&)> match{};
  double drop = 0;                      // probability 0..1 that the message is dropped
  double duplicate = 0;                 // probability 0..1 that it is sent twice
  std::chrono::milliseconds delay{0};   // every copy waits this long ...
  std::chrono::milliseconds jitter{0};  // ... plus uniform 0..jitter, drawn per copy (this
                                        // reorders messages, which is intended)
};

// Command bytes for fault_rule::commands: command_bytes({command::dispatch, command::reply}).
std::vector<std::uint8_t> command_bytes(std::initializer_list<common::command> commands);

class fault_proxy {
 public:
  // Binds a ROUTER and an XPUB on tcp://127.0.0.1 ephemeral ports and forwards to the broker's
  // router and events endpoints. `seed` makes the random choices reproducible. Throws
  // std::runtime_error if a socket cannot be bound or connected; nothing throws afterwards.
  static std::unique_ptr<fault_proxy> start(const std::string& broker_router,
                                            const std::string& broker_events,
                                            std::uint64_t seed = 1);
  ~fault_proxy();  // stops the thread, closes the sockets, discards delayed messages
  fault_proxy(const fault_proxy&) = delete;
  fault_proxy& operator=(const fault_proxy&) = delete;

  const std::string& router() const;  // where a peer connects its DEALER
  const std::string& events() const;  // where a peer connects its SUB

  // Thread-safe. Rules apply to messages the proxy receives after the call returns; messages
  // already waiting out a delay keep it.
  void add_rule(fault_rule rule);
  void clear_rules();

  struct counts {
    std::uint64_t forwarded = 0;      // messages received and passed on (not dropped), each once,
                                      // including unparsed ones and subscriptions
    std::uint64_t dropped = 0;        // messages dropped by a rule
    std::uint64_t duplicated = 0;     // extra copies sent by a rule
    std::uint64_t delayed = 0;        // copies that were held back by a rule
    std::uint64_t waiting = 0;        // copies held back right now
    std::uint64_t undelayed = 0;      // copies sent at once because the delay queue was full
    std::uint64_t unparsed = 0;       // messages forwarded unchanged because they did not parse
    std::uint64_t undeliverable = 0;  // copies that could not be sent (peer gone, queue full)
    std::uint64_t peers = 0;          // peers with a DEALER to the broker right now
  };
  counts stats() const;

 private:
  struct impl;
  explicit fault_proxy(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace ensemble::testkit
