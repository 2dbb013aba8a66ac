// A real broker under bad input: a raw DEALER sends garbage, wrong framing, malformed headers,
// invalid requests and publishes, oversized messages and commands only the broker may send.
// Each must be answered as docs/protocol.md says (ERROR, or REPLY when the request's id could
// be read), with bad_request/too_large and a message naming the frame or field; the
// `malformed` counter must follow; and a well-behaved worker and client must keep being
// served throughout.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/raw_peer.hpp"

namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using ensemble::test::raw_peer;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 5s;  // generous: only reached when something is broken
constexpr std::size_t k_max_message_size = 65536;

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

const std::string k_tag(ec::k_protocol_tag);
std::string cmd_frame(command c) {
  return std::string(1, static_cast<char>(c));
}
std::string raw_header(const json& j) {
  const auto bytes = json::to_msgpack(j);
  return {bytes.begin(), bytes.end()};
}
std::string request_header(const std::string& id) {
  header h;
  h.id = id;
  h.service = "Echo";
  h.action = "say";
  h.deadline_ms = 5000;
  return ec::encode_header(h);
}

class broker_malformed_test : public ::testing::Test {
 protected:
  void SetUp() override {
    broker_ = tk::broker_process::start({"--max-message-size", std::to_string(k_max_message_size)});
    worker_ = std::make_unique<raw_peer>(ctx_, broker_->router());
    header hello;
    hello.agent = "good-worker";
    hello.services = {{"Echo", 1}};
    worker_->send(command::hello, hello);
    worker_->expect(command::welcome);
    client_ = std::make_unique<raw_peer>(ctx_, broker_->router());
    bad_ = std::make_unique<raw_peer>(ctx_, broker_->router());
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }

  // The good pair: a request from the client, served by the worker, answered.
  void expect_still_serving() {
    header h;
    h.id = "good-" + std::to_string(++good_);
    h.service = "Echo";
    h.action = "say";
    h.deadline_ms = 5000;
    client_->send(command::request, h, "ping");
    auto d = worker_->expect(command::dispatch);
    EXPECT_EQ(d.hdr.id, h.id);
    header reply;
    reply.id = d.hdr.id;
    reply.token = d.hdr.token;
    worker_->send(command::reply, reply, d.payload);
    auto r = client_->expect(command::reply);
    EXPECT_EQ(r.hdr.id, h.id);
    EXPECT_FALSE(r.hdr.is_error()) << r.hdr.error_code << ": " << r.hdr.error_message;
    EXPECT_EQ(r.payload, "ping");
  }

  json stats() {
    header h;
    h.id = "stats-" + std::to_string(++good_);
    h.service = "broker";
    h.action = "stats";
    h.deadline_ms = 5000;
    client_->send(command::request, h);
    auto r = client_->expect(command::reply);
    EXPECT_EQ(r.hdr.id, h.id);
    if (r.hdr.is_error() || r.payload.empty()) {
      ADD_FAILURE() << "stats failed: " << r.hdr.error_code << " " << r.hdr.error_message;
      return json::object();
    }
    return json::from_msgpack(r.payload);
  }
  std::uint64_t malformed() { return stats().value("malformed", std::uint64_t{0}); }

  zmq::context_t ctx_{1};
  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<raw_peer> worker_;
  std::unique_ptr<raw_peer> client_;
  std::unique_ptr<raw_peer> bad_;
  int good_ = 0;
};

struct bad_case {
  std::string name;
  std::vector<std::string> frames;
  command answer;                     // ERROR, or REPLY when a request id could be read
  std::string code;                   // error_code expected
  std::vector<std::string> mentions;  // substrings the error_message must contain
  std::string id = {};                // id the answer must carry ("" = none expected)
  bool counts_as_malformed = true;
};

std::vector<bad_case> bad_cases() {
  const std::string long_id(ec::k_max_id_length + 1, 'i');
  const std::string truncated = request_header("t-1").substr(0, 10);
  std::vector<bad_case> cases = {
      {"garbage single frame",
       {"hello, broker"},
       command::error,
       "bad_request",
       {"frame 0", "protocol tag"}},
      {"empty single frame", {""}, command::error, "bad_request", {"frame 0", "0 bytes"}},
      {"wrong tag",
       {"ENS\x02", cmd_frame(command::request), request_header("w-1")},
       command::error,
       "bad_request",
       {"frame 0", "protocol tag"}},
      {"tag alone", {k_tag}, command::error, "bad_request", {"at least 3"}},
      {"no header frame",
       {k_tag, cmd_frame(command::request)},
       command::error,
       "bad_request",
       {"at least 3"}},
      // The header of a message with an unknown command is still read: its id is known.
      {"unknown command byte",
       {k_tag, std::string("\x4f"), request_header("u-1")},
       command::error,
       "bad_request",
       {"unknown command 0x4f"},
       "u-1"},
      {"two-byte command frame",
       {k_tag, std::string("\x10\x10"), request_header("u-2")},
       command::error,
       "bad_request",
       {"frame 1 (command)"}},
      // From here on the header is a map with a readable id: a REQUEST is answered with a
      // REPLY carrying it, whatever else is wrong (docs/protocol.md, "Refusals").
      {"five frames",
       {k_tag, cmd_frame(command::request), request_header("f-1"), "payload", "extra"},
       command::reply,
       "bad_request",
       {"REQUEST has 5 frames"},
       "f-1"},
      {"truncated msgpack header",
       {k_tag, cmd_frame(command::request), truncated},
       command::error,
       "bad_request",
       {"REQUEST", "truncated"}},
      {"header with trailing bytes",
       {k_tag, cmd_frame(command::request), request_header("tb-1") + std::string(1, '\0')},
       command::reply,
       "bad_request",
       {"trailing bytes"},
       "tb-1"},
      {"header not a map",
       {k_tag, cmd_frame(command::request), raw_header(json::array({1}))},
       command::error,
       "bad_request",
       {"must be a msgpack map"}},
      {"header with a non-str key",
       {k_tag, cmd_frame(command::request), std::string("\x81\x01\xa1x", 4)},
       command::error,
       "bad_request",
       {"keys must be str"}},
      {"deadline_ms as str",
       {k_tag, cmd_frame(command::request),
        raw_header(
            {{"id", "d-1"}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", "soon"}})},
       command::reply,
       "bad_request",
       {"'deadline_ms'", "str 'soon'", "milliseconds"},
       "d-1"},
      {"deadline_ms negative",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "d-2"}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", -5}})},
       command::reply,
       "bad_request",
       {"'deadline_ms'", "negative int -5"},
       "d-2"},
      {"deadline_ms float",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "d-3"}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", 1.5}})},
       command::reply,
       "bad_request",
       {"'deadline_ms'", "float 1.5"},
       "d-3"},
      {"deadline_ms 0",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "d-4"}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", 0}})},
       command::reply,
       "bad_request",
       {"'deadline_ms' is 0", "at least 1"},
       "d-4"},
      {"service as uint",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "s-1"}, {"service", 7}, {"action", "say"}, {"deadline_ms", 1000}})},
       command::reply,
       "bad_request",
       {"'service'", "must be a str", "uint 7"},
       "s-1"},
      {"correlation_id as uint",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "ci-1"},
                    {"service", "Echo"},
                    {"action", "say"},
                    {"deadline_ms", 1000},
                    {"correlation_id", 42}})},
       command::reply,
       "bad_request",
       {"'correlation_id'", "uint 42"},
       "ci-1"},
      {"id as uint",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", 9}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", 1000}})},
       command::error,
       "bad_request",
       {"'id'", "must be a str"}},
      {"retryable as uint",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "r-1"},
                    {"service", "Echo"},
                    {"action", "say"},
                    {"deadline_ms", 1000},
                    {"retryable", "yes"}})},
       command::reply,
       "bad_request",
       {"'retryable'", "bool", "str 'yes'"},
       "r-1"},
      // Oversized, not malformed: too_large, counted in errors_by_code like a message over
      // max_message_size; the id is still read.
      {"header over 16 KiB",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "h-1"}, {"x_pad", std::string(20000, 'p')}})},
       command::reply,
       "too_large",
       {"header frame", "16384"},
       "h-1",
       false},
      {"REQUEST without id",
       {k_tag, cmd_frame(command::request),
        raw_header({{"service", "Echo"}, {"action", "say"}, {"deadline_ms", 1000}})},
       command::error,
       "bad_request",
       {"without 'id'", "so that its answer can be matched"}},
      {"REQUEST without deadline_ms",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "nd-1"}, {"service", "Echo"}, {"action", "say"}})},
       command::reply,
       "bad_request",
       {"without 'deadline_ms'", "at least 1"},
       "nd-1"},
      {"REQUEST with an invalid service name",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "sn-1"},
                    {"service", "Echo Service"},
                    {"action", "say"},
                    {"deadline_ms", 1000}})},
       command::reply,
       "bad_request",
       {"'service' 'Echo Service' has a space at byte 4", "printable ASCII without spaces"},
       "sn-1"},
      {"REQUEST without action",
       {k_tag, cmd_frame(command::request),
        raw_header({{"id", "na-1"}, {"service", "Echo"}, {"deadline_ms", 1000}})},
       command::reply,
       "bad_request",
       {"'action'"},
       "na-1"},
      {"REQUEST with an over-long id",
       {k_tag, cmd_frame(command::request),
        raw_header(
            {{"id", long_id}, {"service", "Echo"}, {"action", "say"}, {"deadline_ms", 1000}})},
       command::reply,
       "bad_request",
       {"'id'", "256"},
       long_id},
      {"PUBLISH with an empty topic segment",
       {k_tag, cmd_frame(command::publish), raw_header({{"id", "e-1"}, {"topic", "order..x"}})},
       command::error,
       "bad_request",
       {"topic", "empty segment"},
       "e-1"},
      {"PUBLISH with a bad topic character",
       {k_tag, cmd_frame(command::publish), raw_header({{"id", "e-2"}, {"topic", "order/x"}})},
       command::error,
       "bad_request",
       {"topic", "has '/' at byte 5"},
       "e-2"},
      {"PUBLISH with ack as str",
       {k_tag, cmd_frame(command::publish),
        raw_header({{"id", "e-4"}, {"topic", "order.x"}, {"ack", "please"}})},
       command::error,
       "bad_request",
       {"'ack'", "bool", "str 'please'"},
       "e-4"},
      {"PUBLISH without topic",
       {k_tag, cmd_frame(command::publish), raw_header({{"id", "e-3"}})},
       command::error,
       "bad_request",
       {"topic"},
       "e-3"},
      {"PUBLISH with an over-long id",
       {k_tag, cmd_frame(command::publish),
        raw_header({{"id", long_id}, {"topic", "order.created"}})},
       command::error,
       "bad_request",
       {"PUBLISH 'id'", "256"},
       long_id},
      {"PUBLISH without id",
       {k_tag, cmd_frame(command::publish), raw_header({{"topic", "order.created"}})},
       command::error,
       "bad_request",
       {"'id'"}},
      {"HELLO with capacity 0",
       {k_tag, cmd_frame(command::hello),
        raw_header(
            {{"agent", "a"}, {"services", json::array({json{{"name", "S"}, {"capacity", 0}}})}})},
       command::error,
       "bad_request",
       {"services[0].capacity"}},
      {"HELLO with an invalid service name",
       {k_tag, cmd_frame(command::hello),
        raw_header({{"agent", "a"}, {"services", json::array({json{{"name", "bad name"}}})}})},
       command::error,
       "bad_request",
       {"services[0].name"}},
  };
  for (command c : {command::welcome, command::dispatch, command::publish_ack, command::error}) {
    const std::string name = ec::command_name(static_cast<std::uint8_t>(c));
    cases.push_back({name + " sent to the broker",
                     {k_tag, cmd_frame(c), raw_header({{"id", "bo-" + name}})},
                     command::error,
                     "bad_request",
                     {name, "sent by the broker"},
                     "bo-" + name});
  }
  return cases;
}

TEST_F(broker_malformed_test, each_bad_message_is_refused_and_the_good_pair_keeps_being_served) {
  expect_still_serving();
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.name);
    const std::uint64_t before = malformed();
    bad_->send_raw(c.frames);
    auto answer = bad_->next();
    ASSERT_TRUE(answer.has_value()) << "no answer";
    EXPECT_EQ(answer->cmd, c.answer) << ec::command_name(static_cast<std::uint8_t>(answer->cmd));
    EXPECT_EQ(answer->hdr.error_code, c.code);
    EXPECT_FALSE(answer->hdr.retryable);
    for (const auto& m : c.mentions) EXPECT_TRUE(contains(answer->hdr.error_message, m));
    EXPECT_EQ(answer->hdr.id, c.id) << "the answer must carry the id when it could be read";
    if (answer->cmd == command::reply) {
      EXPECT_EQ(answer->hdr.worker, "broker") << "the broker's own answer";
    }
    EXPECT_EQ(malformed() - before, c.counts_as_malformed ? 1u : 0u)
        << "malformed counter; the answer was: " << answer->hdr.error_message;
    expect_still_serving();
  }
  const json s = stats();
  EXPECT_EQ(s["workers"], 1);  // none of the bad HELLOs registered anything
  EXPECT_EQ(s["pending"], 0);
}

// An invalid agent name is refused after the header decoded (unlike capacity 0, which the
// codec refuses): it must still be answered ERROR bad_request and counted as malformed, like an
// invalid REQUEST or PUBLISH, and register nothing.
TEST_F(broker_malformed_test, hello_with_an_invalid_agent_name_is_refused_and_counted) {
  const std::uint64_t before = malformed();
  bad_->send_raw({k_tag, cmd_frame(command::hello), raw_header({{"agent", "bad agent"}})});
  auto e = bad_->expect(command::error);
  EXPECT_EQ(e.hdr.error_code, "bad_request");
  EXPECT_TRUE(contains(e.hdr.error_message, "'agent'"));
  expect_still_serving();
  EXPECT_EQ(stats()["workers"], 1);
  EXPECT_EQ(malformed() - before, 1u) << "an invalid HELLO is a malformed message";
}

// A worker REPLY without 'token' cannot be tied to a request. It used to be dropped in
// silence, leaving the worker waiting for nothing and its caller for its deadline; the worker
// is told, with an ERROR carrying its reply's id (docs/protocol.md, "Refusals").
TEST_F(broker_malformed_test, worker_reply_without_token_is_refused_with_its_id) {
  header h;
  h.id = "no-token-1";
  h.service = "Echo";
  h.action = "say";
  h.deadline_ms = 5000;
  client_->send(command::request, h, "p");
  auto d = worker_->expect(command::dispatch);
  const std::uint64_t before = malformed();

  header tokenless;
  tokenless.id = d.hdr.id;
  worker_->send(command::reply, tokenless, "answer");
  auto e = worker_->expect(command::error);
  EXPECT_EQ(e.hdr.id, "no-token-1");
  EXPECT_EQ(e.hdr.error_code, "bad_request");
  EXPECT_FALSE(e.hdr.retryable);
  EXPECT_TRUE(contains(e.hdr.error_message, "without 'token'"));
  EXPECT_TRUE(contains(e.hdr.error_message, "echo"));
  EXPECT_EQ(malformed() - before, 1u);

  // The request is still the worker's to answer, and is answered once, properly.
  header reply;
  reply.id = d.hdr.id;
  reply.token = d.hdr.token;
  worker_->send(command::reply, reply, "answer");
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "no-token-1");
  EXPECT_FALSE(r.hdr.is_error()) << r.hdr.error_code << ": " << r.hdr.error_message;
  EXPECT_EQ(r.hdr.worker, "good-worker");
  expect_still_serving();
}

TEST_F(broker_malformed_test, oversized_request_is_answered_too_large) {
  const std::string big(100'000, 'x');
  header h;
  h.id = "big-1";
  h.service = "Echo";
  h.action = "say";
  h.deadline_ms = 5000;
  bad_->send(command::request, h, big);
  auto r = bad_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "big-1");
  EXPECT_EQ(r.hdr.error_code, "too_large");
  EXPECT_FALSE(r.hdr.retryable);
  EXPECT_TRUE(contains(r.hdr.error_message, "REQUEST"));
  EXPECT_TRUE(contains(r.hdr.error_message, std::to_string(k_max_message_size)));
  expect_still_serving();

  // An oversized PUBLISH cannot be answered with a REPLY: ERROR, with its id.
  header e;
  e.id = "big-event";
  e.topic = "order.created";
  bad_->send(command::publish, e, big);
  auto err = bad_->expect(command::error);
  EXPECT_EQ(err.hdr.id, "big-event");
  EXPECT_EQ(err.hdr.error_code, "too_large");
  EXPECT_TRUE(contains(err.hdr.error_message, "PUBLISH"));
  expect_still_serving();

  // Within the limit is fine (payload plus a small header).
  bad_->send(
      command::request,
      [] {
        header ok;
        ok.id = "fits-1";
        ok.service = "broker";
        ok.action = "ping";
        ok.deadline_ms = 5000;
        return ok;
      }(),
      std::string(k_max_message_size - 1024, 'x'));
  auto fits = bad_->expect(command::reply);
  EXPECT_EQ(fits.hdr.id, "fits-1");
  EXPECT_FALSE(fits.hdr.is_error()) << fits.hdr.error_code << ": " << fits.hdr.error_message;

  EXPECT_EQ(stats()["errors_by_code"]["too_large"], 2);
}

// docs/protocol.md: max_message_size is the largest "header + payload" the broker accepts (the
// SDK checks exactly that before sending).
TEST_F(broker_malformed_test, message_of_exactly_max_message_size_is_accepted) {
  header h;
  h.id = "exact-1";
  h.service = "broker";
  h.action = "ping";
  h.deadline_ms = 5000;
  const std::size_t header_bytes = ec::encode_header(h).size();
  bad_->send(command::request, h, std::string(k_max_message_size - header_bytes, 'x'));
  auto r = bad_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "exact-1");
  EXPECT_FALSE(r.hdr.is_error()) << r.hdr.error_code << ": " << r.hdr.error_message;

  h.id = "exact-2";
  bad_->send(command::request, h, std::string(k_max_message_size - header_bytes + 1, 'x'));
  r = bad_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "exact-2");
  EXPECT_EQ(r.hdr.error_code, "too_large");
  EXPECT_TRUE(contains(r.hdr.error_message, std::to_string(k_max_message_size + 1) + " bytes"))
      << "the size reported should be header + payload";
}

TEST_F(broker_malformed_test, oversized_worker_reply_answers_the_client_and_frees_the_worker) {
  header h;
  h.id = "to-big-reply";
  h.service = "Echo";
  h.action = "say";
  h.deadline_ms = 300;
  client_->send(command::request, h);
  auto d = worker_->expect(command::dispatch);
  header reply;
  reply.id = d.hdr.id;
  reply.token = d.hdr.token;
  worker_->send(command::reply, reply, std::string(100'000, 'r'));
  auto refused = worker_->expect(command::error);
  EXPECT_EQ(refused.hdr.error_code, "too_large");

  // The client is answered exactly once, with an error (the reply could not be carried).
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_TRUE(r.hdr.is_error());

  // The worker's only slot must not stay taken by a request it has already answered.
  expect_still_serving();
}

TEST_F(broker_malformed_test, a_flood_of_garbage_does_not_stop_service) {
  const std::uint64_t before = malformed();
  constexpr int k_flood = 1000;
  for (int i = 0; i < k_flood; ++i) bad_->send_raw({"garbage-" + std::to_string(i)});
  expect_still_serving();

  int errors = 0;
  while (errors < k_flood) {
    auto m = bad_->next();
    if (!m) break;
    EXPECT_EQ(m->cmd, command::error);
    EXPECT_EQ(m->hdr.error_code, "bad_request");
    ++errors;
  }
  EXPECT_EQ(errors, k_flood);
  EXPECT_EQ(malformed(), before + k_flood);
  expect_still_serving();
}

TEST_F(broker_malformed_test, message_over_the_hard_limit_drops_only_that_connection) {
  // Over 4 x max_message_size + 64 KiB libzmq drops the connection (docs/protocol.md,
  // section 6): no answer, the broker keeps serving others, and the peer reconnects.
  const std::uint64_t before = malformed();
  header h;
  h.id = "huge-1";
  h.service = "Echo";
  h.action = "say";
  h.deadline_ms = 5000;
  bad_->send(command::request, h, std::string(4 * k_max_message_size + 128 * 1024, 'h'));
  expect_still_serving();

  // Messages written on the dropped connection are lost: ask until one is answered.
  bool answered = false;
  for (int i = 0; !answered && i < 50; ++i) {
    header ping;
    ping.id = "after-huge-" + std::to_string(i);
    ping.service = "broker";
    ping.action = "ping";
    ping.deadline_ms = 5000;
    bad_->send(command::request, ping);
    while (auto m = bad_->next(100ms)) {
      ASSERT_NE(m->hdr.id, "huge-1") << "the oversized message was answered: " << m->hdr.error_code;
      if (m->cmd == command::reply && m->hdr.id.rfind("after-huge-", 0) == 0) answered = true;
    }
  }
  EXPECT_TRUE(answered) << "the peer was never served again after its connection was dropped";
  EXPECT_EQ(malformed(), before);  // never reached the broker
  expect_still_serving();
}

}  // namespace
