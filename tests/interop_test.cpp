// Interoperability: a Python agent written from docs/protocol.md alone
// (tests/interop/interop_agent.py, pyzmq + msgpack, no C++ code) against a real ensemble-broker
// and a C++ SDK agent. The C++ agent calls the Python service and receives the event its
// handler publishes; the Python subscriber receives the C++ agent's events by prefix, in
// order, with the broker's sequence numbers; the Python agent stays registered by its own
// heartbeats and leaves with BYE; and the Python agent, as a member of a durable consumer,
// receives the events the C++ agent stored, ACKs, NACKs and TERMs them (docs/protocol.md
// section 11, "Durable consumers"). With CURVE keys (section 12), the Python agent serves a C++
// caller of a secured broker under its identity.
//
// The Python script reports what it sees as `interop-agent ...` lines on stdout; the test waits
// on those lines, each wait with a deadline.
#include <gtest/gtest.h>

#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/message_inbox.hpp"
#include "support/temp_dir.hpp"

namespace ea = ensemble::agent;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;
using namespace std::string_literals;

namespace {

constexpr auto k_wait = 10s;  // generous: only reached when something is broken
constexpr int k_heartbeat_ms = 50;
// Missed heartbeats before the broker drops a peer, and the Python agent the broker: a wide
// window (2 s), so that a loaded machine cannot make either side give up on the other.
constexpr int k_liveness = 40;
constexpr std::size_t k_max_message_size = 65536;

const std::string k_script = std::string(ENSEMBLE_SOURCE_DIR) + "/tests/interop/interop_agent.py";

// A Python 3 that can import zmq and msgpack (Debian: python3-zmq, python3-msgpack, installed
// by scripts/install-deps.sh): $ENSEMBLE_PYTHON, else /usr/bin/python3, else python3 on PATH
// (which may be a python without the Debian packages, e.g. pyenv's).
std::optional<std::string> find_python(std::string& tried) {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ENSEMBLE_PYTHON"); env != nullptr && *env != '\0') {
    candidates.emplace_back(env);
  }
  candidates.emplace_back("/usr/bin/python3");
  candidates.emplace_back("python3");
  for (const auto& python : candidates) {
    try {
      auto p =
          tk::process::spawn({python,
                              {"-c", "import zmq, msgpack; print('interop-python-ok', flush=True)"},
                              {},
                              {},
                              "python-check"});
      const bool ok = p->wait_for_line("interop-python-ok", k_wait).has_value();
      const auto code = p->wait_exit(k_wait);
      if (ok && code == 0) return python;
      tried += "\n  " + python + ": " + p->tail(5);
    } catch (const std::exception& e) {
      tried += "\n  " + python + ": " + e.what();
    }
  }
  return std::nullopt;
}

// The value of `key=` in one output line of the Python agent (up to the next space; `body=` is
// last on its line and runs to the end).
std::string field(const std::string& line, const std::string& key) {
  const auto at = line.find(" " + key + "=");
  if (at == std::string::npos) return {};
  const auto start = at + key.size() + 2;
  if (key == "body") return line.substr(start);
  const auto end = line.find(' ', start);
  return line.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

class interop_test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tried;
    const auto python = find_python(tried);
    ASSERT_TRUE(python.has_value())
        << "the interop test needs python3 with the zmq and msgpack modules (Debian: "
           "python3-zmq python3-msgpack; scripts/install-deps.sh installs them), or "
           "ENSEMBLE_PYTHON naming such an interpreter. Tried:"
        << tried;
    broker_ = tk::broker_process::start({"--heartbeat", std::to_string(k_heartbeat_ms),
                                         "--liveness", std::to_string(k_liveness),
                                         "--max-message-size", std::to_string(k_max_message_size)});
    python_ =
        tk::process::spawn({*python,
                            {k_script, "--router", broker_->router(), "--events", broker_->events(),
                             "--name", "py-agent", "--service", "PyEcho", "--subscribe",
                             "interop.cpp.", "--liveness", std::to_string(k_liveness)},
                            {{"PYTHONUNBUFFERED", "1"}, {"PYTHONDONTWRITEBYTECODE", "1"}},
                            {},
                            "interop_agent.py"});
    ASSERT_TRUE(python_->wait_for_line("interop-agent ready", k_wait))
        << "the Python agent did not start:\n"
        << python_->tail();

    ea::options o;
    o.name = "cpp-agent";
    o.broker = broker_->router();
    o.events = broker_->events();
    o.liveness = k_liveness;
    cpp_ = std::make_unique<ea::agent>(o);
    ASSERT_TRUE(
        cpp_->subscribe("interop.py.", [this](const ea::message& m) { events_.add(m); }).ok());
    auto started = cpp_->start();
    ASSERT_TRUE(started.ok()) << started.err().to_string();
  }

  void TearDown() override {
    cpp_.reset();
    if (HasFailure()) {
      if (python_) std::cerr << "python agent output:\n" << python_->tail(60) << "\n";
      if (broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
    }
  }

  json admin(const std::string& action) {
    auto r = cpp_->call("broker", action, {}, k_wait);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.err().to_string());
    if (!r.ok()) return json::object();
    auto body = ea::from_json_payload(r->payload());
    EXPECT_TRUE(body.ok());
    return body.ok() ? *body : json::object();
  }

  ea::call_result call_python(const std::string& action, ea::bytes payload,
                              const ea::send_options& so = {}) {
    return cpp_->call("PyEcho", action, std::move(payload), k_wait, so);
  }

  // Lines of the Python agent that contain `text`, in order.
  std::vector<std::string> python_lines(const std::string& text) const {
    std::vector<std::string> out;
    for (auto& line : python_->lines()) {
      if (line.find(text) != std::string::npos) out.push_back(std::move(line));
    }
    return out;
  }

  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<tk::process> python_;
  ensemble::test::message_inbox events_;
  std::unique_ptr<ea::agent> cpp_;
};

TEST_F(interop_test, cpp_agent_calls_the_python_service_and_receives_the_event_it_publishes) {
  ea::send_options so;
  so.correlation_id = "interop-corr-1";
  so.trace_id = "interop-trace-1";
  so.id = "interop-call-1";
  auto r = call_python("upper", ea::to_json_payload({{"text", "hello from c++"}}), so);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(r->id(), "interop-call-1");
  EXPECT_EQ(r->worker(), "py-agent");
  auto body = ea::from_json_payload(r->payload());
  ASSERT_TRUE(body.ok()) << body.err().to_string();
  EXPECT_EQ((*body)["text"], "HELLO FROM C++");
  EXPECT_EQ((*body)["handled_by"], "python");
  EXPECT_EQ((*body)["correlation_id"], "interop-corr-1");  // as the Python side saw it
  EXPECT_EQ((*body)["attempt"], 1);

  // The Python handler published an event carrying the request's trace context.
  auto e = events_.wait_for("interop.py.handled", k_wait);
  ASSERT_TRUE(e.has_value()) << "the C++ agent never received interop.py.handled";
  EXPECT_EQ(e->publisher(), "py-agent");
  EXPECT_EQ(e->seq(), 1u);
  EXPECT_GT(e->timestamp_us(), 0u);
  EXPECT_EQ(e->correlation_id(), "interop-corr-1");
  EXPECT_EQ(e->causation_id(), "interop-call-1");
  EXPECT_EQ(e->trace_id(), "interop-trace-1");
  auto event_body = ea::from_json_payload(e->payload());
  ASSERT_TRUE(event_body.ok());
  EXPECT_EQ((*event_body)["request_id"], "interop-call-1");
  EXPECT_EQ((*event_body)["text"], "HELLO FROM C++");
  // ... and asked for an acknowledgement, which the broker sent it.
  auto ack = python_->wait_for_line("interop-agent ack id=" + e->id(), k_wait);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(field(*ack, "topic"), "interop.py.handled");
  EXPECT_EQ(field(*ack, "seq"), "1");

  // Payloads are opaque bytes: arbitrary binary travels unchanged both ways.
  const ea::bytes binary = "\x00\x01\xff\xfe not msgpack \x00"s;
  auto echoed = call_python("echo", binary);
  ASSERT_TRUE(echoed.ok()) << echoed.err().to_string();
  EXPECT_EQ(echoed->payload(), binary);

  // Application errors: code, message and retryable reach the C++ caller.
  auto refused = call_python("fail", ea::to_json_payload({{"text", "this order"}}));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.err().code, "interop_refused");
  EXPECT_NE(refused.err().message.find("this order"), std::string::npos) << refused.err().message;
  EXPECT_TRUE(refused.err().retryable);

  auto unknown = call_python("nope", {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.err().code, "unknown_action");
  EXPECT_FALSE(unknown.err().retryable);

  // The Python agent applies the WELCOME's max_message_size to its own replies.
  auto big = call_python("big", ea::to_json_payload({{"size", 2 * k_max_message_size}}));
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.err().code, "too_large");
  EXPECT_NE(big.err().message.find(std::to_string(k_max_message_size)), std::string::npos)
      << big.err().message;
  auto fits = call_python("big", ea::to_json_payload({{"size", k_max_message_size / 2}}));
  ASSERT_TRUE(fits.ok()) << fits.err().to_string();
  EXPECT_EQ(fits->payload().size(), k_max_message_size / 2);

  // Every call above reached the Python agent once.
  EXPECT_EQ(python_lines("interop-agent handled ").size(), 6u);
  const json stats = admin("stats");
  EXPECT_EQ(stats["malformed"], 0) << stats.dump();
  EXPECT_EQ(stats["workers_lost"], 0) << stats.dump();
}

TEST_F(interop_test, python_subscriber_receives_cpp_events_by_prefix_in_order) {
  constexpr int k_events = 5;
  ea::send_options so;
  so.correlation_id = "interop-orders";
  // Not under the Python agent's prefix "interop.cpp.": never delivered to it.
  ASSERT_TRUE(cpp_->publish("interop.cppx.noise", ea::to_json_payload({{"n", -1}}), so).ok());
  ASSERT_TRUE(cpp_->publish("other.topic", ea::to_json_payload({{"n", -2}}), so).ok());
  std::vector<std::string> ids;
  for (int i = 0; i < k_events; ++i) {
    auto p = cpp_->publish("interop.cpp.order", ea::to_json_payload({{"n", i}}), so);
    ASSERT_TRUE(p.ok()) << p.err().to_string();
    ids.push_back(p->id);
  }
  // One publisher's events reach the broker, and leave it, in order: once the last one is
  // acknowledged and has reached the subscriber, every earlier one has been fanned out.
  auto last =
      cpp_->publish_acked("interop.cpp.end", ea::to_json_payload({{"n", k_events}}), k_wait, so);
  ASSERT_TRUE(last.ok()) << last.err().to_string();
  EXPECT_EQ(last->seq, 1u);
  ASSERT_TRUE(python_->wait_for_line("interop-agent event topic=interop.cpp.end", k_wait))
      << "the Python subscriber did not receive interop.cpp.end";

  const auto received = python_lines("interop-agent event ");
  ASSERT_EQ(received.size(), static_cast<std::size_t>(k_events + 1));
  for (int i = 0; i < k_events; ++i) {
    SCOPED_TRACE(received[i]);
    EXPECT_EQ(field(received[i], "topic"), "interop.cpp.order");
    EXPECT_EQ(field(received[i], "seq"), std::to_string(i + 1));  // per topic, from 1, no gap
    EXPECT_EQ(field(received[i], "id"), ids[i]);
    EXPECT_EQ(field(received[i], "publisher"), "cpp-agent");
    EXPECT_EQ(field(received[i], "correlation"), "interop-orders");
    EXPECT_EQ(json::parse(field(received[i], "body")), json({{"n", i}}));
  }
  EXPECT_EQ(field(received.back(), "topic"), "interop.cpp.end");
  EXPECT_EQ(field(received.back(), "seq"), "1");
  EXPECT_EQ(field(received.back(), "id"), last->id);
}

TEST_F(interop_test, python_agent_stays_registered_by_heartbeat_and_leaves_with_bye) {
  // Well past the broker's window of k_liveness silent intervals: had the Python agent not
  // sent heartbeats, the broker would have dropped it and stopped sending it heartbeats.
  const int k_heartbeats = k_liveness + 10;
  ASSERT_TRUE(
      python_->wait_for_line("interop-agent heartbeat n=" + std::to_string(k_heartbeats),
                             k_wait + std::chrono::milliseconds(k_heartbeats * k_heartbeat_ms)))
      << "the Python agent stopped receiving the broker's heartbeats";
  EXPECT_EQ(python_lines("interop-agent welcome ").size(), 1u) << "it had to register again";
  const json stats = admin("stats");
  EXPECT_EQ(stats["workers_lost"], 0) << stats.dump();
  EXPECT_EQ(stats["workers"], 2) << stats.dump();  // py-agent and cpp-agent
  auto r = call_python("upper", ea::to_json_payload({{"text", "still there"}}));
  ASSERT_TRUE(r.ok()) << r.err().to_string();

  // SIGTERM: the Python agent says BYE and exits 0; its service goes away at once.
  python_->signal(SIGTERM);
  const auto code = python_->wait_exit(k_wait);
  ASSERT_TRUE(code.has_value()) << "the Python agent did not exit on SIGTERM";
  EXPECT_EQ(*code, 0);
  EXPECT_TRUE(python_->wait_for_line("interop-agent bye", k_wait));
  // The BYE and this client's requests travel on different connections, so wait until the
  // broker has processed it.
  EXPECT_TRUE(tk::wait_until(
      [&] {
        const json services = admin("services");
        for (const auto& s : services["services"]) {
          if (s["service"] == "PyEcho") return s["workers"].empty();
        }
        return false;
      },
      k_wait, 20ms))
      << admin("services").dump();
  EXPECT_EQ(admin("stats")["workers_lost"], 0);  // it left; it was not lost
  auto gone = cpp_->call("PyEcho", "upper", {}, 200ms);
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.err().code, "no_such_service") << gone.err().message;
}

// The Python agent as a member of a durable consumer, against a broker storing a stream.
class interop_consume_test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tried;
    python_path_ = find_python(tried);
    ASSERT_TRUE(python_path_.has_value()) << "the interop test needs python3 with the zmq and "
                                             "msgpack modules. Tried:"
                                          << tried;
    char tmpl[] = "/tmp/ensemble-interop-consume-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::ofstream(dir_ + "/streams.yaml") << "streams:\n"
                                             "  - name: orders\n"
                                             "    topics: [interop.order.]\n";
    broker_ = tk::broker_process::start({"--heartbeat", std::to_string(k_heartbeat_ms),
                                         "--liveness", std::to_string(k_liveness), "--data",
                                         dir_ + "/data", "--streams", dir_ + "/streams.yaml"});
    ea::options o;
    o.name = "cpp-publisher";
    o.broker = broker_->router();
    o.events = broker_->events();
    o.liveness = k_liveness;
    cpp_ = std::make_unique<ea::agent>(o);
    auto started = cpp_->start();
    ASSERT_TRUE(started.ok()) << started.err().to_string();
  }
  void TearDown() override {
    cpp_.reset();
    if (HasFailure()) {
      if (python_) std::cerr << "python agent output:\n" << python_->tail(60) << "\n";
      if (broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
    }
    python_.reset();
    broker_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void start_python(const std::vector<std::string>& more) {
    std::vector<std::string> args{k_script,    "--router",        broker_->router(),
                                  "--events",  broker_->events(), "--name",
                                  "py-member", "--liveness",      std::to_string(k_liveness)};
    args.insert(args.end(), more.begin(), more.end());
    python_ = tk::process::spawn({*python_path_,
                                  args,
                                  {{"PYTHONUNBUFFERED", "1"}, {"PYTHONDONTWRITEBYTECODE", "1"}},
                                  {},
                                  "interop_agent.py"});
  }

  json admin(const std::string& action, const json& args) {
    auto r = cpp_->call("broker", action, ea::to_json_payload(args), k_wait);
    EXPECT_TRUE(r.ok()) << action << ": " << (r.ok() ? "" : r.err().to_string());
    if (!r.ok()) return json::object();
    auto body = ea::from_json_payload(r->payload());
    return body.ok() ? *body : json::object();
  }

  std::vector<std::string> python_lines(const std::string& text) const {
    std::vector<std::string> out;
    for (auto& line : python_->lines()) {
      if (line.find(text) != std::string::npos) out.push_back(std::move(line));
    }
    return out;
  }

  std::optional<std::string> python_path_;
  std::string dir_;
  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<ea::agent> cpp_;
  std::unique_ptr<tk::process> python_;
};

TEST_F(interop_consume_test, python_member_acks_nacks_and_terms_stored_events) {
  // Stored before the consumer exists: start "all" delivers them.
  std::vector<ea::published> stored;
  for (const char* what : {"ack", "nack_once", "term"}) {
    ea::send_options so;
    so.correlation_id = std::string("interop-") + what;
    auto p = cpp_->publish_acked("interop.order.placed", ea::to_json_payload({{"do", what}}),
                                 k_wait, so);
    ASSERT_TRUE(p.ok()) << p.err().to_string();
    EXPECT_EQ(p->stream, "orders");
    stored.push_back(*p);
  }
  start_python({"--consume", "orders/py-billing", "--consume-capacity", "2", "--consume-config",
                R"({"max_deliver": 3, "ack_wait_ms": 60000})"});
  auto joined = python_->wait_for_line("interop-agent consuming", k_wait);
  ASSERT_TRUE(joined.has_value()) << "the Python member did not join";
  EXPECT_EQ(field(*joined, "stream"), "orders");
  EXPECT_EQ(field(*joined, "consumer"), "py-billing");
  EXPECT_EQ(field(*joined, "members"), "1");

  json info;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        info = admin("consumer_info", {{"stream", "orders"}, {"name", "py-billing"}});
        return info.value("ack_floor", 0ULL) >= 3;
      },
      k_wait, 20ms))
      << info.dump();
  EXPECT_EQ(info["acked"], 2) << info.dump();
  EXPECT_EQ(info["redelivered"], 1) << info.dump();
  EXPECT_EQ(info["dead_lettered"], 1) << info.dump();
  EXPECT_EQ(info["config"]["max_deliver"], 3) << info.dump();  // its CONSUME payload
  EXPECT_EQ(info["config"]["ack_wait_ms"], 60000) << info.dump();
  ASSERT_EQ(info["members"].size(), 1u);
  EXPECT_EQ(info["members"][0]["agent"], "py-member");
  EXPECT_EQ(info["members"][0]["capacity"], 2);

  // What the Python member saw and answered, per stream_seq.
  std::map<std::string, std::vector<std::string>> answers;  // "seq" -> "deliveries:answer"
  for (const auto& line : python_lines("interop-agent delivery ")) {
    SCOPED_TRACE(line);
    EXPECT_EQ(field(line, "stream"), "orders");
    EXPECT_EQ(field(line, "consumer"), "py-billing");
    EXPECT_EQ(field(line, "topic"), "interop.order.placed");
    const auto seq = std::stoul(field(line, "stream_seq"));
    ASSERT_GE(seq, 1u);
    ASSERT_LE(seq, stored.size());
    EXPECT_EQ(field(line, "id"), stored[seq - 1].id);
    EXPECT_EQ(field(line, "correlation").rfind("interop-", 0), 0u);
    answers[field(line, "stream_seq")].push_back(field(line, "deliveries") + ":" +
                                                 field(line, "answer"));
  }
  EXPECT_EQ(answers["1"], std::vector<std::string>({"1:ACK"}));
  EXPECT_EQ(answers["2"], std::vector<std::string>({"1:NACK", "2:ACK"}));
  EXPECT_EQ(answers["3"], std::vector<std::string>({"1:TERM"}));
  EXPECT_TRUE(python_lines("interop-agent refused").empty())
      << python_lines("interop-agent refused").front();

  // The TERM's code and reason are kept with the dead letter.
  auto dlq = admin("stream_read", {{"name", "orders-dlq"}});
  ASSERT_EQ(dlq["records"].size(), 1u) << dlq.dump();
  const auto& dead = dlq["records"][0]["header"];
  EXPECT_EQ(dead["stream_seq"], 3);
  EXPECT_EQ(dead["consumer"], "py-billing");
  // The code: in `error_code` (docs/protocol.md), or as the broker stores it today, the prefix
  // `code: ` of error_message.
  EXPECT_TRUE(dead.value("error_code", std::string()) == "interop_term" ||
              dead.value("error_message", std::string()).rfind("interop_term: ", 0) == 0)
      << dead.dump();
  EXPECT_NE(dead["error_message"].get<std::string>().find(stored[2].id), std::string::npos)
      << dead.dump();

  // SIGTERM: BYE; the member is gone from the consumer.
  python_->signal(SIGTERM);
  ASSERT_EQ(python_->wait_exit(k_wait), 0);
  EXPECT_TRUE(tk::wait_until(
      [&] {
        return admin("consumer_info", {{"stream", "orders"}, {"name", "py-billing"}})["members"]
            .empty();
      },
      k_wait, 20ms));
}

}  // namespace

// Secured mode (section 12): the Python agent is a CURVE client with its own key, read from the
// certificate files `ensemble keygen` writes (zmq.auth.load_certificate); it serves a C++ caller
// under its identity, and the event its handler publishes reaches the caller's subscription.
TEST(interop_secured_test, python_agent_with_curve_keys_serves_a_cpp_caller) {
  namespace ec = ensemble::common;
  if (!ec::curve_available()) GTEST_SKIP() << "this libzmq has no CURVE";
  std::string tried;
  const auto python = find_python(tried);
  ASSERT_TRUE(python.has_value()) << "the interop test needs python3 with zmq and msgpack. Tried:"
                                  << tried;
  ensemble::test::temp_dir dir{"ensemble-interop-secured"};
  for (const char* name : {"broker", "py-agent", "cpp-caller"}) {
    ec::write_curve_key_files(dir.file("keys"), name, ec::generate_curve_keys());
  }
  const auto auth = dir.write("auth.yaml", R"(identities:
  py-agent:
    keys: [keys/py-agent.key]
    offer: [PyEcho]
    publish: [interop.py.]
  cpp-caller:
    keys: [keys/cpp-caller.key]
    call: ["PyEcho.*"]
    subscribe: [interop.py.]
)");
  auto broker = tk::broker_process::start({"--heartbeat", std::to_string(k_heartbeat_ms),
                                           "--liveness", std::to_string(k_liveness), "--curve-key",
                                           dir.file("keys/broker.key_secret"), "--auth", auth});
  auto py = tk::process::spawn(
      {*python,
       {k_script, "--router", broker->router(), "--events", broker->events(), "--name", "py-agent",
        "--service", "PyEcho", "--subscribe", "interop.py.", "--liveness",
        std::to_string(k_liveness), "--key", dir.file("keys/py-agent.key_secret"), "--broker-key",
        dir.file("keys/broker.key")},
       {{"PYTHONUNBUFFERED", "1"}, {"PYTHONDONTWRITEBYTECODE", "1"}},
       {},
       "interop_agent.py"});
  ASSERT_TRUE(py->wait_for_line("interop-agent ready", k_wait))
      << "the Python agent did not start:\n"
      << py->tail() << "\nbroker:\n"
      << broker->proc().tail();

  ea::options o;
  o.broker = broker->router();
  o.events = broker->events();
  o.liveness = k_liveness;
  o.key_file = dir.file("keys/cpp-caller.key_secret");
  o.broker_key = ec::read_public_key(dir.file("keys/broker.key"), "");  // as 40 characters
  ea::agent caller(o);
  ensemble::test::message_inbox events;
  ASSERT_TRUE(caller.subscribe("interop.py.", [&](const ea::message& m) { events.add(m); }).ok());
  auto started = caller.start();
  ASSERT_TRUE(started.ok()) << started.err().to_string();

  auto r = caller.call("PyEcho", "upper", ea::to_json_payload({{"text", "secured"}}), k_wait);
  ASSERT_TRUE(r.ok()) << r.err().to_string() << "\n" << py->tail();
  EXPECT_EQ(r->worker(), "py-agent");
  auto body = ea::from_json_payload(r->payload());
  ASSERT_TRUE(body.ok());
  EXPECT_EQ((*body)["text"], "SECURED");
  auto e = events.wait_for("interop.py.handled", k_wait);
  ASSERT_TRUE(e.has_value()) << py->tail();
  EXPECT_EQ(e->publisher(), "py-agent");
}
