#pragma once
// The delivery policy of one durable consumer of a stream, without any I/O.
//
// A consumer walks a stream in sequence order and hands its records to the members that share
// it (competing consumers: each record goes to one member at a time). It remembers what was
// delivered and not yet acknowledged, redelivers after ack_wait or a nack, dead-letters a
// record after max_deliver attempts, stops at max_ack_pending unacknowledged records, and can
// keep the records that share a key (ordered_by) one at a time and in sequence order.
//
// Like the registry, it is fed what arrives (a member joins or leaves, an ack, a nack, a new
// last sequence, the clock) and returns decisions that the broker loop executes (send this
// record to that member, dead-letter that one, persist the new ack floor). Records are read
// only through the `fetch` callback given to next_deliveries(), so tests drive it with a vector
// and a hand-driven clock. docs/streams-consumers.md is the reference for the semantics.
//
// Memory is bounded by max_ack_pending (plus the members): the consumer keeps the records
// between its ack floor and its read position that are not done yet, never the stream.

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "ensemble/broker/stream_types.hpp"
#include "ensemble/common/clock.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::broker::streams {

using common::time_point;
using member_id = std::string;  // the wiring's name for one subscribed member (e.g. its peer)

// Error codes of refused acks, nacks and progress notes (docs/streams-consumers.md).
namespace consumer_errc {
// The sequence is not (or no longer) delivered and unacknowledged on this consumer.
inline constexpr std::string_view not_pending = "not_pending";
// A nack or progress note from a member that does not hold the delivery.
inline constexpr std::string_view not_held = "not_held";
// A CONSUME or consumer_add over one of the broker's bounds: consumers per stream, members per
// consumer (docs/protocol.md section 10).
inline constexpr std::string_view too_many = "too_many";
}  // namespace consumer_errc

enum class start_position { all, new_only, from_sequence, from_time };

struct consumer_config {
  std::string name;    // [A-Za-z0-9_-]{1,64}
  std::string stream;  // the stream it reads
  // Topic prefixes a record must match to be delivered; empty = every record of the stream.
  std::vector<std::string> topic_filter;
  start_position start = start_position::all;
  sequence start_sequence = 0;     // from_sequence: the first sequence considered (>= 1)
  std::int64_t start_time_ms = 0;  // from_time: the first record stored at or after this time
  std::chrono::milliseconds ack_wait{std::chrono::seconds(30)};
  std::uint32_t max_deliver = 5;         // deliveries of one record before it is dead-lettered
  std::uint32_t max_ack_pending = 1000;  // records held at once (see docs)
  // A header field whose value orders deliveries: records with the same non-empty value are
  // never in flight at once and are delivered in sequence order. One of "topic", "event_id",
  // "correlation_id", "causation_id", "trace_id", "idempotency_key", "publisher".
  std::optional<std::string> ordered_by;
  // Delay before redelivering after a failed attempt (ack_wait expiry, or a nack that names no
  // delay); entry i applies after delivery i+1, the last one to every later delivery. Empty =
  // redeliver at once.
  std::vector<std::chrono::milliseconds> backoff;
};

// Checks a configuration; the error names the field.
common::status check_config(const consumer_config& config);

// Decisions the broker loop executes, in order.
struct deliver {
  member_id member;
  sequence seq = 0;
  std::uint32_t delivery_count = 0;  // 1 for the first delivery
};
struct dead_letter {
  sequence seq = 0;
  std::string reason;  // why the last attempt failed
  std::uint32_t delivery_count = 0;
};
// Every record at or below `seq` is done (acked, dead-lettered or not for this consumer):
// a good moment to persist encode_state().
struct ack_floor_advanced {
  sequence seq = 0;
};
using decision = std::variant<deliver, dead_letter, ack_floor_advanced>;

// Reads stored records: up to n records with seq >= from, in increasing order (gaps are records
// removed by retention). An empty vector means the stream holds no record at or after `from`;
// an error means "cannot read now" and the consumer tries again on its next call.
using fetch_fn = std::function<common::result<std::vector<record>>(sequence from, std::size_t n)>;

struct pending_entry {
  enum class state {
    waiting,     // to be delivered when a member has room (and its key is free)
    delayed,     // to be redelivered at `due` (nack delay or backoff)
    in_flight,   // delivered to `member`, acknowledgement due by `due`
    unresolved,  // restored from saved state; its record is read again before anything else
  };
  state st = state::waiting;
  std::uint32_t delivery_count = 0;
  member_id member;
  time_point due{};
  std::string key;          // ordered_by value; empty = unordered
  std::string last_reason;  // why its last attempt failed, for views of the consumer
};

struct consumer_counters {
  std::uint64_t pending = 0;      // records not delivered yet (upper bound: see docs)
  std::uint64_t ack_pending = 0;  // delivered at least once, not yet acked or dead-lettered
  std::uint64_t redelivered = 0;  // deliveries with a count above 1, since creation
  std::uint64_t dead_lettered = 0;
  std::uint64_t lag = 0;        // last stream sequence - ack floor
  std::uint64_t delivered = 0;  // deliveries, first or not
  std::uint64_t acked = 0;
  std::uint64_t refused = 0;          // acks, nacks, terms and progress notes refused
  std::uint64_t gone = 0;             // pending records that retention removed before an ack
  std::uint64_t waiting_for_key = 0;  // fetched records held back behind their key
};

class consumer {
 public:
  // `last_seq` is the stream's last sequence when the consumer is created (0 = empty); it
  // decides where start_position::new_only begins. Throws common::config_error on a bad config.
  consumer(consumer_config config, sequence last_seq);

  const consumer_config& config() const { return config_; }

  // A member subscribes with room for `capacity` deliveries at once; a member that is already
  // there gets its capacity updated.
  common::status on_member_join(const member_id& member, std::uint32_t capacity, time_point now);
  // The member is gone: what it held is redeliverable at once, with its delivery count kept.
  void on_member_leave(const member_id& member, time_point now, std::vector<decision>& out);
  // The stream's last sequence is now `last_seq`.
  void on_records_available(sequence last_seq);

  // Acks and terms are accepted from any member while the record is pending (the work is
  // done, whoever did it); nacks and progress notes only from the member that holds it.
  common::status on_ack(const member_id& member, sequence seq, time_point now,
                        std::vector<decision>& out);
  // A failed attempt: redelivered after `delay`, or after the backoff schedule when none is
  // given; dead-lettered instead when the record already had max_deliver deliveries.
  common::status on_nack(const member_id& member, sequence seq,
                         std::optional<std::chrono::milliseconds> delay, std::string_view reason,
                         time_point now, std::vector<decision>& out);
  // A failure that retrying will not fix: dead-letter now.
  common::status on_term(const member_id& member, sequence seq, std::string_view reason,
                         time_point now, std::vector<decision>& out);
  // Still working: the ack is due ack_wait from now.
  common::status on_progress(const member_id& member, sequence seq, time_point now);
  // An answer the wiring refused before it reached the policy (counted in `refused`).
  void count_refused() { ++totals_.refused; }
  // The wiring could not read a pending record any more (retention removed it): forget it.
  void on_record_gone(sequence seq, std::vector<decision>& out);
  // Expired acks and due delays.
  void on_tick(time_point now, std::vector<decision>& out);
  // When on_tick() next has something to do.
  std::optional<time_point> next_deadline() const;

  // Hands records to members with room, reading new ones through `fetch` as needed. Call it
  // after every input. Returns deliveries, and dead letters or floor advances it caused; the
  // error is a failed fetch (what was decided before it stands, in `out`).
  common::status next_deliveries(time_point now, const fetch_fn& fetch, std::vector<decision>& out);

  // The last next_deliveries() stopped at its read budget while members still had room: call
  // it again on the next turn of the loop (skipping a long run of records for other topics is
  // spread over several turns instead of holding up the loop).
  bool more_to_read() const { return more_to_read_; }

  // Saved state: the ack floor, the read position and every pending sequence with its delivery
  // count. restore() replaces the consumer's state (members stay); what was in flight is
  // delivered again, its count kept. Errors name what is wrong with the bytes.
  std::string encode_state() const;
  common::status restore(std::string_view bytes);

  sequence ack_floor() const { return floor_; }
  sequence next_sequence() const { return next_seq_; }
  sequence last_sequence() const { return last_seq_; }
  consumer_counters counters() const;
  const std::map<sequence, pending_entry>& pending() const { return pending_; }
  std::size_t members() const { return members_.size(); }
  bool has_member(const member_id& member) const { return members_.contains(member); }
  struct member_view {
    member_id id;
    std::uint32_t capacity = 0;
    std::uint32_t in_flight = 0;
  };
  std::vector<member_view> member_views() const;  // in join order
  std::uint32_t in_flight_of(const member_id& member) const;

 private:
  struct member_state {
    std::uint32_t capacity = 1;
    std::uint32_t in_flight = 0;
    std::set<sequence> held;
  };

  bool matches(const record& r) const;
  std::string key_of(const record& r) const;
  // Whether the entry may be delivered now: waiting, and first of its key.
  bool is_head(sequence seq, const pending_entry& e) const;
  void make_ready(sequence seq, pending_entry& e);
  void set_timer(sequence seq, pending_entry& e, time_point due);
  void clear_timer(sequence seq, pending_entry& e);
  // Takes the entry off its member (if in flight) and its timer.
  void detach(sequence seq, pending_entry& e);
  // An attempt failed: redeliver (after `delay`) or dead-letter.
  void attempt_failed(sequence seq, pending_entry& e, std::string reason,
                      std::optional<std::chrono::milliseconds> delay, time_point now,
                      std::vector<decision>& out);
  // The record is done (acked, dead-lettered, gone): forget it, free its key.
  void finish(sequence seq);
  void emit_dead_letter(sequence seq, std::string reason, std::vector<decision>& out);
  void update_floor(std::vector<decision>& out);
  // Reads restored entries' records again (their keys; whether retention removed them).
  common::status resolve(const fetch_fn& fetch, std::vector<decision>& out);
  // Reads new records into pending_ while there is room; false when there was nothing to read.
  common::result<bool> read_more(const fetch_fn& fetch);
  // The next member, in rotation, with room for a delivery.
  const member_id* next_member_with_room();
  std::string where(sequence seq) const;
  common::error read_error(sequence from, const common::error& e) const;

  consumer_config config_;
  sequence floor_ = 0;              // every sequence <= floor_ is done
  sequence next_seq_ = 1;           // the next sequence to read from the stream
  sequence last_seq_ = 0;           // the stream's last sequence, as last told
  bool before_start_time_ = false;  // from_time: still skipping older records
  std::size_t unresolved_ = 0;
  std::size_t scanned_ = 0;  // records read by the current next_deliveries()
  bool more_to_read_ = false;

  std::map<sequence, pending_entry> pending_;  // (floor_, next_seq_) minus what is done
  std::set<sequence> ready_;                   // deliverable now, lowest first
  std::set<std::pair<time_point, sequence>> timers_;
  std::unordered_map<std::string, std::deque<sequence>> keys_;  // pending sequences per key

  std::unordered_map<member_id, member_state> members_;
  std::vector<member_id> rotation_;  // members in join order; deliveries go round it
  std::size_t next_in_rotation_ = 0;

  consumer_counters totals_;  // the cumulative counters; the rest are computed
};

}  // namespace ensemble::broker::streams
