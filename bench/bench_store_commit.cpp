// What the workflow store's commit() costs per completed workflow, without the rest of the
// deployment: the store alone, fed batches shaped like the engine's during bench_workflows
// (docs/benchmarks.md, "Workflows"). Each 3-step OrderProcessing instance is upserted 5 times
// over its life (started and calling its first step; each step done and the next calling; done;
// its lifecycle events acknowledged) with 8 history entries, and a batch carries `--group`
// instances at each of those 5 stages, so 5 x group upserts and 8 x group history rows. The
// state documents are built before the clock starts: the engine has them already.
//
//   bench_store_commit [--workflows 20000] [--group 40] [--store file|memory] [--sync normal]
//                      [--shape engine|changed-steps|no-ack|no-history|changed-step]
//                      [--output-bytes 0]
//
// --shape changed-steps commits the same records with instance_record::changed_steps naming
// the steps each stage changed (stage 0: the first step; 1: the first and second; 2: the second
// and third; 3: the third; 4: none), so that the store rewrites only those steps' rows. The
// other shapes write what a change in the engine would have the store write instead, to say
// what that change would save before anyone makes it. --output-bytes N gives each step's output
// a string of N bytes (0: `{"ok": true}`), for workflows whose steps return real data.
//
// Prints CPU µs per workflow of the committing thread and of the whole process (which includes
// the background checkpoint), and commits/s; then the thread's CPU µs per instance of reading
// them all back with one list() (the state documents put back together).
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>
#include <vector>

#include "ensemble/orchestrator/store.hpp"

namespace eo = ensemble::orchestrator;
using json = nlohmann::json;

namespace {

constexpr int k_stages = 5;
const char* const k_steps[] = {"ValidateOrder", "ChargePayment", "SendConfirmation"};

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

double process_cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  const auto secs = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return secs(u.ru_utime) + secs(u.ru_stime);
}

// The instance's record at `stage` (0: started, step 1 calling; 1, 2: step `stage` done, the
// next one calling; 3: completed, lifecycle event in the outbox; 4: acknowledged, inactive),
// with the state document the engine keeps at that point.
// Each step's output (--output-bytes).
json g_output = {{"ok", true}};

eo::instance_record make_record(int n, int stage) {
  const std::string id = "b0-" + std::to_string(n);
  eo::instance_record r;
  r.id = id;
  r.workflow = "OrderProcessing";
  r.started_by = "bench-driver";
  r.created_us = 1'700'000'000'000'000 + n;
  r.updated_us = r.created_us + 1000 * stage;
  r.status = stage >= 3 ? eo::instance_status::completed : eo::instance_status::running;
  r.active = stage < 4;
  json steps = json::object();
  json run_steps = json::object();
  json completed = json::array();
  for (int s = 0; s < 3 && s <= stage; ++s) {
    const bool done = s < stage;
    json st = {{"status", done ? "completed" : "running"},
               {"attempts", 1},
               {"started_us", r.created_us + 1000 * s}};
    if (done) {
      st["output"] = g_output;
      st["worker"] = "bench-agents";
      st["ended_us"] = r.created_us + 1000 * (s + 1);
      completed.push_back(k_steps[s]);
    }
    steps[k_steps[s]] = std::move(st);
    run_steps[k_steps[s]] = {{"phase", done ? "done" : "calling"},
                             {"request_id", "01JQ7ZK3M" + std::to_string(n * 3 + s)},
                             {"key", id + "/" + k_steps[s] + "/1"},
                             {"deadline_us", r.created_us + 30'000'000}};
  }
  json outbox = json::object();
  if (stage == 0 || stage == 3) {
    const std::string event = stage == 0 ? "started" : "completed";
    outbox[id + "/" + event] = {{"topic", "workflow.OrderProcessing." + event},
                                {"payload",
                                 {{"instance_id", id},
                                  {"workflow", "OrderProcessing"},
                                  {"version", 1},
                                  {"status", stage == 0 ? "running" : "completed"}}},
                                {"kind", "lifecycle"}};
  }
  r.state = {{"workflow",
              {{"id", id}, {"name", "OrderProcessing"}, {"version", 1}, {"input", {{"order", n}}}}},
             {"steps", std::move(steps)},
             {"run",
              {{"trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"},
               {"cause", "01JQ7ZK3MREQ" + std::to_string(n)},
               {"history_seq", 2 + 2 * std::min(stage, 3)},
               {"completed", std::move(completed)},
               {"outbox", std::move(outbox)},
               {"steps", std::move(run_steps)}}}};
  if (stage >= 3) r.state["run"]["output"] = {{"ok", true}};
  return r;
}

// The history entries the instance gains at `stage`.
void add_history(std::vector<eo::history_entry>& out, const eo::instance_record& r, int stage) {
  auto add = [&](std::uint64_t seq, const char* kind, std::string step, json data) {
    out.push_back({r.id, seq, r.updated_us, kind, std::move(step), std::move(data)});
  };
  const json call = {{"attempt", 1}, {"service", "OrderService"}, {"action", "validate"}};
  switch (stage) {
    case 0:
      add(1, "started", "", {{"input", {{"order", 1}}}, {"parent", ""}});
      add(2, "step_started", k_steps[0], call);
      break;
    case 1:
    case 2:
      add(1 + 2 * stage, "step_completed", k_steps[stage - 1],
          {{"output", g_output}, {"worker", "bench-agents"}, {"attempt", 1}});
      add(2 + 2 * stage, "step_started", k_steps[stage], call);
      break;
    case 3:
      add(7, "step_completed", k_steps[2],
          {{"output", g_output}, {"worker", "bench-agents"}, {"attempt", 1}});
      add(8, "completed", "", {{"output", {{"ok", true}}}});
      break;
    default:
      break;
  }
}

}  // namespace

int main(int argc, char** argv) {
  int workflows = 20000;
  int group = 40;
  int output_bytes = 0;
  std::string store = "file";
  std::string sync = "normal";
  std::string shape = "engine";
  CLI::App app{"bench_store_commit: the workflow store's commit() per completed workflow"};
  app.add_option("--workflows", workflows, "instances taken through their life")
      ->capture_default_str();
  app.add_option("--group", group, "instances per stage in one batch")->capture_default_str();
  app.add_option("--store", store, "file | memory")->check(CLI::IsMember({"file", "memory"}));
  app.add_option("--sync", sync, "normal | full")->check(CLI::IsMember({"normal", "full"}));
  app.add_option("--output-bytes", output_bytes, "bytes of data in each step's output")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--shape", shape,
                 "engine (as the engine writes today: the whole state), changed-steps (the same, "
                 "naming the steps each upsert changed), or what an engine change would write: "
                 "no-ack (no upsert when the lifecycle events are acknowledged), no-history, "
                 "changed-step (each upsert's state holds only the step that changed)")
      ->check(CLI::IsMember({"engine", "changed-steps", "no-ack", "no-history", "changed-step"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (output_bytes > 0) g_output = {{"ok", true}, {"data", std::string(output_bytes, 'x')}};

  // Every batch, built up front: group g is at stage (batch - g).
  const int groups = (workflows + group - 1) / group;
  std::vector<eo::commit_batch> batches(static_cast<std::size_t>(groups + k_stages - 1));
  for (std::size_t b = 0; b < batches.size(); ++b) {
    for (int stage = 0; stage < k_stages; ++stage) {
      const int g = static_cast<int>(b) - stage;
      if (g < 0 || g >= groups) continue;
      if (shape == "no-ack" && stage == k_stages - 1) continue;
      for (int n = g * group; n < std::min(workflows, (g + 1) * group); ++n) {
        batches[b].instances.push_back(make_record(n, stage));
        auto& r = batches[b].instances.back();
        if (shape != "no-history") add_history(batches[b].history, r, stage);
        if (shape == "changed-steps") {
          // What each stage changes: the step that completed and the one now calling.
          std::vector<std::string> changed;
          if (stage < 3) changed.push_back(k_steps[stage]);
          if (stage >= 1 && stage <= 3) changed.insert(changed.begin(), k_steps[stage - 1]);
          r.changed_steps = std::move(changed);
        }
        if (shape == "changed-step") {
          // The step this stage changed, with the run's bookkeeping for it.
          const char* step = k_steps[std::min(stage, 2)];
          json steps = json::object();
          json run_steps = json::object();
          if (r.state["steps"].contains(step)) steps[step] = r.state["steps"][step];
          if (r.state["run"]["steps"].contains(step)) {
            run_steps[step] = r.state["run"]["steps"][step];
          }
          r.state = {{"steps", std::move(steps)},
                     {"run",
                      {{"history_seq", r.state["run"]["history_seq"]},
                       {"outbox", r.state["run"]["outbox"]},
                       {"steps", std::move(run_steps)}}}};
        }
      }
    }
  }

  const std::string path = store == "memory"
                               ? ":memory:"
                               : (std::filesystem::temp_directory_path() /
                                  ("ensemble-store-commit-" + std::to_string(::getpid()) + ".db"))
                                     .string();
  double thread_s = 0, process_s = 0, wall_s = 0, read_s = 0;
  {
    auto s = eo::open_sqlite_store(
        path,
        {.check = eo::store_check::off, .sync = *eo::parse_store_sync(sync), .max_size_bytes = 0});
    const double t0 = thread_cpu_seconds();
    const double p0 = process_cpu_seconds();
    const auto w0 = std::chrono::steady_clock::now();
    for (const auto& b : batches) {
      if (auto st = s->commit(b); !st) {
        std::fprintf(stderr, "commit: %s\n", st.err().to_string().c_str());
        return 1;
      }
    }
    wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
    thread_s = thread_cpu_seconds() - t0;
    process_s = process_cpu_seconds() - p0;
    const double r0 = thread_cpu_seconds();
    eo::list_filter all;
    all.limit = static_cast<std::size_t>(workflows);
    auto listed = s->list(all);
    read_s = thread_cpu_seconds() - r0;
    if (!listed || listed->size() != static_cast<std::size_t>(workflows)) {
      std::fprintf(stderr, "list: %s\n",
                   listed ? "LOST instances" : listed.err().to_string().c_str());
      return 1;
    }
  }
  if (store == "file") {
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix);
  }
  std::printf(
      "store %-6s sync %-6s shape %-13s group %3d: %6.1f us CPU/workflow in commit() (thread), "
      "%6.1f "
      "(process, with checkpoints), %7.0f commits/s, %6.0f workflows/s; list %5.1f us/instance\n",
      store.c_str(), sync.c_str(), shape.c_str(), group, thread_s * 1e6 / workflows,
      process_s * 1e6 / workflows, static_cast<double>(batches.size()) / wall_s, workflows / wall_s,
      read_s * 1e6 / workflows);
  return 0;
}
