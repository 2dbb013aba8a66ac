// The `ensemble` commands for durable streams against a real ensemble-broker with --data in a
// temporary directory: `streams` (list, info, add, rm), `consumers` (list, info, add, rm),
// `dlq` (list, show, replay) with a dead letter made by a raw-protocol member that TERMs,
// `events --stream` replays, the broker's refusals as the CLI prints them, bad arguments (exit
// 2), and a deployment's `streams:` section: validated with file, path and line, and brought
// `up` with a data directory that outlives the `up`.
#include <gtest/gtest.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"
#include "support/streams_fixture.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
namespace ec = ensemble::common;
using ec::command;
using ec::header;
using ensemble::test::outcome;
using ensemble::test::raw_peer;
using nlohmann::json;
using namespace std::chrono_literals;

constexpr auto k_deadline = 30s;  // generous: only reached when something is broken

const std::map<std::string, std::string> k_no_endpoints = {{"ENSEMBLE_BROKER", ""},
                                                           {"ENSEMBLE_EVENTS", ""}};

outcome run_cli(const std::vector<std::string>& args, const std::string& dir = {}) {
  auto p = tk::process::spawn({tk::binary_path("ensemble"), args, k_no_endpoints, dir, "ensemble"});
  return ensemble::test::finish(*p, k_deadline);
}

// The JSON lines a command printed (what `events` prints), in order.
std::vector<json> json_lines(const outcome& o) {
  std::vector<json> out;
  for (const auto& l : o.lines) {
    if (l.empty() || l[0] != '{') continue;
    auto j = json::parse(l, nullptr, false);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  return out;
}

std::string packed(const json& value) {
  const auto bytes = json::to_msgpack(value);
  return std::string(bytes.begin(), bytes.end());
}

class cli_streams_test : public ensemble::test::streams_fixture {
 protected:
  // `ensemble --broker R --events E ARGS...`
  outcome cli(std::vector<std::string> args) {
    std::vector<std::string> all{"--broker",        broker_->router(), "--events",
                                 broker_->events(), "--log-level",     "error"};
    all.insert(all.end(), args.begin(), args.end());
    return run_cli(all);
  }

  void publish_json(const std::string& topic, const std::string& id, const json& payload) {
    publish(*client_, topic, id, packed(payload));
    expect_ack(*client_, id);
  }

  // A registered raw peer (HELLO answered), to be a consumer's member.
  std::unique_ptr<raw_peer> member(const std::string& agent) {
    auto p = std::make_unique<raw_peer>(ctx_, broker_->router());
    header hello;
    hello.agent = agent;
    p->send(command::hello, hello);
    p->expect(command::welcome, ensemble::test::raw_peer::k_default_wait);
    return p;
  }
};

// ----- streams

TEST_F(cli_streams_test, streams_lists_shows_adds_and_removes) {
  start_with_orders();
  publish_json("order.created", "o-1", {{"orderId", "A-1"}});
  publish_json("shipment.sent", "s-1", {{"orderId", "A-1"}});

  auto list = cli({"streams"});
  ASSERT_EQ(list.code, 0) << list;
  const auto row = list.line("orders ");
  EXPECT_NE(row.find("order.,shipment."), std::string::npos) << list;
  EXPECT_NE(row.find("1..2"), std::string::npos) << list;
  EXPECT_NE(row.find("max_age=7d"), std::string::npos) << list;

  auto as_json = cli({"streams", "--json"});
  ASSERT_EQ(as_json.code, 0) << as_json;
  const auto doc = as_json.document();
  ASSERT_TRUE(doc.contains("streams")) << as_json;
  EXPECT_EQ(doc["streams"][0]["count"], 2) << as_json;

  auto info = cli({"streams", "info", "orders"});
  ASSERT_EQ(info.code, 0) << info;
  EXPECT_TRUE(info.has("2 (seq 1..2)")) << info;
  EXPECT_TRUE(info.has("max_age            7d")) << info;

  auto add = cli({"streams", "add", "audit", "--topics", "audit.,review.", "--max-age", "2m",
                  "--max-bytes", "1G", "--max-events", "10K", "--duplicate-window", "30s"});
  ASSERT_EQ(add.code, 0) << add;
  EXPECT_TRUE(add.has("added stream audit")) << add;
  const auto audit = admin("stream_info", {{"name", "audit"}});
  EXPECT_EQ(audit["topics"], json::array({"audit.", "review."}));
  EXPECT_EQ(audit["max_age_ms"], 120'000);
  EXPECT_EQ(audit["max_bytes"], 1ULL << 30);
  EXPECT_EQ(audit["max_events"], 10 * 1024);
  EXPECT_EQ(audit["duplicate_window_ms"], 30'000);

  auto rm = cli({"streams", "rm", "audit"});
  ASSERT_EQ(rm.code, 0) << rm;
  EXPECT_TRUE(rm.has("removed stream audit")) << rm;
  EXPECT_EQ(admin_error("stream_info", {{"name", "audit"}}).error_code, "not_found");
}

TEST_F(cli_streams_test, streams_refusals_and_bad_arguments) {
  start_with_orders();
  // The broker's refusals: code and message, exit 1.
  auto unknown = cli({"streams", "info", "nope"});
  EXPECT_EQ(unknown.code, 1) << unknown;
  EXPECT_TRUE(unknown.has("ensemble: streams info nope: not_found: ")) << unknown;
  auto twice = cli({"streams", "add", "orders", "--topics", "order."});
  EXPECT_EQ(twice.code, 1) << twice;
  EXPECT_TRUE(twice.has("ensemble: streams add orders: already_exists: ")) << twice;
  auto overlap = cli({"streams", "add", "more", "--topics", "order.paid"});
  EXPECT_EQ(overlap.code, 1) << overlap;
  EXPECT_TRUE(overlap.has("bad_request: ")) << overlap;
  EXPECT_TRUE(overlap.has("overlaps stream orders")) << overlap;
  auto rm = cli({"streams", "rm", "nope"});
  EXPECT_EQ(rm.code, 1) << rm;
  EXPECT_TRUE(rm.has("not_found")) << rm;

  // Bad arguments: named, exit 2, nothing asked of the broker.
  auto age = cli({"streams", "add", "x", "--topics", "x.", "--max-age", "7x"});
  EXPECT_EQ(age.code, 2) << age;
  EXPECT_TRUE(age.has("--max-age: \"7x\" is not a duration")) << age;
  auto size = cli({"streams", "add", "x", "--topics", "x.", "--max-bytes", "1Q"});
  EXPECT_EQ(size.code, 2) << size;
  EXPECT_TRUE(size.has("--max-bytes: \"1Q\"")) << size;
  auto topics = cli({"streams", "add", "x", "--topics", ","});
  EXPECT_EQ(topics.code, 2) << topics;
  EXPECT_TRUE(topics.has("--topics")) << topics;
  EXPECT_EQ(admin_error("stream_info", {{"name", "x"}}).error_code, "not_found");
  auto typo = cli({"streams", "inf", "orders"});
  EXPECT_EQ(typo.code, 2) << typo;
  EXPECT_TRUE(typo.has("ensemble streams: unknown command 'inf'; did you mean 'info'?")) << typo;
}

TEST_F(cli_streams_test, a_broker_without_data_says_so) {
  start({});
  auto list = cli({"streams"});
  EXPECT_EQ(list.code, 0) << list;
  EXPECT_TRUE(list.has("stores no streams: it was started without --data")) << list;
  auto info = cli({"streams", "info", "orders"});
  EXPECT_EQ(info.code, 1) << info;
  EXPECT_TRUE(info.has("streams_disabled")) << info;
}

// ----- events --stream

TEST_F(cli_streams_test, events_replays_a_stream_from_a_sequence_or_a_time) {
  start_with_orders();
  publish_json("order.created", "o-1", {{"orderId", "A-1"}});
  publish_json("shipment.sent", "s-1", {{"orderId", "A-1"}});
  publish(*client_, "order.raw", "r-1", "not msgpack \xc1");
  expect_ack(*client_, "r-1");

  auto all = cli({"events", "--stream", "orders"});
  ASSERT_EQ(all.code, 0) << all;
  auto lines = json_lines(all);
  ASSERT_EQ(lines.size(), 3u) << all;
  EXPECT_EQ(lines[0]["stream"], "orders");
  EXPECT_EQ(lines[0]["stream_seq"], 1);
  EXPECT_EQ(lines[0]["topic"], "order.created");
  EXPECT_EQ(lines[0]["id"], "o-1");
  EXPECT_EQ(lines[0]["correlation_id"], "corr-o-1");
  EXPECT_EQ(lines[0]["payload"], json({{"orderId", "A-1"}}));
  EXPECT_GT(lines[0]["ts"].get<std::uint64_t>(), 0u);
  EXPECT_EQ(lines[2]["stream_seq"], 3);
  EXPECT_EQ(lines[2]["payload"]["size"], 13) << "not msgpack: its size and bytes";

  auto from = cli({"events", "--stream", "orders", "--from", "2"});
  ASSERT_EQ(from.code, 0) << from;
  lines = json_lines(from);
  ASSERT_EQ(lines.size(), 2u) << from;
  EXPECT_EQ(lines[0]["stream_seq"], 2);

  auto since = cli({"events", "order.", "--stream", "orders", "--since", "10m"});
  ASSERT_EQ(since.code, 0) << since;
  lines = json_lines(since);
  ASSERT_EQ(lines.size(), 2u) << "the prefix filters a replay too\n" << since;
  EXPECT_EQ(lines[1]["topic"], "order.raw");

  auto count = cli({"events", "--stream", "orders", "--count", "5"});
  EXPECT_EQ(count.code, 1) << "fewer than --count stored\n" << count;

  auto unknown = cli({"events", "--stream", "nope"});
  EXPECT_EQ(unknown.code, 1) << unknown;
  EXPECT_TRUE(unknown.has("ensemble: events --stream nope: not_found: ")) << unknown;
  auto bad_since = cli({"events", "--stream", "orders", "--since", "soon"});
  EXPECT_EQ(bad_since.code, 2) << bad_since;
  EXPECT_TRUE(bad_since.has("--since")) << bad_since;
  auto no_stream = cli({"events", "--from", "2"});
  EXPECT_EQ(no_stream.code, 2) << no_stream;
  EXPECT_TRUE(no_stream.has("give --stream NAME too")) << no_stream;
}

// ----- consumers

TEST_F(cli_streams_test, consumers_add_list_info_rm) {
  start_with_orders();
  publish_json("order.created", "o-1", {{"orderId", "A-1"}});

  auto add = cli({"consumers", "orders", "add", "billing", "--filter", "order.,shipment.",
                  "--ack-wait", "45s", "--max-deliver", "3", "--max-ack-pending", "50",
                  "--ordered-by", "correlation_id", "--backoff", "1s,5s", "--start", "seq:2"});
  ASSERT_EQ(add.code, 0) << add;
  EXPECT_TRUE(add.has("added consumer billing on stream orders")) << add;
  const auto info = admin("consumer_info", {{"stream", "orders"}, {"name", "billing"}});
  const auto& config = info["config"];
  EXPECT_EQ(config["filter"], json::array({"order.", "shipment."})) << info;
  EXPECT_EQ(config["ack_wait_ms"], 45'000) << info;
  EXPECT_EQ(config["max_deliver"], 3) << info;
  EXPECT_EQ(config["max_ack_pending"], 50) << info;
  EXPECT_EQ(config["ordered_by"], "correlation_id") << info;
  EXPECT_EQ(config["backoff_ms"], json::array({1000, 5000})) << info;
  EXPECT_EQ(config["start"], "seq") << info;
  EXPECT_EQ(config["start_seq"], 2) << info;

  auto time_start = cli({"consumers", "orders", "add", "recent", "--start", "time:10m"});
  ASSERT_EQ(time_start.code, 0) << time_start;
  EXPECT_EQ(admin("consumer_info", {{"stream", "orders"}, {"name", "recent"}})["config"]["start"],
            "time");

  auto list = cli({"consumers", "orders"});
  ASSERT_EQ(list.code, 0) << list;
  EXPECT_NE(list.line("billing ").find("ordered_by=correlation_id"), std::string::npos) << list;
  EXPECT_FALSE(list.line("recent ").empty()) << list;
  auto as_json = cli({"consumers", "orders", "--json"});
  ASSERT_EQ(as_json.code, 0) << as_json;
  EXPECT_EQ(as_json.document()["consumers"].size(), 2u) << as_json;

  auto shown = cli({"consumers", "orders", "info", "billing"});
  ASSERT_EQ(shown.code, 0) << shown;
  EXPECT_TRUE(shown.has("ordered_by       correlation_id")) << shown;
  EXPECT_TRUE(shown.has("backoff          1s,5s")) << shown;
  EXPECT_TRUE(shown.has("start            seq:2")) << shown;

  auto rm = cli({"consumers", "orders", "rm", "billing"});
  ASSERT_EQ(rm.code, 0) << rm;
  auto gone = cli({"consumers", "orders", "info", "billing"});
  EXPECT_EQ(gone.code, 1) << gone;
  EXPECT_TRUE(gone.has("ensemble: consumers orders info billing: not_found: ")) << gone;
}

TEST_F(cli_streams_test, consumers_refusals_and_bad_arguments) {
  start_with_orders();
  auto unknown = cli({"consumers", "nope"});
  EXPECT_EQ(unknown.code, 1) << unknown;
  EXPECT_TRUE(unknown.has("ensemble: consumers nope: not_found: ")) << unknown;
  auto on_dlq = cli({"consumers", "orders-dlq", "add", "x"});
  EXPECT_EQ(on_dlq.code, 1) << on_dlq;

  auto start = cli({"consumers", "orders", "add", "c", "--start", "later"});
  EXPECT_EQ(start.code, 2) << start;
  EXPECT_TRUE(start.has("--start: \"later\" is not a start position")) << start;
  auto seq0 = cli({"consumers", "orders", "add", "c", "--start", "seq:0"});
  EXPECT_EQ(seq0.code, 2) << seq0;
  auto order = cli({"consumers", "orders", "add", "c", "--ordered-by", "colour"});
  EXPECT_EQ(order.code, 2) << order;
  EXPECT_TRUE(order.has("--ordered-by")) << order;
  auto wait = cli({"consumers", "orders", "add", "c", "--ack-wait", "0"});
  EXPECT_EQ(wait.code, 2) << wait;
  auto backoff = cli({"consumers", "orders", "add", "c", "--backoff", "1s,later"});
  EXPECT_EQ(backoff.code, 2) << backoff;
  EXPECT_TRUE(backoff.has("--backoff: \"later\"")) << backoff;
  EXPECT_EQ(admin_error("consumer_info", {{"stream", "orders"}, {"name", "c"}}).error_code,
            "not_found");
}

// ----- dead letters

TEST_F(cli_streams_test, dlq_lists_shows_and_replays_a_dead_letter) {
  start_with_orders();
  publish_json("order.created", "o-1", {{"orderId", "A-1"}});
  publish_json("order.created", "o-2", {{"orderId", "A-2"}, {"items", json::array()}});
  auto m = member("audit-1");
  header consume;
  consume.id = next_id("consume-");
  consume.stream = "orders";
  consume.consumer = "audit";
  consume.capacity = 5;
  m->send(command::consume, consume);
  ASSERT_FALSE(m->expect(command::reply, ensemble::test::raw_peer::k_default_wait).hdr.is_error());
  auto first = m->expect(command::deliver, ensemble::test::raw_peer::k_default_wait);
  auto second = m->expect(command::deliver, ensemble::test::raw_peer::k_default_wait);
  ASSERT_EQ(second.hdr.stream_seq, 2u);
  header answer;
  answer.stream = "orders";
  answer.consumer = "audit";
  answer.stream_seq = 1;
  m->send(command::ack, answer);
  answer.stream_seq = 2;
  answer.error_message = "invalid order: no items";
  answer.error_code = "invalid";
  answer.id = next_id("term-");
  m->send(command::term, answer);
  ASSERT_FALSE(m->expect(command::reply, ensemble::test::raw_peer::k_default_wait).hdr.is_error());

  auto list = cli({"dlq", "orders"});
  ASSERT_EQ(list.code, 0) << list;
  const auto row = list.line("order.created");
  ASSERT_FALSE(row.empty()) << list;
  std::istringstream words(row);
  std::string seq, time, topic, original, consumer, deliveries;
  words >> seq >> time >> topic >> original >> consumer >> deliveries;
  EXPECT_EQ(seq, "1") << row;
  EXPECT_EQ(original, "2") << row;
  EXPECT_EQ(consumer, "audit") << row;
  EXPECT_EQ(deliveries, "1") << row;
  EXPECT_NE(row.find("invalid: invalid order: no items"), std::string::npos) << row;

  auto show = cli({"dlq", "orders", "show", "1"});
  ASSERT_EQ(show.code, 0) << show;
  EXPECT_TRUE(show.has("orders #2")) << show;
  EXPECT_TRUE(show.has("event id       o-2")) << show;
  EXPECT_TRUE(show.has("\"orderId\": \"A-2\"")) << "the payload as JSON\n" << show;
  auto shown_json = cli({"dlq", "orders", "show", "1", "--json"});
  ASSERT_EQ(shown_json.code, 0) << shown_json;
  EXPECT_EQ(shown_json.document()["payload"]["orderId"], "A-2") << shown_json;

  auto missing = cli({"dlq", "orders", "show", "9"});
  EXPECT_EQ(missing.code, 1) << missing;
  EXPECT_TRUE(missing.has("ensemble: dlq orders show 9: not_found: no dead letter 9 in orders-dlq"))
      << missing;

  auto replay = cli({"dlq", "orders", "replay", "1"});
  ASSERT_EQ(replay.code, 0) << replay;
  EXPECT_TRUE(replay.has("replayed orders-dlq #1 to orders #3 for consumer audit")) << replay;
  auto again = m->expect(command::deliver, ensemble::test::raw_peer::k_default_wait);
  EXPECT_EQ(again.hdr.stream_seq, 3u);
  EXPECT_EQ(again.hdr.consumer, "audit");
  (void)first;

  auto bad = cli({"dlq", "orders", "replay", "7"});
  EXPECT_EQ(bad.code, 1) << bad;
  EXPECT_TRUE(bad.has("ensemble: dlq orders replay 7: ")) << bad;
  auto unknown = cli({"dlq", "nope"});
  EXPECT_EQ(unknown.code, 1) << unknown;
  EXPECT_TRUE(unknown.has("ensemble: dlq nope: not_found: ")) << unknown;
}

// ----- deployments

class cli_streams_deployment_test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "ensemble-cli-streams-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    if (up_) {
      up_->signal(SIGINT);
      (void)up_->wait_exit(k_deadline);
    }
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  void write(const std::string& text) { std::ofstream(dir_ / "deployment.yaml") << text; }

  // `ensemble up DIR` until its ready line; returns the router and events endpoints.
  std::pair<std::string, std::string> up() {
    up_ = tk::process::spawn({tk::binary_path("ensemble"),
                              {"up", dir_.string(), "--no-color"},
                              k_no_endpoints,
                              dir_.string(),
                              "ensemble-up"});
    const std::string ready = "ensemble up: ready ";
    const auto line = up_->wait_for_line(ready, k_deadline);
    if (!line) {
      ADD_FAILURE() << up_->tail(60);
      return {};
    }
    std::istringstream words(line->substr(line->find(ready) + ready.size()));
    std::string word, router, events;
    while (words >> word) {
      if (word.rfind("router=", 0) == 0) router = word.substr(7);
      if (word.rfind("events=", 0) == 0) events = word.substr(7);
    }
    return {router, events};
  }
  void stop() {
    up_->signal(SIGINT);
    EXPECT_EQ(up_->wait_exit(k_deadline), 0) << up_->tail(60);
    up_.reset();
  }

  fs::path dir_;
  std::unique_ptr<tk::process> up_;
};

const std::string k_streams_deployment =
    "broker:\n"
    "  router: tcp://127.0.0.1:*\n"
    "  events: tcp://127.0.0.1:*\n"
    "streams:\n"
    "  - name: orders\n"
    "    topics: [order., shipment.]\n"
    "    max_age: 7d\n"
    "    duplicate_window: 30s\n";

// With an orchestrator whose state outlives the run (a store file), the streams do too: they
// are kept beside the file.
TEST_F(cli_streams_deployment_test, up_declares_the_streams_and_they_outlive_the_up) {
  write(k_streams_deployment + "orchestrator:\n  store: state.db\n");
  auto [router, events] = up();
  ASSERT_FALSE(router.empty());
  EXPECT_TRUE(fs::is_directory(dir_ / ".ensemble" / "data")) << up_->tail(60);
  // Commands run in the deployment's directory find it through .ensemble/up.json.
  auto published = run_cli({"publish", "order.created", R"({"orderId": "A-1"})"}, dir_.string());
  ASSERT_EQ(published.code, 0) << published;
  auto info = run_cli({"streams", "info", "orders", "--json"}, dir_.string());
  ASSERT_EQ(info.code, 0) << info;
  EXPECT_EQ(info.document()["count"], 1) << info;
  EXPECT_EQ(info.document()["duplicate_window_ms"], 30'000) << info;
  stop();

  // A second `up` of the same file: its broker finds the stream and the stored event.
  std::tie(router, events) = up();
  ASSERT_FALSE(router.empty());
  auto again = run_cli({"streams", "info", "orders", "--json"}, dir_.string());
  ASSERT_EQ(again.code, 0) << again;
  EXPECT_EQ(again.document()["count"], 1) << again;
  EXPECT_EQ(again.document()["last_seq"], 1) << again;
  stop();
}

// Without one (no orchestrator, or an in-memory store), the streams live in a temporary
// directory of the run: the next `up` starts from empty streams, and nothing is left behind.
TEST_F(cli_streams_deployment_test, without_a_durable_orchestrator_the_streams_last_one_up) {
  write(k_streams_deployment);
  auto [router, events] = up();
  ASSERT_FALSE(router.empty());
  auto published = run_cli({"publish", "order.created", R"({"orderId": "A-1"})"}, dir_.string());
  ASSERT_EQ(published.code, 0) << published;
  auto info = run_cli({"streams", "info", "orders", "--json"}, dir_.string());
  ASSERT_EQ(info.code, 0) << info;
  EXPECT_EQ(info.document()["count"], 1) << info;
  EXPECT_FALSE(fs::exists(dir_ / ".ensemble" / "data")) << "nothing stored beside the file";
  stop();
  std::tie(router, events) = up();
  ASSERT_FALSE(router.empty());
  auto again = run_cli({"streams", "info", "orders", "--json"}, dir_.string());
  ASSERT_EQ(again.code, 0) << again;
  EXPECT_EQ(again.document()["count"], 0) << again;
  stop();
}

TEST_F(cli_streams_deployment_test, the_testkit_stores_a_files_streams_in_its_own_temp_dir) {
  write(k_streams_deployment);
  auto d = tk::deployment::from_file(dir_.string());
  d.start();
  auto published = run_cli({"--broker", d.router(), "--events", d.events(), "publish",
                            "shipment.sent", R"({"orderId": "A-1"})"});
  ASSERT_EQ(published.code, 0) << published;
  auto info = run_cli(
      {"--broker", d.router(), "--events", d.events(), "streams", "info", "orders", "--json"});
  ASSERT_EQ(info.code, 0) << info;
  EXPECT_EQ(info.document()["count"], 1) << info;
  EXPECT_TRUE(fs::is_directory(fs::path(d.dir()) / "data" / "orders"));
  EXPECT_FALSE(fs::exists(dir_ / ".ensemble")) << "nothing stored beside the file";
}

TEST_F(cli_streams_deployment_test, up_data_option_and_broker_data_say_where) {
  write(
      "broker:\n"
      "  router: tcp://127.0.0.1:*\n"
      "  events: tcp://127.0.0.1:*\n"
      "  data: stored\n");
  auto [router, events] = up();
  ASSERT_FALSE(router.empty());
  EXPECT_TRUE(fs::is_directory(dir_ / "stored")) << up_->tail(60);
  // A broker with storage and no declared streams: streams can be added at run time.
  auto add = run_cli({"streams", "add", "audit", "--topics", "audit."}, dir_.string());
  EXPECT_EQ(add.code, 0) << add;
  stop();
  EXPECT_TRUE(fs::is_directory(dir_ / "stored" / "audit")) << "the stream is in broker.data";
}

TEST_F(cli_streams_deployment_test, validate_names_file_path_and_line_of_bad_streams) {
  write(
      "broker:\n"
      "  router: tcp://127.0.0.1:*\n"
      "streams:\n"
      "  - name: orders\n"
      "    topics: [order.]\n"
      "  - name: bad name\n"
      "    topics: [ord]\n"
      "    max_age: 7x\n"
      "    max_bytes: 1G\n"
      "    retention: 1\n"
      "  - topics: [_control.]\n");
  const auto file = (dir_ / "deployment.yaml").string();
  auto v = run_cli({"validate", "--deployment", file});
  EXPECT_EQ(v.code, 1) << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[1].name: stream name 'bad name' has a character "))
      << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[1].max_age: \"7x\" is not a duration")) << v;
  EXPECT_TRUE(v.has("(line 8")) << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[1].max_bytes: \"1G\" is not a whole number")) << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[1].retention: unknown key")) << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[2]: missing required key \"name\"")) << v;
  EXPECT_TRUE(v.has("deployment.yaml: streams[2].topics[0]: topic prefix '_control.' starts with"))
      << v;

  write(
      "broker:\n"
      "  router: tcp://127.0.0.1:*\n"
      "streams:\n"
      "  - name: orders\n"
      "    topics: [order.]\n"
      "  - name: payments\n"
      "    topics: [order.paid]\n");
  auto overlap = run_cli({"validate", "--deployment", file});
  EXPECT_EQ(overlap.code, 1) << overlap;
  EXPECT_TRUE(overlap.has("deployment.yaml: streams[1].topics: overlaps stream orders")) << overlap;

  // `up` refuses the same file before starting anything.
  auto refused = run_cli({"up", file, "--no-color"});
  EXPECT_EQ(refused.code, 2) << refused;
  EXPECT_TRUE(refused.has("streams[1].topics: overlaps stream orders")) << refused;
}

}  // namespace
