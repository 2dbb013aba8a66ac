#pragma once
// The durable consumers of a broker's streams: the wiring between the delivery policy
// (consumer.hpp, no I/O), the stream store and the router socket.
//
// The broker loop feeds it what peers send (CONSUME, ACK, NACK, TERM, PROGRESS, CONSUME_STOP),
// the peers it lost, and the streams that got new records; once per loop turn, after the
// turn's publishes were flushed, run() executes what the consumers decided: deliveries are sent,
// dead letters appended to `<stream>-dlq` and flushed, and the state of every consumer that
// changed is saved (after its dead letters are stored, never before). docs/protocol.md section
// 11 "Durable consumers" is the wire contract; docs/streams-consumers.md the policy.

#include <spdlog/logger.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "consumer.hpp"
#include "ensemble/broker/stream_store.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::broker::streams {

using json = nlohmann::json;

// The suffix of the stream that holds a stream's dead letters; names ending in it are reserved.
inline constexpr std::string_view k_dlq_suffix = "-dlq";
bool is_dead_letter_stream(std::string_view name);

// The configuration's wire form (docs/protocol.md, the CONSUME payload): every key present.
json consumer_config_json(const consumer_config& c);
// Reads a CONSUME payload or consumer_add arguments into a configuration (defaults for absent
// keys); `where` prefixes the error, which names the key and the rule. Keys in `ignored` (the
// admin's `stream`, `name`) are skipped.
common::result<consumer_config> parse_consumer_config(
    const json& args, const std::string& where,
    std::initializer_list<std::string_view> ignored = {});

// Sends one message to a peer on the router; false when it could not be sent.
// Sends one message to a peer on the router, its header already encoded; false when it could
// not be sent.
using send_fn = std::function<bool(const std::string& peer, common::command,
                                   std::string_view encoded_header, std::string_view payload)>;

// How often, at most, a consumer whose state changed is saved (the state is small, but a save
// is a file write and rename, with --sync always an fdatasync). Confirmed answers and dead
// letters are saved at once.
inline constexpr std::chrono::milliseconds k_state_save_interval{100};

// How long a dead letter whose record could not be read (a storage error) waits before it is
// read again; the consumer's state is not saved past it meanwhile.
inline constexpr std::chrono::milliseconds k_dead_letter_retry_interval{500};
// Answers with an id are confirmed (REPLY) once the consumer's state holding them is saved.
// While saving fails (a storage error, a dead letter not yet stored) they wait; past this many
// per consumer a further answer with an id is refused queue_full (retryable) before it changes
// anything, so a member that keeps answering cannot grow the broker's memory.
inline constexpr std::size_t k_max_unconfirmed_answers = 10'000;

// Bounds on what peers can make the broker hold (docs/protocol.md section 10): each consumer is
// a state file and memory, each member an entry in its rotation. Over a bound, CONSUME and
// broker.consumer_add are refused `too_many`. Consumers loaded at start are all kept, even past
// a lowered bound; the bound applies to creating more.
struct host_limits {
  std::size_t max_consumers_per_stream = 1'000;
  std::size_t max_members_per_consumer = 1'000;
};

struct host_counters {
  std::uint64_t deliveries_unsent = 0;  // DELIVERs the router refused; redelivered after ack_wait
  std::uint64_t dead_letters_stored = 0;
  // Retries of dead letters whose record could not be read, appended or flushed: one per dead
  // letter per failed attempt (never dropped, retried until stored).
  std::uint64_t dead_letter_retries = 0;
  std::uint64_t state_save_failures = 0;
  // Confirmations (REPLY to an ACK, NACK, TERM or PROGRESS with an id) the router could not
  // send: the peer is gone. Not retried; the member re-sends its answer (they are idempotent).
  std::uint64_t confirmations_unsent = 0;
  std::uint64_t consumers_refused = 0;  // creations over max_consumers_per_stream
  std::uint64_t members_refused = 0;    // joins over max_members_per_consumer
  // Consumers run() looked at, in all and in its last call: only those with new input (records,
  // answers, members) or a due timer are.
  std::uint64_t visits = 0;
  std::uint64_t last_run_visits = 0;
};

class consumer_host {
 public:
  consumer_host(stream_store& store, send_fn send, std::shared_ptr<spdlog::logger> log,
                host_limits limits = {});
  ~consumer_host();

  // Loads the saved consumers of every stream. A consumer whose saved bytes do not decode is
  // kept out of service (its CONSUMEs are answered storage_corrupt) and logged.
  void load(time_point now);

  // The commands below come with the fields that k_header_fields requires of them (the broker
  // refuses the others with common::check_required before they get here).
  //
  // CONSUME from `peer` (agent name `agent`): joins, creating the consumer from `config` when it
  // does not exist. Returns its consumer_info.
  common::result<json> join(const std::string& peer, const std::string& agent,
                            const common::header& h, const json& config, time_point now);
  // CONSUME_STOP.
  common::status leave(const std::string& peer, const common::header& h, time_point now);
  // ACK, NACK, TERM, PROGRESS. The error is what to tell the member. An accepted answer that
  // carries an id is confirmed (a REPLY) once the consumer's state that includes it is saved:
  // a confirmed ack survives a broker crash.
  common::status answer(const std::string& peer, common::command cmd, const common::header& h,
                        time_point now);
  // The peer is gone (BYE, lost, replaced): it leaves every consumer it was a member of.
  void peer_gone(const std::string& peer, time_point now);

  // Admin (docs/protocol.md section 11 "Admin").
  common::result<json> list(const std::string& stream) const;
  common::result<json> info(const std::string& stream, const std::string& name) const;
  common::result<json> add(const std::string& stream, const std::string& name, const json& config,
                           time_point now);
  common::result<json> remove(const std::string& stream, const std::string& name);
  common::result<json> dlq_replay(const std::string& stream, sequence dlq_seq, time_point now);
  // broker.stream_rm: the stream's consumers go with it.
  void stream_removed(const std::string& stream);

  // The stream's last sequence grew (after a flush).
  void records_stored(const std::string& stream, sequence last_seq);
  // Timers, deliveries, dead letters, saves. Call once per loop turn, after the turn's flush.
  void run(time_point now);
  // When run() next has timed work; now when a consumer has more to read.
  std::optional<time_point> next_deadline() const;

  const host_counters& counters() const { return counters_; }
  std::size_t size() const;  // consumers, on every stream

 private:
  struct entry;
  entry* find(const std::string& stream, const std::string& name);
  const entry* find(const std::string& stream, const std::string& name) const;
  common::result<entry*> create(const std::string& stream, const consumer_config& config,
                                time_point now);
  json info_json(const entry& e) const;
  void execute(entry& e, std::vector<decision>& decisions, time_point now);
  void send_delivery(entry& e, const deliver& d, const record& r);
  common::result<record> read_one(const std::string& stream, sequence seq);
  // Reads a dead letter's record and queues it for the dead-letter stream; false when the
  // record could not be read now (it is kept on the entry and tried again).
  bool build_dead_letter(entry& e, const dead_letter& dl);
  void retry_dead_letters(entry& e, time_point now);
  common::status ensure_dlq(const std::string& stream, const stream_info& info);
  void store_dead_letters();
  void save_states(time_point now);
  std::string blob(const entry& e) const;
  // The entry has input for run(): visit it on the next call.
  void wake(entry& e) { active_.insert(&e); }
  // Its state changed: save it (at most every k_state_save_interval, or at once).
  void mark_dirty(entry& e);
  bool waits_for_dead_letter(const entry& e) const;
  // Puts the entry in the timer queue at its next deadline (policy timers, retries).
  void schedule(entry& e);
  void forget(entry& e);  // off the run queues: it is being removed
  void visit(entry& e, time_point now);

  stream_store& store_;
  send_fn send_;
  std::shared_ptr<spdlog::logger> log_;
  // stream -> consumer name -> entry
  std::map<std::string, std::map<std::string, std::unique_ptr<entry>>> consumers_;
  std::map<std::string, std::string> agents_;       // member peer -> agent name
  std::map<std::string, std::string> member_peer_;  // member label (agent#conn) -> peer
  // The policy's name for the peer's membership: "<agent>#<connection id in hex>".
  std::string member_of(const std::string& peer) const;
  struct dead_letter_record {
    std::string stream;    // the consumer's stream (the record goes to stream-dlq)
    std::string consumer;  // whose state must not be saved before it is stored
    record rec;
  };
  std::vector<dead_letter_record> dead_letters_;  // appended, not yet flushed
  host_limits limits_;
  host_counters counters_;
  // What run() visits: the entries with input, and those whose timer is due. Entries are owned
  // by consumers_; forget() takes one off both before it is destroyed.
  std::set<entry*> active_;
  std::set<std::pair<time_point, entry*>> timers_;  // one per entry at most: entry::timer
  std::set<entry*> unsaved_;                        // state to save
};

}  // namespace ensemble::broker::streams
