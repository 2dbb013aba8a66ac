#include "consumer_host.hpp"

#include <algorithm>
#include <limits>

#include "ensemble/common/clock.hpp"

namespace ensemble::broker::streams {

using common::command;
using common::error;
using common::header;

namespace {

constexpr std::uint32_t k_max_capacity = 100'000;
constexpr std::size_t k_fetch_bytes = 4u << 20;  // one read of a consumer's fetch, at most

const char* start_name(start_position s) {
  switch (s) {
    case start_position::all:
      return "all";
    case start_position::new_only:
      return "new";
    case start_position::from_sequence:
      return "seq";
    case start_position::from_time:
      return "time";
  }
  return "all";
}

std::string shown(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

std::string dlq_of(const std::string& stream) {
  return stream + std::string(k_dlq_suffix);
}

error not_found(const std::string& what) {
  return error::make(errc::not_found, what);
}

error with_retry(error e) {
  e.retryable = e.code == errc::storage_full;
  return e;
}

}  // namespace

// A member's name in the policy, its reasons and refusals: the agent name and its connection
// (an agent may have several), printable.
std::string member_label(const std::string& agent, const std::string& peer) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out = agent + "#";
  for (unsigned char c : peer) {
    out.push_back(hex[c >> 4]);
    out.push_back(hex[c & 15]);
  }
  return out;
}

bool is_dead_letter_stream(std::string_view name) {
  return name.ends_with(k_dlq_suffix);
}

json consumer_config_json(const consumer_config& c) {
  json backoff = json::array();
  for (auto d : c.backoff) backoff.push_back(d.count());
  json out = {{"filter", c.topic_filter},
              {"start", start_name(c.start)},
              {"start_seq", c.start_sequence},
              {"start_time_ms", c.start_time_ms},
              {"ack_wait_ms", c.ack_wait.count()},
              {"max_deliver", c.max_deliver},
              {"max_ack_pending", c.max_ack_pending},
              {"ordered_by", c.ordered_by ? json(*c.ordered_by) : json(nullptr)},
              {"backoff_ms", std::move(backoff)}};
  return out;
}

common::result<consumer_config> parse_consumer_config(
    const json& args, const std::string& where, std::initializer_list<std::string_view> ignored) {
  consumer_config c;
  if (!args.is_object()) {
    return error::make(errc::bad_request,
                       where + ": the configuration must be a map, got " + shown(args));
  }
  auto bad = [&](const std::string& key, const std::string& rule) {
    return error::make(errc::bad_request,
                       where + ": '" + key + "' " + rule + ", got " + shown(args[key]));
  };
  auto uint_of = [&](const std::string& key, std::uint64_t max,
                     std::uint64_t& out) -> std::optional<error> {
    const auto& v = args[key];
    if (!v.is_number_unsigned() || v.get<std::uint64_t>() > max) {
      return bad(key, "must be a whole number 0.." + std::to_string(max));
    }
    out = v.get<std::uint64_t>();
    return std::nullopt;
  };
  constexpr auto u32max = std::numeric_limits<std::uint32_t>::max();
  constexpr auto i64max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  for (const auto& [key, value] : args.items()) {
    if (std::find(ignored.begin(), ignored.end(), key) != ignored.end()) continue;
    std::uint64_t n = 0;
    if (key == "filter") {
      if (!value.is_array()) return bad(key, "must be an array of topic prefixes (str)");
      for (const auto& p : value) {
        if (!p.is_string() || p.get<std::string>().empty()) {
          return bad(key, "must hold non-empty topic prefixes (str)");
        }
        c.topic_filter.push_back(p.get<std::string>());
      }
    } else if (key == "start") {
      const std::string s = value.is_string() ? value.get<std::string>() : "";
      if (s == "all") {
        c.start = start_position::all;
      } else if (s == "new") {
        c.start = start_position::new_only;
      } else if (s == "seq") {
        c.start = start_position::from_sequence;
      } else if (s == "time") {
        c.start = start_position::from_time;
      } else {
        return bad(key, "must be \"all\", \"new\", \"seq\" or \"time\"");
      }
    } else if (key == "start_seq") {
      if (auto e = uint_of(key, i64max, n)) return *e;
      c.start_sequence = n;
    } else if (key == "start_time_ms") {
      if (auto e = uint_of(key, i64max, n)) return *e;
      c.start_time_ms = static_cast<std::int64_t>(n);
    } else if (key == "ack_wait_ms") {
      if (auto e = uint_of(key, i64max, n)) return *e;
      c.ack_wait = std::chrono::milliseconds(static_cast<std::int64_t>(n));
    } else if (key == "max_deliver") {
      if (auto e = uint_of(key, u32max, n)) return *e;
      c.max_deliver = static_cast<std::uint32_t>(n);
    } else if (key == "max_ack_pending") {
      if (auto e = uint_of(key, u32max, n)) return *e;
      c.max_ack_pending = static_cast<std::uint32_t>(n);
    } else if (key == "ordered_by") {
      if (value.is_null()) continue;
      if (!value.is_string()) return bad(key, "must be a header field name (str)");
      c.ordered_by = value.get<std::string>();
    } else if (key == "backoff_ms") {
      if (!value.is_array()) return bad(key, "must be an array of milliseconds");
      for (const auto& d : value) {
        if (!d.is_number_unsigned() || d.get<std::uint64_t>() > i64max) {
          return bad(key, "must hold whole numbers of milliseconds");
        }
        c.backoff.emplace_back(static_cast<std::int64_t>(d.get<std::uint64_t>()));
      }
    } else {
      return error::make(errc::bad_request,
                         where + ": unknown key '" + key +
                             "' (filter, start, start_seq, start_time_ms, ack_wait_ms, "
                             "max_deliver, max_ack_pending, ordered_by, backoff_ms)");
    }
  }
  if (c.start == start_position::from_sequence && !args.contains("start_seq")) {
    return error::make(errc::bad_request, where + ": start \"seq\" needs 'start_seq' (>= 1)");
  }
  if (c.start == start_position::from_time && !args.contains("start_time_ms")) {
    return error::make(errc::bad_request,
                       where + ": start \"time\" needs 'start_time_ms' (ms since the Unix epoch)");
  }
  return c;
}

struct consumer_host::entry {
  entry(consumer_config config, sequence last_seq) : policy(std::move(config), last_seq) {}
  consumer policy;
  std::vector<decision> todo;  // decided by inputs, executed by run()
  bool broken = false;         // saved state did not decode: out of service
  std::string broken_reason;
  json view;  // the configuration as it was given, for views and comparisons
  time_point last_save{};
  struct confirmation {
    std::string peer;
    command cmd;
    header answer;
  };
  std::vector<confirmation> confirms;  // REPLY once saved
  bool save_now = false;               // a confirmation or a dead letter waits for the save
  // Dead letters decided whose record could not be read (a storage error): read again at
  // dead_letter_retry_at; the state is not saved while any waits.
  std::vector<dead_letter> dead_letter_retry;
  time_point dead_letter_retry_at{};
  std::optional<time_point> timer;  // its place in consumer_host::timers_
  // Records read by this turn's next_deliveries(), so a delivery does not read them again.
  std::map<sequence, record> read_ahead;
  const std::string& stream() const { return policy.config().stream; }
  const std::string& name() const { return policy.config().name; }
};

consumer_host::consumer_host(stream_store& store, send_fn send, std::shared_ptr<spdlog::logger> log,
                             host_limits limits)
    : store_(store), send_(std::move(send)), log_(std::move(log)), limits_(limits) {}

consumer_host::~consumer_host() = default;

std::string consumer_host::blob(const entry& e) const {
  const std::string state = e.policy.encode_state();
  json j = {{"version", 1},
            {"config", consumer_config_json(e.policy.config())},
            {"view", e.view},
            {"state", json::binary(std::vector<std::uint8_t>(state.begin(), state.end()))}};
  const auto bytes = json::to_msgpack(j);
  return std::string(bytes.begin(), bytes.end());
}

void consumer_host::load(time_point now) {
  for (const auto& sc : store_.list_streams()) {
    auto states = store_.load_consumer_states(sc.name);
    if (!states) {
      log_->error("stream {}: consumers not loaded: {} {}", sc.name, states.err().code,
                  states.err().message);
      continue;
    }
    auto info = store_.info(sc.name);
    const sequence last = info ? info->last_seq : 0;
    for (const auto& [name, bytes] : states.value()) {
      const std::string where = "consumer " + sc.name + "/" + name;
      std::string problem;
      consumer_config config;
      std::string state;
      json view;
      try {
        const json j = json::from_msgpack(bytes);
        auto parsed = parse_consumer_config(j.at("config"), where);
        if (!parsed) {
          problem = parsed.err().message;
        } else {
          config = std::move(parsed.value());
          view = j.contains("view") ? j.at("view") : j.at("config");
          const auto& bin = j.at("state").get_binary();
          state.assign(bin.begin(), bin.end());
        }
      } catch (const json::exception& ex) {
        problem = where + ": saved state does not decode: " + ex.what();
      }
      config.name = name;
      config.stream = sc.name;
      std::unique_ptr<entry> e;
      if (problem.empty()) {
        if (auto st = check_config(config); !st) problem = st.err().message;
      }
      if (problem.empty()) {
        e = std::make_unique<entry>(config, last);
        if (auto st = e->policy.restore(state); !st) problem = where + ": " + st.err().message;
      }
      if (!problem.empty()) {
        log_->error("{}; it is out of service (remove it with broker.consumer_rm)", problem);
        consumer_config placeholder;
        placeholder.name = name;
        placeholder.stream = sc.name;
        e = std::make_unique<entry>(placeholder, last);
        e->broken = true;
        e->broken_reason = problem;
      } else {
        e->view = std::move(view);
        e->policy.on_records_available(last);
        const auto c = e->policy.counters();
        log_->info("consumer {}/{} loaded: ack floor {}, {} pending, {} ack-pending", sc.name, name,
                   e->policy.ack_floor(), c.pending, c.ack_pending);
      }
      (void)now;
      if (!e->broken) wake(*e);  // its restored entries are read again on the first turn
      consumers_[sc.name][name] = std::move(e);
    }
  }
}

std::size_t consumer_host::size() const {
  std::size_t n = 0;
  for (const auto& [stream, by_name] : consumers_) n += by_name.size();
  return n;
}

consumer_host::entry* consumer_host::find(const std::string& stream, const std::string& name) {
  auto s = consumers_.find(stream);
  if (s == consumers_.end()) return nullptr;
  auto c = s->second.find(name);
  return c == s->second.end() ? nullptr : c->second.get();
}

const consumer_host::entry* consumer_host::find(const std::string& stream,
                                                const std::string& name) const {
  return const_cast<consumer_host*>(this)->find(stream, name);
}

common::result<consumer_host::entry*> consumer_host::create(const std::string& stream,
                                                            const consumer_config& config,
                                                            time_point now) {
  (void)now;
  if (is_dead_letter_stream(stream)) {
    return error::make(errc::bad_request,
                       "stream " + stream +
                           " holds dead letters; read them with broker.stream_read and put "
                           "one back with broker.dlq_replay (consumers cannot be created on it)");
  }
  auto info = store_.info(stream);
  if (!info) {
    if (info.err().code == errc::not_found) return not_found("no stream '" + stream + "'");
    return with_retry(info.err());
  }
  if (auto st = check_config(config); !st) return st.err();
  if (auto s = consumers_.find(stream);
      s != consumers_.end() && s->second.size() >= limits_.max_consumers_per_stream) {
    ++counters_.consumers_refused;
    return error::make(consumer_errc::too_many,
                       "consumer '" + config.name + "' of stream '" + stream +
                           "' not created: the stream has " + std::to_string(s->second.size()) +
                           " consumers, the broker's limit (--max-consumers " +
                           std::to_string(limits_.max_consumers_per_stream) +
                           "); remove one with broker.consumer_rm or join an existing one");
  }
  // The dead-letter stream exists from the first consumer on: visible before it is needed.
  if (auto st = ensure_dlq(stream, info.value()); !st) return with_retry(st.err());
  consumer_config c = config;
  sequence last = info->last_seq;
  if (c.start == start_position::from_time) {
    // Start at the first record at or after the time without reading the way there.
    auto at = store_.seq_at_time(stream, c.start_time_ms);
    if (!at) return with_retry(at.err());
    c.start = start_position::from_sequence;
    c.start_sequence = at.value();
  }
  auto e = std::make_unique<entry>(c, last);
  e->view = consumer_config_json(config);  // as given: a from_time start stays one in views
  if (auto st = store_.save_consumer_state(stream, c.name, blob(*e)); !st) {
    return with_retry(st.err());
  }
  e->policy.on_records_available(last);
  entry* out = e.get();
  consumers_[stream][c.name] = std::move(e);
  log_->info("consumer {}/{} created: {}", stream, c.name, consumer_config_json(c).dump());
  return out;
}

common::status consumer_host::ensure_dlq(const std::string& stream, const stream_info& info) {
  const std::string dlq = dlq_of(stream);
  if (auto d = store_.info(dlq); d) return common::ok_status();
  stream_config dc;
  dc.name = dlq;
  dc.max_age = info.config.max_age;
  dc.max_bytes = info.config.max_bytes;
  dc.max_events = info.config.max_events;
  dc.duplicate_window =
      std::max(info.config.duplicate_window, std::chrono::milliseconds(std::chrono::hours(24)));
  if (auto st = store_.create_stream(dc); !st && st.err().code != errc::already_exists) {
    return st.err();
  }
  log_->info("stream {} created for the dead letters of {}", dlq, stream);
  return common::ok_status();
}

json consumer_host::info_json(const entry& e) const {
  json members = json::array();
  if (e.broken) {
    return {{"stream", e.stream()},
            {"consumer", e.name()},
            {"broken", e.broken_reason},
            {"members", members}};
  }
  const auto c = e.policy.counters();
  for (const auto& m : e.policy.member_views()) {
    auto p = member_peer_.find(m.id);
    auto a = p == member_peer_.end() ? agents_.end() : agents_.find(p->second);
    members.push_back({{"agent", a == agents_.end() ? m.id : a->second},
                       {"member", m.id},
                       {"capacity", m.capacity},
                       {"in_flight", m.in_flight}});
  }
  return {{"stream", e.stream()},
          {"consumer", e.name()},
          {"config", e.view},
          {"ack_floor", e.policy.ack_floor()},
          {"next_seq", e.policy.next_sequence()},
          {"last_seq", e.policy.last_sequence()},
          {"members", std::move(members)},
          {"pending", c.pending},
          {"ack_pending", c.ack_pending},
          {"redelivered", c.redelivered},
          {"dead_lettered", c.dead_lettered},
          {"lag", c.lag},
          {"delivered", c.delivered},
          {"acked", c.acked},
          {"refused", c.refused},
          {"gone", c.gone},
          {"waiting_for_key", c.waiting_for_key}};
}

common::result<json> consumer_host::join(const std::string& peer, const std::string& agent,
                                         const header& h, const json& config, time_point now) {
  const std::string where = "CONSUME " + h.stream + "/" + h.consumer;
  const std::uint32_t capacity = h.capacity == 0 ? 1 : h.capacity;
  if (capacity > k_max_capacity) {
    return error::make(errc::bad_request, where + ": 'capacity' is " + std::to_string(capacity) +
                                              "; at most " + std::to_string(k_max_capacity));
  }
  auto parsed = parse_consumer_config(config.is_null() ? json::object() : config, where);
  if (!parsed) return parsed.err();
  parsed->name = h.consumer;
  parsed->stream = h.stream;
  entry* e = find(h.stream, h.consumer);
  if (e == nullptr) {
    auto created = create(h.stream, parsed.value(), now);
    if (!created) return created.err();
    e = created.value();
  } else if (e->broken) {
    return error::make(std::string(errc::storage_corrupt), e->broken_reason);
  } else if (config.is_object()) {
    // Only what the CONSUME names is compared: an empty payload joins as it is.
    const json mine = consumer_config_json(parsed.value());
    const json& stored = e->view;
    for (const auto& [key, value] : config.items()) {
      (void)value;
      if (!stored.contains(key) || mine.at(key) != stored.at(key)) {
        return error::make(errc::bad_request,
                           where + ": the consumer exists with " + key + " " +
                               stored.value(key, json()).dump() + ", this CONSUME asks " +
                               mine.at(key).dump() +
                               " (remove it with broker.consumer_rm to change it)");
      }
    }
  }
  const std::string member = member_label(agent, peer);
  if (!e->policy.has_member(member) && e->policy.members() >= limits_.max_members_per_consumer) {
    ++counters_.members_refused;
    return error::make(consumer_errc::too_many,
                       where + ": consumer '" + h.consumer + "' of stream '" + h.stream + "' has " +
                           std::to_string(e->policy.members()) +
                           " members, the broker's limit (--max-consumer-members " +
                           std::to_string(limits_.max_members_per_consumer) +
                           "); join again once one left, or use another consumer");
  }
  agents_[peer] = agent;
  member_peer_[member] = peer;
  if (auto st = e->policy.on_member_join(member, capacity, now); !st) return st.err();
  wake(*e);
  log_->info("consumer {}/{}: member {} joined (capacity {})", h.stream, h.consumer, agent,
             capacity);
  return info_json(*e);
}

common::status consumer_host::leave(const std::string& peer, const header& h, time_point now) {
  entry* e = find(h.stream, h.consumer);
  if (e == nullptr || e->broken) {
    return not_found("no consumer '" + h.consumer + "' on stream '" + h.stream + "'");
  }
  e->policy.on_member_leave(member_of(peer), now, e->todo);
  mark_dirty(*e);
  wake(*e);
  log_->info("consumer {}/{}: member {} left", h.stream, h.consumer, member_of(peer));
  return common::ok_status();
}

common::status consumer_host::answer(const std::string& peer, command cmd, const header& h,
                                     time_point now) {
  const std::string what = common::command_name(static_cast<std::uint8_t>(cmd));
  entry* e = find(h.stream, h.consumer);
  if (e == nullptr || e->broken) {
    return not_found(what + " #" + std::to_string(h.stream_seq) + ": no consumer '" + h.consumer +
                     "' on stream '" + h.stream + "'");
  }
  common::status st = common::ok_status();
  const std::string member = member_of(peer);
  if (h.deliveries != 0 && cmd != command::ack) {
    // The answer names the delivery it is about: a NACK, TERM or PROGRESS repeated after the
    // event came back to this member must not fail (or extend) the new delivery.
    const auto& pending = e->policy.pending();
    auto p = pending.find(h.stream_seq);
    if (p != pending.end() && p->second.delivery_count != h.deliveries &&
        p->second.st == pending_entry::state::in_flight && p->second.member == member) {
      e->policy.count_refused();
      return error::make(consumer_errc::not_held,
                         what + " #" + std::to_string(h.stream_seq) + " of consumer '" +
                             h.consumer + "' on stream '" + h.stream + "' answers delivery " +
                             std::to_string(h.deliveries) + "; member '" + member +
                             "' holds delivery " + std::to_string(p->second.delivery_count));
    }
  }
  if (!h.id.empty() && e->confirms.size() >= k_max_unconfirmed_answers) {
    e->policy.count_refused();
    return error::make(common::errc::queue_full,
                       what + " #" + std::to_string(h.stream_seq) + " of consumer '" + h.consumer +
                           "' on stream '" + h.stream +
                           "' not taken: " + std::to_string(e->confirms.size()) +
                           " answers wait for the consumer's state to be saved; retry later");
  }
  switch (cmd) {
    case command::ack:
      st = e->policy.on_ack(member, h.stream_seq, now, e->todo);
      break;
    case command::nack: {
      std::optional<std::chrono::milliseconds> delay;
      if (h.delay_ms > 0) delay = std::chrono::milliseconds(static_cast<std::int64_t>(h.delay_ms));
      std::string reason = h.error_message.empty() ? "nacked by " + member : h.error_message;
      if (!h.error_code.empty()) reason = h.error_code + ": " + reason;
      st = e->policy.on_nack(member, h.stream_seq, delay, reason, now, e->todo);
      break;
    }
    case command::term: {
      std::string reason = h.error_message.empty() ? "terminated by " + member : h.error_message;
      if (!h.error_code.empty()) reason = h.error_code + ": " + reason;
      st = e->policy.on_term(member, h.stream_seq, reason, now, e->todo);
      break;
    }
    case command::progress:
      st = e->policy.on_progress(member, h.stream_seq, now);
      break;
    default:
      return error::make(errc::bad_request, what + " is not an answer to a delivery");
  }
  if (st) {
    mark_dirty(*e);
    wake(*e);
    if (!h.id.empty()) {
      e->confirms.push_back({peer, cmd, h});
      e->save_now = true;
    }
  }
  return st;
}

void consumer_host::peer_gone(const std::string& peer, time_point now) {
  auto a = agents_.find(peer);
  if (a == agents_.end()) return;
  const std::string member = member_label(a->second, peer);
  for (auto& [stream, by_name] : consumers_) {
    for (auto& [name, e] : by_name) {
      if (e->broken || !e->policy.has_member(member)) continue;
      e->policy.on_member_leave(member, now, e->todo);
      mark_dirty(*e);
      wake(*e);
      log_->info("consumer {}/{}: member {} is gone", stream, name, member);
    }
  }
  member_peer_.erase(member);
  agents_.erase(a);
}

std::string consumer_host::member_of(const std::string& peer) const {
  auto a = agents_.find(peer);
  return member_label(a == agents_.end() ? std::string("?") : a->second, peer);
}

common::result<json> consumer_host::list(const std::string& stream) const {
  if (auto info = store_.info(stream); !info) return with_retry(info.err());
  json out = json::array();
  if (auto s = consumers_.find(stream); s != consumers_.end()) {
    for (const auto& [name, e] : s->second) out.push_back(info_json(*e));
  }
  return json{{"stream", stream}, {"consumers", std::move(out)}};
}

common::result<json> consumer_host::info(const std::string& stream, const std::string& name) const {
  const entry* e = find(stream, name);
  if (e == nullptr) return not_found("no consumer '" + name + "' on stream '" + stream + "'");
  return info_json(*e);
}

common::result<json> consumer_host::add(const std::string& stream, const std::string& name,
                                        const json& args, time_point now) {
  const std::string where = "broker.consumer_add " + stream + "/" + name;
  auto parsed = parse_consumer_config(args, where, {"stream", "name"});
  if (!parsed) return parsed.err();
  parsed->name = name;
  parsed->stream = stream;
  if (entry* e = find(stream, name)) {
    if (e->view == consumer_config_json(parsed.value())) return info_json(*e);
    return error::make(
        errc::already_exists,
        where + ": the consumer exists with another configuration " + e->view.dump());
  }
  auto created = create(stream, parsed.value(), now);
  if (!created) return created.err();
  return info_json(*created.value());
}

common::result<json> consumer_host::remove(const std::string& stream, const std::string& name) {
  entry* e = find(stream, name);
  if (e == nullptr) return not_found("no consumer '" + name + "' on stream '" + stream + "'");
  if (auto st = store_.delete_consumer_state(stream, name);
      !st && st.err().code != errc::not_found) {
    return with_retry(st.err());
  }
  std::erase_if(dead_letters_, [&](const dead_letter_record& d) {
    return d.stream == stream && d.consumer == name;
  });
  forget(*e);
  consumers_[stream].erase(name);
  log_->info("consumer {}/{} removed", stream, name);
  return json{{"stream", stream}, {"consumer", name}, {"removed", true}};
}

void consumer_host::stream_removed(const std::string& stream) {
  if (auto s = consumers_.find(stream); s != consumers_.end()) {
    for (auto& [name, e] : s->second) forget(*e);
  }
  if (consumers_.erase(stream) > 0) log_->info("stream {} removed with its consumers", stream);
  std::erase_if(dead_letters_, [&](const dead_letter_record& d) { return d.stream == stream; });
}

common::result<json> consumer_host::dlq_replay(const std::string& stream_or_dlq, sequence dlq_seq,
                                               time_point now) {
  const std::string source =
      is_dead_letter_stream(stream_or_dlq)
          ? stream_or_dlq.substr(0, stream_or_dlq.size() - k_dlq_suffix.size())
          : stream_or_dlq;
  const std::string dlq = dlq_of(source);
  auto dead = read_one(dlq, dlq_seq);
  if (!dead) return dead.err();
  auto h = common::decode_header(dead->header);
  if (!h) {
    return error::make(std::string(errc::storage_corrupt),
                       "dead letter " + dlq + " #" + std::to_string(dlq_seq) +
                           ": its header does not decode: " + h.err().message);
  }
  const std::string consumer_name = h->consumer;
  if (find(source, consumer_name) == nullptr) {
    return not_found("dead letter " + dlq + " #" + std::to_string(dlq_seq) +
                     " was made by consumer '" + consumer_name + "', which stream '" + source +
                     "' no longer has");
  }
  header replay = h.value();
  replay.stream = source;
  replay.stream_seq = 0;
  replay.deliveries = 0;
  replay.error_code.clear();
  replay.error_message.clear();
  replay.consumer = consumer_name;  // only this consumer gets it
  const std::string original_id = h->id.empty() ? dead->event_id : h->id;
  replay.id = original_id + "~replay" + std::to_string(dlq_seq);
  record rec;
  rec.topic = dead->topic;
  rec.event_id = replay.id;
  rec.header = common::encode_header(replay);
  rec.payload = dead->payload;
  auto appended = store_.append(source, std::span<const record>(&rec, 1));
  if (!appended) return with_retry(appended.err());
  if (auto st = store_.flush(); !st) return with_retry(st.err());
  const auto& a = appended.value().front();
  if (auto info = store_.info(source)) records_stored(source, info->last_seq);
  log_->info("dead letter {} #{} replayed into {} #{} for consumer {}{}", dlq, dlq_seq, source,
             a.seq, consumer_name, a.duplicate ? " (already replayed)" : "");
  (void)now;
  return json{{"stream", source},
              {"stream_seq", a.seq},
              {"consumer", consumer_name},
              {"duplicate", a.duplicate}};
}

void consumer_host::records_stored(const std::string& stream, sequence last_seq) {
  auto s = consumers_.find(stream);
  if (s == consumers_.end()) return;
  for (auto& [name, e] : s->second) {
    if (e->broken) continue;
    e->policy.on_records_available(last_seq);
    // Only members read: a consumer without any has nothing to do with new records.
    if (e->policy.members() > 0) wake(*e);
  }
}

common::result<record> consumer_host::read_one(const std::string& stream, sequence seq) {
  auto got = store_.read(stream, seq, 1, k_fetch_bytes);
  if (!got) return with_retry(got.err());
  if (got->empty() || got->front().seq != seq) {
    return not_found("stream '" + stream + "' has no record #" + std::to_string(seq) +
                     " (never stored, or removed by retention)");
  }
  return std::move(got->front());
}

namespace {

// The element count and prefix length of the msgpack map at the start of `bytes`.
bool map_prefix(std::string_view bytes, std::uint32_t& count, std::size_t& length) {
  if (bytes.empty()) return false;
  const auto b = static_cast<unsigned char>(bytes[0]);
  if ((b & 0xf0) == 0x80) {
    count = b & 0x0f;
    length = 1;
    return true;
  }
  const auto at = [&](std::size_t i) {
    return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i]));
  };
  if (b == 0xde && bytes.size() >= 3) {
    count = at(1) << 8 | at(2);
    length = 3;
    return true;
  }
  if (b == 0xdf && bytes.size() >= 5) {
    count = at(1) << 24 | at(2) << 16 | at(3) << 8 | at(4);
    length = 5;
    return true;
  }
  return false;
}

// The map `stored` with the pairs of the map `extra` appended, without decoding either (the
// delivery path's hot spot was decoding and re-encoding every stored header). The caller makes
// sure no key is in both. False when either is not a msgpack map.
bool append_pairs(std::string_view stored, std::string_view extra, std::string& out) {
  std::uint32_t a = 0, b = 0;
  std::size_t la = 0, lb = 0;
  if (!map_prefix(stored, a, la) || !map_prefix(extra, b, lb)) return false;
  const std::uint64_t n = std::uint64_t{a} + b;
  out.clear();
  out.reserve(stored.size() + extra.size());
  if (n < 16) {
    out.push_back(static_cast<char>(0x80 | n));
  } else if (n < 65536) {
    out.push_back(static_cast<char>(0xde));
    out.push_back(static_cast<char>(n >> 8));
    out.push_back(static_cast<char>(n & 0xff));
  } else {
    return false;
  }
  out.append(stored.substr(la));
  out.append(extra.substr(lb));
  return true;
}

}  // namespace

void consumer_host::send_delivery(entry& e, const deliver& d, const record& r) {
  auto peer = member_peer_.find(d.member);
  thread_local std::string encoded;
  // Fast path: the stored header (the fanned-out event's fields and `stream`) plus the
  // delivery's own fields. A record whose header already names a consumer (a replayed dead
  // letter), or any of the delivery's fields, takes the decoding path below.
  header fields;
  fields.stream_seq = r.seq;
  fields.consumer = e.name();
  fields.deliveries = d.delivery_count;
  const bool plain = r.header.find("consumer") == std::string::npos &&
                     r.header.find("deliveries") == std::string::npos &&
                     r.header.find("stream_seq") == std::string::npos &&
                     r.header.find("\xa3seq") == std::string::npos;
  if (plain && append_pairs(r.header, common::encode_header(fields), encoded)) {
    if (peer == member_peer_.end() || !send_(peer->second, command::deliver, encoded, r.payload)) {
      ++counters_.deliveries_unsent;
      log_->debug(
          "consumer {}/{}: DELIVER #{} to {} could not be sent; redelivered after "
          "ack_wait",
          e.stream(), e.name(), r.seq, d.member);
    }
    return;
  }
  auto h = common::decode_header(r.header);
  header out;
  if (h) {
    out = std::move(h.value());
  } else {
    // Stored by this broker, so this is damage: deliver what is known rather than nothing.
    log_->warn("consumer {}/{}: stored header of #{} does not decode: {}", e.stream(), e.name(),
               r.seq, h.err().message);
    out.id = r.event_id;
  }
  out.topic = r.topic;
  out.seq = 0;
  out.stream = e.stream();
  out.stream_seq = r.seq;
  out.consumer = e.name();
  out.deliveries = d.delivery_count;
  encoded.clear();
  common::encode_header(out, encoded);
  if (peer == member_peer_.end() || !send_(peer->second, command::deliver, encoded, r.payload)) {
    ++counters_.deliveries_unsent;
    log_->debug("consumer {}/{}: DELIVER #{} to {} could not be sent; redelivered after ack_wait",
                e.stream(), e.name(), r.seq, d.member);
  }
}

bool consumer_host::build_dead_letter(entry& e, const dead_letter& dl) {
  auto r = read_one(e.stream(), dl.seq);
  if (!r) {
    if (r.err().code == errc::not_found) {
      // Retention removed the record before it could be stored as a dead letter: there is
      // nothing left to store.
      log_->error("consumer {}/{}: dead letter #{} ({}) not stored: {}", e.stream(), e.name(),
                  dl.seq, dl.reason, r.err().message);
      return true;
    }
    ++counters_.dead_letter_retries;
    log_->error(
        "consumer {}/{}: dead letter #{} ({}) could not be read to store it, retried in {} ms "
        "(the consumer's state is not saved past it): {} {}",
        e.stream(), e.name(), dl.seq, dl.reason, k_dead_letter_retry_interval.count(), r.err().code,
        r.err().message);
    return false;
  }
  auto h = common::decode_header(r->header);
  header dh = h ? h.value() : header{};
  if (!h) dh.id = r->event_id;
  dh.stream = e.stream();
  dh.stream_seq = dl.seq;
  dh.consumer = e.name();
  dh.deliveries = dl.delivery_count;
  dh.error_message = dl.reason;
  dead_letter_record out;
  out.stream = e.stream();
  out.consumer = e.name();
  out.rec.topic = r->topic;
  out.rec.event_id = e.stream() + ":" + std::to_string(dl.seq) + ":" + e.name();
  out.rec.header = common::encode_header(dh);
  out.rec.payload = std::move(r->payload);
  log_->warn("consumer {}/{}: #{} {} id={} dead-lettered after {} deliveries: {}", e.stream(),
             e.name(), dl.seq, r->topic, r->event_id, dl.delivery_count, dl.reason);
  dead_letters_.push_back(std::move(out));
  return true;
}

void consumer_host::retry_dead_letters(entry& e, time_point now) {
  if (e.dead_letter_retry.empty() || now < e.dead_letter_retry_at) return;
  std::vector<dead_letter> todo;
  todo.swap(e.dead_letter_retry);
  for (const auto& dl : todo) {
    if (!build_dead_letter(e, dl)) e.dead_letter_retry.push_back(dl);
  }
  if (!e.dead_letter_retry.empty()) e.dead_letter_retry_at = now + k_dead_letter_retry_interval;
  e.save_now = true;
}

void consumer_host::execute(entry& e, std::vector<decision>& decisions, time_point now) {
  for (std::size_t i = 0; i < decisions.size(); ++i) {
    const decision d = decisions[i];  // executing may append decisions (a record gone)
    if (const auto* del = std::get_if<deliver>(&d)) {
      if (auto cached = e.read_ahead.find(del->seq); cached != e.read_ahead.end()) {
        send_delivery(e, *del, cached->second);
        continue;
      }
      auto r = read_one(e.stream(), del->seq);
      if (!r) {
        if (r.err().code == errc::not_found) {
          e.policy.on_record_gone(del->seq, decisions);
        } else {
          log_->warn("consumer {}/{}: #{} not delivered: {} {}", e.stream(), e.name(), del->seq,
                     r.err().code, r.err().message);
        }
        continue;
      }
      send_delivery(e, *del, r.value());
    } else if (const auto* dl = std::get_if<dead_letter>(&d)) {
      // The policy counts it done at once; the wiring keeps it until it is read and stored,
      // and the consumer's state is not saved before (a crash reads it again from the saved
      // state, where it is still pending).
      if (!build_dead_letter(e, *dl)) {
        if (e.dead_letter_retry.empty())
          e.dead_letter_retry_at = now + k_dead_letter_retry_interval;
        e.dead_letter_retry.push_back(*dl);
      }
      mark_dirty(e);
      e.save_now = true;
    } else {
      mark_dirty(e);  // the ack floor moved
    }
  }
  decisions.clear();
}

void consumer_host::store_dead_letters() {
  if (dead_letters_.empty()) return;
  std::vector<bool> appended(dead_letters_.size(), false);
  for (std::size_t i = 0; i < dead_letters_.size(); ++i) {
    const auto& d = dead_letters_[i];
    auto a = store_.append(dlq_of(d.stream), std::span<const record>(&d.rec, 1));
    if (a) {
      appended[i] = true;
      continue;
    }
    ++counters_.dead_letter_retries;
    log_->error("dead letter {} of {}/{} not appended to {}, retried: {} {}", d.rec.event_id,
                d.stream, d.consumer, dlq_of(d.stream), a.err().code, a.err().message);
    if (a.err().code == errc::not_found) {
      // Its dead-letter stream was removed (broker.stream_rm): made again, as at creation.
      if (auto info = store_.info(d.stream); info) (void)ensure_dlq(d.stream, info.value());
    }
  }
  if (auto st = store_.flush(); !st) {
    // Kept and appended again next turn; the consumers' states are not saved past them. Those
    // whose append failed are counted already: one retry per dead letter per turn.
    counters_.dead_letter_retries +=
        static_cast<std::uint64_t>(std::count(appended.begin(), appended.end(), true));
    log_->error("{} dead letter(s) not stored, retried: {} {}", dead_letters_.size(), st.err().code,
                st.err().message);
    return;
  }
  std::vector<dead_letter_record> kept;
  for (std::size_t i = 0; i < dead_letters_.size(); ++i) {
    if (appended[i]) {
      ++counters_.dead_letters_stored;
    } else {
      kept.push_back(std::move(dead_letters_[i]));
    }
  }
  dead_letters_ = std::move(kept);
}

void consumer_host::mark_dirty(entry& e) {
  unsaved_.insert(&e);
}

// Its state is not saved past a dead letter not yet read (its retry timer covers it) or not
// yet stored (saved once they are).
bool consumer_host::waits_for_dead_letter(const entry& e) const {
  if (!e.dead_letter_retry.empty()) return true;
  return std::any_of(dead_letters_.begin(), dead_letters_.end(), [&](const auto& d) {
    return d.stream == e.stream() && d.consumer == e.name();
  });
}

void consumer_host::schedule(entry& e) {
  if (e.timer) {
    timers_.erase({*e.timer, &e});
    e.timer.reset();
  }
  if (e.broken) return;
  std::optional<time_point> due = e.policy.next_deadline();
  if (!e.dead_letter_retry.empty() && (!due || e.dead_letter_retry_at < *due)) {
    due = e.dead_letter_retry_at;
  }
  if (!due) return;
  e.timer = *due;
  timers_.emplace(*due, &e);
}

void consumer_host::forget(entry& e) {
  active_.erase(&e);
  unsaved_.erase(&e);
  if (e.timer) timers_.erase({*e.timer, &e});
  e.timer.reset();
}

void consumer_host::save_states(time_point now) {
  if (unsaved_.empty()) return;
  const std::vector<entry*> todo(unsaved_.begin(), unsaved_.end());
  for (entry* e : todo) {
    const std::string& stream = e->stream();
    const std::string& name = e->name();
    if (e->broken) {
      unsaved_.erase(e);
      continue;
    }
    if (!e->save_now && now - e->last_save < k_state_save_interval) continue;
    if (waits_for_dead_letter(*e)) continue;
    if (auto st = store_.save_consumer_state(stream, name, blob(*e)); !st) {
      ++counters_.state_save_failures;
      log_->error("consumer {}/{}: state not saved (retried): {} {}", stream, name, st.err().code,
                  st.err().message);
      e->save_now = false;  // retried after the interval, not spun on
      e->last_save = now;
      continue;
    }
    e->save_now = false;
    e->last_save = now;
    unsaved_.erase(e);
    for (const auto& c : e->confirms) {
      header h;
      h.id = c.answer.id;
      h.stream = c.answer.stream;
      h.consumer = c.answer.consumer;
      h.stream_seq = c.answer.stream_seq;
      h.worker = "broker";
      if (!send_(c.peer, command::reply, common::encode_header(h), std::string_view("\x80", 1))) {
        // The answer is applied and saved; only its confirmation is lost with the peer. A
        // member that did not get it sends the answer again (docs/protocol.md section 11).
        ++counters_.confirmations_unsent;
        log_->warn(
            "consumer {}/{}: confirmation of {} #{} id={} could not be sent (the peer is gone); "
            "the answer stands",
            stream, name, common::command_name(static_cast<std::uint8_t>(c.cmd)),
            c.answer.stream_seq, c.answer.id);
      }
    }
    e->confirms.clear();
  }
}

void consumer_host::visit(entry& e, time_point now) {
  ++counters_.visits;
  ++counters_.last_run_visits;
  if (e.broken) return;
  retry_dead_letters(e, now);
  e.policy.on_tick(now, e.todo);
  execute(e, e.todo, now);
  entry* current = &e;
  fetch_fn fetch = [this, current](sequence from, std::size_t n) {
    auto got = store_.read(current->stream(), from, n, k_fetch_bytes);
    if (got) {
      for (const auto& r : got.value()) current->read_ahead.emplace(r.seq, r);
    }
    return got;
  };
  if (auto st = e.policy.next_deliveries(now, fetch, e.todo); !st) {
    log_->warn("consumer {}/{}: {} {}", e.stream(), e.name(), st.err().code, st.err().message);
  }
  execute(e, e.todo, now);
  e.read_ahead.clear();
  // A read budget spent with members still waiting: the next turn goes on.
  if (e.policy.more_to_read() || !e.todo.empty()) wake(e);
  schedule(e);
}

void consumer_host::run(time_point now) {
  counters_.last_run_visits = 0;
  while (!timers_.empty() && timers_.begin()->first <= now) {
    entry* e = timers_.begin()->second;
    timers_.erase(timers_.begin());
    e->timer.reset();
    active_.insert(e);
  }
  if (!active_.empty()) {
    // In (stream, name) order, as a walk of every consumer would go.
    std::vector<entry*> todo(active_.begin(), active_.end());
    active_.clear();
    std::sort(todo.begin(), todo.end(), [](const entry* a, const entry* b) {
      return std::tie(a->stream(), a->name()) < std::tie(b->stream(), b->name());
    });
    for (entry* e : todo) visit(*e, now);
  }
  store_dead_letters();
  save_states(now);
}

std::optional<time_point> consumer_host::next_deadline() const {
  if (!active_.empty()) return time_point::min();
  std::optional<time_point> out;
  if (!timers_.empty()) out = timers_.begin()->first;
  for (const entry* e : unsaved_) {
    if (e->broken || waits_for_dead_letter(*e)) continue;  // the retry timers cover it
    const auto save_at = e->save_now ? time_point::min() : e->last_save + k_state_save_interval;
    if (!out || save_at < *out) out = save_at;
  }
  if (!dead_letters_.empty()) {
    // A failed flush is retried, not spun on.
    const auto retry = common::steady_clock::now() + std::chrono::milliseconds(500);
    if (!out || retry < *out) out = retry;
  }
  return out;
}

}  // namespace ensemble::broker::streams
