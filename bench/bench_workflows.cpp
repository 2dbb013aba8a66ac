// Workflow benchmark: completed workflows per second and end-to-end latency through a real
// ensemble-broker, a real ensemble-orchestrator and an agents process, next to a bare broker
// round trip measured in the same run (docs/benchmarks.md, "Workflows").
//
// Processes: ensemble-broker; ensemble-orchestrator (--store FILE with each --sync mode asked
// for, then :memory:); this binary
// with --role agents (OrderService, PaymentService, NotificationService, an Echo service for
// the bare round trip, and two choreography hops: fulfil.requested -> parcel.packed ->
// shipment.dispatched); and this process as the driver, which starts instances through the
// broker (`orchestrator.start`) and times each one until its `workflow.<name>.completed`
// event arrives.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/logging.hpp"
#include "harness.hpp"

namespace ea = ensemble::agent;
namespace eb = ensemble::bench;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const char* k_seed = R"({"workflow": {"name": "OrderProcessing", "steps": [
  {"name": "ValidateOrder", "service": "OrderService", "action": "validate"},
  {"name": "ChargePayment", "service": "PaymentService", "action": "charge"},
  {"name": "SendConfirmation", "service": "NotificationService", "action": "send"}]}})";

const char* k_mixed = R"({"workflow": {"name": "MixedOrder", "steps": [
  {"name": "ValidateOrder", "service": "OrderService", "action": "validate",
   "input": {"order": "${workflow.input.order}"}},
  {"name": "ChargePayment", "service": "PaymentService", "action": "charge",
   "input": {"order": "${workflow.input.order}"}},
  {"name": "Fulfil", "kind": "choreography",
   "start": {"topic": "fulfil.requested", "payload": {"order": "${workflow.input.order}"}},
   "until": ["shipment.dispatched"], "timeout": "30s"}]}})";

struct options {
  std::string role;
  std::string broker, events;
  int instances = 5000;
  int window = 500;
  int latency_runs = 1000;
  int rtt_calls = 2000;
  bool quick = false;
  std::string only;  // seed | mixed
  // The file store's --sync modes, each run in turn (so that they compare in one run).
  std::vector<std::string> syncs = {"normal"};
  bool cpu = false;  // print where the CPU went during each throughput run
};

// --- the agents process ----------------------------------------------------------------------

int role_agents(const options& o) {
  ea::options ao{.name = "bench-agents", .broker = o.broker, .events = o.events};
  ao.inline_handlers = true;  // echo-style handlers that never block
  ea::agent a(ao);
  const auto reply = ea::to_json_payload({{"ok", true}});
  for (const auto& [service, action] :
       std::vector<std::pair<std::string, std::string>>{{"OrderService", "validate"},
                                                        {"PaymentService", "charge"},
                                                        {"NotificationService", "send"},
                                                        {"Echo", "echo"}}) {
    a.handle(service, action, [reply](const ea::message&) -> ea::handler_result { return reply; });
    a.set_capacity(service, 1000);
  }
  // Two choreography hops, each published while handling the previous event (so they carry
  // the instance's correlation id automatically).
  (void)a.subscribe("fulfil.requested",
                    [&a](const ea::message& e) { (void)a.publish("parcel.packed", e.payload()); });
  (void)a.subscribe("parcel.packed", [&a](const ea::message& e) {
    (void)a.publish("shipment.dispatched", e.payload());
  });
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "agents: %s\n", s.err().to_string().c_str());
    return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);
  std::string line;
  while (std::getline(std::cin, line) && line != "quit") {
  }
  a.stop();
  return 0;
}

// --- the driver ------------------------------------------------------------------------------

// Starts instances through the broker and waits for their completion events.
class driver {
 public:
  driver(const std::string& broker, const std::string& events)
      : agent_(ea::options{.name = "bench-driver", .broker = broker, .events = events}) {
    (void)agent_.subscribe("workflow.", [this](const ea::message& m) {
      const auto now = eb::clock_type::now();
      const std::string& t = m.topic();
      if (t.ends_with(".started")) return;
      std::lock_guard lock(mutex_);
      auto it = started_.find(m.correlation_id());
      if (it == started_.end()) return;
      if (t.ends_with(".completed")) {
        latencies_ns_.push_back((now - it->second).count());
      } else {
        ++failed_;
      }
      started_.erase(it);
      ++ended_;
      last_end_ = now;
      changed_.notify_all();
    });
    if (auto s = agent_.start(); !s) throw std::runtime_error("driver: " + s.err().to_string());
  }

  struct result {
    double per_second = 0;
    double p50_us = 0, p99_us = 0;
    int failed = 0, lost = 0;
  };

  // `total` instances with at most `window` running at once.
  result run(const std::string& workflow, int total, int window) {
    {
      std::lock_guard lock(mutex_);
      latencies_ns_.clear();
      started_.clear();
      ended_ = 0;
      failed_ = 0;
    }
    const auto begin = eb::clock_type::now();
    int sent = 0;
    {
      std::lock_guard lock(mutex_);
      start_errors_ = 0;
    }
    for (; sent < total; ++sent) {
      {
        std::unique_lock lock(mutex_);
        if (!changed_.wait_for(lock, 30s, [&] { return sent - ended_ - start_errors_ < window; })) {
          break;  // nothing ended for 30 s: count the rest as lost
        }
      }
      const std::string id = "b" + std::to_string(run_++) + "-" + std::to_string(sent);
      {
        std::lock_guard lock(mutex_);
        started_[id] = eb::clock_type::now();
      }
      agent_.call_async(
          "orchestrator", "start",
          ea::to_json_payload({{"workflow", workflow}, {"id", id}, {"input", {{"order", sent}}}}),
          10s, [this, id](ea::call_result r) {
            if (r) return;
            std::fprintf(stderr, "start failed: %s\n", r.err().to_string().c_str());
            std::lock_guard lock(mutex_);
            started_.erase(id);
            ++start_errors_;
            changed_.notify_all();
          });
    }
    std::unique_lock lock(mutex_);
    changed_.wait_for(lock, 60s, [&] { return ended_ + start_errors_ >= sent; });
    result r;
    const double seconds = std::chrono::duration<double>(last_end_ - begin).count();
    r.per_second = seconds > 0 ? (ended_ - failed_) / seconds : 0;
    r.p50_us = eb::percentile_us(latencies_ns_, 50);
    r.p99_us = eb::percentile_us(latencies_ns_, 99);
    r.failed = failed_ + start_errors_;
    r.lost = total - ended_ - start_errors_;
    return r;
  }

  // Bare broker round trips to the Echo service, 1 in flight.
  std::pair<double, double> rtt(int calls) {
    std::vector<std::int64_t> ns;
    const auto payload = ea::to_json_payload({{"order", 1}});
    for (int i = 0; i < calls + 200; ++i) {
      const auto t0 = eb::clock_type::now();
      auto r = agent_.call("Echo", "echo", payload, 5s);
      if (!r) throw std::runtime_error("echo: " + r.err().to_string());
      if (i >= 200) ns.push_back((eb::clock_type::now() - t0).count());
    }
    return {eb::percentile_us(ns, 50), eb::percentile_us(ns, 99)};
  }

 private:
  ea::agent agent_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::unordered_map<std::string, eb::clock_type::time_point> started_;
  std::vector<std::int64_t> latencies_ns_;
  int ended_ = 0;
  int failed_ = 0;
  int start_errors_ = 0;
  int run_ = 0;
  eb::clock_type::time_point last_end_{};
};

// CPU of every process of the deployment (and of the machine) over one throughput run, by
// thread: what each completed workflow costs, in µs of CPU, and where. The threads of a process
// that share a name (the SDK's pool) are summed.
class cpu_per_workflow {
 public:
  explicit cpu_per_workflow(std::vector<std::pair<std::string, pid_t>> procs)
      : procs_(std::move(procs)) {
    before_ = take();
  }
  // One line per process: "  orchestrator 412 us/wf: orch-engine 250, ZMQbg/IO/0 80, ...".
  void print(const std::string& title, double completed) const {
    const snapshot after = take();
    if (completed <= 0) return;
    std::printf("  %s, CPU per completed workflow (us) during the throughput run:\n",
                title.c_str());
    double ours = 0;
    for (std::size_t i = 0; i < procs_.size(); ++i) {
      std::map<std::string, double> by_name;
      for (const auto& [tid, t] : after.threads[i]) {
        auto b = before_.threads[i].find(tid);
        by_name[t.comm] += t.seconds - (b == before_.threads[i].end() ? 0 : b->second.seconds);
      }
      std::vector<std::pair<double, std::string>> sorted;
      for (const auto& [name, sec] : by_name) sorted.emplace_back(sec, name);
      std::sort(sorted.rbegin(), sorted.rend());
      const double total = after.totals[i] - before_.totals[i];
      ours += total;
      std::printf("    cpu %-12s %6.0f us/wf:", procs_[i].first.c_str(), total * 1e6 / completed);
      for (const auto& [sec, name] : sorted) {
        if (sec * 1e6 / completed < 1) break;
        std::printf(" %s %.0f", name.c_str(), sec * 1e6 / completed);
      }
      std::printf("\n");
    }
    const double wall = std::chrono::duration<double>(after.at - before_.at).count();
    const double busy = after.machine.busy - before_.machine.busy;
    std::printf(
        "    cpu deployment %.0f us/wf; machine busy %.2f of 2 cores over %.2f s, others %.2f "
        "cores, steal %.2f\n",
        ours * 1e6 / completed, wall > 0 ? busy / wall : 0, wall,
        wall > 0 ? std::max(0.0, busy - ours) / wall : 0,
        wall > 0 ? (after.machine.steal - before_.machine.steal) / wall : 0);
  }

 private:
  struct snapshot {
    eb::clock_type::time_point at;
    eb::machine_cpu machine;
    std::vector<std::map<std::string, eb::thread_cpu>> threads;
    std::vector<double> totals;
  };
  snapshot take() const {
    snapshot s;
    s.at = eb::clock_type::now();
    s.machine = eb::machine_cpu_seconds();
    for (const auto& [label, pid] : procs_) {
      s.threads.push_back(eb::threads_cpu_seconds(pid));
      s.totals.push_back(eb::process_cpu_seconds(pid));
    }
    return s;
  }
  std::vector<std::pair<std::string, pid_t>> procs_;
  snapshot before_;
};

int run_all(const options& o) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("ensemble-bench-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "seed.json") << k_seed;
  std::ofstream(dir / "mixed.json") << k_mixed;

  auto broker = eb::child::spawn("broker", eb::sibling_exe("ensemble-broker"),
                                 {"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*",
                                  "--log-level", "warn", "--event-hwm", "1000000"});
  const auto ready = broker->expect("ensemble-broker ready", 10s);
  const auto fields = eb::parse_fields(ready);
  const std::string router = fields.at("router"), events = fields.at("events");
  auto agents = eb::child::spawn("agents", eb::self_exe(),
                                 {"--role", "agents", "--broker", router, "--events", events});
  agents->expect("ready", 10s);
  driver d(router, events);

  const auto [rtt_p50, rtt_p99] = d.rtt(o.rtt_calls);
  std::printf(
      "bare broker round trip (driver -> broker -> agent), 1 in flight: p50 %.0f us, "
      "p99 %.0f us\n\n",
      rtt_p50, rtt_p99);
  std::printf("%-16s %-12s %12s %10s %10s %8s %6s | %10s %10s %14s\n", "workflow", "store",
              "done/s", "p50 us", "p99 us", "failed", "lost", "1-fl p50", "1-fl p99",
              "ovh/step(xRTT)");

  // (store, --sync): the file store once per sync mode, each on a fresh file, then memory.
  std::vector<std::pair<std::string, std::string>> stores;
  for (const auto& sync : o.syncs) stores.emplace_back("file", sync);
  stores.emplace_back("memory", "normal");
  int not_done = 0;  // failed or lost workflows over every run
  for (const auto& [store_kind, sync] : stores) {
    const std::string store = store_kind == "file" ? "file/" + sync : store_kind;
    const std::string store_path =
        store_kind == "file"
            ? (dir / ("state-" + std::to_string(::getpid()) + "-" + sync + ".db")).string()
            : ":memory:";
    auto orch = eb::child::spawn(
        "orchestrator", eb::sibling_exe("ensemble-orchestrator"),
        {"--broker", router, "--events", events, "--store", store_path, "--sync", sync,
         "--workflows", dir.string(), "--log-level", "warn", "--capacity", "64"});
    orch->expect("ensemble-orchestrator ready", 10s);
    for (const auto& [workflow, steps] :
         std::vector<std::pair<std::string, int>>{{"OrderProcessing", 3}, {"MixedOrder", 3}}) {
      if (!o.only.empty() && ((o.only == "seed") != (workflow == "OrderProcessing"))) continue;
      (void)d.run(workflow, std::min(o.instances, 500), o.window);  // warm-up
      std::optional<cpu_per_workflow> cpu;
      if (o.cpu) {
        cpu.emplace(std::vector<std::pair<std::string, pid_t>>{{"broker", broker->pid()},
                                                               {"orchestrator", orch->pid()},
                                                               {"agents", agents->pid()},
                                                               {"driver", ::getpid()}});
      }
      const auto thr = d.run(workflow, o.instances, o.window);
      if (cpu) cpu->print(workflow + " " + store, o.instances - thr.failed - thr.lost);
      const auto lat = d.run(workflow, o.latency_runs, 1);
      // One instance at 1 in flight costs: the start call, `steps` hops, the lifecycle event.
      // Its overhead per step, beyond what the same number of bare round trips would cost:
      const double overhead = (lat.p50_us - (steps + 1) * rtt_p50) / steps;
      std::printf("%-16s %-12s %12.0f %10.0f %10.0f %8d %6d | %10.0f %10.0f %8.0f (%.2fx)\n",
                  workflow.c_str(), store.c_str(), thr.per_second, thr.p50_us, thr.p99_us,
                  thr.failed + lat.failed, thr.lost + lat.lost, lat.p50_us, lat.p99_us, overhead,
                  overhead / rtt_p50);
      std::fflush(stdout);
      not_done += thr.failed + lat.failed + thr.lost + lat.lost;
    }
    orch->finish(SIGTERM, 10s);
  }
  agents->finish(0, 5s);
  broker->finish(SIGTERM, 10s);
  std::filesystem::remove_all(dir);
  if (not_done != 0) {
    std::printf(
        "FAILED: %d workflow(s) failed or were lost (the failed/lost columns above); figures "
        "from those runs are not results\n",
        not_done);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"bench_workflows: workflows/s and latency vs. a bare broker round trip"};
  app.add_option("--instances", o.instances, "instances per throughput run")->capture_default_str();
  app.add_option("--window", o.window, "instances running at once")->capture_default_str();
  app.add_option("--latency-runs", o.latency_runs, "instances run one at a time")
      ->capture_default_str();
  app.add_option("--rtt-calls", o.rtt_calls, "bare round trips")->capture_default_str();
  app.add_flag("--quick", o.quick, "small counts, for a smoke run");
  app.add_flag("--cpu", o.cpu,
               "after each throughput run, the CPU each completed workflow cost (us), per "
               "process and thread");
  app.add_option("--only", o.only, "seed | mixed")->check(CLI::IsMember({"seed", "mixed"}));
  app.add_option("--sync", o.syncs,
                 "the file store's --sync modes to run, in turn: normal, full or normal,full")
      ->delimiter(',')
      ->check(CLI::IsMember({"normal", "full"}))
      ->capture_default_str();
  auto* internal = "internal";
  app.add_option("--role", o.role)->group(internal);
  app.add_option("--broker", o.broker)->group(internal);
  app.add_option("--events", o.events)->group(internal);
  CLI11_PARSE(app, argc, argv);
  ensemble::common::set_log_level("warn");
  try {
    if (o.role == "agents") return role_agents(o);
    if (o.quick) {
      o.instances = 500;
      o.latency_runs = 100;
      o.rtt_calls = 200;
    }
    return run_all(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_workflows: %s\n", e.what());
    return 1;
  }
}
