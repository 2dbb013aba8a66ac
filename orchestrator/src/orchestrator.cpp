// The public orchestrator: owns the agent that connects it to the broker, the engine, and the
// `orchestrator` service that exposes the engine's admin operations to any client.
#include "ensemble/orchestrator/orchestrator.hpp"

#include "engine.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/logging.hpp"

namespace ensemble::orchestrator {

struct orchestrator::impl {
  options opts;
  std::unique_ptr<detail::engine> engine;
  std::unique_ptr<agent::agent> agent;
  bool started = false;
};

orchestrator::orchestrator(options opts) : impl_(std::make_unique<impl>()) {
  auto defs = load_definitions(opts.workflows);
  auto db = open_sqlite_store(
      opts.store, sqlite_options{.check = opts.check_store, .max_size_bytes = opts.store_max_size});
  impl_->opts = opts;
  impl_->engine = std::make_unique<detail::engine>(std::move(opts), std::move(defs), std::move(db));
}

orchestrator::~orchestrator() {
  stop();
}

common::status orchestrator::start() {
  auto& d = *impl_;
  if (d.started) return common::ok_status();
  agent::options ao;
  ao.name = d.opts.name;
  ao.broker = d.opts.broker;
  ao.events = d.opts.events;
  d.agent = std::make_unique<agent::agent>(ao);
  auto* engine = d.engine.get();
  for (const auto& topic : engine->listened_topics()) {
    // Subscriptions are prefix matches; the engine wants the exact topic.
    (void)d.agent->subscribe(topic, [engine, topic](const agent::message& m) {
      if (m.topic() == topic) engine->on_event(m);
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
          auto r = engine->request(m.action(), *args, budget, detail::origin{m.id(), m.trace_id()});
          if (!r) return r.err();
          return agent::to_json_payload(*r);
        });
    d.agent->set_capacity(d.opts.service, d.opts.capacity);
  }
  if (auto s = d.agent->start(); !s) return s;
  d.engine->run(*d.agent);
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

stats orchestrator::counters() const {
  return impl_->engine->counters();
}
const options& orchestrator::config() const {
  return impl_->opts;
}

}  // namespace ensemble::orchestrator
