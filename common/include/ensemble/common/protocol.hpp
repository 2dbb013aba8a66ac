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

#include <cstdint>
#include <string>
#include <string_view>
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

// Name for logs and error messages; "0x42" for bytes that are not a command.
std::string command_name(std::uint8_t byte);
bool is_known_command(std::uint8_t byte);

struct service_offer {
  std::string name;
  std::uint32_t capacity = 1;
};

// Every field of every command. Empty strings, zero numbers and false mean "absent" (the
// field's default) and are not written; which fields a command requires is checked where the
// command is handled. The decoder (protocol.cpp) reads them through one table of fields.
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

// A topic is one or more dot-separated non-empty segments of [A-Za-z0-9_-:] characters.
// Returns an empty string when valid, otherwise what is wrong.
std::string check_topic(std::string_view topic);
// A service or action name: non-empty, printable ASCII without spaces, at most
// k_max_name_length bytes. Returns an empty string when valid, otherwise what is wrong.
std::string check_name(std::string_view what, std::string_view name);

}  // namespace ensemble::common
