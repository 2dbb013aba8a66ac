// Broker subcommands: services, events, publish, call; the stream commands (stream_commands.cpp).
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>

#include "client.hpp"
#include "ensemble/agent/json.hpp"
#include "stream_commands.hpp"

namespace ensemble::cli {

using namespace std::chrono_literals;

namespace {

int cmd_services(const context& ctx, bool as_json) {
  client c(ctx);
  if (auto s = c.start(); !s) return report("services", s.err());
  auto r = c.call("broker", "services", json::object(), 5s);
  if (!r) return report("services", r.err());
  if (as_json) {
    std::printf("%s\n", r->dump(2).c_str());
    return 0;
  }
  std::printf("%-28s %8s %9s %7s %9s  %s\n", "SERVICE", "CAPACITY", "IN FLIGHT", "QUEUED",
              "REQUESTS", "WORKERS");
  for (const auto& s : (*r)["services"]) {
    std::string workers;
    for (const auto& w : s.value("workers", json::array())) {
      workers += (workers.empty() ? "" : ", ") + w.value("agent", std::string()) + " (" +
                 std::to_string(w.value("in_flight", 0)) + "/" +
                 std::to_string(w.value("capacity", 0)) + ")";
    }
    std::printf("%-28s %8d %9d %7d %9lld  %s\n", s.value("service", "").c_str(),
                s.value("capacity", 0), s.value("in_flight", 0), s.value("queued", 0),
                static_cast<long long>(s.value("requests", 0LL)), workers.c_str());
  }
  return 0;
}

struct events_args {
  std::string prefix;
  int count = 0;
  std::string duration;
  std::string correlation;
  std::string stream;  // replay this stream's stored events instead (stream_commands.hpp)
  std::uint64_t from_seq = 0;
  std::string since;
};

int cmd_events(const context& ctx, const events_args& a) {
  if (!a.stream.empty()) {
    if (!a.duration.empty()) {
      throw CLI::ValidationError("--for", "a replay (--stream) ends at the stream's end");
    }
    return replay_stream(ctx, {.stream = a.stream,
                               .from_seq = a.from_seq,
                               .since = a.since,
                               .prefix = a.prefix,
                               .correlation = a.correlation,
                               .count = a.count});
  }
  if (a.from_seq > 0 || !a.since.empty()) {
    throw CLI::ValidationError(a.from_seq > 0 ? "--from" : "--since",
                               "replays a stream: give --stream NAME too");
  }
  // Ctrl-C is taken by exit_on_stop_signal() (app.cpp): it ends the command at once.
  const auto duration =
      a.duration.empty() ? std::chrono::milliseconds(0) : parse_duration_arg("--for", a.duration);
  client c(ctx);
  std::mutex m;
  std::condition_variable cv;
  int seen = 0;
  auto status = c.sdk().subscribe(a.prefix, [&](const agent::message& e) {
    if (!a.correlation.empty() && e.correlation_id() != a.correlation) return;
    auto payload = agent::from_json_payload(e.payload());
    json line = {{"topic", e.topic()},
                 {"id", e.id()},
                 {"seq", e.seq()},
                 {"ts", e.timestamp_us()},
                 {"publisher", e.publisher()},
                 {"correlation_id", e.correlation_id()},
                 {"causation_id", e.causation_id()},
                 {"payload", payload ? *payload : json(e.payload())}};
    std::lock_guard lock(m);
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
    ++seen;
    cv.notify_all();
  });
  (void)status;  // before start(): active once start() returns
  if (auto s = c.start(); !s) return report("events", s.err());
  std::fprintf(stderr, "ensemble: listening to '%s'%s on %s (Ctrl-C to stop)\n", a.prefix.c_str(),
               a.correlation.empty() ? "" : (" correlated to " + a.correlation).c_str(),
               ctx.events_endpoint().c_str());
  std::unique_lock lock(m);
  const auto until = duration.count() > 0 ? std::chrono::steady_clock::now() + duration
                                          : std::chrono::steady_clock::time_point::max();
  cv.wait_until(lock, until, [&] { return a.count > 0 && seen >= a.count; });
  return a.count > 0 && seen < a.count ? 1 : 0;
}

int cmd_publish(const context& ctx, const std::string& topic, const std::string& payload_text,
                const std::string& correlation, const std::string& id) {
  const json payload = parse_json_arg("payload", payload_text);
  client c(ctx);
  if (auto s = c.start(); !s) return report("publish", s.err());
  agent::send_options opts;
  opts.correlation_id = correlation;
  opts.id = id;
  auto r = c.sdk().publish_acked(topic, agent::to_json_payload(payload), 5s, opts);
  if (!r) return report("publish " + topic, r.err());
  std::printf("published %s id=%s seq=%llu\n", topic.c_str(), r->id.c_str(),
              static_cast<unsigned long long>(r->seq));
  return 0;
}

int cmd_call(const context& ctx, const std::string& service, const std::string& action,
             const std::string& payload_text, const std::string& timeout_text, bool retryable) {
  const json payload =
      payload_text.empty() ? json::object() : parse_json_arg("payload", payload_text);
  const auto timeout = parse_duration_arg("--timeout", timeout_text);
  client c(ctx);
  if (auto s = c.start(); !s) return report("call", s.err());
  auto r = c.call(service, action, payload, timeout, retryable);
  if (!r) return report(service + "." + action, r.err());
  std::printf("%s\n", r->dump(2).c_str());
  return 0;
}

}  // namespace

void add_broker_commands(CLI::App& app, context& ctx) {
  {
    auto* sub =
        app.add_subcommand("services", "services, workers, capacity, in flight, queue depth");
    auto as_json = std::make_shared<bool>(false);
    sub->add_flag("--json", *as_json, "the broker's JSON answer");
    sub->callback([&ctx, as_json] { ctx.exit_code = cmd_services(ctx, *as_json); });
  }
  {
    auto* sub = app.add_subcommand(
        "events",
        "tail events live, or replay a stream's stored ones (--stream), one JSON line each");
    auto a = std::make_shared<events_args>();
    sub->add_option("prefix", a->prefix, "topic prefix (all events if empty)");
    sub->add_option("--count", a->count, "exit after this many events (1 if fewer arrive)");
    sub->add_option("--for", a->duration, "exit after this long (e.g. 10s)");
    sub->add_option("--correlation", a->correlation,
                    "only events with this correlation id (a workflow instance, the first event "
                    "of a choreography)");
    sub->add_option("--stream", a->stream,
                    "replay the events stored in this durable stream (with stream_seq), then exit");
    auto* from = sub->add_option("--from", a->from_seq, "with --stream: from this stream_seq");
    sub->add_option("--since", a->since,
                    "with --stream: from the events stored this long ago (e.g. 10m)")
        ->excludes(from);
    sub->callback([&ctx, a] { ctx.exit_code = cmd_events(ctx, *a); });
  }
  {
    auto* sub = app.add_subcommand("publish", "publish an event (waits for the broker's ack)");
    struct args_t {
      std::string topic, payload, correlation, id;
    };
    auto a = std::make_shared<args_t>();
    sub->add_option("topic", a->topic, "dot-separated topic")->required();
    sub->add_option("payload", a->payload, "JSON payload, or @file")->required();
    sub->add_option("--correlation", a->correlation, "correlation id (e.g. an instance id)");
    sub->add_option("--id", a->id,
                    "the event's id (default: a fresh one); publishing the same id again lets "
                    "a trigger's at-most-once per event id be seen");
    sub->callback([&ctx, a] {
      ctx.exit_code = cmd_publish(ctx, a->topic, a->payload, a->correlation, a->id);
    });
  }
  {
    auto* sub =
        app.add_subcommand("call", "call SERVICE ACTION with a JSON payload, print the reply");
    struct args_t {
      std::string service, action, payload, timeout = "5s";
      bool retryable = false;
    };
    auto a = std::make_shared<args_t>();
    sub->add_option("service", a->service, "service name")->required();
    sub->add_option("action", a->action, "action name")->required();
    sub->add_option("payload", a->payload, "JSON payload, or @file (default {})");
    sub->add_option("--timeout", a->timeout, "deadline")->capture_default_str();
    sub->add_flag("--retryable", a->retryable,
                  "if the worker is lost while handling it, the broker re-dispatches the request "
                  "once to another worker instead of answering worker_lost");
    sub->callback([&ctx, a] {
      ctx.exit_code = cmd_call(ctx, a->service, a->action, a->payload, a->timeout, a->retryable);
    });
  }
  add_stream_commands(app, ctx);
}

}  // namespace ensemble::cli
