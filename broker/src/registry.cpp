#include "registry.hpp"

#include <algorithm>

namespace ensemble::broker {

namespace errc = common::errc;
using common::error;

service_entry& registry::service(const std::string& name) {
  auto [it, inserted] = services_.try_emplace(name);
  if (inserted) it->second.name = name;
  return it->second;
}

service_counters& registry::counters_for(const std::string& name) {
  return service(name).counters;
}

common::status registry::hello(const peer_id& peer, std::string agent,
                               const std::vector<common::service_offer>& services, time_point now,
                               std::vector<decision>& out) {
  auto& slot = workers_[peer];
  if (!slot) {
    slot = std::make_unique<worker>();
    slot->id = peer;
  }
  worker& w = *slot;
  w.agent = std::move(agent);
  w.last_seen = now;
  for (const auto& wanted : services) {
    auto existing = std::find_if(w.offers.begin(), w.offers.end(),
                                 [&](const auto& o) { return o->service == wanted.name; });
    service_entry& s = service(wanted.name);
    s.ever_offered = true;
    if (existing != w.offers.end()) {
      offer& o = **existing;
      o.capacity = wanted.capacity;
      if (!o.listed_idle && o.in_flight < o.capacity) {
        s.idle.push_back(&o);
        o.listed_idle = true;
      }
    } else {
      auto o = std::make_unique<offer>();
      o->owner = &w;
      o->service = wanted.name;
      o->capacity = wanted.capacity;
      o->listed_idle = true;
      s.offers.push_back(o.get());
      s.idle.push_back(o.get());
      w.offers.push_back(std::move(o));
    }
    try_dispatch(s, out);
  }
  return common::ok_status();
}

worker* registry::find_worker(const peer_id& peer) {
  auto it = workers_.find(peer);
  return it == workers_.end() ? nullptr : it->second.get();
}

bool registry::touch(const peer_id& peer, time_point now) {
  worker* w = find_worker(peer);
  if (w == nullptr) return false;
  w->last_seen = now;
  return true;
}

void registry::remove_worker(const peer_id& peer, std::vector<decision>& out) {
  auto it = workers_.find(peer);
  if (it == workers_.end()) return;
  std::unique_ptr<worker> w = std::move(it->second);
  workers_.erase(it);
  removed_.push_back(peer);

  // Take the worker's offers out of their services first, so that nothing is re-dispatched
  // to the worker that is going away.
  std::vector<std::string> touched;
  for (auto& o : w->offers) {
    service_entry& s = service(o->service);
    std::erase(s.offers, o.get());
    if (o->listed_idle) std::erase(s.idle, o.get());
    touched.push_back(o->service);
  }
  for (std::uint64_t token : w->in_flight) {
    auto p = pending_.find(token);
    if (p == pending_.end()) continue;
    pending_request& r = p->second;
    r.assigned = nullptr;
    if (r.state == request_state::abandoned) {
      pending_.erase(p);  // already answered; nothing more to say
    } else if (r.hdr.retryable && !r.redispatched) {
      r.redispatched = true;
      enqueue(service(r.hdr.service), r, /*front=*/true);
    } else {
      fail(token,
           error::make(errc::worker_lost, "worker '" + w->agent + "' was lost while handling " +
                                              r.hdr.service + "." + r.hdr.action),
           out);
    }
  }
  drop_requests_of(peer);
  for (const auto& name : touched) {
    try_dispatch(service(name), out);
    maybe_forget_service(name);
  }
}

void registry::drop_requests_of(const peer_id& client) {
  // The lost peer's own calls: nobody is left to answer. Queued ones are dropped before a
  // worker spends time on them (an orchestrator that restarts re-sends its commands under a new
  // identity); those in flight are abandoned, so the worker's reply is dropped.
  std::vector<std::uint64_t> tokens;
  for (const auto& [token, r] : pending_) {
    if (r.client == client && r.state != request_state::abandoned) tokens.push_back(token);
  }
  for (std::uint64_t token : tokens) {
    auto it = pending_.find(token);
    pending_request& r = it->second;
    ++requests_of_lost_peers_;
    if (r.state == request_state::queued) {
      dequeued(service(r.hdr.service), r);
      const std::string name = r.hdr.service;
      pending_.erase(it);
      maybe_forget_service(name);
    } else {
      r.state = request_state::abandoned;
      r.payload = zmq::message_t{};
      deadlines_.emplace(abandon_release(r), token);
    }
  }
}

void registry::maybe_forget_service(const std::string& name) {
  auto it = services_.find(name);
  if (it == services_.end()) return;
  const service_entry& s = it->second;
  // Services that some worker once offered keep their entry (and counters); names that were
  // only ever asked for go away once nothing waits on them, so typos cannot grow the table.
  if (!s.ever_offered && s.offers.empty() && s.queued == 0) services_.erase(it);
}

void registry::enqueue(service_entry& s, pending_request& r, bool front) {
  r.state = request_state::queued;
  if (front) {
    s.queue.push_front(r.token);
  } else {
    s.queue.push_back(r.token);
  }
  ++s.queued;
  ++queued_total_;
  s.queued_bytes += r.bytes;
  queued_bytes_total_ += r.bytes;
}

void registry::dequeued(service_entry& s, const pending_request& r) {
  --s.queued;
  --queued_total_;
  s.queued_bytes -= r.bytes;
  queued_bytes_total_ -= r.bytes;
}

bool registry::within_budget(const worker& w, const pending_request& r) const {
  if (w.unconfirmed.empty()) return true;  // one request always fits, however large
  return w.unconfirmed.size() < limits_.peer_budget_messages &&
         w.unconfirmed_bytes + r.bytes <= limits_.peer_budget_bytes;
}

void registry::confirm(worker& w, std::uint64_t dispatch_seq) {
  // The worker answered the DISPATCH numbered dispatch_seq: it has read it and everything sent
  // to it before, so none of them is held by the broker any more.
  auto end = w.unconfirmed.upper_bound(dispatch_seq);
  for (auto it = w.unconfirmed.begin(); it != end; ++it) w.unconfirmed_bytes -= it->second;
  w.unconfirmed.erase(w.unconfirmed.begin(), end);
}

void registry::submit(pending_request request, std::vector<decision>& out) {
  service_entry& s = service(request.hdr.service);
  ++s.counters.requests;
  request.bytes = request.payload.size() + k_header_allowance;
  std::string full;
  if (s.queued >= limits_.queue_per_service) {
    full = "queue of service '" + s.name + "' is full (" +
           std::to_string(limits_.queue_per_service) + " waiting)";
  } else if (queued_total_ >= limits_.queue_total) {
    full = "broker queue is full (" + std::to_string(limits_.queue_total) + " waiting)";
  } else if (s.queued_bytes + request.bytes > limits_.queue_bytes_per_service) {
    full = "queue of service '" + s.name + "' is full (" + std::to_string(s.queued_bytes) +
           " bytes waiting, limit " + std::to_string(limits_.queue_bytes_per_service) + ")";
  } else if (queued_bytes_total_ + request.bytes > limits_.queue_bytes_total) {
    full = "broker queue is full (" + std::to_string(queued_bytes_total_) +
           " bytes waiting, limit " + std::to_string(limits_.queue_bytes_total) + ")";
  }
  if (!full.empty()) {
    decision d;
    d.what = decision::kind::fail;
    d.token = request.token;
    d.client = std::move(request.client);
    d.err = error::make(errc::queue_full, std::move(full));
    d.hdr = std::move(request.hdr);
    out.push_back(std::move(d));
    ++s.counters.errors;
    ++s.counters.errors_by_code[std::string(errc::queue_full)];
    maybe_forget_service(s.name);
    return;
  }
  const std::uint64_t token = request.token;
  deadlines_.emplace(request.deadline, token);
  auto [it, inserted] = pending_.emplace(token, std::move(request));
  enqueue(s, it->second, /*front=*/false);
  try_dispatch(s, out);
}

pending_request* registry::find(std::uint64_t token) {
  auto it = pending_.find(token);
  return it == pending_.end() ? nullptr : &it->second;
}

void registry::try_dispatch(service_entry& s, std::vector<decision>& out) {
  while (s.queued > 0 && !s.idle.empty()) {
    pending_request* r = find(s.queue.front());
    if (r == nullptr || r->state != request_state::queued) {  // stale
      s.queue.pop_front();
      continue;
    }
    // The least recently used offer with room whose worker is within its budget. An offer
    // whose capacity a later HELLO lowered may be listed without room; it is listed again
    // when a reply frees a slot.
    offer* chosen = nullptr;
    for (auto it = s.idle.begin(); it != s.idle.end();) {
      offer* o = *it;
      if (o->in_flight >= o->capacity) {
        o->listed_idle = false;
        it = s.idle.erase(it);
      } else if (within_budget(*o->owner, *r)) {
        chosen = o;
        s.idle.erase(it);
        break;
      } else {
        ++it;
      }
    }
    if (chosen == nullptr) {
      // Offers with room exist but every one's worker holds its whole budget: the request
      // waits (FIFO) until a worker reads and answers, or its deadline passes.
      if (!s.idle.empty()) ++budget_waits_;
      break;
    }
    s.queue.pop_front();
    dequeued(s, *r);
    chosen->listed_idle = false;
    assign(*r, *chosen, out);
  }
  if (s.queue.size() > 64 && s.queue.size() > 2 * s.queued) compact(s);
}

void registry::compact(service_entry& s) {
  std::erase_if(s.queue, [this](std::uint64_t token) {
    const pending_request* r = find(token);
    return r == nullptr || r->state != request_state::queued;
  });
}

void registry::assign(pending_request& r, offer& o, std::vector<decision>& out) {
  r.state = request_state::dispatched;
  r.assigned = &o;
  ++o.in_flight;
  ++o.dispatched;
  o.owner->in_flight.insert(r.token);
  r.dispatch_seq = ++next_dispatch_seq_;
  o.owner->unconfirmed.emplace(r.dispatch_seq, r.bytes);
  o.owner->unconfirmed_bytes += r.bytes;
  if (o.in_flight < o.capacity) {
    service(o.service).idle.push_back(&o);
    o.listed_idle = true;
  }
  decision d;
  d.what = decision::kind::dispatch;
  d.token = r.token;
  out.push_back(std::move(d));
}

void registry::release(offer& o) {
  if (o.in_flight > 0) --o.in_flight;
  if (!o.listed_idle && o.in_flight < o.capacity) {
    service(o.service).idle.push_back(&o);
    o.listed_idle = true;
  }
}

pending_request* registry::reply_from(const peer_id& peer, std::uint64_t token) {
  pending_request* r = find(token);
  if (r == nullptr || r->assigned == nullptr || r->assigned->owner->id != peer) return nullptr;
  confirm(*r->assigned->owner, r->dispatch_seq);
  return r;
}

void registry::finish(std::uint64_t token, std::vector<decision>& out) {
  auto it = pending_.find(token);
  if (it == pending_.end()) return;
  offer* o = it->second.assigned;
  pending_.erase(it);
  if (o == nullptr) return;
  o->owner->in_flight.erase(token);
  release(*o);
  try_dispatch(service(o->service), out);
  // A reply may also have freed the worker's budget for the other services it offers.
  for (const auto& other : o->owner->offers) {
    if (other.get() != o) try_dispatch(service(other->service), out);
  }
}

void registry::fail(std::uint64_t token, error err, std::vector<decision>& out) {
  auto it = pending_.find(token);
  if (it == pending_.end()) return;
  pending_request& r = it->second;
  service_counters& c = service(r.hdr.service).counters;
  ++c.errors;
  ++c.errors_by_code[err.code];
  decision d;
  d.what = decision::kind::fail;
  d.token = token;
  d.client = r.client;
  d.hdr = r.hdr;
  d.err = std::move(err);
  out.push_back(std::move(d));
  if (r.state == request_state::queued) dequeued(service(r.hdr.service), r);
  if (r.assigned != nullptr) {
    // The worker is still busy with it: keep the record until it replies or is lost, so its
    // capacity is accounted for, but never answer the client again. A worker that never
    // received the DISPATCH (lost on the way) would hold the slot for ever while it keeps
    // heartbeating: the slot is given back at abandon_release() at the latest.
    r.state = request_state::abandoned;
    r.payload = zmq::message_t{};
    deadlines_.emplace(abandon_release(r), token);
  } else {
    const std::string name = r.hdr.service;
    pending_.erase(it);
    maybe_forget_service(name);
  }
}

time_point registry::abandon_release(const pending_request& r) const {
  return r.deadline + limits_.heartbeat * limits_.liveness;
}

void registry::expire(time_point now, std::vector<decision>& out) {
  while (!deadlines_.empty() && deadlines_.top().first <= now) {
    const std::uint64_t token = deadlines_.top().second;
    deadlines_.pop();
    pending_request* r = find(token);
    if (r == nullptr) continue;
    if (r->state == request_state::abandoned) {
      // Its release timer (an earlier timer of the request is stale): the worker has had the
      // request's whole deadline and heartbeat x liveness more to answer; take the slot back.
      if (now >= abandon_release(*r)) {
        ++abandoned_released_;
        finish(token, out);
      }
      continue;
    }
    const std::string& name = r->hdr.service;
    const auto sit = services_.find(name);
    const bool has_workers = sit != services_.end() && !sit->second.offers.empty();
    // A request that a worker already took (and lost) was not refused for want of a worker.
    if (r->state == request_state::queued && !has_workers && !r->redispatched) {
      fail(token,
           error::make(errc::no_such_service, "no worker offers service '" + name +
                                                  "' (waited until the request's deadline)"),
           out);
    } else {
      const char* where = r->state == request_state::queued ? "while queued" : "while in flight";
      fail(token,
           error::make(errc::deadline_exceeded,
                       name + "." + r->hdr.action + " did not complete before its deadline (" +
                           std::to_string(r->hdr.deadline_ms) + " ms) " + where),
           out);
    }
  }

  if (now < next_liveness_check_) return;
  next_liveness_check_ = now + limits_.heartbeat;
  const auto allowed = limits_.heartbeat * limits_.liveness;
  std::vector<peer_id> silent;
  for (const auto& [id, w] : workers_) {
    if (now - w->last_seen > allowed) silent.push_back(id);
  }
  for (const auto& id : silent) remove_worker(id, out);
}

std::optional<time_point> registry::next_deadline() {
  // Drop timers of requests that are already answered so they do not cause idle wake-ups.
  while (!deadlines_.empty()) {
    const auto& [when, token] = deadlines_.top();
    const pending_request* r = find(token);
    if (r != nullptr && (r->state != request_state::abandoned || when >= abandon_release(*r)))
      break;
    deadlines_.pop();
  }
  if (deadlines_.empty()) return std::nullopt;
  return deadlines_.top().first;
}

void registry::fail_all(const error& err, bool dispatched_too, std::vector<decision>& out) {
  std::vector<std::uint64_t> tokens;
  for (const auto& [token, r] : pending_) {
    if (r.state == request_state::queued ||
        (dispatched_too && r.state == request_state::dispatched)) {
      tokens.push_back(token);
    }
  }
  std::sort(tokens.begin(), tokens.end());
  for (std::uint64_t token : tokens) fail(token, err, out);
}

std::size_t registry::in_flight_total() const {
  std::size_t n = 0;
  for (const auto& [id, w] : workers_) n += w->in_flight.size();
  return n;
}

}  // namespace ensemble::broker
