// A member of a durable consumer for the chaos tests, speaking the raw protocol
// (docs/protocol.md sections 4 and 11) on one DEALER, without the SDK: HELLO, CONSUME, handle
// each DELIVER and ACK it, heartbeat both ways, and come back by itself when the broker
// restarts (a WELCOME with a new `broker` id, an ERROR or REPLY `not_registered`, or
// `k_liveness` silent heartbeat intervals, after which the DEALER is replaced).
//
// Every handled delivery is one line appended to --out (O_APPEND, one write(2) each) before
// its ACK is sent, so a test that SIGKILLs this process still counts what it processed:
//
//   <steady ns> <pid> <broker> <outcome> <stream_seq> <deliveries> <event id> <key> <payload>
//
// <broker> is the broker run that delivered it (WELCOME's `broker`); <outcome> is `ok` (acked),
// `nack` or `term` (a poison event, --poison); the key is the correlation id (`-` when empty); the
// payload is printed as received (the tests publish short text without spaces). The steady clock is
// CLOCK_MONOTONIC, shared by the processes of one machine, so the lines of several members can be
// merged in processing order.
//
// Poison: a delivery whose payload contains --poison is NACKed (or TERMed with
// --poison-action term) with the reason "poison event: payload contains '<marker>'", or makes
// the process SIGKILL itself (--poison-action crash: a handler that takes its process down),
// unless --fix-file exists: then it is handled like any other ("the fix is deployed").
//
// stdout gets lifecycle lines only: `stream-member consuming <stream>/<consumer> broker=<id>`
// each time CONSUME is accepted, so that a test can wait for it.
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"

namespace ec = ensemble::common;
using ec::command;
using ec::header;
using nlohmann::json;
using steady = std::chrono::steady_clock;

namespace {

constexpr int k_liveness = 3;  // silent heartbeat intervals before the broker is presumed lost
constexpr std::chrono::milliseconds k_hello_interval{1000};  // before the first WELCOME

struct settings {
  std::string router;
  std::string agent;
  std::string stream;
  std::string consumer;
  std::uint32_t capacity = 1;
  std::string config;  // JSON text, sent as the CONSUME payload
  std::string out;     // file the processed lines are appended to; empty: stdout
  std::string poison;
  std::string poison_action = "nack";
  std::string fix_file;
  bool confirm_acks = false;
};

class member {
 public:
  explicit member(settings s) : s_(std::move(s)) {
    if (!s_.config.empty()) {
      const auto bytes = json::to_msgpack(json::parse(s_.config));
      config_.assign(bytes.begin(), bytes.end());
    }
    out_fd_ = s_.out.empty() ? STDOUT_FILENO
                             : ::open(s_.out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out_fd_ < 0) throw std::runtime_error("cannot open --out " + s_.out);
  }

  int run() {
    connect();
    while (true) {
      const auto now = steady::now();
      if (now >= next_heartbeat_) send_heartbeat(now);
      if (now - last_heard_ > silence_limit()) {
        std::printf(
            "stream-member: broker silent for %lld ms; reconnecting\n",
            static_cast<long long>(
                std::chrono::duration_cast<std::chrono::milliseconds>(now - last_heard_).count()));
        std::fflush(stdout);
        connect();
        continue;
      }
      const auto wait =
          std::chrono::duration_cast<std::chrono::milliseconds>(next_heartbeat_ - now);
      zmq::pollitem_t item{socket_->handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::max(wait, std::chrono::milliseconds(1)));
      if ((item.revents & ZMQ_POLLIN) == 0) continue;
      std::vector<zmq::message_t> frames;
      while (ec::recv_frames(*socket_, frames)) {
        last_heard_ = steady::now();
        auto m = ec::parse_message(frames, 0);
        if (!m) {
          std::fprintf(stderr, "stream-member: malformed message from the broker: %s\n",
                       m.err().message.c_str());
          continue;
        }
        on_message(*m);
      }
    }
  }

 private:
  std::chrono::milliseconds silence_limit() const {
    return heartbeat_.count() > 0 ? heartbeat_ * k_liveness : k_hello_interval * k_liveness;
  }

  // A new DEALER and a HELLO: at start, and when the broker has been silent too long.
  void connect() {
    socket_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::dealer);
    socket_->set(zmq::sockopt::linger, 0);
    socket_->connect(s_.router);
    welcomed_ = false;
    last_heard_ = steady::now();
    send_hello();
  }

  void send(command cmd, const header& h, const std::string& payload = {}) {
    std::vector<zmq::message_t> frames;
    ec::build_message(frames, cmd, h, zmq::message_t(payload.data(), payload.size()));
    // Never blocks: while the broker is away the DEALER queues up to its high-water mark, and
    // past it the message is dropped; HELLO is repeated and deliveries come back anyway.
    ec::send_frames(*socket_, frames);
  }

  void send_hello() {
    header h;
    h.agent = s_.agent;
    send(command::hello, h);
    // Until a WELCOME says otherwise, HELLO is repeated at this pace (the heartbeat slot).
    next_heartbeat_ = steady::now() + (heartbeat_.count() > 0 ? heartbeat_ : k_hello_interval);
  }

  void send_heartbeat(steady::time_point now) {
    if (!welcomed_) {
      send_hello();
      return;
    }
    send(command::heartbeat, header{});
    next_heartbeat_ = now + heartbeat_;
  }

  void send_consume() {
    header h;
    h.id = "consume-" + std::to_string(++consumes_);
    h.stream = s_.stream;
    h.consumer = s_.consumer;
    h.capacity = s_.capacity;
    send(command::consume, h, config_);
  }

  void on_message(ec::parsed_message& m) {
    switch (m.cmd) {
      case command::welcome:
        welcomed_ = true;
        heartbeat_ = std::chrono::milliseconds(m.hdr.heartbeat_ms);
        next_heartbeat_ = steady::now() + heartbeat_;
        // A new broker run, or the same one after it declared this peer lost: either way the
        // membership is gone (joining again only sets the capacity when it is not).
        broker_id_ = m.hdr.broker;
        send_consume();
        return;
      case command::heartbeat:
        if (welcomed_) send(command::heartbeat, header{});
        return;
      case command::deliver:
        on_deliver(m);
        return;
      case command::reply:
      case command::error:
        on_answer(m.cmd, m.hdr);
        return;
      default:
        std::fprintf(stderr, "stream-member: unexpected %s\n",
                     ec::command_name(static_cast<std::uint8_t>(m.cmd)).c_str());
        return;
    }
  }

  void on_answer(command cmd, const header& h) {
    if (h.error_code == "not_registered") {
      // The broker restarted (or lost this peer): register again at once. The answers sent
      // before this HELLO are all refused the same way; one HELLO is enough.
      if (welcomed_) {
        welcomed_ = false;
        send_hello();
      }
      return;
    }
    if (cmd == command::reply && h.id.starts_with("consume-")) {
      if (h.is_error()) {
        std::fprintf(stderr, "stream-member: CONSUME refused: %s %s\n", h.error_code.c_str(),
                     h.error_message.c_str());
        std::fflush(stderr);
        std::exit(3);
      }
      std::printf("stream-member consuming %s/%s broker=%s\n", s_.stream.c_str(),
                  s_.consumer.c_str(), broker_id_.c_str());
      std::fflush(stdout);
      return;
    }
    if (cmd == command::reply && h.id.starts_with("ack-") && !h.is_error()) {
      write_line(h.id.substr(4) + " 0 - - -", "confirmed");  // the id is ack-<stream_seq>
      return;
    }
    // A refused answer (not_pending: the event was done, or is someone else's now): harmless.
    ++refused_;
  }

  void on_deliver(ec::parsed_message& m) {
    const header& d = m.hdr;
    const std::string payload(ec::as_view(m.payload));
    command answer = command::ack;
    std::string outcome = "ok";
    if (!s_.poison.empty() && payload.find(s_.poison) != std::string::npos &&
        (s_.fix_file.empty() || !std::filesystem::exists(s_.fix_file))) {
      if (s_.poison_action == "crash") ::kill(::getpid(), SIGKILL);
      answer = s_.poison_action == "term" ? command::term : command::nack;
      outcome = s_.poison_action;
    }
    write_line(std::to_string(d.stream_seq) + " " + std::to_string(d.deliveries) + " " + d.id +
                   " " + (d.correlation_id.empty() ? std::string("-") : d.correlation_id) + " " +
                   payload,
               outcome);
    header a;
    a.stream = d.stream;
    a.consumer = d.consumer;
    a.stream_seq = d.stream_seq;
    if (answer == command::ack && s_.confirm_acks) a.id = "ack-" + std::to_string(d.stream_seq);
    if (answer != command::ack)
      a.error_message = "poison event: payload contains '" + s_.poison + "'";
    send(answer, a);
  }

  // One line of --out, in one write(2): in the kernel before the answer leaves, so it survives
  // a SIGKILL of this process.
  void write_line(const std::string& rest, const std::string& outcome) {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    const std::string line =
        std::to_string(static_cast<long long>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec) + " " +
        std::to_string(::getpid()) + " " + broker_id_ + " " + outcome + " " + rest + "\n";
    if (::write(out_fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
      std::fprintf(stderr, "stream-member: cannot write to %s\n", s_.out.c_str());
      std::exit(4);
    }
  }

  settings s_;
  std::string config_;
  int out_fd_ = -1;
  zmq::context_t ctx_{1};
  std::unique_ptr<zmq::socket_t> socket_;
  bool welcomed_ = false;
  std::chrono::milliseconds heartbeat_{0};
  steady::time_point next_heartbeat_{};
  steady::time_point last_heard_{};
  std::string broker_id_;
  std::uint64_t consumes_ = 0;
  std::uint64_t refused_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"ensemble test stream member: one member of a durable consumer"};
  app.add_option("--router", s.router, "the broker's router endpoint")->required();
  app.add_option("--name", s.agent, "agent name in HELLO")->required();
  app.add_option("--stream", s.stream)->required();
  app.add_option("--consumer", s.consumer)->required();
  app.add_option("--capacity", s.capacity)->check(CLI::Range(1, 100000));
  app.add_option("--config", s.config, "the consumer's configuration, JSON (CONSUME payload)");
  app.add_option("--out", s.out, "file the processed deliveries are appended to (default stdout)");
  app.add_option("--poison", s.poison, "payload marker of events to fail");
  app.add_option("--poison-action", s.poison_action)
      ->check(CLI::IsMember({"nack", "term", "crash"}));
  app.add_option("--fix-file", s.fix_file, "while this file exists, poison events succeed");
  app.add_flag("--confirm-acks", s.confirm_acks,
               "ACK with an id, and log the broker's confirmation");
  CLI11_PARSE(app, argc, argv);
  try {
    member m(std::move(s));
    return m.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stream-member: %s\n", e.what());
    return 2;
  }
}
