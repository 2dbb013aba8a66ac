#pragma once
// The Ensemble wire protocol: command bytes, the header every message carries, and its msgpack
// codec. docs/protocol.md is the normative text; this file is its C++ face, and the two must
// agree field for field.
//
// A message from a peer to the broker's ROUTER is
//   [protocol tag "ENS\x01"] [command byte] [header: msgpack map] [payload: opaque bytes]
// and the broker answers with the same shape. Events leave through the XPUB as
//   [topic] [header] [payload].
// The header is decoded into `header`; keys this version does not know are kept verbatim in
// `header::extra` and written back on re-encoding, so that peers of a newer minor version can
// add fields without the broker dropping them.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ensemble/common/result.hpp"

namespace ensemble::common {

// First frame of every ROUTER/DEALER message: "ENS" and the protocol version.
inline constexpr std::string_view k_protocol_tag{"ENS\x01", 4};
inline constexpr std::uint8_t k_protocol_version = 1;

enum class command : std::uint8_t {
  hello = 0x01,        // peer -> broker: announce agent name and services
  welcome = 0x02,      // broker -> peer: registration accepted, heartbeat settings
  bye = 0x03,          // peer -> broker: leaving
  request = 0x10,      // client -> broker: call service.action
  dispatch = 0x11,     // broker -> worker: a request to handle
  reply = 0x12,        // worker -> broker, and broker -> client: the answer
  publish = 0x20,      // peer -> broker: an event to fan out
  publish_ack = 0x21,  // broker -> peer: the event went out, with its sequence number
  heartbeat = 0x30,    // both directions
  // Durable consumers of streams (docs/protocol.md "Durable consumers").
  consume = 0x40,       // member -> broker: join a consumer (created if needed); REPLY
  deliver = 0x41,       // broker -> member: one stored event
  ack = 0x42,           // member -> broker: handled
  nack = 0x43,          // member -> broker: failed; redeliver (after delay_ms) or dead-letter
  term = 0x44,          // member -> broker: failed for good; dead-letter now
  progress = 0x45,      // member -> broker: still working; the ack is due ack_wait from now
  consume_stop = 0x46,  // member -> broker: leave the consumer; REPLY
  error = 0x7f,         // broker -> peer: a message that could not be tied to a request
};

// Every command, in byte order.
inline constexpr std::array<command, 17> k_commands{
    command::hello,     command::welcome, command::bye,      command::request,
    command::dispatch,  command::reply,   command::publish,  command::publish_ack,
    command::heartbeat, command::consume, command::deliver,  command::ack,
    command::nack,      command::term,    command::progress, command::consume_stop,
    command::error};

// Name for logs and error messages; "0x42" for bytes that are not a command.
std::string command_name(std::uint8_t byte);
bool is_known_command(std::uint8_t byte);

// A set of commands, written as a list: {command::request, command::dispatch}.
class command_set {
 public:
  constexpr command_set() = default;
  constexpr command_set(std::initializer_list<command> commands) {
    for (command c : commands) bits_ |= bit(c);
  }
  static constexpr command_set all() {
    command_set s;
    for (command c : k_commands) s.bits_ |= bit(c);
    return s;
  }
  constexpr bool contains(command c) const { return (bits_ & bit(c)) != 0; }
  constexpr bool empty() const { return bits_ == 0; }
  // Whether every command of `other` is in this set.
  constexpr bool includes(command_set other) const { return (other.bits_ & ~bits_) == 0; }

 private:
  static constexpr std::uint32_t bit(command c) {
    for (std::size_t i = 0; i < k_commands.size(); ++i) {
      if (k_commands[i] == c) return std::uint32_t{1} << i;
    }
    return 0;
  }
  std::uint32_t bits_ = 0;
};

struct service_offer {
  std::string name;
  std::uint32_t capacity = 1;
};

// Every field of every command. Empty strings, zero numbers and false mean "absent" (the
// field's default) and are not written. Each member has one row in k_header_fields below,
// which says its wire key, which commands carry it and which require it.
struct header {
  // Message identity and routing.
  std::string id;                 // request id / event id, chosen by the sender
  std::string service;            // request, dispatch
  std::string action;             // request, dispatch
  std::string topic;              // publish, event
  std::uint64_t deadline_ms = 0;  // request, dispatch: time budget left, relative

  // Trace context, copied by the SDK from the message being handled.
  std::string correlation_id;
  std::string causation_id;
  std::string trace_id;
  std::uint32_t attempt = 0;  // 1-based; 0 = absent = 1
  std::string idempotency_key;

  // Delivery options.
  bool retryable = false;  // request: may be re-dispatched once; reply: error may be retried
  bool ack = false;        // publish: answer with publish_ack

  // Broker bookkeeping.
  std::uint64_t token = 0;   // dispatch, worker's reply: the broker's handle for the request
  std::string worker;        // reply: agent that handled the request
  std::uint64_t seq = 0;     // event, publish_ack: per-topic sequence number
  std::uint64_t ts = 0;      // event: broker time, microseconds since the Unix epoch
  std::string publisher;     // event: agent name (secured: identity) of the publisher
  std::string caller;        // dispatch: who sent the request (secured: its identity)
  std::string caller_scope;  // dispatch: "own" = act only on what `caller` owns

  // Durable streams (docs/protocol.md "Durable streams").
  std::string stream;            // event, publish_ack: the stream that stored the event
  std::uint64_t stream_seq = 0;  // event, publish_ack: its sequence in that stream
  bool duplicate = false;  // publish_ack: the id was stored before; stream_seq is the original's
  std::string consumer;    // consume..consume_stop, deliver: the durable consumer
  std::uint32_t deliveries = 0;  // deliver: delivery count, 1 the first time
  std::uint32_t capacity = 0;    // consume: deliveries the member may hold at once; 0 = 1
  std::uint64_t delay_ms = 0;    // nack: redeliver no sooner than this; 0 = backoff schedule

  // Outcome (reply, error). No error_code means success.
  std::string error_code;
  std::string error_message;

  // Registration (hello, welcome).
  std::string agent;
  std::vector<service_offer> services;
  std::uint32_t heartbeat_ms = 0;
  std::uint64_t max_message_size = 0;
  std::string broker;

  // Keys this version does not know: msgpack-encoded key/value pairs, kept verbatim.
  std::string extra;
  std::uint32_t extra_count = 0;

  bool is_error() const { return !error_code.empty(); }
  std::uint32_t attempt_or_first() const { return attempt == 0 ? 1 : attempt; }
};

// ---- The header's fields, listed once --------------------------------------------------------
//
// k_header_fields has one row per field of `header` (but `extra`): its wire key, which commands
// carry it (and whether events do), which commands are refused without it, and, for the
// decoder's errors, the rule a value must follow when the type alone does not say it. The rows
// drive the decoder, the encoder (which writes present fields in row order, and the map size it
// writes), check_required (the broker's "REQUEST without 'id'" refusals), and the tests that
// hold docs/protocol.md section 3 to this list. A new field is a member of `header` and a row.
//
// The encoder and check_required unroll the rows at compile time (the row's member pointer is
// a template argument), so going through the table costs nothing per message over code written
// by hand; bench/bench_header.cpp measures it.

enum class field_type : std::uint8_t {
  str,       // msgpack str
  uint,      // a non-negative integer in any msgpack integer encoding
  boolean,   // msgpack bool
  services,  // array of maps {name: str, capacity: uint 1..1000000}
};

template <class Member>
struct header_member;
template <class T>
struct header_member<T header::*> {
  using type = T;
};

template <class T>
constexpr field_type field_type_of() {
  if constexpr (std::is_same_v<T, std::string>) {
    return field_type::str;
  } else if constexpr (std::is_same_v<T, bool>) {
    return field_type::boolean;
  } else if constexpr (std::is_same_v<T, std::vector<service_offer>>) {
    return field_type::services;
  } else {
    static_assert(std::is_same_v<T, std::uint32_t> || std::is_same_v<T, std::uint64_t>,
                  "a header field is a std::string, bool, uint32, uint64 or the services list");
    return field_type::uint;
  }
}

// One row of k_header_fields, without its member: what tests and tools iterate.
struct header_field_info {
  std::string_view key;
  field_type type;
  command_set carried;
  bool in_events;
  command_set required;
  std::string_view needs;
  std::string_view rule;
  std::uint64_t min;
  std::uint64_t max;
};

// One row of k_header_fields. `Member` is the field's member of `header`.
template <auto Member>
struct header_field {
  using value_type = typename header_member<decltype(Member)>::type;
  static constexpr auto member = Member;
  static constexpr field_type type = field_type_of<value_type>();

  std::string_view key{};
  command_set carried{};   // commands whose header may hold it
  bool in_events = false;  // events (on the XPUB, and as DELIVER) hold it
  command_set required{};  // commands refused bad_request when it is absent
  // For a required field: what a refusal says the command needs, as in
  // "REQUEST without 'deadline_ms': every REQUEST needs <needs>".
  std::string_view needs{};
  // What a value must be, as decode errors quote it; empty: the type's own rule.
  std::string_view rule{};
  std::uint64_t min = 0;  // uint: the smallest value accepted when the field is present

  constexpr header_field_info info() const {
    std::string_view r = rule;
    std::uint64_t most = 0;
    if constexpr (type == field_type::uint) most = static_cast<std::uint64_t>(value_type(-1));
    if (r.empty()) {
      switch (type) {
        case field_type::str:
          r = "a str";
          break;
        case field_type::boolean:
          r = "a bool (true or false)";
          break;
        case field_type::services:
          r = "an array of maps {name: str, capacity: uint 1..1000000}";
          break;
        case field_type::uint:
          r = most == std::uint64_t(-1) ? "a non-negative integer"
                                        : "a non-negative integer up to 4294967295";
          break;
      }
    }
    return {key, type, carried, in_events, required, needs, r, min, most};
  }
};

namespace detail {
constexpr auto make_header_fields() {
  using enum command;
  const command_set any = command_set::all();
  // Encoding order: present fields are written in this order (kept from version 1's first
  // encoder; peers must not depend on it, but byte-for-byte stable output is worth keeping).
  return std::tuple{
      header_field<&header::id>{
          .key = "id",
          .carried = {request, dispatch, reply, publish, publish_ack, consume, deliver, ack, nack,
                      term, progress, consume_stop, error},
          .in_events = true,
          .required = {request, publish, consume, consume_stop},
          .needs = "one (a str), so that its answer can be matched to it"},
      header_field<&header::service>{.key = "service",
                                     .carried = {request, dispatch},
                                     .required = {request},
                                     .needs = "the name of the service it calls (a str)"},
      header_field<&header::action>{.key = "action",
                                    .carried = {request, dispatch},
                                    .required = {request},
                                    .needs = "the name of the action it calls (a str)"},
      header_field<&header::topic>{.key = "topic",
                                   .carried = {publish, publish_ack, deliver},
                                   .in_events = true,
                                   .required = {publish},
                                   .needs = "a topic (a str)"},
      header_field<&header::deadline_ms>{
          .key = "deadline_ms",
          .carried = {request, dispatch},
          .required = {request},
          .needs = "a time budget, a whole number of milliseconds of at least 1",
          .rule = "a whole number of milliseconds, at least 1 (omit it rather than send 0)",
          .min = 1},
      header_field<&header::correlation_id>{
          .key = "correlation_id", .carried = any, .in_events = true},
      header_field<&header::causation_id>{.key = "causation_id", .carried = any, .in_events = true},
      header_field<&header::trace_id>{.key = "trace_id", .carried = any, .in_events = true},
      header_field<&header::attempt>{.key = "attempt", .carried = {request, dispatch, reply}},
      header_field<&header::idempotency_key>{
          .key = "idempotency_key", .carried = {request, dispatch, publish}, .in_events = true},
      header_field<&header::retryable>{.key = "retryable", .carried = {request, reply, error}},
      header_field<&header::ack>{.key = "ack", .carried = {publish}},
      header_field<&header::token>{
          .key = "token",
          .carried = {dispatch, reply},
          .required = {reply},
          .needs = "the 'token' of the DISPATCH it answers, echoed (a uint)"},
      header_field<&header::worker>{.key = "worker", .carried = {reply}},
      header_field<&header::seq>{.key = "seq", .carried = {publish_ack}, .in_events = true},
      header_field<&header::ts>{.key = "ts", .carried = {deliver}, .in_events = true},
      header_field<&header::publisher>{.key = "publisher", .carried = {deliver}, .in_events = true},
      header_field<&header::caller>{.key = "caller", .carried = {dispatch}},
      header_field<&header::caller_scope>{.key = "caller_scope", .carried = {dispatch}},
      header_field<&header::error_code>{.key = "error_code", .carried = {reply, error, nack, term}},
      header_field<&header::error_message>{.key = "error_message",
                                           .carried = {reply, error, nack, term}},
      header_field<&header::agent>{.key = "agent", .carried = {hello}},
      header_field<&header::services>{.key = "services", .carried = {hello}},
      header_field<&header::heartbeat_ms>{.key = "heartbeat_ms", .carried = {welcome}},
      header_field<&header::max_message_size>{.key = "max_message_size", .carried = {welcome}},
      header_field<&header::broker>{.key = "broker", .carried = {welcome}},
      header_field<&header::stream>{.key = "stream",
                                    .carried = {publish_ack, consume, deliver, ack, nack, term,
                                                progress, consume_stop, reply, error},
                                    .in_events = true,
                                    .required = {consume, ack, nack, term, progress, consume_stop},
                                    .needs = "the name of the stream (a str)"},
      header_field<&header::stream_seq>{
          .key = "stream_seq",
          .carried = {publish_ack, deliver, ack, nack, term, progress, reply, error},
          .in_events = true,
          .required = {ack, nack, term, progress},
          .needs = "the 'stream_seq' of the delivery it answers (a uint, at least 1)"},
      header_field<&header::duplicate>{.key = "duplicate", .carried = {publish_ack}},
      header_field<&header::consumer>{
          .key = "consumer",
          .carried = {consume, deliver, ack, nack, term, progress, consume_stop, reply, error},
          .required = {consume, ack, nack, term, progress, consume_stop},
          .needs = "the name of the consumer (a str)"},
      header_field<&header::deliveries>{.key = "deliveries",
                                        .carried = {deliver, nack, term, progress}},
      header_field<&header::capacity>{.key = "capacity", .carried = {consume}},
      header_field<&header::delay_ms>{.key = "delay_ms", .carried = {nack}},
  };
}
}  // namespace detail

inline constexpr auto k_header_fields = detail::make_header_fields();
inline constexpr std::size_t k_header_field_count = std::tuple_size_v<decltype(k_header_fields)>;

// The rows without their members, in the same order.
inline constexpr auto k_header_field_infos = std::apply(
    [](const auto&... f) { return std::array<header_field_info, sizeof...(f)>{f.info()...}; },
    k_header_fields);

namespace detail {
// What the codec relies on: unique keys short enough to be msgpack fixstr (the encoder writes
// them as constants), a uint minimum within its range, and every required field carried by the
// commands that require it, with the words that say why a command needs it.
constexpr bool header_fields_are_consistent() {
  for (std::size_t i = 0; i < k_header_field_infos.size(); ++i) {
    const auto& f = k_header_field_infos[i];
    if (f.key.empty() || f.key.size() > 31) return false;
    if (f.type == field_type::uint ? f.min > f.max : f.min != 0) return false;
    if (!f.carried.includes(f.required)) return false;
    if (f.required.empty() != f.needs.empty()) return false;
    for (std::size_t j = 0; j < i; ++j) {
      if (k_header_field_infos[j].key == f.key) return false;
    }
  }
  return true;
}
}  // namespace detail
static_assert(detail::header_fields_are_consistent(),
              "k_header_fields: a key is empty, repeated or over 31 bytes, a min is out of "
              "range, a required field is not carried, or `needs` does not match `required`");

// Whether `h` has every field that command `c` requires (k_header_fields). Returns an empty
// string when it has, otherwise what is missing, naming the first such field in row order:
// "REQUEST without 'deadline_ms': every REQUEST needs a time budget, ...".
std::string check_required(command c, const header& h);

// Limits on header contents that the broker enforces (and the SDK checks before sending).
inline constexpr std::size_t k_max_name_length = 128;  // service, action, agent
inline constexpr std::size_t k_max_id_length = 256;    // ids and keys
inline constexpr std::size_t k_max_topic_length = 256;
inline constexpr std::size_t k_max_header_bytes = 16 * 1024;

// Appends the msgpack encoding of `h` to `out`.
void encode_header(const header& h, std::string& out);
std::string encode_header(const header& h);

// Decodes a header frame. Errors name the field, what is wrong with its value and the rule it
// breaks; the code is bad_request, or too_large for a frame over k_max_header_bytes.
//
// A refused header may still say which message it belonged to: when the frame is a msgpack map
// (however bad some of its fields, or too large, or followed by trailing bytes), `partial`, if
// given, receives every field that did read, `id` above all, so that the refusal can carry it.
result<header> decode_header(std::string_view bytes, header* partial = nullptr);
// The same into `out`, which must be empty (default-constructed): a receive loop decodes into
// the message it fills instead of moving a header out of a result. On a refusal `out` holds
// what `partial` receives above, or is left empty when the frame was not a map.
status decode_header(std::string_view bytes, header& out);

// A topic is one or more dot-separated non-empty segments of [A-Za-z0-9_-:] characters.
// Returns an empty string when valid, otherwise what is wrong.
std::string check_topic(std::string_view topic);
// A service or action name: non-empty, printable ASCII without spaces, at most
// k_max_name_length bytes. Returns an empty string when valid, otherwise what is wrong.
std::string check_name(std::string_view what, std::string_view name);

}  // namespace ensemble::common
