// Events: awaits registered by instance id or by match condition, publisher ("from") filters,
// triggers that start instances, and the buffer that keeps events that came before their await.
#include <algorithm>

#include "engine.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator::detail {

using namespace std::chrono_literals;
using millis = std::chrono::milliseconds;

namespace {

// Events ignored for their publisher ("from") are logged at most this often per topic.
constexpr std::int64_t k_ignored_log_interval_us = 1'000'000;

json event_meta(const json& ev) {
  json m = ev;
  m.erase("payload");
  return m;
}

json event_json(const agent::message& m) {
  json ev = {{"id", m.id()},
             {"topic", m.topic()},
             {"correlation_id", m.correlation_id()},
             {"causation_id", m.causation_id()},
             {"trace_id", m.trace_id()},
             {"seq", m.seq()},
             {"ts", m.timestamp_us()},
             {"publisher", m.publisher()}};
  auto payload = agent::from_json_payload(m.payload());
  ev["payload"] = payload ? std::move(*payload) : json();
  if (!m.stream().empty()) {
    ev["stream"] = m.stream();
    ev["stream_seq"] = m.stream_seq();
  }
  return ev;
}

}  // namespace

void engine::register_await(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        default_awaits_[key_of(t, in.id)] = s.name;
      } else {
        match_awaits_[t].insert({in.id, s.name});
      }
    }
  }
}

void engine::unregister_await(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        auto it = default_awaits_.find(key_of(t, in.id));
        if (it != default_awaits_.end() && it->second == s.name) default_awaits_.erase(it);
      } else if (auto it = match_awaits_.find(t); it != match_awaits_.end()) {
        it->second.erase({in.id, s.name});
        if (it->second.empty()) match_awaits_.erase(it);
      }
    }
  }
}

bool engine::matches(instance& in, const step& s, const json& ev) {
  if (s.match.empty()) return ev.value("correlation_id", "") == in.id;
  in.state["event"] = ev;
  auto r = evaluate(s.match, in.state);
  in.state.erase("event");
  if (!r) {
    log_->warn("instance {}: step {}: match condition failed on event {}: {}", in.id, s.name,
               ev.value("id", ""), r.err().message);
    return false;
  }
  return *r;
}

bool engine::try_buffer(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        auto range = buffer_index_.equal_range(key_of(t, in.id));
        for (auto it = range.first; it != range.second; ++it) {
          // An event from a publisher that "from" does not list stays where it is: it is not
          // this step's answer.
          if (!from_allowed(s, *it->second)) {
            ignore_from(in, s, *it->second);
            continue;
          }
          json ev = std::move(*it->second);
          buffer_.erase(it->second);
          buffer_index_.erase(it);
          batch_.buffer_remove.push_back(ev["id"]);
          deliver(in, s, ev);
          return true;
        }
        continue;
      }
      for (auto it = buffer_.begin(); it != buffer_.end(); ++it) {
        if ((*it)["topic"] != t || !matches(in, s, *it)) continue;
        if (!from_allowed(s, *it)) {
          ignore_from(in, s, *it);
          continue;
        }
        json ev = std::move(*it);
        auto range = buffer_index_.equal_range(key_of(t, ev.value("correlation_id", "")));
        for (auto i = range.first; i != range.second; ++i) {
          if (i->second == it) {
            buffer_index_.erase(i);
            break;
          }
        }
        buffer_.erase(it);
        batch_.buffer_remove.push_back(ev["id"]);
        deliver(in, s, ev);
        return true;
      }
    }
  }
  return false;
}

void engine::deliver(instance& in, const step& s, const json& ev) {
  unregister_await(in, s);
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.events_matched;
  }
  const std::string topic = ev["topic"];
  in.run.cause = ev.value("id", "");
  vis(in, s.name)["event"] = event_meta(ev);
  history(in, "event_matched", s.name, event_meta(ev));
  const bool failure = std::find(s.fail_on.begin(), s.fail_on.end(), topic) != s.fail_on.end();
  if (failure) {
    vis(in, s.name)["output"] = ev.value("payload", json());
    step_error(
        in, s,
        error{"choreography_failed",
              "the segment ended with " + topic + " (event " + ev.value("id", "") + ")", false});
  } else {
    complete_step(in, s, ev.value("payload", json()));
  }
}

void engine::on_event(const agent::message& m) {
  post_event(event_json(m));
}

void engine::post_event(json ev) {
  inbound in;
  in.what = inbound::kind::event;
  in.event = std::move(ev);
  post(std::move(in));
}

std::future<result<json>> engine::on_durable_event(const agent::message& m) {
  inbound in;
  in.what = inbound::kind::event;
  in.event = event_json(m);
  in.promise = std::make_shared<std::promise<result<json>>>();
  auto done = in.promise->get_future();
  post(std::move(in));
  return done;
}

void engine::set_durable_topics(std::set<std::string> topics) {
  durable_topics_ = std::move(topics);
}

std::string engine::handle_event(json ev, bool replayed) {
  std::string triggered;
  const std::string topic = ev["topic"];
  const std::string event_id = ev.value("id", "");
  // Triggers: one instance per (workflow, event id), ever.
  if (auto t = triggers_.find(topic); !replayed && t != triggers_.end()) {
    for (const auto& def : t->second) {
      for (const auto& trig : def->triggers) {
        if (trig.topic != topic) continue;
        json ctx = {{"event", ev}};
        if (!trig.match.empty()) {
          auto r = evaluate(trig.match, ctx);
          if (!r || !*r) continue;
        }
        if (store_failure_) {
          log_->warn("trigger {} of {}: event {} starts no instance, the store cannot commit: {}",
                     topic, def->name, event_id, store_failure_->message);
          continue;
        }
        const std::string mark = key_of(def->name, event_id);
        if (pending_triggers_.count(mark) != 0) {
          log_->debug("trigger {} event {}: already started an instance", topic, event_id);
          continue;
        }
        auto started = db_->triggered_by(def->name, event_id);
        if (!started || *started) {
          if (!started) {
            log_->error("trigger {} of {}: event {} starts no instance: {}", topic, def->name,
                        event_id, started.err().message);
          } else {
            log_->debug("trigger {} event {}: already started an instance", topic, event_id);
          }
          continue;
        }
        json start_input = ev.value("payload", json());
        if (trig.input) {
          auto r = render(*trig.input, ctx);
          if (!r) {
            log_->warn("trigger {} of {}: input for event {}: {}", topic, def->name, event_id,
                       r.err().message);
            continue;
          }
          start_input = std::move(*r);
        }
        const std::string id = ids_.next();
        pending_triggers_[mark] = id;
        batch_.triggers.push_back({def->name, event_id, id});
        instance& inst = create_instance(def, id, std::move(start_input), "", "",
                                         ev.value("trace_id", ""), event_id, "");
        advance(inst);
        if (triggered.empty()) triggered = id;
        break;
      }
    }
  }
  if (await_topics_.count(topic) == 0) return triggered;
  // An event that a waiting step refused for its publisher ("from") is not buffered either: it
  // is not the answer of the step it was addressed to.
  bool refused = false;
  // Awaits correlated by instance id.
  const std::string corr = ev.value("correlation_id", "");
  if (auto it = default_awaits_.find(key_of(topic, corr)); it != default_awaits_.end()) {
    auto inst = live_.find(corr);
    if (inst != live_.end()) {
      const step* s = inst->second->def->find(it->second);
      if (s != nullptr && !from_allowed(*s, ev)) {
        ignore_from(*inst->second, *s, ev);
        refused = true;
      } else if (s != nullptr) {
        if (replayed) count_caught_up();
        deliver(*inst->second, *s, ev);
        advance(*inst->second);
        return triggered;
      }
    }
  }
  // Awaits with a match condition.
  if (auto it = match_awaits_.find(topic); it != match_awaits_.end()) {
    const auto candidates = it->second;
    for (const auto& [id, step_name] : candidates) {
      auto inst = live_.find(id);
      if (inst == live_.end()) continue;
      const step* s = inst->second->def->find(step_name);
      if (s == nullptr || !matches(*inst->second, *s, ev)) continue;
      if (!from_allowed(*s, ev)) {
        ignore_from(*inst->second, *s, ev);
        refused = true;
        continue;
      }
      if (replayed) count_caught_up();
      deliver(*inst->second, *s, ev);
      advance(*inst->second);
      return triggered;
    }
  }
  if (!replayed && !refused) buffer_event(std::move(ev));
  return triggered;
}

bool engine::from_allowed(const step& s, const json& ev) {
  if (s.from.empty()) return true;
  const std::string publisher = ev.value("publisher", "");
  return std::find(s.from.begin(), s.from.end(), publisher) != s.from.end();
}

void engine::ignore_from(instance& in, const step& s, const json& ev) {
  const std::string topic = ev.value("topic", "");
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.events_ignored_from;
    ++stats_.events_ignored_from_by_topic[topic];
  }
  // One line per topic per second at most: a publisher that floods a topic must not flood the
  // log too.
  auto& limit = ignored_log_[topic];
  const auto now = clock_->real_us();
  if (limit.last_us != 0 && now - limit.last_us < k_ignored_log_interval_us) {
    ++limit.suppressed;
    return;
  }
  std::string listed;
  for (const auto& name : s.from) listed += (listed.empty() ? "" : ", ") + name;
  const std::string more = limit.suppressed == 0 ? std::string()
                                                 : " (and " + std::to_string(limit.suppressed) +
                                                       " more on this topic since the last line)";
  log_->warn(
      "instance {}: step {}: event {} on {} from publisher '{}' ignored: \"from\" lists only "
      "{}{}",
      in.id, s.name, ev.value("id", ""), topic, ev.value("publisher", ""), listed, more);
  limit.last_us = now;
  limit.suppressed = 0;
}

void engine::count_caught_up() {
  std::lock_guard lock(stats_mutex_);
  ++stats_.events_caught_up;
}

void engine::buffer_event(json ev) {
  const std::string topic = ev["topic"];
  const std::string corr = ev.value("correlation_id", "");
  buffered_event b;
  b.id = ev.value("id", "");
  b.topic = topic;
  b.correlation_id = corr;
  b.received_us = now_us();
  ev["received_us"] = b.received_us;
  b.event = ev;
  batch_.buffer_add.push_back(std::move(b));
  buffer_.push_back(std::move(ev));
  buffer_index_.emplace(key_of(topic, corr), std::prev(buffer_.end()));
  while (buffer_.size() > opts_.buffer_limit) {
    auto& oldest = buffer_.front();
    log_->warn("event buffer full ({}): dropping event {} on {}", opts_.buffer_limit,
               oldest.value("id", ""), oldest.value("topic", ""));
    batch_.buffer_remove.push_back(oldest.value("id", ""));
    pop_oldest_buffered();
  }
}

void engine::pop_oldest_buffered() {
  const json& oldest = buffer_.front();
  auto range = buffer_index_.equal_range(
      key_of(oldest["topic"].get<std::string>(), oldest.value("correlation_id", "")));
  for (auto i = range.first; i != range.second; ++i) {
    if (i->second == buffer_.begin()) {
      buffer_index_.erase(i);
      break;
    }
  }
  buffer_.pop_front();
}

void engine::purge_buffer() {
  const auto now = now_us();
  next_purge_us_ = now + 1'000'000;
  const auto before = now - opts_.buffer_retention.count() * 1000;
  bool any = false;
  while (!buffer_.empty() && buffer_.front().value("received_us", std::int64_t{0}) < before) {
    pop_oldest_buffered();
    any = true;
  }
  if (any) db_->purge_buffer(before);
}

}  // namespace ensemble::orchestrator::detail
