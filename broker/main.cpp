// ensemble-broker: parses options and runs ensemble::broker until SIGINT/SIGTERM; SIGHUP reads
// --auth again.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "ensemble/broker/broker.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/result.hpp"

namespace {
ensemble::broker::broker* g_broker = nullptr;
void on_signal(int) {
  if (g_broker != nullptr) g_broker->request_stop();
}
// Async-signal-safe: sets a flag and wakes the broker's loop, which reloads.
void on_hangup(int) {
  if (g_broker != nullptr) g_broker->request_reload();
}
}  // namespace

int main(int argc, char** argv) {
  ensemble::broker::config cfg;
  std::string log_level = "info";
  int heartbeat_ms = static_cast<int>(cfg.heartbeat.count());
  int grace_ms = static_cast<int>(cfg.shutdown_grace.count());

  CLI::App app{"ensemble-broker: carries commands (request/reply) and events (pub/sub)"};
  app.add_option("--router", cfg.router_endpoint, "ROUTER endpoint for all inbound traffic")
      ->capture_default_str();
  app.add_option("--events", cfg.events_endpoint, "XPUB endpoint events are fanned out on")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")
      ->capture_default_str();
  app.add_option("--heartbeat", heartbeat_ms, "heartbeat interval in ms")
      ->capture_default_str()
      ->check(CLI::Range(10, 600'000));
  app.add_option("--liveness", cfg.liveness, "missed heartbeats before a peer is lost")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  app.add_option("--max-message-size", cfg.max_message_size,
                 "largest accepted message (header + payload) in bytes; larger: too_large")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 30));
  app.add_option("--queue-per-service", cfg.queue_per_service,
                 "requests that may wait for a free worker, per service")
      ->capture_default_str();
  app.add_option("--queue-total", cfg.queue_total, "requests that may wait, in all")
      ->capture_default_str();
  app.add_option("--queue-bytes-per-service", cfg.queue_bytes_per_service,
                 "payload bytes (+256 per request) that may wait, per service; over: queue_full")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 40));
  app.add_option("--queue-bytes-total", cfg.queue_bytes_total,
                 "payload bytes (+256 per request) that may wait, in all; over: queue_full")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 40));
  app.add_option("--peer-budget-bytes", cfg.peer_budget_bytes,
                 "bytes of unanswered DISPATCHes the broker holds for one worker; over it the "
                 "worker gets no new requests")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 40));
  app.add_option("--peer-budget-messages", cfg.peer_budget_messages,
                 "unanswered DISPATCHes the broker holds for one worker")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{10'000'000}));
  app.add_option("--shutdown-grace", grace_ms, "ms in-flight requests get to finish on stop")
      ->capture_default_str()
      ->check(CLI::Range(0, 600'000));
  app.add_option("--event-hwm", cfg.event_hwm, "events queued per subscriber before dropping")
      ->capture_default_str()
      ->check(CLI::Range(1, 10'000'000));  // 0 would mean "no limit" to libzmq
  app.add_option("--topic-seq-max", cfg.topic_seq_max,
                 "topics whose per-topic seq the broker tracks; a topic idle while as many "
                 "others were published starts again at 1")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{2}, std::size_t{100'000'000}));
  app.add_option("--journal", cfg.journal_size,
                 "requests, replies and events kept for broker.trace (ensemble trace); 0: off")
      ->capture_default_str();
  app.add_option("--data", cfg.data_dir,
                 "directory durable streams are stored in; without it the broker has no streams");
  app.add_option("--streams", cfg.streams_file,
                 "YAML or JSON file declaring streams (name, topics, max_age, max_bytes, "
                 "max_events), created at start if missing; needs --data")
      ->check(CLI::ExistingFile);
  app.add_option("--max-consumers", cfg.max_consumers,
                 "durable consumers one stream may have; creating more: too_many")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1'000'000}));
  app.add_option("--max-consumer-members", cfg.max_consumer_members,
                 "members one durable consumer may have; more joining: too_many")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1'000'000}));
  std::string sync = "os";
  app.add_option("--sync", sync,
                 "when a stored publish is acked: os (written to the kernel: survives a killed "
                 "broker) or always (fdatasync'ed, once per poll batch: survives a power loss)")
      ->capture_default_str()
      ->check(CLI::IsMember({"os", "always"}));
  app.add_option("--curve-key", cfg.curve_secret_key_file,
                 "secured mode (docs/protocol.md section 12): the broker's secret key file "
                 "(ensemble keygen broker); needs --auth")
      ->check(CLI::ExistingFile);
  app.add_option("--auth", cfg.auth_file,
                 "secured mode: YAML or JSON file of identities (public keys) and their rights "
                 "(offer, call, call_own, publish, subscribe, consume, admin); needs --curve-key. "
                 "SIGHUP reads it again")
      ->check(CLI::ExistingFile);
  app.add_flag("--insecure", cfg.insecure,
               "plain mode (no keys) on an endpoint other machines can reach; without it plain "
               "mode binds only tcp://127.*, tcp://[::1], tcp://localhost, ipc:// and inproc://");
  CLI11_PARSE(app, argc, argv);
  cfg.stream_sync = sync == "always" ? ensemble::broker::streams::sync::always
                                     : ensemble::broker::streams::sync::os;

  try {
    ensemble::common::set_log_level(log_level);
    cfg.heartbeat = std::chrono::milliseconds(heartbeat_ms);
    cfg.shutdown_grace = std::chrono::milliseconds(grace_ms);
    ensemble::broker::broker b(cfg);
    g_broker = &b;
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    if (!cfg.auth_file.empty()) {
      // Only in secured mode: without --auth, SIGHUP keeps its default (a hangup stops it).
      struct sigaction hup {};
      hup.sa_handler = on_hangup;
      sigemptyset(&hup.sa_mask);
      sigaction(SIGHUP, &hup, nullptr);
    }
    // The one line launchers and tests wait for: the real endpoints, ephemeral ports resolved.
    std::printf("ensemble-broker ready router=%s events=%s\n", b.bound().router.c_str(),
                b.bound().events.c_str());
    std::fflush(stdout);
    b.run();
    g_broker = nullptr;
    return 0;
  } catch (const ensemble::common::config_error& e) {
    std::cerr << "ensemble-broker: " << e.what() << "\n";
    return 2;
  }
}
