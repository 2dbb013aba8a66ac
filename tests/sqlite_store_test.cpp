// The SQLite workflow store against real files: what is committed survives closing the store
// and a SIGKILL of the process that wrote it, a failing batch leaves nothing behind, and the
// queries return what the engine expects (active rows, newest first, history in order).

#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/store.hpp"

namespace {

namespace fs = std::filesystem;
using ensemble::common::config_error;
using namespace ensemble::orchestrator;

class sqlite_store_test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = "/tmp/ensemble-store-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << "mkdtemp: " << std::strerror(errno);
    dir_ = pattern;
    path_ = (dir_ / "store.db").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::unique_ptr<store> open() { return open_sqlite_store(path_); }

  fs::path dir_;
  std::string path_;
};

instance_record make_instance(const std::string& id, std::int64_t created_us,
                              instance_status status = instance_status::running,
                              const std::string& workflow = "OrderProcessing") {
  instance_record r;
  r.id = id;
  r.workflow = workflow;
  r.version = 1;
  r.status = status;
  r.created_us = created_us;
  r.updated_us = created_us;
  r.active = !is_terminal(status);
  r.state = {{"step", 0}, {"id", id}};
  return r;
}

history_entry make_entry(const std::string& instance_id, std::uint64_t seq,
                         const std::string& kind = "step_completed") {
  history_entry h;
  h.instance_id = instance_id;
  h.seq = seq;
  h.ts_us = 1000 + static_cast<std::int64_t>(seq);
  h.kind = kind;
  h.step = "Step" + std::to_string(seq);
  h.data = {{"seq", seq}};
  return h;
}

buffered_event make_event(const std::string& id, std::int64_t received_us,
                          const std::string& payload = "p") {
  buffered_event b;
  b.id = id;
  b.topic = "payment.done";
  b.correlation_id = "wf-1";
  b.received_us = received_us;
  b.event = {{"id", id}, {"topic", "payment.done"}, {"payload", {{"v", payload}}}};
  return b;
}

// The value of a store read that must succeed.
template <class T>
T ok(ensemble::common::result<T> r) {
  if (!r) {
    ADD_FAILURE() << r.err().to_string();
    return T{};
  }
  return std::move(*r);
}

std::vector<std::string> ids_of(const std::vector<instance_record>& rs) {
  std::vector<std::string> out;
  for (const auto& r : rs) out.push_back(r.id);
  return out;
}

void commit_ok(store& s, const commit_batch& b) {
  auto st = s.commit(b);
  ASSERT_TRUE(st.ok()) << st.err().to_string();
}

// Runs SQL on the file directly, to build files the store must refuse.
void raw_sql(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  char* message = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &message);
  const std::string text = message != nullptr ? message : "";
  sqlite3_free(message);
  sqlite3_close(db);
  ASSERT_EQ(rc, SQLITE_OK) << text;
}

std::string open_error(const std::string& path) {
  try {
    open_sqlite_store(path);
  } catch (const config_error& e) {
    return e.what();
  }
  return "(no config_error)";
}

// The message of the store_damaged that opening `path` throws.
std::string damaged_error(const std::string& path, store_check check) {
  try {
    open_sqlite_store(path, {.check = check, .max_size_bytes = 0});
  } catch (const store_damaged& e) {
    return e.what();
  } catch (const config_error& e) {
    return std::string("(a config_error but not store_damaged) ") + e.what();
  }
  return "(no store_damaged)";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(instance_status_names, round_trip) {
  for (auto s :
       {instance_status::running, instance_status::compensating, instance_status::completed,
        instance_status::failed, instance_status::cancelled, instance_status::timed_out}) {
    EXPECT_EQ(parse_instance_status(to_string(s)), s);
  }
  EXPECT_EQ(to_string(instance_status::timed_out), "timed_out");
  EXPECT_EQ(parse_instance_status("Running"), std::nullopt);
  EXPECT_EQ(parse_instance_status(""), std::nullopt);
}

TEST_F(sqlite_store_test, everything_survives_close_and_reopen) {
  instance_record parent = make_instance("wf-1", 100);
  parent.version = 7;
  parent.state = {{"steps", {{"Charge", {{"attempt", 2}, {"output", {{"tx", "t-9"}}}}}}},
                  {"big", 9007199254740993ULL},
                  {"neg", -5},
                  {"ratio", 0.25},
                  {"text", "gr\xc3\xbc\xc3\x9f"},
                  {"list", {1, "two", nullptr, false}}};
  instance_record child = make_instance("wf-2", 200, instance_status::failed);
  child.parent_id = "wf-1";
  child.updated_us = 250;
  child.active = true;  // terminal, lifecycle event not yet acknowledged
  child.state = nullptr;

  commit_batch b;
  b.instances = {parent, child};
  b.history = {make_entry("wf-1", 1, "started"), make_entry("wf-1", 2), make_entry("wf-2", 1)};
  b.history[0].step.clear();
  b.history[0].data = nullptr;
  b.triggers = {{"OrderProcessing", "ev-1", "wf-1"}};
  b.buffer_add = {make_event("ev-7", 300), make_event("ev-8", 301)};
  {
    auto s = open();
    ASSERT_TRUE(s->save_definition("OrderProcessing", 7, {{"workflow", {{"name", "x"}}}}).ok());
    commit_ok(*s, b);
  }

  auto s = open();
  auto got = ok(s->get("wf-1"));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->workflow, "OrderProcessing");
  EXPECT_EQ(got->version, 7u);
  EXPECT_EQ(got->status, instance_status::running);
  EXPECT_EQ(got->parent_id, "");
  EXPECT_EQ(got->created_us, 100);
  EXPECT_EQ(got->updated_us, 100);
  EXPECT_TRUE(got->active);
  EXPECT_EQ(got->state, parent.state);
  EXPECT_EQ(got->state["big"].get<std::uint64_t>(), 9007199254740993ULL);

  auto got_child = ok(s->get("wf-2"));
  ASSERT_TRUE(got_child.has_value());
  EXPECT_EQ(got_child->status, instance_status::failed);
  EXPECT_EQ(got_child->parent_id, "wf-1");
  EXPECT_EQ(got_child->updated_us, 250);
  EXPECT_TRUE(got_child->active);
  EXPECT_TRUE(got_child->state.is_null());
  EXPECT_FALSE(ok(s->get("wf-3")).has_value());

  auto h = ok(s->history("wf-1"));
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0].instance_id, "wf-1");
  EXPECT_EQ(h[0].seq, 1u);
  EXPECT_EQ(h[0].ts_us, 1001);
  EXPECT_EQ(h[0].kind, "started");
  EXPECT_EQ(h[0].step, "");
  EXPECT_TRUE(h[0].data.is_null());
  EXPECT_EQ(h[1].kind, "step_completed");
  EXPECT_EQ(h[1].step, "Step2");
  EXPECT_EQ(h[1].data, (json{{"seq", 2}}));

  EXPECT_EQ(ok(s->triggered_by("OrderProcessing", "ev-1")), "wf-1");
  auto buffered = ok(s->load_buffer());
  ASSERT_EQ(buffered.size(), 2u);
  EXPECT_EQ(buffered[0].id, "ev-7");
  EXPECT_EQ(buffered[0].topic, "payment.done");
  EXPECT_EQ(buffered[0].correlation_id, "wf-1");
  EXPECT_EQ(buffered[0].received_us, 300);
  EXPECT_EQ(buffered[0].event, b.buffer_add[0].event);

  EXPECT_EQ(s->load_definition("OrderProcessing", 7), (json{{"workflow", {{"name", "x"}}}}));
  EXPECT_EQ(ids_of(ok(s->load_active())), (std::vector<std::string>{"wf-1", "wf-2"}));
}

TEST_F(sqlite_store_test, memory_store_works) {
  auto s = open_sqlite_store(":memory:");
  commit_batch b;
  b.instances = {make_instance("m-1", 1)};
  b.history = {make_entry("m-1", 1)};
  commit_ok(*s, b);
  ASSERT_TRUE(ok(s->get("m-1")).has_value());
  EXPECT_EQ(ok(s->history("m-1")).size(), 1u);
}

TEST_F(sqlite_store_test, upsert_replaces_the_record) {
  auto s = open();
  commit_batch first;
  first.instances = {make_instance("wf-1", 100), make_instance("wf-2", 200)};
  commit_ok(*s, first);

  instance_record done = make_instance("wf-1", 100, instance_status::completed);
  done.updated_us = 500;
  done.state = {{"output", "ok"}};
  commit_batch second;
  second.instances = {done};
  commit_ok(*s, second);

  auto got = ok(s->get("wf-1"));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->status, instance_status::completed);
  EXPECT_EQ(got->updated_us, 500);
  EXPECT_EQ(got->created_us, 100);
  EXPECT_FALSE(got->active);
  EXPECT_EQ(got->state, (json{{"output", "ok"}}));
  EXPECT_EQ(ids_of(ok(s->list({}))), (std::vector<std::string>{"wf-2", "wf-1"}));

  // The same id twice in one batch: the last one wins.
  instance_record a = make_instance("wf-3", 300);
  instance_record z = make_instance("wf-3", 300, instance_status::compensating);
  z.state = {{"last", true}};
  commit_batch third;
  third.instances = {a, z};
  commit_ok(*s, third);
  got = ok(s->get("wf-3"));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->status, instance_status::compensating);
  EXPECT_EQ(got->state, (json{{"last", true}}));
  EXPECT_EQ(ok(s->list({})).size(), 3u);
}

// commit() updates a known instance's changing columns only when the others are unchanged; a
// record that changes any of them (workflow, version, parent, creation time, starter) must
// still replace the whole row, and the list filters on those columns must follow.
TEST_F(sqlite_store_test, upsert_replaces_columns_that_running_instances_never_change) {
  auto s = open();
  instance_record r = make_instance("wf-1", 100);
  r.started_by = "alice";
  commit_batch first;
  first.instances = {r};
  commit_ok(*s, first);

  r.workflow = "Refunds";
  r.version = 2;
  r.parent_id = "wf-0";
  r.created_us = 50;
  r.started_by = "bob";
  r.status = instance_status::completed;
  r.active = false;
  r.state = {{"replaced", true}};
  commit_batch second;
  second.instances = {r};
  commit_ok(*s, second);

  auto got = ok(s->get("wf-1"));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->workflow, "Refunds");
  EXPECT_EQ(got->version, 2u);
  EXPECT_EQ(got->parent_id, "wf-0");
  EXPECT_EQ(got->created_us, 50);
  EXPECT_EQ(got->started_by, "bob");
  EXPECT_EQ(got->status, instance_status::completed);
  EXPECT_EQ(got->state, (json{{"replaced", true}}));
  const auto listed = [&](std::string workflow, std::optional<std::string> started_by) {
    list_filter f;
    f.workflow = std::move(workflow);
    f.started_by = std::move(started_by);
    return ids_of(ok(s->list(f)));
  };
  const std::vector<std::string> just_it = {"wf-1"};
  EXPECT_EQ(listed("Refunds", std::nullopt), just_it);
  EXPECT_TRUE(listed("OrderProcessing", std::nullopt).empty());
  EXPECT_EQ(listed("", "bob"), just_it);
  EXPECT_TRUE(listed("", "alice").empty());
  EXPECT_TRUE(ok(s->load_active()).empty());
}

TEST_F(sqlite_store_test, load_active_returns_exactly_the_active_rows_oldest_first) {
  auto s = open();
  commit_batch b;
  instance_record terminal_unacked = make_instance("c", 30, instance_status::completed);
  terminal_unacked.active = true;
  b.instances = {make_instance("d", 40), terminal_unacked,
                 make_instance("a", 10, instance_status::failed), make_instance("b", 20),
                 make_instance("e", 5, instance_status::compensating)};
  commit_ok(*s, b);
  EXPECT_EQ(ids_of(ok(s->load_active())), (std::vector<std::string>{"e", "b", "c", "d"}));

  // Finishing an instance takes it out; acknowledging the terminal one too.
  commit_batch later;
  later.instances = {make_instance("b", 20, instance_status::completed)};
  terminal_unacked.active = false;
  later.instances.push_back(terminal_unacked);
  commit_ok(*s, later);
  EXPECT_EQ(ids_of(ok(s->load_active())), (std::vector<std::string>{"e", "d"}));
  EXPECT_EQ(ok(s->list({})).size(), 5u);
}

TEST_F(sqlite_store_test, list_filters_orders_newest_first_and_limits) {
  auto s = open();
  commit_batch b;
  b.instances = {
      make_instance("o1", 10, instance_status::completed, "Order"),
      make_instance("o2", 20, instance_status::running, "Order"),
      make_instance("o3", 30, instance_status::failed, "Order"),
      make_instance("s1", 15, instance_status::completed, "Ship"),
      make_instance("s2", 25, instance_status::running, "Ship"),
      make_instance("o4", 30, instance_status::completed, "Order"),  // same time as o3
  };
  commit_ok(*s, b);

  // Equal created_us: the one stored later comes first.
  EXPECT_EQ(ids_of(ok(s->list({}))),
            (std::vector<std::string>{"o4", "o3", "s2", "o2", "s1", "o1"}));
  list_filter f;
  f.limit = 2;
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"o4", "o3"}));
  f = {};
  f.status = instance_status::completed;
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"o4", "s1", "o1"}));
  f = {};
  f.workflow = "Ship";
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"s2", "s1"}));
  f.status = instance_status::running;
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"s2"}));
  f.workflow = "Order";
  f.status = instance_status::completed;
  f.limit = 1;
  auto one = ok(s->list(f));
  EXPECT_EQ(ids_of(one), (std::vector<std::string>{"o4"}));
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].state, (json{{"step", 0}, {"id", "o4"}}));  // state is filled
  f = {};
  f.workflow = "Nope";
  EXPECT_TRUE(ok(s->list(f)).empty());
  f = {};
  f.status = instance_status::timed_out;
  EXPECT_TRUE(ok(s->list(f)).empty());
}

TEST_F(sqlite_store_test, history_is_read_in_seq_order_per_instance) {
  auto s = open();
  commit_batch b;
  b.instances = {make_instance("wf-1", 1), make_instance("wf-2", 2)};
  b.history = {make_entry("wf-1", 3), make_entry("wf-2", 1), make_entry("wf-1", 1)};
  commit_ok(*s, b);
  commit_batch more;
  more.history = {make_entry("wf-1", 2), make_entry("wf-1", 10), make_entry("wf-2", 2)};
  commit_ok(*s, more);

  std::vector<std::uint64_t> seqs;
  for (const auto& h : ok(s->history("wf-1"))) {
    EXPECT_EQ(h.instance_id, "wf-1");
    seqs.push_back(h.seq);
  }
  EXPECT_EQ(seqs, (std::vector<std::uint64_t>{1, 2, 3, 10}));
  EXPECT_EQ(ok(s->history("wf-2")).size(), 2u);
  EXPECT_TRUE(ok(s->history("wf-9")).empty());
}

TEST_F(sqlite_store_test, a_failing_batch_stores_nothing_and_the_store_stays_usable) {
  auto s = open();
  commit_batch good;
  good.instances = {make_instance("wf-1", 1)};
  good.history = {make_entry("wf-1", 1)};
  good.buffer_add = {make_event("ev-1", 10)};
  commit_ok(*s, good);

  commit_batch bad;
  instance_record changed = make_instance("wf-1", 1, instance_status::failed);
  bad.instances = {changed, make_instance("wf-2", 2)};
  bad.history = {make_entry("wf-2", 1), make_entry("wf-1", 2), make_entry("wf-2", 1)};
  bad.triggers = {{"OrderProcessing", "ev-5", "wf-2"}};
  bad.buffer_add = {make_event("ev-2", 20)};
  bad.buffer_remove = {"ev-1"};
  auto st = s->commit(bad);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.err().code, "store_error");
  EXPECT_NE(st.err().message.find("history"), std::string::npos) << st.err().message;
  EXPECT_NE(st.err().message.find("wf-2"), std::string::npos) << st.err().message;
  EXPECT_NE(st.err().message.find("UNIQUE constraint failed"), std::string::npos)
      << st.err().message;

  // Nothing of the batch, including what came before the failing row.
  EXPECT_EQ(ok(s->get("wf-1"))->status, instance_status::running);
  EXPECT_FALSE(ok(s->get("wf-2")).has_value());
  EXPECT_EQ(ok(s->history("wf-1")).size(), 1u);
  EXPECT_TRUE(ok(s->history("wf-2")).empty());
  EXPECT_FALSE(ok(s->triggered_by("OrderProcessing", "ev-5")).has_value());
  auto buffered = ok(s->load_buffer());
  ASSERT_EQ(buffered.size(), 1u);
  EXPECT_EQ(buffered[0].id, "ev-1");

  // A history row that collides with one committed earlier fails the same way.
  commit_batch collides;
  collides.instances = {changed};
  collides.history = {make_entry("wf-1", 1)};
  EXPECT_FALSE(s->commit(collides).ok());
  EXPECT_EQ(ok(s->get("wf-1"))->status, instance_status::running);

  // The store goes on: the corrected batch commits, and survives a reopen.
  bad.history.pop_back();
  commit_ok(*s, bad);
  EXPECT_EQ(ok(s->get("wf-1"))->status, instance_status::failed);
  s.reset();
  s = open();
  EXPECT_TRUE(ok(s->get("wf-2")).has_value());
  EXPECT_EQ(ok(s->history("wf-1")).size(), 2u);
  EXPECT_EQ(ok(s->triggered_by("OrderProcessing", "ev-5")), "wf-2");
  ASSERT_EQ(ok(s->load_buffer()).size(), 1u);
  EXPECT_EQ(ok(s->load_buffer())[0].id, "ev-2");
}

TEST_F(sqlite_store_test, trigger_marks_dedup_events_per_workflow) {
  auto s = open();
  EXPECT_FALSE(ok(s->triggered_by("Order", "ev-1")).has_value());
  commit_batch b;
  b.instances = {make_instance("wf-1", 1, instance_status::running, "Order")};
  b.triggers = {{"Order", "ev-1", "wf-1"}};
  commit_ok(*s, b);
  EXPECT_EQ(ok(s->triggered_by("Order", "ev-1")), "wf-1");
  EXPECT_FALSE(ok(s->triggered_by("Ship", "ev-1")).has_value());
  EXPECT_FALSE(ok(s->triggered_by("Order", "ev-2")).has_value());

  // The same event for another workflow starts its own instance.
  commit_batch other;
  other.triggers = {{"Ship", "ev-1", "wf-2"}};
  commit_ok(*s, other);
  EXPECT_EQ(ok(s->triggered_by("Ship", "ev-1")), "wf-2");

  // A second mark for the same (workflow, event) is refused: the event already started one.
  commit_batch replay;
  replay.instances = {make_instance("wf-3", 3, instance_status::running, "Order")};
  replay.triggers = {{"Order", "ev-1", "wf-3"}};
  auto st = s->commit(replay);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.err().code, "store_error");
  EXPECT_NE(st.err().message.find("ev-1"), std::string::npos) << st.err().message;
  EXPECT_EQ(ok(s->triggered_by("Order", "ev-1")), "wf-1");
  EXPECT_FALSE(ok(s->get("wf-3")).has_value());
}

TEST_F(sqlite_store_test, buffer_add_ignores_known_ids_remove_and_purge) {
  auto s = open();
  commit_batch b;
  b.buffer_add = {make_event("ev-3", 30), make_event("ev-1", 10), make_event("ev-2", 20),
                  make_event("ev-1", 99, "duplicate in the same batch")};
  commit_ok(*s, b);
  commit_batch again;
  again.buffer_add = {make_event("ev-2", 98, "duplicate later")};
  commit_ok(*s, again);

  auto buffered = ok(s->load_buffer());
  ASSERT_EQ(buffered.size(), 3u);
  EXPECT_EQ(buffered[0].id, "ev-1");  // oldest first
  EXPECT_EQ(buffered[0].received_us, 10);
  EXPECT_EQ(buffered[0].event["payload"]["v"], "p");  // the first one stays
  EXPECT_EQ(buffered[1].id, "ev-2");
  EXPECT_EQ(buffered[1].received_us, 20);
  EXPECT_EQ(buffered[2].id, "ev-3");

  commit_batch remove;
  remove.buffer_remove = {"ev-2", "ev-unknown"};
  commit_ok(*s, remove);
  buffered = ok(s->load_buffer());
  ASSERT_EQ(buffered.size(), 2u);
  EXPECT_EQ(buffered[0].id, "ev-1");
  EXPECT_EQ(buffered[1].id, "ev-3");

  // Added and removed in one batch: gone.
  commit_batch both;
  both.buffer_add = {make_event("ev-4", 40)};
  both.buffer_remove = {"ev-4"};
  commit_ok(*s, both);
  EXPECT_EQ(ok(s->load_buffer()).size(), 2u);

  commit_batch more;
  more.buffer_add = {make_event("ev-5", 50)};
  commit_ok(*s, more);
  EXPECT_EQ(s->purge_buffer(30), 1u);  // ev-1 only: strictly before 30
  EXPECT_EQ(s->purge_buffer(30), 0u);
  buffered = ok(s->load_buffer());
  ASSERT_EQ(buffered.size(), 2u);
  EXPECT_EQ(buffered[0].id, "ev-3");
  EXPECT_EQ(buffered[1].id, "ev-5");
  EXPECT_EQ(s->purge_buffer(1000), 2u);
  EXPECT_TRUE(ok(s->load_buffer()).empty());
}

TEST_F(sqlite_store_test, definitions_identical_again_is_a_no_op_different_is_refused) {
  const json v1 = json::parse(R"({"workflow": {"name": "Order", "steps": [{"name": "A"}]}})");
  const json same_other_key_order =
      json::parse(R"({"workflow": {"steps": [{"name": "A"}], "name": "Order"}})");
  const json changed = json::parse(R"({"workflow": {"name": "Order", "steps": []}})");
  {
    auto s = open();
    EXPECT_FALSE(s->load_definition("Order", 1).has_value());
    ASSERT_TRUE(s->save_definition("Order", 1, v1).ok());
    EXPECT_TRUE(s->save_definition("Order", 1, v1).ok());
    EXPECT_TRUE(s->save_definition("Order", 1, same_other_key_order).ok());
    EXPECT_TRUE(s->save_definition("Order", 2, changed).ok());
  }
  auto s = open();
  auto st = s->save_definition("Order", 1, changed);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.err().code, "bad_request");
  EXPECT_NE(st.err().message.find("'Order'"), std::string::npos) << st.err().message;
  EXPECT_NE(st.err().message.find("version 1"), std::string::npos) << st.err().message;
  EXPECT_EQ(s->load_definition("Order", 1), v1);
  EXPECT_EQ(s->load_definition("Order", 2), changed);
  EXPECT_FALSE(s->load_definition("Order", 3).has_value());
  EXPECT_FALSE(s->load_definition("Ship", 1).has_value());
}

TEST_F(sqlite_store_test, count_by_status) {
  auto s = open();
  EXPECT_TRUE(s->count_by_status().empty());
  commit_batch b;
  b.instances = {make_instance("a", 1),
                 make_instance("b", 2),
                 make_instance("c", 3, instance_status::completed),
                 make_instance("d", 4, instance_status::timed_out),
                 make_instance("e", 5, instance_status::completed),
                 make_instance("f", 6, instance_status::completed)};
  commit_ok(*s, b);
  std::map<instance_status, std::uint64_t> counts;
  for (auto [status, n] : s->count_by_status()) counts[status] = n;
  EXPECT_EQ(counts, (std::map<instance_status, std::uint64_t>{{instance_status::running, 2},
                                                              {instance_status::completed, 3},
                                                              {instance_status::timed_out, 1}}));
}

TEST_F(sqlite_store_test, a_string_that_is_not_utf8_does_not_break_commit) {
  auto s = open();
  commit_batch b;
  b.instances = {make_instance("wf-1", 1)};
  b.instances[0].state = {{"raw", std::string("\xff\xfe bytes")}};
  commit_ok(*s, b);
  auto got = ok(s->get("wf-1"));
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->state["raw"].is_string());
}

TEST_F(sqlite_store_test, a_file_that_is_not_sqlite_is_refused_untouched) {
  const std::string garbage =
      "this is not a database, just some text that is long enough. " + std::string(200, 'x');
  {
    std::ofstream out(path_, std::ios::binary);
    out << garbage;
  }
  const std::string message = open_error(path_);
  EXPECT_NE(message.find(path_), std::string::npos) << message;
  EXPECT_NE(message.find("not an SQLite database"), std::string::npos) << message;
  std::ifstream in(path_, std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), garbage);
}

TEST_F(sqlite_store_test, an_sqlite_file_of_another_application_is_refused) {
  raw_sql(path_, "CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT)");
  const std::string message = open_error(path_);
  EXPECT_NE(message.find(path_), std::string::npos) << message;
  EXPECT_NE(message.find("not an Ensemble store"), std::string::npos) << message;
}

TEST_F(sqlite_store_test, started_by_is_stored_and_list_filters_on_it) {
  {
    auto s = open();
    commit_batch b;
    b.instances = {make_instance("a1", 10), make_instance("b1", 20), make_instance("a2", 30),
                   make_instance("n1", 40)};
    b.instances[0].started_by = "alice";
    b.instances[1].started_by = "bob";
    b.instances[2].started_by = "alice";
    commit_ok(*s, b);
  }
  auto s = open();  // read back from the file
  EXPECT_EQ(ok(s->get("a1"))->started_by, "alice");
  EXPECT_EQ(ok(s->get("n1"))->started_by, "");
  list_filter f;
  f.started_by = "alice";
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"a2", "a1"}));
  f.started_by = "carol";
  EXPECT_TRUE(ok(s->list(f)).empty());
  f.started_by = "bob";
  f.status = instance_status::running;
  f.workflow = "OrderProcessing";
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"b1"}));
  f.workflow = "Ship";
  EXPECT_TRUE(ok(s->list(f)).empty());
  EXPECT_EQ(ids_of(ok(s->list({}))), (std::vector<std::string>{"n1", "a2", "b1", "a1"}));
}

// A file written before instances recorded started_by (schema version 1, built here with the
// statements that version used) is upgraded in place and keeps every row.
TEST_F(sqlite_store_test, a_store_of_schema_version_1_is_upgraded_and_keeps_its_instances) {
  raw_sql(path_, R"sql(
CREATE TABLE definitions(name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
  PRIMARY KEY(name, version));
CREATE TABLE instances(id TEXT NOT NULL PRIMARY KEY, workflow TEXT NOT NULL,
  version INTEGER NOT NULL, status TEXT NOT NULL, parent_id TEXT NOT NULL,
  created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL, active INTEGER NOT NULL, state BLOB);
CREATE INDEX instances_active ON instances(created_us) WHERE active = 1;
CREATE INDEX instances_created ON instances(created_us);
CREATE INDEX instances_status ON instances(status, created_us);
CREATE INDEX instances_workflow ON instances(workflow, created_us);
CREATE TABLE history(instance_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_us INTEGER NOT NULL,
  kind TEXT NOT NULL, step TEXT NOT NULL, data BLOB, PRIMARY KEY(instance_id, seq)) WITHOUT ROWID;
CREATE TABLE triggers(workflow TEXT NOT NULL, event_id TEXT NOT NULL, instance_id TEXT NOT NULL,
  PRIMARY KEY(workflow, event_id)) WITHOUT ROWID;
CREATE TABLE buffer(id TEXT NOT NULL PRIMARY KEY, topic TEXT NOT NULL,
  correlation_id TEXT NOT NULL, received_us INTEGER NOT NULL, event BLOB);
CREATE INDEX buffer_received ON buffer(received_us);
INSERT INTO instances VALUES ('old-1', 'OrderProcessing', 1, 'running', '', 10, 11, 1,
  '{"step": 1}');
INSERT INTO history VALUES ('old-1', 1, 10, 'started', '', '{"input": {}}');
PRAGMA application_id = 1164858228;  -- "EnSt"
PRAGMA user_version = 1;
)sql");
  {
    auto s = open();
    auto active = ok(s->load_active());
    ASSERT_EQ(active.size(), 1u);
    EXPECT_EQ(active[0].id, "old-1");
    EXPECT_EQ(active[0].started_by, "") << "rows of version 1 have no started_by";
    EXPECT_EQ(active[0].state, (json{{"step", 1}}));
    EXPECT_EQ(ok(s->history("old-1")).size(), 1u);
    commit_batch b;
    b.instances = {make_instance("new-1", 20)};
    b.instances[0].started_by = "alice";
    commit_ok(*s, b);
  }
  auto s = open();  // now a version 2 file: opens as is
  list_filter f;
  f.started_by = "alice";
  EXPECT_EQ(ids_of(ok(s->list(f))), (std::vector<std::string>{"new-1"}));
  EXPECT_EQ(ids_of(ok(s->list({}))), (std::vector<std::string>{"new-1", "old-1"}));
}

// A virtual clock's time (orchestrator --clock virtual) is kept across a reopen; a store that
// never had one has none, and no table for it.
TEST_F(sqlite_store_test, the_virtual_clock_time_is_kept_across_a_reopen) {
  {
    auto s = open();
    EXPECT_EQ(ok(s->load_virtual_now()), std::nullopt);
    commit_batch b;
    b.instances = {make_instance("wf-1", 10)};
    commit_ok(*s, b);
  }
  {
    auto s = open();
    EXPECT_EQ(ok(s->load_virtual_now()), std::nullopt) << "nothing wrote it";
    commit_batch b;
    b.virtual_now_us = 86'400'000'000;
    commit_ok(*s, b);
    b.virtual_now_us = 90'000'000'000;
    commit_ok(*s, b);
  }
  auto s = open();
  EXPECT_EQ(ok(s->load_virtual_now()), std::optional<std::int64_t>(90'000'000'000));
  EXPECT_EQ(ok(s->load_active()).size(), 1u);
}

TEST_F(sqlite_store_test, a_store_of_a_newer_schema_version_is_refused) {
  open().reset();
  raw_sql(path_, "PRAGMA user_version = 99");
  const std::string message = open_error(path_);
  EXPECT_NE(message.find(path_), std::string::npos) << message;
  EXPECT_NE(message.find("schema version 99"), std::string::npos) << message;
}

TEST_F(sqlite_store_test, a_store_with_a_damaged_schema_is_refused) {
  open().reset();
  raw_sql(path_, "DROP TABLE triggers");
  const std::string message = open_error(path_);
  EXPECT_NE(message.find(path_), std::string::npos) << message;
  EXPECT_NE(message.find("triggers"), std::string::npos) << message;
}

TEST_F(sqlite_store_test, a_missing_directory_is_named) {
  const std::string missing = (dir_ / "no-such-dir").string();
  const std::string path = missing + "/store.db";
  const std::string message = open_error(path);
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("'" + missing + "' does not exist"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(missing));
}

TEST_F(sqlite_store_test, a_directory_is_not_a_store_file) {
  const std::string message = open_error(dir_.string());
  EXPECT_NE(message.find(dir_.string()), std::string::npos) << message;
  EXPECT_NE(message.find("is a directory"), std::string::npos) << message;
}

// Enough data for many WAL checkpoints (in the background, and by commit() when the WAL grows
// large): everything reads back, before and after reopening.
TEST_F(sqlite_store_test, many_batches_survive_wal_checkpoints) {
  constexpr int k_batches = 60;
  constexpr int k_per_batch = 200;
  const std::string padding(1500, 'p');
  auto batch_of = [&](int batch) {
    commit_batch b;
    for (int i = 0; i < k_per_batch; ++i) {
      const std::string id = "b" + std::to_string(batch) + "-" + std::to_string(i);
      b.instances.push_back(make_instance(id, batch));
      b.instances.back().state["padding"] = padding;
      b.history.push_back(make_entry(id, 1, "started"));
      b.history.push_back(make_entry(id, 2));
    }
    return b;
  };
  auto check = [&](store& s) {
    EXPECT_EQ(ok(s.load_active()).size(), static_cast<std::size_t>(k_batches * k_per_batch));
    for (int batch = 1; batch <= k_batches; batch += 7) {
      const std::string id = "b" + std::to_string(batch) + "-" + std::to_string(batch % 200);
      auto got = ok(s.get(id));
      ASSERT_TRUE(got.has_value()) << id;
      EXPECT_EQ(got->state["padding"], padding);
      EXPECT_EQ(ok(s.history(id)).size(), 2u) << id;
    }
  };
  {
    auto s = open();
    for (int batch = 1; batch <= k_batches; ++batch) commit_ok(*s, batch_of(batch));
    check(*s);
  }
  EXPECT_FALSE(fs::exists(path_ + "-wal"));  // closed cleanly: checkpointed and removed
  auto s = open();
  check(*s);
}

// Durability as promised: the process that committed is killed without closing anything; the
// next process to open the file finds every committed batch (recovered from the WAL).
TEST_F(sqlite_store_test, a_committed_batch_survives_sigkill) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    try {
      auto s = open();
      commit_batch b;
      for (int i = 0; i < 50; ++i) {
        const std::string id = "wf-" + std::to_string(i);
        b.instances.push_back(make_instance(id, i));
        b.history.push_back(make_entry(id, 1, "started"));
      }
      b.triggers = {{"OrderProcessing", "ev-1", "wf-0"}};
      b.buffer_add = {make_event("ev-9", 9)};
      if (!s->commit(b).ok()) ::_exit(3);
      ::raise(SIGKILL);
    } catch (...) {
      ::_exit(4);
    }
    ::_exit(5);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited with " << WEXITSTATUS(wstatus);
  ASSERT_EQ(WTERMSIG(wstatus), SIGKILL);
  // The store was not closed: the batch is in the WAL, not yet in the main file.
  EXPECT_TRUE(fs::exists(path_ + "-wal"));

  auto s = open();
  EXPECT_EQ(ok(s->load_active()).size(), 50u);
  EXPECT_EQ(ok(s->history("wf-49")).size(), 1u);
  EXPECT_EQ(ok(s->triggered_by("OrderProcessing", "ev-1")), "wf-0");
  EXPECT_EQ(ok(s->load_buffer()).size(), 1u);
}

// Killed at an arbitrary point of a stream of commits (big enough for the WAL to be
// checkpointed in the background meanwhile): every batch whose commit() returned is there, and
// each batch is all there or not at all.
TEST_F(sqlite_store_test, killed_while_committing_keeps_whole_acknowledged_batches) {
  constexpr int k_per_batch = 200;
  constexpr int k_acks_before_kill = 30;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(fds[0]);
    try {
      auto s = open();
      for (int batch = 1; batch <= 100000; ++batch) {  // bounded, killed long before
        commit_batch b;
        for (int i = 0; i < k_per_batch; ++i) {
          const std::string id = "b" + std::to_string(batch) + "-" + std::to_string(i);
          b.instances.push_back(make_instance(id, batch));
          b.instances.back().state["padding"] = std::string(1000, 'p');
          b.history.push_back(make_entry(id, 1, "started"));
        }
        if (!s->commit(b).ok()) ::_exit(3);
        if (::write(fds[1], &batch, sizeof batch) != sizeof batch) ::_exit(4);
      }
    } catch (...) {
      ::_exit(5);
    }
    ::_exit(6);
  }
  ::close(fds[1]);
  int acked = 0;
  while (acked < k_acks_before_kill) {
    int batch = 0;
    const auto n = ::read(fds[0], &batch, sizeof batch);
    if (n != static_cast<ssize_t>(sizeof batch)) break;
    acked = batch;
  }
  ::kill(child, SIGKILL);
  ::close(fds[0]);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited with " << WEXITSTATUS(wstatus);
  ASSERT_EQ(acked, k_acks_before_kill);

  auto s = open();
  std::map<std::int64_t, int> per_batch;  // created_us is the batch number
  for (const auto& r : ok(s->load_active())) ++per_batch[r.created_us];
  ASSERT_FALSE(per_batch.empty());
  const std::int64_t last = per_batch.rbegin()->first;
  EXPECT_GE(last, acked);
  for (std::int64_t batch = 1; batch <= last; ++batch) {
    EXPECT_EQ(per_batch[batch], k_per_batch) << "batch " << batch;
    const std::string id = "b" + std::to_string(batch) + "-" + std::to_string(k_per_batch - 1);
    EXPECT_EQ(ok(s->history(id)).size(), 1u) << id;
  }
}

// What the engine reads from the store must be what it wrote: a row that does not decode is an
// error naming it (a get, a list, loading the active instances, a history), never a record
// silently skipped or returned without its state.
TEST_F(sqlite_store_test, a_row_that_does_not_decode_is_an_error_naming_it) {
  {
    auto s = open();
    commit_batch b;
    b.instances = {make_instance("wf-1", 1), make_instance("wf-2", 2), make_instance("wf-3", 3)};
    b.history = {make_entry("wf-1", 1), make_entry("wf-1", 2)};
    b.buffer_add = {make_event("ev-1", 10)};
    commit_ok(*s, b);
  }
  raw_sql(path_, "UPDATE instances SET state = '{\"steps\": [1, 2' WHERE id = 'wf-2'");
  raw_sql(path_, "UPDATE history SET data = X'c1' WHERE instance_id = 'wf-1' AND seq = 2");
  raw_sql(path_, "UPDATE buffer SET event = X'c1' WHERE id = 'ev-1'");
  auto s = open();  // quick_check looks at pages, not at what the rows mean

  auto got = s->get("wf-2");
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.err().code, "store_error");
  EXPECT_TRUE(contains(got.err().message, "instance 'wf-2'")) << got.err().message;
  EXPECT_TRUE(contains(got.err().message, path_)) << got.err().message;
  auto listed = s->list({});
  ASSERT_FALSE(listed.ok()) << "returned " << listed->size() << " instances";
  EXPECT_TRUE(contains(listed.err().message, "instance 'wf-2'")) << listed.err().message;
  auto active = s->load_active();
  ASSERT_FALSE(active.ok()) << "returned " << active->size() << " instances";
  EXPECT_TRUE(contains(active.err().message, "instance 'wf-2'")) << active.err().message;
  auto history = s->history("wf-1");
  ASSERT_FALSE(history.ok()) << "returned " << history->size() << " entries";
  EXPECT_TRUE(contains(history.err().message, "history entry 2 of instance 'wf-1'"))
      << history.err().message;
  auto buffered = s->load_buffer();
  ASSERT_FALSE(buffered.ok()) << "returned " << buffered->size() << " events";
  EXPECT_TRUE(contains(buffered.err().message, "buffered event 'ev-1'")) << buffered.err().message;
  // The rows that do decode still read.
  EXPECT_EQ(ok(s->get("wf-3"))->state, make_instance("wf-3", 3).state);

  // An unknown status is not a row to skip either.
  raw_sql(path_, "UPDATE instances SET status = 'sleeping' WHERE id = 'wf-3'");
  auto unknown = s->get("wf-3");
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(contains(unknown.err().message, "instance 'wf-3' has the unknown status 'sleeping'"))
      << unknown.err().message;
}

// 8 KiB of garbage in the middle of a store's file (a bad disk, a stray write): opening it with
// the default check refuses it with store_damaged, naming the file and what the check found.
TEST_F(sqlite_store_test, a_damaged_file_is_refused_at_open) {
  {
    auto s = open();
    for (int batch = 0; batch < 10; ++batch) {
      commit_batch b;
      for (int i = 0; i < 30; ++i) {
        const std::string id = "wf-" + std::to_string(batch * 30 + i);
        b.instances.push_back(make_instance(id, batch * 30 + i));
        b.instances.back().state["padding"] = std::string(600, 'p');
        b.history.push_back(make_entry(id, 1, "started"));
      }
      commit_ok(*s, b);
    }
  }  // closed: the WAL is checkpointed into the file and removed
  ASSERT_FALSE(fs::exists(path_ + "-wal"));
  const auto size = fs::file_size(path_);
  ASSERT_GE(size, 64u * 1024u);
  {
    std::fstream f(path_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2 / 4096 * 4096));
    std::uint32_t x = 2463534242u;  // xorshift: garbage, the same every run
    for (int i = 0; i < 8192; ++i) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      f.put(static_cast<char>(x & 0xff));
    }
  }
  for (auto check : {store_check::quick, store_check::full}) {
    const std::string message = damaged_error(path_, check);
    EXPECT_TRUE(contains(message, path_)) << message;
    EXPECT_TRUE(contains(message, "the store is damaged")) << message;
    EXPECT_TRUE(contains(message, "restore the file from a backup") ||
                contains(message, "Restore the file from a backup"))
        << message;
  }
  // --store-check off opens it; what is damaged then fails where it is read, with an error
  // (which table the garbage lands in depends on the file's layout: instances or history).
  auto s = open_sqlite_store(path_, {.check = store_check::off, .max_size_bytes = 0});
  auto listed = s->list(list_filter{
      .status = std::nullopt, .workflow = "", .started_by = std::nullopt, .limit = 1000});
  bool damage_seen = false;
  if (listed.ok()) {
    damage_seen = listed->size() < 300u;
  } else {
    EXPECT_EQ(listed.err().code, "store_error");
    damage_seen = true;
  }
  for (int i = 0; i < 300; ++i) {
    auto history = s->history("wf-" + std::to_string(i));
    if (history.ok()) {
      damage_seen = damage_seen || history->size() != 1u;
    } else {
      EXPECT_EQ(history.err().code, "store_error");
      damage_seen = true;
    }
  }
  EXPECT_TRUE(damage_seen) << "the garbage damaged nothing the list and the histories read";
}

TEST_F(sqlite_store_test, store_check_names_round_trip) {
  for (auto c : {store_check::off, store_check::quick, store_check::full}) {
    EXPECT_EQ(parse_store_check(to_string(c)), c);
  }
  EXPECT_EQ(parse_store_check("fast"), std::nullopt);
}

// A full disk, made real with a size limit (PRAGMA max_page_count: SQLite itself answers
// SQLITE_FULL): the commit fails with storage_full (retryable), stores nothing of the batch,
// and the same batch commits once space returns (here: another connection deletes rows,
// which frees pages inside the limit).
TEST_F(sqlite_store_test, a_full_store_refuses_the_batch_and_commits_once_space_returns) {
  open().reset();
  raw_sql(path_, "CREATE TABLE padding(b BLOB); INSERT INTO padding VALUES (zeroblob(256 * 1024))");
  const auto size = static_cast<std::int64_t>(fs::file_size(path_));
  auto s =
      open_sqlite_store(path_, {.check = store_check::quick, .max_size_bytes = size + 16 * 4096});
  list_filter everything;
  everything.limit = 100000;
  int committed = 0;
  commit_batch refused;
  for (int batch = 0; batch < 1000; ++batch) {  // bounded: full after a few dozen
    commit_batch b;
    for (int i = 0; i < 5; ++i) {
      const std::string id = "wf-" + std::to_string(batch) + "-" + std::to_string(i);
      b.instances.push_back(make_instance(id, batch));
      b.instances.back().state["padding"] = std::string(2000, 'p');
      b.history.push_back(make_entry(id, 1, "started"));
    }
    auto st = s->commit(b);
    if (!st.ok()) {
      EXPECT_EQ(st.err().code, "storage_full") << st.err().to_string();
      EXPECT_TRUE(st.err().retryable);
      EXPECT_TRUE(contains(st.err().message, path_)) << st.err().message;
      refused = std::move(b);
      break;
    }
    ++committed;
  }
  ASSERT_FALSE(refused.empty()) << "the store never filled";
  ASSERT_GT(committed, 0);
  // Nothing of the refused batch is stored; everything before it is; reads go on.
  for (const auto& r : refused.instances) EXPECT_FALSE(ok(s->get(r.id)).has_value()) << r.id;
  EXPECT_EQ(ok(s->list(everything)).size(), static_cast<std::size_t>(committed) * 5);
  // Still full: refused again, still nothing stored.
  EXPECT_EQ(s->commit(refused).err().code, "storage_full");
  EXPECT_FALSE(ok(s->get(refused.instances[0].id)).has_value());

  raw_sql(path_, "DELETE FROM padding");
  commit_ok(*s, refused);
  EXPECT_EQ(ok(s->list(everything)).size(), static_cast<std::size_t>(committed + 1) * 5);
  EXPECT_EQ(ok(s->history(refused.instances[0].id)).size(), 1u);
}

}  // namespace

// The store writes documents with its own MessagePack encoder: every blob must be byte for byte
// what json::to_msgpack writes (the encoding older builds stored and any reader expects), at
// every boundary where MessagePack changes type or width.
TEST_F(sqlite_store_test, documents_are_stored_as_exactly_the_bytes_of_to_msgpack) {
  json ints = json::array();
  for (std::int64_t v : {std::int64_t{0},
                         std::int64_t{1},
                         std::int64_t{127},
                         std::int64_t{128},
                         std::int64_t{255},
                         std::int64_t{256},
                         std::int64_t{65535},
                         std::int64_t{65536},
                         std::int64_t{4294967295},
                         std::int64_t{4294967296},
                         std::numeric_limits<std::int64_t>::max(),
                         std::int64_t{-1},
                         std::int64_t{-32},
                         std::int64_t{-33},
                         std::int64_t{-128},
                         std::int64_t{-129},
                         std::int64_t{-32768},
                         std::int64_t{-32769},
                         std::int64_t{-2147483648},
                         std::int64_t{-2147483649},
                         std::numeric_limits<std::int64_t>::min()}) {
    ints.push_back(v);
  }
  for (std::uint64_t v : {std::uint64_t{0}, std::uint64_t{127}, std::uint64_t{128},
                          std::uint64_t{65536}, std::numeric_limits<std::uint64_t>::max()}) {
    ints.push_back(v);
  }
  json floats = json::array();
  for (double v :
       {0.0, -0.0, 0.5, 0.1, -2.25, 1e39, -1e39, 3.4028234663852886e38, 1e-50,
        std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
        std::numeric_limits<double>::quiet_NaN()}) {
    floats.push_back(v);
  }
  json strings = json::array();
  for (std::size_t n : {0, 1, 31, 32, 255, 256, 65535, 65536})
    strings.push_back(std::string(n, 'x'));
  strings.push_back(std::string("\xff\xfe not utf-8"));
  json binaries = json::array();
  for (std::size_t n : {0, 1, 2, 3, 4, 8, 16, 17, 255, 256, 65536}) {
    const std::vector<std::uint8_t> bytes(n, 0xAB);
    binaries.push_back(json::binary(bytes));
    binaries.push_back(json::binary(bytes, static_cast<std::uint8_t>(n % 128)));
  }
  json sized = json::object();
  for (std::size_t n : {0, 15, 16, 65536}) {
    json a = json::array();
    json o = json::object();
    for (std::size_t i = 0; i < n; ++i) {
      a.push_back(i);
      o["k" + std::to_string(i)] = i;
    }
    sized["array" + std::to_string(n)] = std::move(a);
    sized["object" + std::to_string(n)] = std::move(o);
  }
  const std::vector<json> docs = {
      json::object(),
      json::array(),
      json(true),
      json(false),
      json(42),
      json("text"),
      ints,
      floats,
      strings,
      binaries,
      sized,
      json{{"nested", {{"null", nullptr}, {"list", {1, "two", 3.5, false, json::object()}}}}}};

  auto s = open();
  commit_batch b;
  for (std::size_t i = 0; i < docs.size(); ++i) {
    const std::string id = "wf-" + std::to_string(i);
    b.instances.push_back(make_instance(id, static_cast<std::int64_t>(i)));
    b.instances.back().state = docs[i];
    b.history.push_back(make_entry(id, 1));
    b.history.back().data = docs[i];
    b.buffer_add.push_back(make_event("ev-" + std::to_string(i), static_cast<std::int64_t>(i)));
    b.buffer_add.back().event = docs[i];
  }
  commit_ok(*s, b);

  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open_v2(path_.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  const auto blob_of = [db](const std::string& sql, const std::string& key) {
    sqlite3_stmt* stmt = nullptr;
    std::vector<std::uint8_t> out;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
      ADD_FAILURE() << sql << ": " << sqlite3_errmsg(db);
      return out;
    }
    sqlite3_bind_text(stmt, 1, key.c_str(), -1, SQLITE_TRANSIENT);
    if (sqlite3_step(stmt) == SQLITE_ROW && sqlite3_column_type(stmt, 0) == SQLITE_BLOB) {
      const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(stmt, 0));
      out.assign(p, p + sqlite3_column_bytes(stmt, 0));
    } else {
      ADD_FAILURE() << sql << " for '" << key << "': no blob";
    }
    sqlite3_finalize(stmt);
    return out;
  };
  for (std::size_t i = 0; i < docs.size(); ++i) {
    const std::string n = std::to_string(i);
    const auto expected = json::to_msgpack(docs[i]);
    EXPECT_EQ(blob_of("SELECT state FROM instances WHERE id = ?1", "wf-" + n), expected)
        << "instance state " << i << ": " << docs[i].dump().substr(0, 200);
    EXPECT_EQ(blob_of("SELECT data FROM history WHERE instance_id = ?1", "wf-" + n), expected)
        << "history data " << i;
    EXPECT_EQ(blob_of("SELECT event FROM buffer WHERE id = ?1", "ev-" + n), expected)
        << "buffered event " << i;
  }
  sqlite3_close(db);
  // And they read back as the documents (NaN aside, which equals nothing).
  EXPECT_EQ(ok(s->get("wf-10"))->state, docs[10]);
  EXPECT_EQ(ok(s->get("wf-8"))->state, docs[8]);
}

namespace {

// A random-ish JSON value of at most `depth` levels (no NaN, which equals nothing).
json random_value(std::mt19937& rng, int depth) {
  const auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  switch (pick(depth > 0 ? 9 : 6)) {
    case 0:
      return nullptr;
    case 1:
      return pick(2) == 0;
    case 2:
      return static_cast<std::int64_t>(rng()) - (std::int64_t{1} << 31);
    case 3:
      return static_cast<double>(pick(1000)) / 8.0;
    case 4:
      return std::string(static_cast<std::size_t>(pick(40)), static_cast<char>('a' + pick(26)));
    case 5:
      return json::object();
    case 6: {
      json a = json::array();
      for (int i = pick(5); i > 0; --i) a.push_back(random_value(rng, depth - 1));
      return a;
    }
    default: {
      json o = json::object();
      for (int i = pick(6); i > 0; --i) {
        o["k" + std::to_string(pick(20))] = random_value(rng, depth - 1);
      }
      return o;
    }
  }
}

// A state document shaped like the engine's: "workflow", "steps.<name>", "run" with
// "run.steps.<name>"; a step may be in one of the two only, or hold null.
json random_state(std::mt19937& rng) {
  json steps = json::object();
  json run_steps = json::object();
  for (int s = 0; s < 6; ++s) {
    const std::string name = "Step" + std::to_string(s);
    switch (rng() % 4) {
      case 0:
        break;
      case 1:
        steps[name] = random_value(rng, 3);
        break;
      case 2:
        run_steps[name] = random_value(rng, 3);
        break;
      default:
        steps[name] = random_value(rng, 3);
        run_steps[name] = random_value(rng, 3);
    }
  }
  return {{"workflow", {{"name", "W"}, {"input", random_value(rng, 3)}}},
          {"steps", std::move(steps)},
          {"run", {{"history_seq", rng() % 100}, {"steps", std::move(run_steps)}}}};
}

// The steps of `state` a commit would name, changed at random into `next`: some steps' parts
// replaced, some removed from one or both objects, some added.
std::vector<std::string> mutate_steps(std::mt19937& rng, json& next) {
  std::vector<std::string> changed;
  for (int s = 0; s < 6; ++s) {
    if (rng() % 3 != 0) continue;
    const std::string name = "Step" + std::to_string(s);
    changed.push_back(name);
    auto& steps = next["steps"];
    auto& run_steps = next["run"]["steps"];
    switch (rng() % 4) {
      case 0:
        steps.erase(name);
        run_steps.erase(name);
        break;
      case 1:
        steps[name] = random_value(rng, 3);
        run_steps.erase(name);
        break;
      case 2:
        run_steps[name] = nullptr;
        break;
      default:
        steps[name] = random_value(rng, 3);
        run_steps[name] = random_value(rng, 3);
    }
  }
  next["run"]["history_seq"] = rng() % 100;
  return changed;
}

}  // namespace

commit_batch one_instance(const instance_record& r) {
  commit_batch b;
  b.instances = {r};
  return b;
}

// Each step's part of a state is stored in a row of its own and a commit that names the changed
// steps writes only those: whatever was committed, with or without changed_steps, every read
// puts back exactly the committed document (equal as JSON, and as MessagePack bytes).
TEST_F(sqlite_store_test, states_split_into_step_rows_read_back_exactly_as_committed) {
  std::mt19937 rng(20261130);
  constexpr int k_instances = 12;
  std::map<std::string, json> expected;
  {
    auto s = open();
    commit_batch first;
    for (int i = 0; i < k_instances; ++i) {
      const std::string id = "wf-" + std::to_string(i);
      first.instances.push_back(make_instance(id, i));
      first.instances.back().state = random_state(rng);
      expected[id] = first.instances.back().state;
    }
    // Documents the split leaves whole or in part: no steps, steps not objects, no run.
    first.instances[0].state = json{{"workflow", "W"}};
    first.instances[1].state = json{{"steps", json::array({1, 2})}, {"run", "r"}};
    first.instances[2].state = json{{"steps", {{"A", nullptr}}}};
    first.instances[3].state = json::array({1, {{"steps", {{"A", 1}}}}});
    for (int i = 0; i < 4; ++i) expected[first.instances[i].id] = first.instances[i].state;
    commit_ok(*s, first);

    for (int round = 0; round < 20; ++round) {
      commit_batch b;
      for (int i = 4; i < k_instances; ++i) {
        const std::string id = "wf-" + std::to_string(i);
        instance_record r = make_instance(id, i);
        r.state = expected[id];
        auto changed = mutate_steps(rng, r.state);
        // Every third round writes everything, as a commit without changed_steps does.
        if (round % 3 != 2) r.changed_steps = std::move(changed);
        expected[id] = r.state;
        b.instances.push_back(std::move(r));
      }
      commit_ok(*s, b);
      for (int i = 4; i < k_instances; ++i) {
        const std::string id = "wf-" + std::to_string(i);
        auto got = ok(s->get(id));
        ASSERT_TRUE(got.has_value()) << id;
        ASSERT_EQ(got->state, expected[id]) << id << " after round " << round;
        EXPECT_FALSE(got->changed_steps.has_value());
      }
    }
  }
  auto s = open();  // and after a reopen, through every read
  const auto check_all = [&](const std::vector<instance_record>& rs, const char* read) {
    ASSERT_EQ(rs.size(), expected.size()) << read;
    for (const auto& r : rs) {
      EXPECT_EQ(r.state, expected[r.id]) << read << ": " << r.id;
      EXPECT_EQ(json::to_msgpack(r.state), json::to_msgpack(expected[r.id]))
          << read << ": " << r.id;
    }
  };
  check_all(ok(s->load_active()), "load_active");
  check_all(ok(s->list({})), "list");
  for (const auto& [id, state] : expected) EXPECT_EQ(ok(s->get(id))->state, state) << id;
  // A list that stops at its limit reads each instance's steps whole.
  list_filter few;
  few.limit = 3;
  const auto newest = ok(s->list(few));
  ASSERT_EQ(ids_of(newest), (std::vector<std::string>{"wf-11", "wf-10", "wf-9"}));
  for (const auto& r : newest) EXPECT_EQ(r.state, expected[r.id]) << r.id;
}

// A step named as changed but gone from the state loses its row; a full write (no
// changed_steps) drops the rows of steps the state no longer has.
TEST_F(sqlite_store_test, step_rows_of_removed_steps_are_deleted) {
  auto s = open();
  instance_record r = make_instance("wf-1", 1);
  r.state = {{"steps", {{"A", 1}, {"B", 2}, {"C", 3}}}, {"run", {{"steps", {{"A", "a"}}}}}};
  commit_ok(*s, one_instance(r));
  const auto rows = [&] {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(path_.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(
        sqlite3_prepare_v2(db, "SELECT step FROM instance_steps ORDER BY step", -1, &stmt, nullptr),
        SQLITE_OK);
    std::vector<std::string> out;
    while (sqlite3_step(stmt) == SQLITE_ROW) {
      out.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)));
    }
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return out;
  };
  EXPECT_EQ(rows(), (std::vector<std::string>{"A", "B", "C"}));
  r.state["steps"].erase("B");
  r.changed_steps = std::vector<std::string>{"B"};
  commit_ok(*s, one_instance(r));
  EXPECT_EQ(rows(), (std::vector<std::string>{"A", "C"}));
  r.state["steps"].erase("C");
  r.state["run"]["steps"].erase("A");
  r.changed_steps.reset();
  commit_ok(*s, one_instance(r));
  EXPECT_EQ(rows(), (std::vector<std::string>{"A"}));
  EXPECT_EQ(ok(s->get("wf-1"))->state, r.state);
}

// A file of schema version 2 (each instance's whole state in instances.state, built here with
// the statements that version used) is upgraded in place: states split into step rows in one
// transaction, every document reads back the same; a state that does not decode is kept as it
// is and still named where it is read.
TEST_F(sqlite_store_test, a_store_of_schema_version_2_is_upgraded_and_reads_the_same_documents) {
  const json split = json::parse(
      R"({"workflow": {"name": "W", "input": {"n": 1}},
          "steps": {"A": {"status": "completed", "output": [1, 2]}, "B": null},
          "run": {"history_seq": 4, "steps": {"A": {"phase": "done"}, "C": {"x": true}}}})");
  const json whole = json::parse(R"({"step": 1, "run": {"steps": []}})");
  const std::string sql = R"sql(
CREATE TABLE definitions(name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
  PRIMARY KEY(name, version));
CREATE TABLE instances(id TEXT NOT NULL PRIMARY KEY, workflow TEXT NOT NULL,
  version INTEGER NOT NULL, status TEXT NOT NULL, parent_id TEXT NOT NULL,
  created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL, active INTEGER NOT NULL, state BLOB,
  started_by TEXT NOT NULL DEFAULT '');
CREATE INDEX instances_active ON instances(created_us) WHERE active = 1;
CREATE INDEX instances_created ON instances(created_us);
CREATE INDEX instances_status ON instances(status, created_us);
CREATE INDEX instances_workflow ON instances(workflow, created_us);
CREATE INDEX instances_started_by ON instances(started_by, created_us);
CREATE TABLE history(instance_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_us INTEGER NOT NULL,
  kind TEXT NOT NULL, step TEXT NOT NULL, data BLOB, PRIMARY KEY(instance_id, seq)) WITHOUT ROWID;
CREATE TABLE triggers(workflow TEXT NOT NULL, event_id TEXT NOT NULL, instance_id TEXT NOT NULL,
  PRIMARY KEY(workflow, event_id)) WITHOUT ROWID;
CREATE TABLE buffer(id TEXT NOT NULL PRIMARY KEY, topic TEXT NOT NULL,
  correlation_id TEXT NOT NULL, received_us INTEGER NOT NULL, event BLOB);
CREATE INDEX buffer_received ON buffer(received_us);
INSERT INTO instances VALUES ('old-1', 'W', 1, 'running', '', 10, 11, 1, X')sql" +
                          [&] {
                            std::string hex;
                            char buf[3];
                            for (auto byte : json::to_msgpack(split)) {
                              std::snprintf(buf, sizeof buf, "%02x", byte);
                              hex += buf;
                            }
                            return hex;
                          }() +
                          R"sql(', 'alice');
INSERT INTO instances VALUES ('old-2', 'W', 1, 'completed', '', 20, 21, 0, ')sql" +
                          whole.dump() + R"sql(', '');
INSERT INTO instances VALUES ('old-3', 'W', 1, 'running', '', 30, 31, 1, X'c1', '');
PRAGMA application_id = 1164858228;  -- "EnSt"
PRAGMA user_version = 2;
)sql";
  raw_sql(path_, sql.c_str());
  {
    auto s = open();
    EXPECT_EQ(ok(s->get("old-1"))->state, split);
    EXPECT_EQ(json::to_msgpack(ok(s->get("old-1"))->state), json::to_msgpack(split));
    EXPECT_EQ(ok(s->get("old-1"))->started_by, "alice");
    EXPECT_EQ(ok(s->get("old-2"))->state, whole);
    auto damaged = s->get("old-3");
    ASSERT_FALSE(damaged.ok());
    EXPECT_TRUE(contains(damaged.err().message, "instance 'old-3'")) << damaged.err().message;
  }
  {
    // The upgrade did split: the steps are rows, instances.state keeps the rest.
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open_v2(path_.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db,
                                 "SELECT group_concat(step) FROM (SELECT step FROM instance_steps "
                                 "WHERE instance_id = 'old-1' ORDER BY step)",
                                 -1, &stmt, nullptr),
              SQLITE_OK);
    ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))), "A,B,C");
    sqlite3_finalize(stmt);
    ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, nullptr), SQLITE_OK);
    ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
    EXPECT_EQ(sqlite3_column_int64(stmt, 0), 3);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
  }
  auto s = open();  // now a version 3 file: opens as is
  EXPECT_EQ(ok(s->get("old-1"))->state, split);
  EXPECT_EQ(ok(s->get("old-2"))->state, whole);
}

// A step row that does not decode is an error naming the step, the instance and the column.
TEST_F(sqlite_store_test, a_step_row_that_does_not_decode_is_an_error_naming_it) {
  {
    auto s = open();
    instance_record r = make_instance("wf-1", 1);
    r.state = {{"steps", {{"Charge", {{"status", "running"}}}}},
               {"run", {{"steps", {{"Charge", {{"phase", "calling"}}}}}}}};
    commit_ok(*s, one_instance(r));
  }
  raw_sql(path_, "UPDATE instance_steps SET run = X'c1' WHERE step = 'Charge'");
  auto s = open();
  const auto expect_named = [](const ensemble::common::error& e) {
    EXPECT_EQ(e.code, "store_error");
    EXPECT_TRUE(contains(e.message,
                         "step 'Charge' of instance 'wf-1' (workflow OrderProcessing) does not "
                         "decode (table instance_steps, column run)"))
        << e.message;
  };
  auto got = s->get("wf-1");
  ASSERT_FALSE(got.ok());
  expect_named(got.err());
  auto listed = s->list({});
  ASSERT_FALSE(listed.ok());
  expect_named(listed.err());
  auto active = s->load_active();
  ASSERT_FALSE(active.ok());
  expect_named(active.err());
}
