#include "consumer.hpp"

#include <algorithm>
#include <array>
#include <limits>

#include "ensemble/common/protocol.hpp"

namespace ensemble::broker::streams {

namespace errc = common::errc;
using common::error;

namespace {

// Records asked of the store at once; the room left under max_ack_pending caps it further.
constexpr std::size_t k_fetch_batch = 256;
// Records one next_deliveries() call reads at most, so that skipping a long run of records for
// other topics is spread over several turns of the broker loop.
constexpr std::size_t k_scan_budget = 16 * k_fetch_batch;
constexpr std::uint8_t k_state_version = 1;
constexpr std::uint8_t k_flag_before_start_time = 0x01;

constexpr std::array<std::string_view, 7> k_key_fields = {
    "topic",    "event_id",        "correlation_id", "causation_id",
    "trace_id", "idempotency_key", "publisher"};

std::string check_identifier(std::string_view what, std::string_view value) {
  if (value.empty() || value.size() > 64) {
    return std::string(what) + " must be 1 to 64 characters, got " + std::to_string(value.size());
  }
  for (char c : value) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    if (!ok)
      return std::string(what) + " '" + std::string(value) +
             "' has a character outside [A-Za-z0-9_-]";
  }
  return {};
}

void put_varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

// Reads LEB128 varints from saved state; the error names the field and the byte offset.
class state_reader {
 public:
  explicit state_reader(std::string_view bytes) : bytes_(bytes) {}
  std::optional<std::uint64_t> varint(std::string_view field, std::string& err) {
    std::uint64_t v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
      if (pos_ >= bytes_.size()) {
        err = "truncated in " + std::string(field) + " at byte " + std::to_string(pos_);
        return std::nullopt;
      }
      const auto b = static_cast<std::uint8_t>(bytes_[pos_++]);
      if (shift == 63 && (b & 0x7e) != 0) {
        err = std::string(field) + " overflows 64 bits at byte " + std::to_string(pos_ - 1);
        return std::nullopt;
      }
      v |= static_cast<std::uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return v;
    }
    err = std::string(field) + " overflows 64 bits at byte " + std::to_string(pos_ - 1);
    return std::nullopt;
  }
  std::optional<std::uint8_t> byte(std::string_view field, std::string& err) {
    if (pos_ >= bytes_.size()) {
      err = "truncated in " + std::string(field) + " at byte " + std::to_string(pos_);
      return std::nullopt;
    }
    return static_cast<std::uint8_t>(bytes_[pos_++]);
  }
  std::size_t position() const { return pos_; }
  std::size_t remaining() const { return bytes_.size() - pos_; }

 private:
  std::string_view bytes_;
  std::size_t pos_ = 0;
};

}  // namespace

common::status check_config(const consumer_config& c) {
  auto bad = [&](const std::string& what) -> common::status {
    return error::make(errc::bad_request, "consumer '" + c.name + "': " + what);
  };
  if (auto e = check_identifier("name", c.name); !e.empty()) return bad(e);
  if (auto e = check_identifier("stream", c.stream); !e.empty()) return bad(e);
  for (std::size_t i = 0; i < c.topic_filter.size(); ++i) {
    if (c.topic_filter[i].empty()) return bad("topic_filter[" + std::to_string(i) + "] is empty");
  }
  if (c.start == start_position::from_sequence && c.start_sequence == 0) {
    return bad("start_sequence must be at least 1 when starting from a sequence");
  }
  if (c.ack_wait <= std::chrono::milliseconds::zero()) return bad("ack_wait must be positive");
  if (c.max_deliver == 0) return bad("max_deliver must be at least 1");
  if (c.max_ack_pending == 0) return bad("max_ack_pending must be at least 1");
  if (c.ordered_by &&
      std::find(k_key_fields.begin(), k_key_fields.end(), *c.ordered_by) == k_key_fields.end()) {
    std::string known;
    for (auto f : k_key_fields) known += (known.empty() ? "" : ", ") + std::string(f);
    return bad("ordered_by '" + *c.ordered_by + "' is not one of " + known);
  }
  for (std::size_t i = 0; i < c.backoff.size(); ++i) {
    if (c.backoff[i] < std::chrono::milliseconds::zero()) {
      return bad("backoff[" + std::to_string(i) + "] is negative");
    }
  }
  return common::ok_status();
}

consumer::consumer(consumer_config config, sequence last_seq)
    : config_(std::move(config)), last_seq_(last_seq) {
  if (auto st = check_config(config_); !st.ok()) {
    throw common::config_error("consumer '" + config_.name + "'", st.err().message);
  }
  switch (config_.start) {
    case start_position::all:
      break;
    case start_position::new_only:
      next_seq_ = last_seq + 1;
      break;
    case start_position::from_sequence:
      next_seq_ = config_.start_sequence;
      break;
    case start_position::from_time:
      before_start_time_ = true;
      break;
  }
  floor_ = next_seq_ - 1;
}

std::string consumer::where(sequence seq) const {
  return "consumer '" + config_.name + "' of stream '" + config_.stream + "', sequence " +
         std::to_string(seq);
}

error consumer::read_error(sequence from, const error& e) const {
  error wrapped = e;
  wrapped.message = "consumer '" + config_.name + "': reading stream '" + config_.stream +
                    "' from sequence " + std::to_string(from) + ": " + e.message;
  return wrapped;
}

std::vector<consumer::member_view> consumer::member_views() const {
  std::vector<member_view> out;
  for (const auto& id : rotation_) {
    const auto& m = members_.at(id);
    out.push_back({id, m.capacity, m.in_flight});
  }
  return out;
}

bool consumer::matches(const record& r) const {
  // A dead letter replayed for one consumer (docs/protocol.md "Dead letters") names it in the
  // stored header; the other consumers skip it. The byte search keeps the decode off the path
  // of ordinary records.
  if (r.header.find("consumer") != std::string::npos) {
    auto h = common::decode_header(r.header);
    if (h.ok() && !h->consumer.empty() && h->consumer != config_.name) return false;
  }
  if (config_.topic_filter.empty()) return true;
  return std::any_of(config_.topic_filter.begin(), config_.topic_filter.end(),
                     [&](const std::string& p) { return r.topic.starts_with(p); });
}

std::string consumer::key_of(const record& r) const {
  if (!config_.ordered_by) return {};
  const std::string& field = *config_.ordered_by;
  if (field == "topic") return r.topic;
  if (field == "event_id") return r.event_id;
  // A stored header was encoded by the broker; one that does not decode has no key and is
  // delivered unordered rather than held forever.
  auto h = common::decode_header(r.header);
  if (!h.ok()) return {};
  if (field == "correlation_id") return h->correlation_id;
  if (field == "causation_id") return h->causation_id;
  if (field == "trace_id") return h->trace_id;
  if (field == "idempotency_key") return h->idempotency_key;
  if (field == "publisher") return h->publisher;
  return {};
}

bool consumer::is_head(sequence seq, const pending_entry& e) const {
  if (e.key.empty()) return true;
  auto it = keys_.find(e.key);
  return it != keys_.end() && !it->second.empty() && it->second.front() == seq;
}

void consumer::make_ready(sequence seq, pending_entry& e) {
  e.st = pending_entry::state::waiting;
  e.member.clear();
  if (is_head(seq, e)) ready_.insert(seq);
}

void consumer::set_timer(sequence seq, pending_entry& e, time_point due) {
  e.due = due;
  timers_.emplace(due, seq);
}

void consumer::clear_timer(sequence seq, pending_entry& e) {
  if (e.st == pending_entry::state::in_flight || e.st == pending_entry::state::delayed) {
    timers_.erase({e.due, seq});
  }
}

void consumer::detach(sequence seq, pending_entry& e) {
  clear_timer(seq, e);
  ready_.erase(seq);
  if (e.st == pending_entry::state::in_flight) {
    auto m = members_.find(e.member);
    if (m != members_.end()) {
      --m->second.in_flight;
      m->second.held.erase(seq);
    }
  }
  if (e.st == pending_entry::state::unresolved) --unresolved_;
  e.st = pending_entry::state::waiting;
  e.member.clear();
}

void consumer::finish(sequence seq) {
  auto it = pending_.find(seq);
  if (it == pending_.end()) return;
  pending_entry& e = it->second;
  detach(seq, e);
  if (!e.key.empty()) {
    auto k = keys_.find(e.key);
    if (k != keys_.end()) {
      auto& q = k->second;
      const bool was_head = !q.empty() && q.front() == seq;
      q.erase(std::remove(q.begin(), q.end(), seq), q.end());
      if (q.empty()) {
        keys_.erase(k);
      } else if (was_head) {
        auto next = pending_.find(q.front());
        if (next != pending_.end() && next->second.st == pending_entry::state::waiting) {
          ready_.insert(q.front());
        }
      }
    }
  }
  pending_.erase(it);
}

void consumer::emit_dead_letter(sequence seq, std::string reason, std::vector<decision>& out) {
  const auto count = pending_.at(seq).delivery_count;
  ++totals_.dead_lettered;
  out.emplace_back(dead_letter{seq, std::move(reason), count});
  finish(seq);
}

void consumer::attempt_failed(sequence seq, pending_entry& e, std::string reason,
                              std::optional<std::chrono::milliseconds> delay, time_point now,
                              std::vector<decision>& out) {
  detach(seq, e);
  if (e.delivery_count >= config_.max_deliver) {
    emit_dead_letter(seq, std::move(reason), out);
    return;
  }
  e.last_reason = std::move(reason);
  if (!delay && !config_.backoff.empty()) {
    const std::size_t i = std::min<std::size_t>(e.delivery_count, config_.backoff.size()) - 1;
    delay = config_.backoff[i];
  }
  if (delay && *delay > std::chrono::milliseconds::zero()) {
    e.st = pending_entry::state::delayed;
    set_timer(seq, e, now + *delay);
  } else {
    make_ready(seq, e);
  }
}

void consumer::update_floor(std::vector<decision>& out) {
  const sequence floor = pending_.empty() ? next_seq_ - 1 : pending_.begin()->first - 1;
  if (floor > floor_) {
    floor_ = floor;
    out.emplace_back(ack_floor_advanced{floor_});
  }
}

common::status consumer::on_member_join(const member_id& member, std::uint32_t capacity,
                                        time_point /*now*/) {
  if (capacity == 0) {
    return error::make(errc::bad_request, "consumer '" + config_.name + "': member '" + member +
                                              "' joined with capacity 0");
  }
  auto [it, inserted] = members_.try_emplace(member);
  it->second.capacity = capacity;
  if (inserted) rotation_.push_back(member);
  return common::ok_status();
}

void consumer::on_member_leave(const member_id& member, time_point now,
                               std::vector<decision>& out) {
  auto it = members_.find(member);
  if (it == members_.end()) return;
  const std::set<sequence> held = it->second.held;
  for (sequence seq : held) {
    pending_entry& e = pending_.at(seq);
    attempt_failed(seq, e, "member '" + member + "' left while holding it",
                   std::chrono::milliseconds::zero(), now, out);
  }
  members_.erase(it);
  auto pos = std::find(rotation_.begin(), rotation_.end(), member);
  const auto index = static_cast<std::size_t>(pos - rotation_.begin());
  rotation_.erase(pos);
  if (index < next_in_rotation_) --next_in_rotation_;
  if (next_in_rotation_ >= rotation_.size()) next_in_rotation_ = 0;
  update_floor(out);
}

void consumer::on_records_available(sequence last_seq) {
  last_seq_ = std::max(last_seq_, last_seq);
}

common::status consumer::on_ack(const member_id& member, sequence seq, time_point /*now*/,
                                std::vector<decision>& out) {
  auto it = pending_.find(seq);
  if (it == pending_.end() || it->second.delivery_count == 0) {
    ++totals_.refused;
    const bool never = seq >= next_seq_ || seq == 0 || it != pending_.end();
    return error::make(
        consumer_errc::not_pending,
        where(seq) + ": ack from member '" + member +
            "': " + (never ? "never delivered" : "not pending (already acked or dead-lettered)"));
  }
  ++totals_.acked;
  finish(seq);
  update_floor(out);
  return common::ok_status();
}

common::status consumer::on_nack(const member_id& member, sequence seq,
                                 std::optional<std::chrono::milliseconds> delay,
                                 std::string_view reason, time_point now,
                                 std::vector<decision>& out) {
  auto it = pending_.find(seq);
  if (it == pending_.end() || it->second.delivery_count == 0) {
    ++totals_.refused;
    return error::make(consumer_errc::not_pending,
                       where(seq) + ": nack from member '" + member + "': not pending");
  }
  pending_entry& e = it->second;
  if (e.st != pending_entry::state::in_flight || e.member != member) {
    ++totals_.refused;
    return error::make(consumer_errc::not_held,
                       where(seq) + ": nack from member '" + member + "', which does not hold it");
  }
  if (delay && *delay < std::chrono::milliseconds::zero())
    delay = std::chrono::milliseconds::zero();
  attempt_failed(seq, e, reason.empty() ? "nacked by member '" + member + "'" : std::string(reason),
                 delay, now, out);
  update_floor(out);
  return common::ok_status();
}

common::status consumer::on_term(const member_id& member, sequence seq, std::string_view reason,
                                 time_point /*now*/, std::vector<decision>& out) {
  auto it = pending_.find(seq);
  if (it == pending_.end() || it->second.delivery_count == 0) {
    ++totals_.refused;
    return error::make(consumer_errc::not_pending,
                       where(seq) + ": term from member '" + member + "': not pending");
  }
  pending_entry& e = it->second;
  if (e.st != pending_entry::state::in_flight || e.member != member) {
    ++totals_.refused;
    return error::make(consumer_errc::not_held,
                       where(seq) + ": term from member '" + member + "', which does not hold it");
  }
  emit_dead_letter(
      seq, reason.empty() ? "terminated by member '" + member + "'" : std::string(reason), out);
  update_floor(out);
  return common::ok_status();
}

common::status consumer::on_progress(const member_id& member, sequence seq, time_point now) {
  auto it = pending_.find(seq);
  if (it == pending_.end() || it->second.st != pending_entry::state::in_flight ||
      it->second.member != member) {
    ++totals_.refused;
    return error::make(consumer_errc::not_held, where(seq) + ": progress from member '" + member +
                                                    "', which does not hold it");
  }
  clear_timer(seq, it->second);
  set_timer(seq, it->second, now + config_.ack_wait);
  return common::ok_status();
}

void consumer::on_record_gone(sequence seq, std::vector<decision>& out) {
  if (!pending_.contains(seq)) return;
  ++totals_.gone;
  finish(seq);
  update_floor(out);
}

void consumer::on_tick(time_point now, std::vector<decision>& out) {
  while (!timers_.empty() && timers_.begin()->first <= now) {
    const sequence seq = timers_.begin()->second;
    timers_.erase(timers_.begin());
    pending_entry& e = pending_.at(seq);
    if (e.st == pending_entry::state::in_flight) {
      std::string reason = "ack_wait of " + std::to_string(config_.ack_wait.count()) +
                           " ms expired on member '" + e.member + "'";
      attempt_failed(seq, e, std::move(reason), std::nullopt, now, out);
    } else if (e.st == pending_entry::state::delayed) {
      e.st = pending_entry::state::waiting;  // its timer is already gone
      make_ready(seq, e);
    }
  }
  update_floor(out);
}

std::optional<time_point> consumer::next_deadline() const {
  if (timers_.empty()) return std::nullopt;
  return timers_.begin()->first;
}

const member_id* consumer::next_member_with_room() {
  for (std::size_t i = 0; i < rotation_.size(); ++i) {
    const std::size_t index = (next_in_rotation_ + i) % rotation_.size();
    const member_state& m = members_.at(rotation_[index]);
    if (m.in_flight < m.capacity) {
      next_in_rotation_ = (index + 1) % rotation_.size();
      return &rotation_[index];
    }
  }
  return nullptr;
}

common::status consumer::resolve(const fetch_fn& fetch, std::vector<decision>& out) {
  // Restored entries are read again in sequence order, so that each key's queue is in order
  // before anything new is read behind it.
  std::vector<sequence> todo;
  for (const auto& [seq, e] : pending_) {
    if (e.st == pending_entry::state::unresolved) todo.push_back(seq);
  }
  for (sequence seq : todo) {
    auto got = fetch(seq, 1);
    if (!got.ok()) return read_error(seq, got.err());
    pending_entry& e = pending_.at(seq);
    if (got->empty() || got->front().seq != seq) {
      ++totals_.gone;
      finish(seq);
      continue;
    }
    --unresolved_;
    e.st = pending_entry::state::waiting;
    e.key = key_of(got->front());
    if (!e.key.empty()) keys_[e.key].push_back(seq);
    if (e.delivery_count >= config_.max_deliver) {
      // Its last allowed delivery was in flight when the state was saved: delivering it again
      // would exceed max_deliver.
      emit_dead_letter(seq,
                       "in flight at its delivery " + std::to_string(e.delivery_count) + " of " +
                           std::to_string(config_.max_deliver) +
                           " when the consumer's state was saved",
                       out);
      continue;
    }
    make_ready(seq, e);
  }
  return common::ok_status();
}

common::result<bool> consumer::read_more(const fetch_fn& fetch) {
  if (pending_.size() >= config_.max_ack_pending || next_seq_ > last_seq_) return false;
  if (scanned_ >= k_scan_budget) {
    more_to_read_ = true;
    return false;
  }
  const std::size_t room = config_.max_ack_pending - pending_.size();
  auto got = fetch(next_seq_, std::min(room, k_fetch_batch));
  if (!got.ok()) return read_error(next_seq_, got.err());
  scanned_ += got->size();
  if (got->empty()) {
    // Nothing at or after next_seq_: retention removed what was left of the stream.
    next_seq_ = last_seq_ + 1;
    return true;
  }
  const sequence before = next_seq_;
  for (record& r : *got) {
    if (r.seq < next_seq_) continue;  // not asked for
    last_seq_ = std::max(last_seq_, r.seq);
    next_seq_ = r.seq + 1;
    if (before_start_time_) {
      if (r.ts_ms < config_.start_time_ms) continue;
      before_start_time_ = false;
    }
    if (!matches(r)) continue;
    auto [it, inserted] = pending_.try_emplace(r.seq);
    pending_entry& e = it->second;
    e.key = key_of(r);
    if (!e.key.empty()) keys_[e.key].push_back(r.seq);
    make_ready(r.seq, e);
    if (pending_.size() >= config_.max_ack_pending) break;
  }
  return next_seq_ != before;  // a store that answers below `from` must not spin the caller
}

common::status consumer::next_deliveries(time_point now, const fetch_fn& fetch,
                                         std::vector<decision>& out) {
  common::status result = common::ok_status();
  scanned_ = 0;
  more_to_read_ = false;
  if (unresolved_ > 0) result = resolve(fetch, out);
  while (result.ok() && unresolved_ == 0) {
    const member_id* member = next_member_with_room();
    if (member == nullptr) break;
    if (ready_.empty()) {
      auto more = read_more(fetch);
      if (!more.ok()) {
        result = more.err();
        break;
      }
      if (!*more) break;
      // It may have read only records that wait behind their key, or none for this consumer;
      // give the member back its turn and look again.
      next_in_rotation_ = (next_in_rotation_ + rotation_.size() - 1) % rotation_.size();
      continue;
    }
    const sequence seq = *ready_.begin();
    ready_.erase(ready_.begin());
    pending_entry& e = pending_.at(seq);
    member_state& m = members_.at(*member);
    e.st = pending_entry::state::in_flight;
    e.member = *member;
    ++e.delivery_count;
    set_timer(seq, e, now + config_.ack_wait);
    ++m.in_flight;
    m.held.insert(seq);
    ++totals_.delivered;
    if (e.delivery_count > 1) ++totals_.redelivered;
    out.emplace_back(deliver{*member, seq, e.delivery_count});
  }
  update_floor(out);
  return result;
}

std::uint32_t consumer::in_flight_of(const member_id& member) const {
  auto it = members_.find(member);
  return it == members_.end() ? 0 : it->second.in_flight;
}

consumer_counters consumer::counters() const {
  consumer_counters c = totals_;
  c.pending = last_seq_ >= next_seq_ ? last_seq_ - next_seq_ + 1 : 0;
  c.ack_pending = 0;
  c.waiting_for_key = 0;
  for (const auto& [seq, e] : pending_) {
    if (e.delivery_count > 0) {
      ++c.ack_pending;
    } else {
      ++c.pending;
    }
    if (e.st == pending_entry::state::waiting && !is_head(seq, e)) ++c.waiting_for_key;
  }
  c.lag = last_seq_ > floor_ ? last_seq_ - floor_ : 0;
  return c;
}

std::string consumer::encode_state() const {
  std::string out;
  out.push_back(static_cast<char>(k_state_version));
  out.push_back(static_cast<char>(before_start_time_ ? k_flag_before_start_time : 0));
  put_varint(out, floor_);
  put_varint(out, next_seq_);
  put_varint(out, totals_.delivered);
  put_varint(out, totals_.redelivered);
  put_varint(out, totals_.acked);
  put_varint(out, totals_.dead_lettered);
  put_varint(out, pending_.size());
  sequence prev = floor_;
  for (const auto& [seq, e] : pending_) {
    put_varint(out, seq - prev);
    put_varint(out, e.delivery_count);
    prev = seq;
  }
  return out;
}

common::status consumer::restore(std::string_view bytes) {
  auto bad = [&](const std::string& what) -> common::status {
    return error::make(errc::bad_request,
                       "saved state of consumer '" + config_.name + "': " + what);
  };
  state_reader in(bytes);
  std::string err;
  auto version = in.byte("version", err);
  if (!version) return bad(err);
  if (*version != k_state_version) {
    return bad("version " + std::to_string(*version) + " is not " +
               std::to_string(k_state_version));
  }
  auto flags = in.byte("flags", err);
  auto floor = flags ? in.varint("ack floor", err) : std::nullopt;
  auto next = floor ? in.varint("next sequence", err) : std::nullopt;
  auto delivered = next ? in.varint("delivered", err) : std::nullopt;
  auto redelivered = delivered ? in.varint("redelivered", err) : std::nullopt;
  auto acked = redelivered ? in.varint("acked", err) : std::nullopt;
  auto dead = acked ? in.varint("dead_lettered", err) : std::nullopt;
  auto count = dead ? in.varint("pending count", err) : std::nullopt;
  if (!count) return bad(err);
  if (*next == 0 || *floor >= *next) {
    return bad("ack floor " + std::to_string(*floor) + " is not below next sequence " +
               std::to_string(*next));
  }
  if (*count > in.remaining()) {
    return bad("pending count " + std::to_string(*count) + " does not fit in the " +
               std::to_string(in.remaining()) + " bytes left");
  }
  std::vector<std::pair<sequence, std::uint32_t>> entries;
  entries.reserve(static_cast<std::size_t>(*count));
  sequence prev = *floor;
  for (std::uint64_t i = 0; i < *count; ++i) {
    const std::string field = "pending entry " + std::to_string(i);
    auto delta = in.varint(field, err);
    auto deliveries = delta ? in.varint(field, err) : std::nullopt;
    if (!deliveries) return bad(err);
    if (*delta == 0 || *delta >= *next - prev) {
      return bad(field + " is not between the previous one and the next sequence");
    }
    if (*deliveries > std::numeric_limits<std::uint32_t>::max()) {
      return bad(field + " has a delivery count out of range");
    }
    prev += *delta;
    entries.emplace_back(prev, static_cast<std::uint32_t>(*deliveries));
  }
  if (in.remaining() != 0) {
    return bad(std::to_string(in.remaining()) + " unexpected bytes after byte " +
               std::to_string(in.position()));
  }

  pending_.clear();
  ready_.clear();
  timers_.clear();
  keys_.clear();
  for (auto& [id, m] : members_) {
    m.in_flight = 0;
    m.held.clear();
  }
  floor_ = *floor;
  next_seq_ = *next;
  last_seq_ = std::max(last_seq_, next_seq_ - 1);
  before_start_time_ = (*flags & k_flag_before_start_time) != 0;
  totals_ = consumer_counters{};
  totals_.delivered = *delivered;
  totals_.redelivered = *redelivered;
  totals_.acked = *acked;
  totals_.dead_lettered = *dead;
  for (const auto& [seq, deliveries] : entries) {
    pending_entry& e = pending_[seq];
    e.st = pending_entry::state::unresolved;
    e.delivery_count = deliveries;
  }
  unresolved_ = entries.size();
  return common::ok_status();
}

}  // namespace ensemble::broker::streams
