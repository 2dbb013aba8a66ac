#include "ensemble/testkit/fault_proxy.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/logging.hpp"

namespace ensemble::testkit {

namespace {

using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr std::size_t k_max_waiting = 50'000;
constexpr std::size_t k_max_waiting_bytes = 64 * 1024 * 1024;
constexpr auto k_peer_idle = 60s;
constexpr auto k_housekeeping = 1s;  // longest poll: idle peers are looked for this often
constexpr int k_hwm = 100'000;
constexpr int k_batch = 256;  // messages taken from one socket before looking at the others
constexpr const char* k_control_endpoint = "inproc://ensemble-fault-proxy-control";

// Where a message goes: to the broker on its peer's DEALER, back to a peer through the
// ROUTER, or to the subscribers through the XPUB.
enum class target { broker, peer, subscribers };

struct held_message {
  target to = target::broker;
  std::string peer;
  std::vector<zmq::message_t> frames;
  std::size_t bytes = 0;
};

std::vector<zmq::message_t> copy_frames(std::vector<zmq::message_t>& frames) {
  std::vector<zmq::message_t> out(frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) out[i].copy(frames[i]);  // shares the buffer
  return out;
}

std::size_t size_of(const std::vector<zmq::message_t>& frames) {
  std::size_t n = 0;
  for (const auto& f : frames) n += f.size();
  return n;
}

std::string hex(std::string_view bytes) {
  static constexpr char k_digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += k_digits[c >> 4];
    out += k_digits[c & 0xf];
  }
  return out;
}

// Sends all frames without blocking. False if nothing could be sent; `unreachable` is set when
// a ROUTER (with ROUTER_MANDATORY) no longer knows the routing id in front.
bool send_all(zmq::socket_t& socket, std::vector<zmq::message_t>& frames,
              bool* unreachable = nullptr) {
  for (std::size_t i = 0; i < frames.size(); ++i) {
    const auto flags = i + 1 == frames.size()
                           ? zmq::send_flags::dontwait
                           : (zmq::send_flags::dontwait | zmq::send_flags::sndmore);
    try {
      // Only the first frame can fail: the others follow it into the same pipe.
      if (!socket.send(frames[i], flags) && i == 0) return false;
    } catch (const zmq::error_t& e) {
      if (unreachable != nullptr && e.num() == EHOSTUNREACH) *unreachable = true;
      return false;
    }
  }
  return true;
}

bool matches(const fault_rule& r, const message_view& v) {
  if (r.chan && *r.chan != v.chan) return false;
  if (r.dir && *r.dir != v.dir) return false;
  if (!r.commands.empty() &&
      std::find(r.commands.begin(), r.commands.end(), v.command) == r.commands.end()) {
    return false;
  }
  if (!r.topic_prefix.empty() && !v.topic.starts_with(r.topic_prefix)) return false;
  if (!r.match) return true;
  try {
    return r.match(v);
  } catch (...) {
    return false;
  }
}

}  // namespace

std::vector<std::uint8_t> command_bytes(std::initializer_list<common::command> commands) {
  std::vector<std::uint8_t> out;
  for (auto c : commands) out.push_back(static_cast<std::uint8_t>(c));
  return out;
}

struct fault_proxy::impl {
  struct peer {
    std::string id;  // routing id on the proxy's ROUTER
    zmq::socket_t dealer;
    steady::time_point last_active;
    bool gone = false;  // the ROUTER no longer knows it: closed at the end of the loop turn
  };

  explicit impl(std::uint64_t seed) : rng(seed) {}

  void run();
  void on_from_peer(steady::time_point now);
  void on_from_broker(peer& p, steady::time_point now);
  void on_subscription();
  void on_event();
  void handle(channel chan, direction dir, target to, const std::string& peer_id,
              std::vector<zmq::message_t>& msg);
  void send_now(target to, const std::string& peer_id, std::vector<zmq::message_t>& msg);
  void hold(target to, const std::string& peer_id, std::vector<zmq::message_t> msg,
            steady::time_point due);
  void deliver_due(steady::time_point now);
  void reap(steady::time_point now);
  peer* find_or_add_peer(const std::string& id, steady::time_point now);
  bool chance(double p) { return p > 0 && std::uniform_real_distribution<double>(0, 1)(rng) < p; }

  // Declared first so that it outlives every socket below.
  zmq::context_t ctx{1};
  zmq::socket_t frontend{ctx, zmq::socket_type::router};
  zmq::socket_t xpub{ctx, zmq::socket_type::xpub};
  zmq::socket_t xsub{ctx, zmq::socket_type::xsub};
  zmq::socket_t control_rx{ctx, zmq::socket_type::pair};  // the thread's end
  zmq::socket_t control_tx{ctx, zmq::socket_type::pair};  // the destructor's end
  std::string broker_router;
  std::string broker_events;
  std::string router_endpoint;
  std::string events_endpoint;
  std::shared_ptr<spdlog::logger> log = common::component_logger("fault_proxy");

  // Rules are replaced as a whole (copy on write), so the thread evaluates a snapshot without
  // holding the lock while a `match` predicate runs.
  mutable std::mutex rules_mutex;
  std::shared_ptr<const std::vector<fault_rule>> rules =
      std::make_shared<const std::vector<fault_rule>>();

  // Owned by the thread.
  std::mt19937_64 rng;
  std::unordered_map<std::string, std::unique_ptr<peer>> peers;
  bool peers_changed = true;
  std::map<std::pair<steady::time_point, std::uint64_t>, held_message> waiting;
  std::uint64_t next_sequence = 0;  // keeps copies due at the same time in arrival order
  std::size_t waiting_bytes = 0;
  std::vector<zmq::message_t> frames;

  std::atomic<std::uint64_t> forwarded{0}, dropped{0}, duplicated{0}, delayed{0}, waiting_now{0},
      undelayed{0}, unparsed{0}, undeliverable{0}, peer_count{0};

  std::thread thread;
};

fault_proxy::impl::peer* fault_proxy::impl::find_or_add_peer(const std::string& id,
                                                             steady::time_point now) {
  if (auto it = peers.find(id); it != peers.end()) return it->second.get();
  auto p = std::make_unique<peer>(peer{id, zmq::socket_t(ctx, zmq::socket_type::dealer), now});
  p->dealer.set(zmq::sockopt::linger, 0);
  p->dealer.set(zmq::sockopt::sndhwm, k_hwm);
  p->dealer.set(zmq::sockopt::rcvhwm, k_hwm);
  p->dealer.set(zmq::sockopt::reconnect_ivl, 50);
  p->dealer.set(zmq::sockopt::reconnect_ivl_max, 1000);
  p->dealer.connect(broker_router);  // the endpoint was checked at start-up
  log->debug("peer {} connected: new DEALER to {}", hex(id), broker_router);
  peer* raw = p.get();
  peers.emplace(id, std::move(p));
  peers_changed = true;
  peer_count = peers.size();
  return raw;
}

void fault_proxy::impl::run() {
  std::vector<zmq::pollitem_t> items;
  std::vector<peer*> polled;
  auto next_housekeeping = steady::now() + k_housekeeping;
  while (true) {
    if (peers_changed) {
      items = {{control_rx.handle(), 0, ZMQ_POLLIN, 0},
               {frontend.handle(), 0, ZMQ_POLLIN, 0},
               {xpub.handle(), 0, ZMQ_POLLIN, 0},
               {xsub.handle(), 0, ZMQ_POLLIN, 0}};
      polled.clear();
      for (auto& [id, p] : peers) {
        items.push_back({p->dealer.handle(), 0, ZMQ_POLLIN, 0});
        polled.push_back(p.get());
      }
      peers_changed = false;
    }
    auto now = steady::now();
    auto wake = next_housekeeping;
    if (!waiting.empty()) wake = std::min(wake, waiting.begin()->first.first);
    const auto timeout =
        wake <= now ? 0ms : std::chrono::ceil<std::chrono::milliseconds>(wake - now);
    try {
      zmq::poll(items.data(), items.size(), timeout);
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      continue;  // EINTR
    }
    if ((items[0].revents & ZMQ_POLLIN) != 0) return;
    // Nothing below may end the thread: a message that breaks something is logged and lost.
    try {
      now = steady::now();
      deliver_due(now);
      if ((items[1].revents & ZMQ_POLLIN) != 0) {
        for (int i = 0; i < k_batch && common::recv_frames(frontend, frames); ++i) {
          on_from_peer(now);
        }
      }
      if ((items[2].revents & ZMQ_POLLIN) != 0) on_subscription();
      if ((items[3].revents & ZMQ_POLLIN) != 0) on_event();
      for (std::size_t i = 0; i < polled.size(); ++i) {
        if ((items[4 + i].revents & ZMQ_POLLIN) != 0) on_from_broker(*polled[i], now);
      }
      if (now >= next_housekeeping) {
        reap(now);
        next_housekeeping = now + k_housekeeping;
      } else if (peers_changed) {
        reap(now);  // only the gone ones can be due
      }
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      log->error("fault proxy: {} (the message being handled is lost)", e.what());
    } catch (const std::exception& e) {
      log->error("fault proxy: {} (the message being handled is lost)", e.what());
    }
  }
}

void fault_proxy::impl::on_from_peer(steady::time_point now) {
  if (frames.size() < 2) return;  // a routing id alone carries nothing to forward
  const std::string id(common::as_view(frames[0]));
  frames.erase(frames.begin());
  peer* p = find_or_add_peer(id, now);
  p->last_active = now;
  handle(channel::commands, direction::to_broker, target::broker, id, frames);
}

void fault_proxy::impl::on_from_broker(peer& p, steady::time_point now) {
  for (int i = 0; i < k_batch && !p.gone && common::recv_frames(p.dealer, frames); ++i) {
    p.last_active = now;
    handle(channel::commands, direction::from_broker, target::peer, p.id, frames);
  }
}

void fault_proxy::impl::on_subscription() {
  // (Un)subscriptions, and anything else a subscriber sends, go upstream unchanged.
  for (int i = 0; i < k_batch && common::recv_frames(xpub, frames); ++i) {
    ++forwarded;
    if (!send_all(xsub, frames)) ++undeliverable;
  }
}

void fault_proxy::impl::on_event() {
  static const std::string k_no_peer;
  for (int i = 0; i < k_batch && common::recv_frames(xsub, frames); ++i) {
    handle(channel::events, direction::from_broker, target::subscribers, k_no_peer, frames);
  }
}

void fault_proxy::impl::handle(channel chan, direction dir, target to, const std::string& peer_id,
                               std::vector<zmq::message_t>& msg) {
  // Parse just enough to fill the view: [tag][command][header]... on the router,
  // [topic][header][payload] for events.
  message_view v;
  v.chan = chan;
  v.dir = dir;
  bool parsed = false;
  common::header h;
  std::size_t header_frame = 0;
  if (chan == channel::commands) {
    if (msg.size() >= 3 && common::as_view(msg[0]) == common::k_protocol_tag &&
        msg[1].size() == 1) {
      v.command = *static_cast<const std::uint8_t*>(msg[1].data());
      header_frame = 2;
      parsed = true;
    }
  } else if (msg.size() >= 2) {
    v.topic = common::as_view(msg[0]);
    header_frame = 1;
    parsed = true;
  }
  if (parsed) {
    auto decoded = common::decode_header(common::as_view(msg[header_frame]));
    if (decoded) {
      h = std::move(decoded).value();
    } else {
      parsed = false;
    }
  }
  if (!parsed) {
    ++unparsed;
    ++forwarded;
    send_now(to, peer_id, msg);
    return;
  }
  if (chan == channel::commands) v.topic = h.topic;
  v.service = h.service;
  v.action = h.action;
  v.id = h.id;
  v.idempotency_key = h.idempotency_key;
  v.correlation_id = h.correlation_id;

  const fault_rule* rule = nullptr;
  std::shared_ptr<const std::vector<fault_rule>> snapshot;
  {
    std::lock_guard lock(rules_mutex);
    snapshot = rules;
  }
  for (const auto& r : *snapshot) {
    if (matches(r, v)) {
      rule = &r;
      break;
    }
  }
  if (rule == nullptr) {
    ++forwarded;
    send_now(to, peer_id, msg);
    return;
  }

  const auto what = [&] {
    std::string s = chan == channel::events ? "event" : common::command_name(v.command);
    if (!v.topic.empty()) s += " '" + std::string(v.topic) + "'";
    if (!v.service.empty()) s += " " + std::string(v.service) + "." + std::string(v.action);
    s += " id=" + std::string(v.id);
    if (!v.correlation_id.empty()) s += " correlation=" + std::string(v.correlation_id);
    return s;
  };
  if (chance(rule->drop)) {
    ++dropped;
    if (log->should_log(spdlog::level::debug)) log->debug("fault proxy: dropped {}", what());
    return;
  }
  ++forwarded;
  int copies = 1;
  if (chance(rule->duplicate)) {
    copies = 2;
    ++duplicated;
    if (log->should_log(spdlog::level::debug)) log->debug("fault proxy: duplicated {}", what());
  }
  const auto now = steady::now();
  for (int c = 0; c < copies; ++c) {
    std::vector<zmq::message_t> copy = c + 1 < copies ? copy_frames(msg) : std::move(msg);
    auto wait = rule->delay;
    if (rule->jitter.count() > 0) {
      wait += std::chrono::milliseconds(
          std::uniform_int_distribution<std::int64_t>(0, rule->jitter.count())(rng));
    }
    if (wait.count() <= 0) {
      send_now(to, peer_id, copy);
      continue;
    }
    if (log->should_log(spdlog::level::debug)) {
      log->debug("fault proxy: delayed {} by {} ms", what(), wait.count());
    }
    hold(to, peer_id, std::move(copy), now + wait);
  }
}

void fault_proxy::impl::send_now(target to, const std::string& peer_id,
                                 std::vector<zmq::message_t>& msg) {
  switch (to) {
    case target::broker: {
      peer* p = find_or_add_peer(peer_id, steady::now());
      if (!send_all(p->dealer, msg)) ++undeliverable;
      break;
    }
    case target::peer: {
      msg.insert(msg.begin(), zmq::message_t(peer_id.data(), peer_id.size()));
      bool unreachable = false;
      if (!send_all(frontend, msg, &unreachable)) {
        ++undeliverable;
        if (unreachable) {
          if (auto it = peers.find(peer_id); it != peers.end() && !it->second->gone) {
            it->second->gone = true;
            peers_changed = true;
          }
        }
      }
      break;
    }
    case target::subscribers:
      if (!send_all(xpub, msg)) ++undeliverable;
      break;
  }
  msg.clear();
}

void fault_proxy::impl::hold(target to, const std::string& peer_id, std::vector<zmq::message_t> msg,
                             steady::time_point due) {
  const std::size_t bytes = size_of(msg);
  if (waiting.size() >= k_max_waiting || waiting_bytes + bytes > k_max_waiting_bytes) {
    ++undelayed;
    send_now(to, peer_id, msg);
    return;
  }
  waiting_bytes += bytes;
  waiting.emplace(std::make_pair(due, next_sequence++),
                  held_message{to, peer_id, std::move(msg), bytes});
  ++delayed;
  waiting_now = waiting.size();
}

void fault_proxy::impl::deliver_due(steady::time_point now) {
  while (!waiting.empty() && waiting.begin()->first.first <= now) {
    auto node = waiting.extract(waiting.begin());
    held_message& m = node.mapped();
    waiting_bytes -= m.bytes;
    waiting_now = waiting.size();
    if (m.to == target::peer && peers.find(m.peer) == peers.end()) {
      ++undeliverable;  // its peer went away while the message waited
      continue;
    }
    send_now(m.to, m.peer, m.frames);
  }
}

void fault_proxy::impl::reap(steady::time_point now) {
  for (auto it = peers.begin(); it != peers.end();) {
    const peer& p = *it->second;
    if (p.gone || now - p.last_active > k_peer_idle) {
      log->debug("peer {} {}: closing its DEALER to the broker", hex(p.id),
                 p.gone ? "disconnected" : "idle");
      it = peers.erase(it);
      peers_changed = true;
    } else {
      ++it;
    }
  }
  peer_count = peers.size();
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<fault_proxy> fault_proxy::start(const std::string& broker_router,
                                                const std::string& broker_events,
                                                std::uint64_t seed) {
  auto p = std::make_unique<impl>(seed);
  p->broker_router = broker_router;
  p->broker_events = broker_events;
  const char* step = "";
  try {
    step = "bind the ROUTER";
    p->frontend.set(zmq::sockopt::linger, 0);
    p->frontend.set(zmq::sockopt::router_mandatory, true);
    p->frontend.set(zmq::sockopt::sndhwm, k_hwm);
    p->frontend.set(zmq::sockopt::rcvhwm, k_hwm);
    p->frontend.bind("tcp://127.0.0.1:*");
    p->router_endpoint = p->frontend.get(zmq::sockopt::last_endpoint);

    step = "bind the XPUB";
    p->xpub.set(zmq::sockopt::linger, 0);
    p->xpub.set(zmq::sockopt::sndhwm, k_hwm);
    // Every subscribe and unsubscribe of every subscriber goes upstream, not just the first
    // and last of each prefix: the broker sees the same stream as without the proxy.
    p->xpub.set(zmq::sockopt::xpub_verboser, true);
    p->xpub.bind("tcp://127.0.0.1:*");
    p->events_endpoint = p->xpub.get(zmq::sockopt::last_endpoint);

    step = "connect to the broker's events endpoint";
    p->xsub.set(zmq::sockopt::linger, 0);
    p->xsub.set(zmq::sockopt::rcvhwm, k_hwm);
    p->xsub.set(zmq::sockopt::reconnect_ivl, 50);
    p->xsub.set(zmq::sockopt::reconnect_ivl_max, 1000);
    p->xsub.connect(broker_events);

    // Per-peer DEALERs connect lazily, in the thread: check the endpoint once here so that a
    // typo fails the test at start-up, not silently later.
    step = "connect to the broker's router endpoint";
    zmq::socket_t check(p->ctx, zmq::socket_type::dealer);
    check.set(zmq::sockopt::linger, 0);
    check.connect(broker_router);

    step = "set up the control pair";
    p->control_rx.set(zmq::sockopt::linger, 0);
    p->control_tx.set(zmq::sockopt::linger, 0);
    p->control_rx.bind(k_control_endpoint);  // inproc names are per context: one per proxy
    p->control_tx.connect(k_control_endpoint);
  } catch (const zmq::error_t& e) {
    throw std::runtime_error(std::string("fault_proxy: cannot ") + step + " (broker " +
                             broker_router + " / " + broker_events + "): " + e.what());
  }
  p->log->info("fault proxy {} / {} -> broker {} / {}", p->router_endpoint, p->events_endpoint,
               broker_router, broker_events);
  impl* raw = p.get();
  p->thread = std::thread([raw] { raw->run(); });
  return std::unique_ptr<fault_proxy>(new fault_proxy(std::move(p)));
}

fault_proxy::fault_proxy(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

fault_proxy::~fault_proxy() {
  // The thread polls control_rx with everything else and returns as soon as it is readable.
  // Should the stop message not go out, shutting the context down makes the poll fail with
  // ETERM instead.
  bool sent = false;
  try {
    sent = impl_->control_tx.send(zmq::str_buffer("stop"), zmq::send_flags::dontwait).has_value();
  } catch (const zmq::error_t&) {
  }
  if (!sent) impl_->ctx.shutdown();
  if (impl_->thread.joinable()) impl_->thread.join();
}

const std::string& fault_proxy::router() const {
  return impl_->router_endpoint;
}
const std::string& fault_proxy::events() const {
  return impl_->events_endpoint;
}

void fault_proxy::add_rule(fault_rule rule) {
  std::lock_guard lock(impl_->rules_mutex);
  auto next = std::make_shared<std::vector<fault_rule>>(*impl_->rules);
  next->push_back(std::move(rule));
  impl_->rules = std::move(next);
}

void fault_proxy::clear_rules() {
  std::lock_guard lock(impl_->rules_mutex);
  impl_->rules = std::make_shared<const std::vector<fault_rule>>();
}

fault_proxy::counts fault_proxy::stats() const {
  const impl& i = *impl_;
  counts c;
  c.forwarded = i.forwarded;
  c.dropped = i.dropped;
  c.duplicated = i.duplicated;
  c.delayed = i.delayed;
  c.waiting = i.waiting_now;
  c.undelayed = i.undelayed;
  c.unparsed = i.unparsed;
  c.undeliverable = i.undeliverable;
  c.peers = i.peer_count;
  return c;
}

}  // namespace ensemble::testkit
