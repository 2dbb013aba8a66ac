// The orchestrator's store under damage and a full disk, with real ensemble-orchestrator
// processes driven through a real broker:
// - a store file with garbage in its middle, or a row that does not decode, is refused at
//   start with exit code 3 and a message naming the file and the damage;
// - a full store (a size limit: SQLite's own SQLITE_FULL, no privileges needed) answers reads,
//   answers writes promptly with storage_full, never commits a start it refused, and commits
//   the state changes of the instances it had accepted once space returns.
#include <signal.h>
#include <sqlite3.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>

#include "ensemble/testkit/workflow_client.hpp"
#include "support/orchestrator_fixture.hpp"

namespace ensemble::test {
namespace {

using orchestrator_store_test = orchestrator_fixture;

constexpr int k_exit_store_damaged = 3;

std::unique_ptr<tk::process> spawn_orchestrator(const tk::broker_process& broker,
                                                const std::string& workflows,
                                                const std::string& store,
                                                std::vector<std::string> extra = {}) {
  tk::process_options o;
  o.program = tk::binary_path("ensemble-orchestrator");
  o.args = {"--broker", broker.router(), "--events", broker.events(), "--workflows",
            workflows,  "--store",       store,      "--log-level",   "info"};
  o.args.insert(o.args.end(), extra.begin(), extra.end());
  o.name = "orchestrator";
  return tk::process::spawn(std::move(o));
}

std::unique_ptr<tk::process> run_orchestrator(const tk::broker_process& broker,
                                              const std::string& workflows,
                                              const std::string& store,
                                              std::vector<std::string> extra = {}) {
  auto p = spawn_orchestrator(broker, workflows, store, std::move(extra));
  if (!p->wait_for_line("ensemble-orchestrator ready", 10s)) {
    throw std::runtime_error("orchestrator not ready:\n" + p->tail());
  }
  return p;
}

// SIGTERM and a clean exit: the last connection checkpoints the WAL into the file.
void stop_cleanly(tk::process& p) {
  p.signal(SIGTERM);
  ASSERT_EQ(p.wait_exit(10s), 0) << p.tail();
}

// SQL on the store file from another connection, as an operator's sqlite3 shell would.
void raw_sql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  char* message = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &message);
  const std::string text = message != nullptr ? message : "";
  sqlite3_free(message);
  sqlite3_close(db);
  ASSERT_EQ(rc, SQLITE_OK) << sql << ": " << text;
}

std::int64_t query_int(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) return -1;
  sqlite3_busy_timeout(db, 5000);
  sqlite3_stmt* st = nullptr;
  std::int64_t out = -1;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    out = sqlite3_column_int64(st, 0);
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

// The line of the process's output that contains `text`, or "" once its output has ended
// without one (the output is read on a thread of its own: it may still be arriving after the
// process has exited).
std::string line_with(tk::process& p, const std::string& text) {
  return p.wait_for_line(text, 10s).value_or("");
}

json sleeper_workflow() {
  return json::parse(R"({"workflow": {"name": "Sleeper", "steps": [
    {"name": "Nap", "kind": "wait", "duration": "1h"}]}})");
}

// The scenario of the bug report: 300 instances, the orchestrator stopped, 8 KiB of garbage
// written into the middle of its file. It used to start without a word, with instances gone.
TEST_F(orchestrator_store_test, a_store_with_garbage_in_its_middle_is_refused_at_start) {
  const auto workflows = write("sleeper.json", sleeper_workflow());
  const auto store = dir_ + "/damaged.db";
  auto orch = run_orchestrator(*broker_, workflows, store);
  tk::workflow_client wf(broker_->router(), broker_->events());
  for (int i = 0; i < 300; ++i) {
    auto r = wf.start("Sleeper", {{"n", i}, {"padding", std::string(500, 'p')}});
    ASSERT_TRUE(r) << r.err().to_string();
  }
  stop_cleanly(*orch);
  ASSERT_FALSE(std::filesystem::exists(store + "-wal"));
  const auto size = std::filesystem::file_size(store);
  ASSERT_GE(size, 64u * 1024u);
  {
    std::fstream f(store, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2 / 4096 * 4096));
    std::uint32_t x = 2463534242u;  // xorshift: garbage, the same every run
    for (int i = 0; i < 8192; ++i) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      f.put(static_cast<char>(x & 0xff));
    }
  }

  auto refused = spawn_orchestrator(*broker_, workflows, store);
  ASSERT_EQ(refused->wait_exit(20s), k_exit_store_damaged) << refused->tail();
  const std::string why = line_with(*refused, "the store is damaged");
  EXPECT_NE(why.find(store), std::string::npos) << refused->tail();
  EXPECT_NE(why.find("backup"), std::string::npos) << refused->tail();
  EXPECT_TRUE(line_with(*refused, "ensemble-orchestrator ready").empty()) << refused->tail();

  // The full check refuses it too.
  auto full = spawn_orchestrator(*broker_, workflows, store, {"--store-check", "full"});
  EXPECT_EQ(full->wait_exit(20s), k_exit_store_damaged) << full->tail();
}

// A row whose state does not decode stops the start-up with an error naming the instance,
// instead of an instance resumed without its state (or silently left out).
TEST_F(orchestrator_store_test, an_instance_whose_state_does_not_decode_is_named_at_start) {
  const auto workflows = write("sleeper.json", sleeper_workflow());
  const auto store = dir_ + "/bad-row.db";
  auto orch = run_orchestrator(*broker_, workflows, store);
  tk::workflow_client wf(broker_->router(), broker_->events());
  for (const auto* id : {"nap-1", "nap-2", "nap-3"}) {
    auto r = wf.start("Sleeper", json::object(), id);
    ASSERT_TRUE(r) << r.err().to_string();
  }
  stop_cleanly(*orch);
  raw_sql(store, "UPDATE instances SET state = '{\"steps\": ' WHERE id = 'nap-2'");

  auto refused = spawn_orchestrator(*broker_, workflows, store);
  ASSERT_EQ(refused->wait_exit(20s), k_exit_store_damaged) << refused->tail();
  const std::string why = line_with(*refused, "does not decode");
  EXPECT_NE(why.find("instance 'nap-2'"), std::string::npos) << refused->tail();
  EXPECT_NE(why.find(store), std::string::npos) << refused->tail();
}

// The bug report's full disk: starts and gets timed out while the engine retried the commit
// in a loop, and the starts the clients were told had failed were committed once space came
// back. Here the disk is a size limit (--store-max-size: SQLite answers SQLITE_FULL exactly as
// on a full disk) and space comes back when another connection deletes a padding table.
TEST_F(orchestrator_store_test, a_full_store_refuses_new_work_and_keeps_what_it_accepted) {
  // Work instances run one command each; the service answers at once, so that instances
  // accepted before the store filled have state changes (completion) to commit while it is
  // full.
  add_agent("work", [](ea::agent& a) {
    a.handle("WorkService", "do", [](const ea::message&) -> ea::handler_result {
      return ea::to_json_payload({{"done", true}});
    });
    a.set_capacity("WorkService", 16);
  });
  const auto workflows = write("work.json", json::parse(R"({"workflow": {"name": "Work",
    "steps": [{"name": "Do", "service": "WorkService", "action": "do"}]}})"));
  const auto store = dir_ + "/full.db";
  // Create the store, then pad it: the padding is the space that "returns" later.
  stop_cleanly(*run_orchestrator(*broker_, workflows, store));
  raw_sql(store, "CREATE TABLE padding(b BLOB); INSERT INTO padding VALUES (zeroblob(512 * 1024))");
  const auto limit = static_cast<std::int64_t>(std::filesystem::file_size(store)) + 24 * 4096;
  auto orch =
      run_orchestrator(*broker_, workflows, store, {"--store-max-size", std::to_string(limit)});

  auto& client = add_agent("client", [](ea::agent&) {});
  auto call = [&](const std::string& action, const json& args) -> common::result<json> {
    auto r = client.call("orchestrator", action, ea::to_json_payload(args), 5s);
    if (!r) return r.err();
    return ea::from_json_payload(r->payload());
  };
  std::vector<std::string> accepted;
  std::vector<std::string> refused;
  for (int i = 0; i < 2000 && refused.empty(); ++i) {  // bounded: full after a few dozen
    const std::string id = "w-" + std::to_string(i);
    auto r = call("start",
                  {{"workflow", "Work"}, {"id", id}, {"input", {{"pad", std::string(1500, 'x')}}}});
    if (r) {
      accepted.push_back(id);
    } else {
      ASSERT_EQ(r.err().code, "storage_full") << r.err().to_string() << "\n" << orch->tail();
      EXPECT_TRUE(r.err().retryable);
      refused.push_back(id);
    }
  }
  ASSERT_FALSE(refused.empty()) << "the store never filled";
  ASSERT_FALSE(accepted.empty());

  // While full: reads answer, new work is refused at once.
  for (int i = 0; i < 5; ++i) {
    // Inputs that need new pages whatever room is left in the existing ones.
    const std::string id = "w-more-" + std::to_string(i);
    auto r = call(
        "start", {{"workflow", "Work"}, {"id", id}, {"input", {{"pad", std::string(16384, 'y')}}}});
    ASSERT_FALSE(r) << "started " << id << " on a full store";
    EXPECT_EQ(r.err().code, "storage_full") << r.err().to_string();
    refused.push_back(id);
  }
  auto got = call("get", {{"id", accepted.back()}});
  ASSERT_TRUE(got) << got.err().to_string() << "\n" << orch->tail();
  EXPECT_EQ(got->at("id"), accepted.back());
  auto listed = call("list", {{"limit", 10000}});
  ASSERT_TRUE(listed) << listed.err().to_string();
  auto missing = call("get", {{"id", refused.front()}});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.err().code, "not_found") << missing.err().to_string();

  // Space returns.
  raw_sql(store, "DELETE FROM padding");
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto r = call("start", {{"workflow", "Work"}, {"id", "w-after"}});
        return r.ok();
      },
      20s, 50ms))
      << orch->tail();
  accepted.push_back("w-after");

  // Every accepted instance completes; no refused one ever exists.
  for (const auto& id : accepted) {
    json last;
    const bool done = tk::wait_until(
        [&] {
          auto r = call("get", {{"id", id}});
          if (!r) return false;
          last = *r;
          return last.value("status", "") == "completed";
        },
        20s, 10ms);
    EXPECT_TRUE(done) << id << ": " << last.dump() << "\n" << orch->tail();
  }
  for (const auto& id : refused) {
    auto r = call("get", {{"id", id}});
    ASSERT_FALSE(r) << "refused start " << id << " exists: " << r->dump();
    EXPECT_EQ(r.err().code, "not_found") << r.err().to_string();
  }
  stop_cleanly(*orch);
  // And on disk: exactly the accepted instances, all completed.
  EXPECT_EQ(query_int(store, "SELECT count(*) FROM instances"),
            static_cast<std::int64_t>(accepted.size()));
  EXPECT_EQ(query_int(store, "SELECT count(*) FROM instances WHERE status = 'completed'"),
            static_cast<std::int64_t>(accepted.size()));
  std::printf("accepted=%zu refused=%zu (limit %lld bytes)\n", accepted.size(), refused.size(),
              static_cast<long long>(limit));
}

// The same with nothing pending once the store filled (instances that only wait): there is no
// accepted change whose commit can tell that space returned, so the next start is the probe.
TEST_F(orchestrator_store_test, a_full_store_with_nothing_pending_accepts_work_once_space_returns) {
  const auto workflows = write("sleeper.json", sleeper_workflow());
  const auto store = dir_ + "/idle.db";
  stop_cleanly(*run_orchestrator(*broker_, workflows, store));
  raw_sql(store, "CREATE TABLE padding(b BLOB); INSERT INTO padding VALUES (zeroblob(512 * 1024))");
  const auto limit = static_cast<std::int64_t>(std::filesystem::file_size(store)) + 24 * 4096;
  auto orch =
      run_orchestrator(*broker_, workflows, store, {"--store-max-size", std::to_string(limit)});
  auto& client = add_agent("client", [](ea::agent&) {});
  // Straight to the service: no retry of storage_full (it is retryable).
  auto call = [&](const json& args) -> common::result<json> {
    auto r = client.call("orchestrator", "start", ea::to_json_payload(args), 5s);
    if (!r) return r.err();
    return ea::from_json_payload(r->payload());
  };
  std::vector<std::string> accepted;
  std::string refused;
  for (int i = 0; i < 2000 && refused.empty(); ++i) {  // bounded: full after a few dozen
    const std::string id = "s-" + std::to_string(i);
    auto r =
        call({{"workflow", "Sleeper"}, {"id", id}, {"input", {{"pad", std::string(1500, 'x')}}}});
    if (r) {
      accepted.push_back(id);
    } else {
      ASSERT_EQ(r.err().code, "storage_full") << r.err().to_string() << "\n" << orch->tail();
      refused = id;
    }
  }
  ASSERT_FALSE(refused.empty()) << "the store never filled";
  raw_sql(store, "DELETE FROM padding");
  ASSERT_TRUE(tk::wait_until(
      [&] {
        return call({{"workflow", "Sleeper"}, {"id", "s-after"}}).ok();
      },
      20s, 50ms))
      << orch->tail();
  stop_cleanly(*orch);
  EXPECT_EQ(query_int(store, "SELECT count(*) FROM instances"),
            static_cast<std::int64_t>(accepted.size()) + 1);
  EXPECT_EQ(query_int(store, "SELECT count(*) FROM instances WHERE id = '" + refused + "'"), 0);
}

}  // namespace
}  // namespace ensemble::test
