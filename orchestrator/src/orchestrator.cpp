// The public orchestrator: owns the agent that connects it to the broker, the engine, and the
// `orchestrator` service that exposes the engine's admin operations to any client.
#include "ensemble/orchestrator/orchestrator.hpp"

#include <atomic>
#include <future>
#include <map>
#include <set>

#include "engine.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/logging.hpp"

namespace ensemble::orchestrator {

struct orchestrator::impl {
  options opts;
  std::unique_ptr<detail::engine> engine;
  std::unique_ptr<agent::agent> agent;
  std::unique_ptr<detail::agent_effects> effects;  // the engine's sends, over `agent`
  bool started = false;
  // Streams whose events the durable consumer delivers: their copies on the plain
  // subscription are ignored once it is known (written before consuming, then only read).
  std::set<std::string> consumed_streams;
  std::atomic<bool> streams_known{false};

  common::status consume_streams();
};

namespace {

constexpr std::uint32_t k_consumer_capacity = 64;
constexpr auto k_event_commit_wait = std::chrono::seconds(30);

// The consumer's name: the orchestrator's agent name in [A-Za-z0-9_-]{1,64}.
std::string consumer_name(const std::string& agent_name) {
  std::string out;
  for (char c : agent_name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    out.push_back(ok ? c : '-');
  }
  if (out.empty()) out = "orchestrator";
  return out.substr(0, 64);
}

}  // namespace

// Awaited and triggering topics that a broker stream stores are fed by the orchestrator's own
// durable consumer of that stream (docs/workflows.md, "Durability"): an event is acked only
// once what it caused is committed, so nothing published while the orchestrator or the broker
// restarts is missed. Other topics keep the plain subscription.
common::status orchestrator::impl::consume_streams() {
  auto log = common::component_logger("orchestrator");
  auto listed = agent->call("broker", "streams", agent::to_json_payload(json::object()),
                            std::chrono::seconds(5));
  auto body =
      listed ? agent::from_json_payload(listed->payload()) : common::result<json>(listed.err());
  if (!body) {
    log->warn("cannot list the broker's streams ({}); events come by subscription only",
              body.err().to_string());
    streams_known = true;
    return common::ok_status();
  }
  std::set<std::string> topics;
  for (const auto& t : engine->listened_topics()) topics.insert(t);
  std::map<std::string, std::set<std::string>> covered;  // stream -> listened topics
  for (const auto& s : body->value("streams", json::array())) {
    for (const auto& prefix : s.value("topics", json::array())) {
      for (const auto& t : topics) {
        if (prefix.is_string() && t.starts_with(prefix.template get<std::string>()))
          covered[s.value("name", "")].insert(t);
      }
    }
  }
  std::set<std::string> durable;
  for (const auto& [stream, ts] : covered) {
    consumed_streams.insert(stream);
    durable.insert(ts.begin(), ts.end());
  }
  engine->set_durable_topics(durable);
  streams_known = true;
  return common::ok_status();
}

orchestrator::orchestrator(options opts) : impl_(std::make_unique<impl>()) {
  auto defs = load_definitions(opts.workflows);
  auto db = open_sqlite_store(opts.store, sqlite_options{.check = opts.check_store,
                                                         .sync = opts.sync,
                                                         .max_size_bytes = opts.store_max_size});
  std::shared_ptr<clock> clk = std::make_shared<wall_clock>();
  if (opts.clock == clock_kind::virtual_) {
    // Virtual time goes on from where the store kept it; a new store starts it at the wall time.
    auto kept = db->load_virtual_now();
    if (!kept) throw store_damaged(opts.store, kept.err().message);
    clk = std::make_shared<virtual_clock>(
        kept->value_or(static_cast<std::int64_t>(common::wall_clock_us())));
  }
  impl_->opts = opts;
  impl_->engine = std::make_unique<detail::engine>(std::move(opts), std::move(defs), std::move(db),
                                                   std::move(clk));
}

orchestrator::~orchestrator() {
  stop();
  // A start() that failed part way (the durable consumer refused) left `started` false with the
  // engine and the agent running: both must end before the members are destroyed — the engine
  // sends through `effects`, and the agent's subscription callbacks read `consumed_streams`.
  if (impl_->engine) impl_->engine->stop();
  if (impl_->agent) impl_->agent->stop(std::chrono::seconds(2));
}

common::status orchestrator::start() {
  auto& d = *impl_;
  if (d.started) return common::ok_status();
  agent::options ao;
  ao.name = d.opts.name;
  ao.broker = d.opts.broker;
  ao.events = d.opts.events;
  ao.key_file = d.opts.key_file;
  ao.broker_key = d.opts.broker_key;
  d.agent = std::make_unique<agent::agent>(ao);
  auto* engine = d.engine.get();
  auto* self = impl_.get();
  for (const auto& topic : engine->listened_topics()) {
    // Subscriptions are prefix matches; the engine wants the exact topic.
    (void)d.agent->subscribe(topic, [engine, topic, self](const agent::message& m) {
      if (m.topic() != topic) return;
      // A stored event the durable consumer delivers too.
      if (!m.stream().empty() && self->streams_known && self->consumed_streams.count(m.stream())) {
        return;
      }
      engine->on_event(m);
    });
  }
  if (d.opts.serve) {
    d.agent->handle(
        d.opts.service, "*", [engine](const agent::message& m) -> agent::handler_result {
          auto args = agent::from_json_payload(m.payload());
          if (!args) return args.err();
          const auto now = std::chrono::steady_clock::now();
          auto budget = std::chrono::duration_cast<std::chrono::milliseconds>(m.deadline() - now);
          if (budget.count() <= 0) budget = std::chrono::milliseconds(1);
          auto r =
              engine->request(m.action(), *args, budget,
                              detail::origin{m.id(), m.trace_id(), m.caller(), m.caller_scope()});
          if (!r) return r.err();
          return agent::to_json_payload(*r);
        });
    d.agent->set_capacity(d.opts.service, d.opts.capacity);
  }
  if (auto s = d.agent->start(); !s) return s;
  if (auto s = d.consume_streams(); !s) return s;
  d.effects = std::make_unique<detail::agent_effects>(*d.agent);
  d.engine->run(*d.effects);
  for (const auto& stream : d.consumed_streams) {
    const std::string name = consumer_name(d.opts.name);
    // Created on first use; its position is kept by the broker from then on. A new consumer
    // starts buffer_retention back: events older than that would have expired from the buffer.
    const auto since =
        std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::system_clock::now().time_since_epoch() - d.opts.buffer_retention)
            .count();
    json add = {{"stream", stream},
                {"name", name},
                {"start", "time"},
                {"start_time_ms", std::max<std::int64_t>(0, since)},
                {"ordered_by", "correlation_id"},
                {"ack_wait_ms", 60'000},
                {"max_deliver", 100},
                {"max_ack_pending", 10'000},
                {"backoff_ms", {500, 2000, 10'000}}};
    auto added = d.agent->call("broker", "consumer_add", agent::to_json_payload(add),
                               std::chrono::seconds(5));
    if (!added && added.err().code != "already_exists") {
      return common::error{added.err().code,
                           "cannot create the durable consumer " + name + " of stream " + stream +
                               ": " + added.err().message,
                           added.err().retryable};
    }
    agent::consume_options co;
    co.stream = stream;
    co.consumer = name;
    co.capacity = k_consumer_capacity;
    auto listened = engine->listened_topics();
    std::set<std::string> exact(listened.begin(), listened.end());
    auto joined = d.agent->consume(co, [engine, exact](const agent::message& m) -> common::status {
      if (exact.count(m.topic()) == 0) return common::ok_status();  // not awaited or triggering
      auto done = engine->on_durable_event(m);
      if (done.wait_for(k_event_commit_wait) != std::future_status::ready) {
        return common::error{std::string(common::errc::deadline_exceeded),
                             "event " + m.id() + " not committed within 30 s", true};
      }
      auto r = done.get();
      if (!r) return r.err();
      return common::ok_status();
    });
    if (!joined) return joined;
    common::component_logger("orchestrator")
        ->info("{}: events of stream {} come from durable consumer {}", d.opts.name, stream, name);
  }
  d.started = true;
  common::component_logger("orchestrator")
      ->info("{} ready: {} workflow definition(s), store {}", d.opts.name,
             d.engine->request("definitions", json::object(), std::chrono::seconds(5), {})
                 .value()["definitions"]
                 .size(),
             d.opts.store);
  return common::ok_status();
}

void orchestrator::stop() {
  auto& d = *impl_;
  if (!d.started) return;
  d.started = false;
  d.engine->stop();  // first: nothing is sent once the engine is gone
  if (d.agent) d.agent->stop(std::chrono::seconds(2));
  d.effects.reset();
  d.agent.reset();
}

common::result<json> orchestrator::request(std::string_view action, const json& args,
                                           std::chrono::milliseconds deadline) {
  if (!impl_->started) {
    return common::error{std::string(common::errc::shutting_down), "orchestrator not started",
                         true};
  }
  return impl_->engine->request(action, args, deadline, {});
}

common::result<json> orchestrator::request(std::string_view action, const json& args,
                                           std::chrono::milliseconds deadline,
                                           const requester& who) {
  if (!impl_->started) {
    return common::error{std::string(common::errc::shutting_down), "orchestrator not started",
                         true};
  }
  return impl_->engine->request(action, args, deadline,
                                detail::origin{"", "", who.caller, who.scope});
}

stats orchestrator::counters() const {
  return impl_->engine->counters();
}
const options& orchestrator::config() const {
  return impl_->opts;
}

}  // namespace ensemble::orchestrator
