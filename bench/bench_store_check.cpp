// How long the orchestrator's start-up integrity check takes (--store-check quick|full), on a
// store of N instances shaped like the engine's (three command steps, completed, with their
// history). Prints one line per check; docs/workflows.md, "The store", quotes the numbers.
//
//   bench_store_check [instances=10000] [dir=/tmp]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "ensemble/orchestrator/store.hpp"

namespace eo = ensemble::orchestrator;
using json = nlohmann::json;

namespace {

eo::instance_record make_instance(int n) {
  const std::string id = "01J" + std::to_string(1'000'000 + n) + "XQ7ZK3M";
  eo::instance_record r;
  r.id = id;
  r.workflow = "OrderProcessing";
  r.status = eo::instance_status::completed;
  r.created_us = 1'700'000'000'000'000 + n;
  r.updated_us = r.created_us + 5000;
  r.active = false;
  json steps = json::object();
  json run_steps = json::object();
  for (const char* name : {"ValidateOrder", "ChargePayment", "SendConfirmation"}) {
    steps[name] = {{"status", "completed"},
                   {"attempts", 1},
                   {"output", {{"ok", true}, {"ref", id + "/" + name}}},
                   {"worker", "worker-1"},
                   {"started_us", r.created_us},
                   {"ended_us", r.updated_us}};
    run_steps[name] = {{"phase", "done"}, {"request_id", id + "-" + name}, {"key", id + "/1"}};
  }
  r.state = {{"workflow",
              {{"id", id},
               {"name", "OrderProcessing"},
               {"version", 1},
               {"input", {{"orderId", "o-" + std::to_string(n)}, {"amount", 42.5}}}}},
             {"steps", steps},
             {"run",
              {{"trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"},
               {"cause", id},
               {"history_seq", 8},
               {"completed", {"ValidateOrder", "ChargePayment", "SendConfirmation"}},
               {"outbox", json::object()},
               {"steps", run_steps},
               {"output", {{"ok", true}}}}}};
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::stoi(argv[1]) : 10'000;
  const std::string dir = argc > 2 ? argv[2] : "/tmp";
  const std::string path = dir + "/ensemble-store-check-" + std::to_string(::getpid()) + ".db";
  {
    auto s = eo::open_sqlite_store(path);
    for (int batch = 0; batch < n; batch += 200) {
      eo::commit_batch b;
      for (int i = batch; i < std::min(n, batch + 200); ++i) {
        b.instances.push_back(make_instance(i));
        const auto& r = b.instances.back();
        const char* kinds[] = {"started",        "step_started", "step_completed", "step_started",
                               "step_completed", "step_started", "step_completed", "completed"};
        for (std::uint64_t seq = 1; seq <= 8; ++seq) {
          b.history.push_back({r.id, seq, r.created_us + static_cast<std::int64_t>(seq),
                               kinds[seq - 1], seq == 1 || seq == 8 ? "" : "ChargePayment",
                               json{{"worker", "worker-1"}, {"attempt", 1}, {"key", r.id}}});
        }
      }
      if (auto st = s->commit(b); !st) {
        std::fprintf(stderr, "commit: %s\n", st.err().to_string().c_str());
        return 1;
      }
    }
  }
  const auto size = std::filesystem::file_size(path);
  std::printf("store: %d instances, %.1f MiB\n", n, static_cast<double>(size) / (1 << 20));
  for (auto check : {eo::store_check::off, eo::store_check::quick, eo::store_check::full}) {
    for (int run = 0; run < 3; ++run) {
      const auto start = std::chrono::steady_clock::now();
      auto s = eo::open_sqlite_store(path, {.check = check, .max_size_bytes = 0});
      const auto ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      std::printf("open with --store-check %-5s run %d: %8.1f ms\n",
                  std::string(eo::to_string(check)).c_str(), run + 1, ms);
    }
  }
  std::filesystem::remove(path);
  return 0;
}
