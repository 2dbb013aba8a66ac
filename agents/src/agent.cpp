#include "ensemble/agent/agent.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>
#include <utility>

#include "ensemble/common/clock.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/signals.hpp"

namespace ensemble::agent {

namespace errc = common::errc;
using common::command;
using common::header;
using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct message_access {
  static message make(message::kind k, header& h, bytes payload) {
    message m;
    m.kind_ = k;
    m.id_ = std::move(h.id);
    m.service_ = std::move(h.service);
    m.action_ = std::move(h.action);
    m.topic_ = std::move(h.topic);
    m.correlation_id_ = std::move(h.correlation_id);
    m.causation_id_ = std::move(h.causation_id);
    m.trace_id_ = std::move(h.trace_id);
    m.idempotency_key_ = std::move(h.idempotency_key);
    m.attempt_ = h.attempt_or_first();
    m.seq_ = h.seq;
    m.ts_ = h.ts;
    m.publisher_ = std::move(h.publisher);
    m.caller_ = std::move(h.caller);
    m.caller_scope_ = std::move(h.caller_scope);
    m.worker_ = std::move(h.worker);
    m.stream_ = std::move(h.stream);
    m.stream_seq_ = h.stream_seq;
    m.consumer_ = std::move(h.consumer);
    m.deliveries_ = h.deliveries;
    m.duplicate_ = h.duplicate;
    m.deadline_ = steady::now() + std::chrono::milliseconds(h.deadline_ms);
    m.payload_ = std::move(payload);
    return m;
  }
  // A handled request's reply header, taking the strings the request no longer needs.
  static void reply_header(message& m, header& r) {
    r.id = std::move(m.id_);
    r.correlation_id = std::move(m.correlation_id_);
    r.attempt = m.attempt_ > 1 ? m.attempt_ : 0;
  }
};

namespace {

thread_local const message* t_current = nullptr;

// Sets the message being handled on this thread for the duration of a handler.
struct current_scope {
  explicit current_scope(const message* m) : previous(t_current) { t_current = m; }
  ~current_scope() { t_current = previous; }
  const message* previous;
};

bytes to_bytes(zmq::message_t& m) {
  return bytes(static_cast<const char*>(m.data()), m.size());
}

// Library threads never take the application's stop signals (see signals.hpp).
using common::spawn_quiet;

// A FIFO of jobs served by a fixed set of threads.
class job_queue {
 public:
  void push(std::function<void()> job) {
    {
      std::lock_guard lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  // Returns false once closed and drained.
  bool pop(std::function<void()>& job) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [this] { return closed_ || !jobs_.empty(); });
    if (jobs_.empty()) return false;
    job = std::move(jobs_.front());
    jobs_.pop_front();
    ++running_;
    return true;
  }
  void done() {
    std::lock_guard lock(mutex_);
    --running_;
    idle_cv_.notify_all();
  }
  void close() {
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
    }
    cv_.notify_all();
  }
  // Waits until no job is queued or running, or the deadline passes.
  bool wait_idle(steady::time_point deadline) {
    std::unique_lock lock(mutex_);
    return idle_cv_.wait_until(lock, deadline, [this] { return jobs_.empty() && running_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<std::function<void()>> jobs_;
  std::size_t running_ = 0;
  bool closed_ = false;
};

// An event for the event thread, with the handlers that matched its topic when it arrived.
struct event_job {
  message m;
  std::shared_ptr<const std::vector<event_handler>> handlers;
};

// Events handed from the I/O thread to the event thread. The I/O thread appends what one poll
// turn received under one lock, with at most one wake-up; the event thread takes everything
// queued at once. The two vectors trade places, so neither reallocates once warm.
//
// Bounded by `limit` events, counting those queued and the batch the event thread is handling:
// the I/O thread reads no more from its SUB socket than there is room for. Once full it stops
// reading until the event thread comes back for more (and wakes it), so a slow handler leaves
// the excess in ZeroMQ's queues and, past them, to the broker's slow-subscriber policy
// (docs/protocol.md section 7), never in this process's memory.
class event_backlog {
 public:
  explicit event_backlog(std::size_t limit) : limit_(std::max<std::size_t>(1, limit)) {}
  // Events received and not yet handled.
  std::size_t size() {
    std::lock_guard lock(mutex_);
    return jobs_.size() + in_hand_;
  }
  // I/O thread: how many more events fit. When none does, the reader is paused until the event
  // thread makes room.
  std::size_t room() {
    std::lock_guard lock(mutex_);
    const std::size_t held = jobs_.size() + in_hand_;
    const std::size_t left = held >= limit_ ? 0 : limit_ - held;
    if (left == 0) reader_paused_ = true;
    return left;
  }
  // I/O thread: moves the jobs out of `batch` (never more than room() said).
  void push(std::vector<event_job>& batch) {
    if (batch.empty()) return;
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      wake = jobs_.empty() && taker_waiting_;
      for (auto& j : batch) jobs_.push_back(std::move(j));
    }
    batch.clear();
    if (wake) cv_.notify_one();
  }
  // Event thread, once done with the previous batch: waits for jobs and swaps them into `out`.
  // False once closed and drained. A paused reader is woken through `reader_wake_fd`.
  bool take(std::vector<event_job>& out, int reader_wake_fd) {
    out.clear();
    std::unique_lock lock(mutex_);
    in_hand_ = 0;
    if (reader_paused_) {
      reader_paused_ = false;
      const std::uint64_t one = 1;
      [[maybe_unused]] auto n = ::write(reader_wake_fd, &one, sizeof one);
    }
    taker_waiting_ = true;
    cv_.wait(lock, [this] { return closed_ || !jobs_.empty(); });
    taker_waiting_ = false;
    if (jobs_.empty()) return false;
    out.swap(jobs_);
    in_hand_ = out.size();
    return true;
  }
  void close() {
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
    }
    cv_.notify_all();
  }

 private:
  const std::size_t limit_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<event_job> jobs_;
  std::size_t in_hand_ = 0;  // taken by the event thread, not all handled yet
  bool taker_waiting_ = false;
  bool reader_paused_ = false;
  bool closed_ = false;
};

struct service_def {
  std::uint32_t capacity = 1;
  // Shared so that a dispatch takes a handler with a reference count, not a copy of the
  // std::function and what it captured.
  std::map<std::string, std::shared_ptr<const request_handler>> actions;
};

// A durable consumer this agent is a member of (docs/protocol.md section 11).
using consumer_key = std::pair<std::string, std::string>;  // stream, consumer

std::string describe(const consumer_key& k) {
  return "consumer '" + k.second + "' of stream '" + k.first + "'";
}

struct consumer_state {
  consume_options opts;
  consume_handler handler;
  bytes config_payload;  // the CONSUME payload, encoded once by consume()

  // Read by consumer_stats() from any thread.
  struct counters {
    std::atomic<std::uint64_t> delivered{0}, acked{0}, nacked{0}, termed{0}, threw{0}, refused{0},
        joins{0}, dropped{0}, redelivered{0};
    std::atomic<std::uint32_t> in_flight{0};
  } count;

  // I/O thread only.
  consumer_key key() const { return {opts.stream, opts.consumer}; }
  bool joined = false;          // the broker accepted the last CONSUME
  bool removed = false;         // stop_consuming, or the first join failed: nothing new starts
  bool pumping = false;         // pump() is on the stack (inline handlers answer from inside it)
  std::uint64_t join_call = 0;  // call number of the CONSUME waiting for its REPLY; 0: none
  // The caller of consume() (or start()) waiting for the first join, and until when.
  std::shared_ptr<std::promise<status>> first_join;
  steady::time_point join_deadline{};
  std::uint32_t in_hand = 0;                     // deliveries being handled
  std::deque<std::shared_ptr<message>> waiting;  // delivered, waiting for a free slot
};

// Something a user thread asks the I/O thread to do.
struct outbound {
  enum class kind {
    request,
    publish,
    reply,
    subscribe,
    sync,
    hello,
    consume,
    consume_stop,
    answer,
    progress
  };
  kind what = kind::request;
  header hdr;
  bytes payload;
  call_callback done;        // request; publish with ack
  std::uint64_t number = 0;  // request, publish: hdr.id's number (id_generator), 0 for a given id
  steady::time_point deadline{};                 // request, publish with ack, sync, consume_stop
  std::string prefix;                            // subscribe
  std::shared_ptr<std::promise<status>> synced;  // sync, consume_stop
  bool counted = false;  // publish: holds a place in the send queue (impl::queued)
  std::shared_ptr<consumer_state> consumer;  // consume, answer
  command answer = command::ack;             // answer: ACK, NACK or TERM
};

// A message the DEALER could not take yet (its high-water mark was reached), in sending order.
struct held_message {
  std::vector<zmq::message_t> frames;
  std::uint64_t call =
      0;                 // a request or acknowledged publish: skipped once its caller was answered
  bool event = false;    // a PUBLISH
  bool counted = false;  // holds a place in the send queue
};

// What send() needs to know about the message besides its frames.
struct send_tag {
  std::uint64_t call = 0;  // the pending call it belongs to (call_table), 0: none
  bool counted = false;
};

// A call waiting for its answer: a request (REPLY), an acknowledged publish (PUBLISH_ACK), a
// CONSUME or CONSUME_STOP (REPLY).
struct pending_call {
  enum class about : std::uint8_t { request, ack, other };
  call_callback done;
  steady::time_point deadline;
  std::uint64_t generation = 0;
  // What the call is, for error messages, built only when one is needed: request: service and
  // action; ack: the topic; other: the whole description.
  about kind = about::other;
  std::string subject, action;
  std::string given_id;  // the caller chose the id (send_options::id): its entry in named_calls

  std::string what() const {
    switch (kind) {
      case about::request:
        return subject + "." + action;
      case about::ack:
        return "ack of " + subject;
      default:
        return subject;
    }
  }
};

// The pending calls, keyed by a number that is never 0 (the id generator's number of the call's
// id): open addressing with linear probing in one array that doubles when half full, so that
// adding and removing a call hashes no string and allocates nothing once the table is warm.
class call_table {
 public:
  std::size_t size() const { return count_; }
  bool empty() const { return count_ == 0; }
  bool contains(std::uint64_t key) const { return find(key) != nullptr; }
  pending_call* find(std::uint64_t key) {
    return const_cast<pending_call*>(std::as_const(*this).find(key));
  }
  const pending_call* find(std::uint64_t key) const {
    if (key == 0 || count_ == 0) return nullptr;
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].call;
      if (slots_[i].key == 0) return nullptr;
    }
  }
  // Adds or replaces the call `key` (never 0).
  void put(std::uint64_t key, pending_call call) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    std::size_t i = home(key);
    while (slots_[i].key != 0 && slots_[i].key != key) i = (i + 1) & mask_;
    if (slots_[i].key == 0) ++count_;
    slots_[i].key = key;
    slots_[i].call = std::move(call);
  }
  // Removes the call `key` and returns it, if there is one.
  std::optional<pending_call> take(std::uint64_t key) {
    if (key == 0 || count_ == 0) return std::nullopt;
    std::size_t i = home(key);
    while (slots_[i].key != key) {
      if (slots_[i].key == 0) return std::nullopt;
      i = (i + 1) & mask_;
    }
    std::optional<pending_call> out(std::move(slots_[i].call));
    // Backward-shift deletion: later entries of the same probe run move up into the hole, so
    // that lookups never need tombstones.
    for (std::size_t j = (i + 1) & mask_; slots_[j].key != 0; j = (j + 1) & mask_) {
      const std::size_t h = home(slots_[j].key);
      // Entry j may fill the hole at i unless its home lies cyclically in (i, j].
      const bool stays = i <= j ? (h > i && h <= j) : (h > i || h <= j);
      if (stays) continue;
      slots_[i].key = slots_[j].key;
      slots_[i].call = std::move(slots_[j].call);
      i = j;
    }
    slots_[i].key = 0;
    slots_[i].call = pending_call{};
    --count_;
    return out;
  }
  // The keys of the calls for which `pick` is true.
  template <class Pick>
  std::vector<std::uint64_t> keys_where(Pick pick) const {
    std::vector<std::uint64_t> out;
    for (const auto& s : slots_) {
      if (s.key != 0 && pick(s.call)) out.push_back(s.key);
    }
    return out;
  }

 private:
  struct slot {
    std::uint64_t key = 0;
    pending_call call;
  };
  std::size_t home(std::uint64_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ULL) >> shift_);
  }
  void grow() {
    std::vector<slot> old = std::move(slots_);
    const std::size_t capacity = old.empty() ? 64 : old.size() * 2;
    slots_ = std::vector<slot>(capacity);
    mask_ = capacity - 1;
    shift_ = 64 - static_cast<unsigned>(std::countr_zero(capacity));
    count_ = 0;
    for (auto& s : old) {
      if (s.key != 0) put(s.key, std::move(s.call));
    }
  }
  std::vector<slot> slots_;
  std::size_t mask_ = 0;
  unsigned shift_ = 64;
  std::size_t count_ = 0;
};

struct probe {
  std::string topic;
  steady::time_point next_publish;
  steady::time_point deadline;
  std::shared_ptr<std::promise<status>> synced;
};

}  // namespace

struct agent::impl {
  explicit impl(options o) : opts(std::move(o)), log(common::component_logger("agent")) {
    name_given = !opts.name.empty();
    if (opts.name.empty()) opts.name = "agent-" + ids.prefix().substr(0, 8);
    opts.send_queue = std::max<std::size_t>(1, opts.send_queue);
    wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~impl() {
    if (wake_fd >= 0) ::close(wake_fd);
  }

  options opts;
  bool name_given = false;  // options.name was set (else a random one, or the key file's)
  std::shared_ptr<spdlog::logger> log;
  common::id_generator ids;
  zmq::context_t ctx{1};
  int wake_fd = -1;

  // Configuration (guarded by config_mutex; read by the I/O thread when dispatching).
  std::mutex config_mutex;
  std::map<std::string, service_def> services;
  std::vector<std::pair<std::string, event_handler>> subscriptions;
  // The consumers given to consume() and not stopped: for duplicates and consumer_stats(). The
  // I/O thread has its own map (io_consumers) of those it joined.
  std::map<consumer_key, std::shared_ptr<consumer_state>> consumers;

  // Outbox from user threads to the I/O thread.
  std::mutex out_mutex;
  std::vector<outbound> outbox;
  std::vector<outbound> drained;  // I/O thread only: drain_outbox's batch
  bool wake_pending = false;
  bool outbox_closed = false;

  // Secured mode: this agent's key pair and the broker's public key, read by start(). Without
  // keys, `secured` is false and the sockets use ZeroMQ's NULL mechanism.
  bool secured = false;
  common::curve_keys keys;
  std::string broker_public_key;

  // State owned by the I/O thread.
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<zmq::socket_t> sub;
  // The DEALER's socket monitor (handshake outcomes): how a refused key is told apart from an
  // unreachable broker. A new one comes with each new DEALER.
  std::unique_ptr<zmq::socket_t> monitor;
  std::uint64_t monitors_opened = 0;
  std::vector<zmq::message_t> monitor_frames;
  bool refusal_logged = false;  // since the last successful handshake
  int handshakes_dropped = 0;   // connections dropped during the handshake, since the last success
  std::thread io;
  std::thread::id io_id;
  // Calls waiting for an answer, by number; those whose id the caller chose are found through
  // named_calls (the others' number is read from the id itself: call_number()).
  call_table calls;
  std::unordered_map<std::string, std::uint64_t> named_calls;
  using timer = std::pair<steady::time_point, std::uint64_t>;  // a call's deadline, its number
  // A min-heap (std::push_heap with std::greater) of the calls' backstop timers. An answered
  // call's entry stays until it is popped or the heap is pruned (add_call).
  std::vector<timer> call_deadlines;
  std::vector<probe> probes;
  std::vector<zmq::message_t> frames;
  std::vector<zmq::message_t> out_frames;
  std::deque<held_message> held;         // what the DEALER could not take yet, oldest first
  std::uint64_t events_unconfirmed = 0;  // PUBLISHes sent since the broker was last heard from
  steady::time_point flush_deadline{};   // set by stop(): how long the last flush may take
  std::chrono::milliseconds heartbeat{1000};
  steady::time_point last_from_broker;
  steady::time_point next_heartbeat;
  std::uint64_t generation = 0;  // bumped whenever the broker connection is known to be reset
  std::uint64_t welcome_generation = 0;  // generation when the last WELCOME arrived
  std::string known_broker;
  std::map<consumer_key, std::shared_ptr<consumer_state>> io_consumers;
  // The broker forgot this agent's memberships (it restarted, or declared the agent lost): the
  // next WELCOME joins every consumer again.
  bool rejoin_needed = false;

  // Shared state.
  std::atomic<bool> running{false};
  std::atomic<bool> stopping{false};
  std::atomic<bool> is_registered{false};
  std::atomic<std::uint64_t> registration_count{0};
  std::atomic<std::uint64_t> max_message_size{1024 * 1024};
  mutable std::mutex state_mutex;
  std::string broker_id;
  std::promise<status> first_welcome;
  bool welcomed_once = false;
  bool started_once = false;

  // The send queue: events accepted by publish*() and not yet taken by the DEALER (in the outbox
  // or held). Publishers take a place before posting, the I/O thread gives it back once the
  // socket took the event; publishers without a place wait on room_cv.
  std::atomic<std::size_t> queued{0};
  std::atomic<std::size_t> room_waiters{0};
  std::mutex room_mutex;
  std::condition_variable room_cv;

  job_queue handler_jobs;
  std::mutex pool_mutex;  // handler_threads: consume() after start() may add threads
  std::vector<std::thread> handler_threads;
  event_backlog inbox{opts.event_queue};
  std::thread event_thread;
  // I/O thread: the handlers matching each topic seen, for the subscriptions of
  // `cached_subscriptions` (subscribe() bumps `subscriptions_version`), and the events of the
  // current poll turn, handed to `inbox` in one go.
  std::atomic<std::uint64_t> subscriptions_version{0};
  std::uint64_t cached_subscriptions = 0;
  std::unordered_map<std::string, std::shared_ptr<const std::vector<event_handler>>> handler_cache;
  std::vector<event_job> event_batch;

  // --- user-thread side ---
  // Hands `o` to the I/O thread; false (and `o` refused) once the agent has stopped.
  bool post(outbound o) {
    bool signal = false;
    {
      std::unique_lock lock(out_mutex);
      if (outbox_closed) {
        lock.unlock();
        if (o.counted) release_room(1);
        refuse(o, error{std::string(errc::broker_lost), "the agent stopped", false});
        return false;
      }
      outbox.push_back(std::move(o));
      if (!wake_pending) signal = wake_pending = true;
    }
    if (signal) {
      const std::uint64_t one = 1;
      [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
    }
    return true;
  }
  void post_hello() {
    outbound o;
    o.what = outbound::kind::hello;
    post(std::move(o));
  }
  // Settles whatever a user thread waits on for an outbound that will never be sent.
  static void refuse(outbound& o, const error& why) {
    if (o.done) o.done(why);
    if (o.synced) o.synced->set_value(why);
  }
  // After the I/O thread is gone: nothing more is accepted, and what is left is refused.
  void close_outbox() {
    std::vector<outbound> left;
    {
      std::lock_guard lock(out_mutex);
      outbox_closed = true;
      left.swap(outbox);
    }
    for (auto& o : left) {
      if (o.counted) release_room(1);
      refuse(o, error{std::string(errc::broker_lost), "the agent stopped", false});
    }
  }
  bool on_io_thread() const { return std::this_thread::get_id() == io_id; }
  // Runs `o` now if on the I/O thread (callbacks pipelining calls), else hands it over.
  // False if the agent has stopped (`o` was refused).
  bool submit(outbound o) {
    if (on_io_thread()) {
      execute(o);
      return true;
    }
    return post(std::move(o));
  }

  // Takes a place in the send queue for one event. Waits for one until `until` when `may_wait`
  // (never on the I/O thread: only it makes room). An error says why there is none.
  std::optional<error> reserve_room(const std::string& topic, steady::time_point until,
                                    bool may_wait) {
    auto take = [this] {
      auto n = queued.load();
      while (n < opts.send_queue) {
        if (queued.compare_exchange_weak(n, n + 1)) return true;
      }
      return false;
    };
    if (take()) return std::nullopt;
    const auto t0 = steady::now();
    const bool waits = may_wait && !on_io_thread();
    bool taken = false;
    if (waits) {
      std::unique_lock lock(room_mutex);
      ++room_waiters;  // before testing again: release_room() then sees us and notifies
      room_cv.wait_until(lock, until, [&] { return !running || (taken = take()); });
      --room_waiters;
    }
    if (taken) return std::nullopt;
    if (!running) return error{std::string(errc::broker_lost), "the agent stopped", false};
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0);
    return error{std::string(errc::queue_full),
                 "publish to '" + topic + "': " + std::to_string(opts.send_queue) +
                     " events already wait for the connection to the broker at " + opts.broker +
                     " (options.send_queue)" +
                     (waits ? ", still after waiting " + std::to_string(waited.count()) + " ms"
                            : std::string(", and this call cannot wait for room")) +
                     "; the broker is not keeping up or not reachable",
                 true};
  }
  // Gives back `n` places in the send queue (the socket took those events, or they were
  // refused) and wakes publishers waiting for one — once a quarter of the queue is free, so
  // that they wake for a batch rather than for every event. (A waiter whose wait ends while
  // there is room, but before that, still takes its place.)
  void release_room(std::size_t n) {
    const auto left = queued.fetch_sub(n) - n;
    if (room_waiters.load() > 0 &&
        left <= opts.send_queue - std::max<std::size_t>(1, opts.send_queue / 4)) {
      std::lock_guard lock(room_mutex);
      room_cv.notify_all();
    }
  }
  // Returns the id's number when the SDK made the id, 0 when the caller gave one.
  std::uint64_t fill_context(header& h, const send_options& so) {
    std::uint64_t number = 0;
    if (so.id.empty()) {
      number = ids.next_number();
      h.id = ids.format(number);
    } else {
      h.id = so.id;
    }
    const message* cur = t_current;
    h.correlation_id = !so.correlation_id.empty()                         ? so.correlation_id
                       : cur != nullptr && !cur->correlation_id().empty() ? cur->correlation_id()
                                                                          : h.id;
    h.causation_id = !so.causation_id.empty() ? so.causation_id
                     : cur != nullptr         ? cur->id()
                                              : std::string();
    h.trace_id = !so.trace_id.empty()                         ? so.trace_id
                 : cur != nullptr && !cur->trace_id().empty() ? cur->trace_id()
                                                              : h.id;
    h.idempotency_key = so.idempotency_key;
    h.attempt = so.attempt;
    h.retryable = so.retryable;
    return number;
  }
  // Measures the encoded header in a buffer this thread keeps, so that the check allocates
  // nothing once warm.
  std::optional<error> check_size(const header& h, const bytes& payload) {
    thread_local std::string encoded;
    encoded.clear();
    common::encode_header(h, encoded);
    return check_size(encoded.size() + payload.size());
  }
  std::optional<error> check_size(std::size_t size) {
    if (size > max_message_size.load()) {
      return error{std::string(errc::too_large),
                   "message of " + std::to_string(size) + " bytes exceeds the broker's limit of " +
                       std::to_string(max_message_size.load()),
                   false};
    }
    return std::nullopt;
  }

  void publish_with_ack(const std::string& topic, bytes payload, std::chrono::milliseconds deadline,
                        call_callback done, const send_options& so, bool wait_for_room);

  // --- I/O thread ---
  void io_main();
  void connect();
  void secure(zmq::socket_t& s) const;
  void open_monitor();
  void on_monitor_event();
  void on_refused(const std::string& why);
  void send(command cmd, const header& h, bytes payload = {}, send_tag tag = {});
  void send_encoded(command cmd, std::string_view encoded, const header& h, bytes payload,
                    send_tag tag);
  bool try_send(std::vector<zmq::message_t>& message_frames);
  void sent(command cmd, bool counted);
  void flush_held();
  void flush_before(steady::time_point deadline);
  void send_hello(bool first = false);
  void execute(outbound& o);
  void drain_outbox();
  void on_dealer_message(steady::time_point now);
  void on_event(steady::time_point now);
  std::shared_ptr<const std::vector<event_handler>> handlers_for(const std::string& topic);
  void handle_event(const event_job& job);
  void on_dispatch(header& h, bytes payload);
  std::shared_ptr<const request_handler> handler_for(const header& h);
  handler_result run_handler(const request_handler& handler, const message& m);
  void answer_request(message& m, std::uint64_t token, handler_result result);
  // Durable consumers.
  void spawn_handler_thread();
  void grow_pool();
  void send_consume(const std::shared_ptr<consumer_state>& st);
  void on_consume_answer(const std::shared_ptr<consumer_state>& st, std::uint64_t call,
                         call_result r);
  void settle_join(consumer_state& st, status s);
  void remove_consumer(const std::shared_ptr<consumer_state>& st, const std::string& why,
                       bool leave);
  void rejoin_consumers();
  void on_deliver(header& h, bytes payload);
  void pump(const std::shared_ptr<consumer_state>& st);
  void handle_delivery(const std::shared_ptr<consumer_state>& st, std::shared_ptr<message> m);
  void on_answer_refused(const header& h);
  std::uint64_t call_number(const std::string& id) const;
  void add_call(std::uint64_t number, std::string given_id, pending_call c,
                steady::time_point backstop);
  void complete_call(std::uint64_t number, call_result r);
  void fail_calls(const std::string& code, const std::string& why, bool all_generations);
  void on_timers(steady::time_point now);
  void broker_reset(const std::string& why);
  steady::time_point next_wakeup() const;
};

// Hands one message to the DEALER, or holds it when the socket has no room (its high-water mark
// is reached: the broker does not keep up, is paused or unreachable) or older messages are held:
// nothing is dropped, and order is kept. Held messages go out as the socket drains (flush_held).
void agent::impl::send(command cmd, const header& h, bytes payload, send_tag tag) {
  thread_local std::string encoded;
  encoded.clear();
  common::encode_header(h, encoded);
  send_encoded(cmd, encoded, h, std::move(payload), tag);
}

// send() with the header already encoded (`h` is only named in logs).
void agent::impl::send_encoded(command cmd, std::string_view encoded, const header& h,
                               bytes payload, send_tag tag) {
  out_frames.clear();
  common::build_encoded_message(out_frames, cmd, encoded,
                                zmq::message_t(payload.data(), payload.size()));
  if (held.empty() && try_send(out_frames)) {
    sent(cmd, tag.counted);
    return;
  }
  if (held.empty()) {
    log->debug("{}: the connection to the broker is full; holding messages from {} id={}",
               opts.name, common::command_name(static_cast<std::uint8_t>(cmd)), h.id);
  }
  held.push_back(
      held_message{std::move(out_frames), tag.call, cmd == command::publish, tag.counted});
  out_frames.clear();  // moved from: make it a usable empty vector again
}

// Sends one whole message without blocking; false, with the frames kept, if the socket has no
// room. A DEALER takes a multipart message atomically: only its first frame can meet EAGAIN.
bool agent::impl::try_send(std::vector<zmq::message_t>& message_frames) {
  for (std::size_t i = 0; i < message_frames.size(); ++i) {
    auto flags = zmq::send_flags::dontwait;
    if (i + 1 < message_frames.size()) flags = flags | zmq::send_flags::sndmore;
    if (!dealer->send(message_frames[i], flags) && i == 0) return false;
  }
  message_frames.clear();
  return true;
}

// Book-keeping once the socket took a message.
void agent::impl::sent(command cmd, bool counted) {
  if (cmd == command::publish) ++events_unconfirmed;
  if (counted) release_room(1);
}

// Sends held messages, oldest first, while the socket takes them. A request or acknowledged
// publish whose caller was already answered (its deadline passed, or the connection was reset)
// is not sent: its caller was told it failed.
void agent::impl::flush_held() {
  std::size_t released = 0;
  while (!held.empty()) {
    auto& m = held.front();
    const bool answered = m.call != 0 && !calls.contains(m.call);
    if (!answered && !try_send(m.frames)) break;
    if (m.event && !answered) ++events_unconfirmed;
    if (m.counted) ++released;
    held.pop_front();
  }
  if (released > 0) release_room(released);
}

// stop(): sends what is held until `deadline`; what the socket still cannot take is lost, and
// said so.
void agent::impl::flush_before(steady::time_point deadline) {
  while (true) {
    flush_held();
    if (held.empty() || steady::now() >= deadline) break;
    std::array<zmq::pollitem_t, 1> item{{{dealer->handle(), 0, ZMQ_POLLOUT, 0}}};
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    try {
      zmq::poll(item.data(), item.size(), std::clamp(left, 1ms, 100ms));
    } catch (const zmq::error_t&) {
      break;
    }
  }
  if (held.empty()) return;
  std::size_t events = 0, counted = 0;
  for (const auto& m : held) {
    if (m.event) ++events;
    if (m.counted) ++counted;
  }
  log->warn(
      "{}: stopping with {} message(s), {} of them events, that the broker at {} did not "
      "take within the grace period; they are lost",
      opts.name, held.size(), events, opts.broker);
  held.clear();
  if (counted > 0) release_room(counted);
}

void agent::impl::send_hello(bool first) {
  header h;
  // Secured without a name: the broker names this agent with its key's identity.
  if (!secured || name_given) h.agent = opts.name;
  {
    std::lock_guard lock(config_mutex);
    for (const auto& [name, def] : services) h.services.push_back({name, def.capacity});
  }
  if (!first || held.empty()) {
    send(command::hello, h);
    return;
  }
  // A new connection registers before the held messages go out on it.
  std::vector<zmq::message_t> hello;
  common::build_message(hello, command::hello, h);
  held.push_front(held_message{std::move(hello), {}, false, false});
}

// The CURVE client options of docs/protocol.md section 12, "Connecting" (before connect()).
void agent::impl::secure(zmq::socket_t& s) const {
  if (!secured) return;
  s.set(zmq::sockopt::curve_serverkey, broker_public_key);
  s.set(zmq::sockopt::curve_publickey, keys.public_key);
  s.set(zmq::sockopt::curve_secretkey, keys.secret_key);
}

// Watches the handshakes of the current DEALER. Called before it connects, so that no event is
// missed.
void agent::impl::open_monitor() {
  monitor.reset();
  const std::string endpoint =
      "inproc://ensemble-agent-monitor-" + std::to_string(++monitors_opened);
  const int events = ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                     ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;
  if (zmq_socket_monitor(dealer->handle(), endpoint.c_str(), events) != 0) throw zmq::error_t();
  monitor = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::pair);
  monitor->set(zmq::sockopt::linger, 0);
  monitor->connect(endpoint);
}

namespace {

std::string hex(std::uint32_t v) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%x", v);
  return text;
}

}  // namespace

// One event of the DEALER's monitor: two frames, [uint16 event, uint32 value] in host order and
// the endpoint (libzmq's monitor format, version 1).
void agent::impl::on_monitor_event() {
  if (monitor_frames.empty() || monitor_frames[0].size() < 6) return;
  std::uint16_t event = 0;
  std::uint32_t value = 0;
  std::memcpy(&event, monitor_frames[0].data(), sizeof event);
  std::memcpy(&value, static_cast<const char*>(monitor_frames[0].data()) + 2, sizeof value);
  switch (event) {
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
      if (refusal_logged) {
        log->info("{}: the broker at {} accepted this agent's connection again", opts.name,
                  opts.broker);
      }
      refusal_logged = false;
      handshakes_dropped = 0;
      return;
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
      on_refused("ZAP status " + std::to_string(value) +
                 ": no identity of its auth file has this agent's public key " + keys.public_key +
                 " (" + opts.key_file + ")");
      return;
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
      if (value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) {
        on_refused(secured ? "the broker at " + opts.broker +
                                 " does not run secured mode: it expects no CURVE key; start it "
                                 "with --curve-key, or connect without keys"
                           : "the broker at " + opts.broker +
                                 " runs secured mode: this agent needs a key "
                                 "(options.key_file and options.broker_key; `ensemble keygen`)");
      } else {
        on_refused("ZeroMQ protocol error " + hex(value) + " with the broker at " + opts.broker);
      }
      return;
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
      // A CURVE server that cannot open the client's HELLO (it was sealed for another server
      // key) drops the connection without a word; so may a plain broker that saw the mechanism
      // mismatch first. Once could be a broker stopping mid-handshake: twice in a row is a
      // refusal. Without CURVE, it is just a connection lost: reconnection deals with it.
      if (secured && ++handshakes_dropped >= 2) {
        on_refused("the broker at " + opts.broker +
                   " dropped the connection during the CURVE handshake: is " + broker_public_key +
                   " (options.broker_key) its public key, and does it run secured mode?");
      } else {
        log->debug("{}: connection to {} lost during the handshake (errno {})", opts.name,
                   opts.broker, value);
      }
      return;
    default:
      return;
  }
}

// The broker refused this agent's connection at the handshake: start() fails with it; later (a
// revoked key, a broker restarted with other keys) it is logged, once until a handshake passes.
void agent::impl::on_refused(const std::string& why) {
  const std::string message = "the broker refused this key at the handshake (" + why + ")";
  {
    std::lock_guard lock(state_mutex);
    if (!welcomed_once) {
      welcomed_once = true;  // start() is told; nothing else waits on the first WELCOME
      first_welcome.set_value(error{std::string(errc::unauthorized), message, false});
      refusal_logged = true;
      return;
    }
  }
  if (!refusal_logged) {
    log->error("{}: unauthorized: {}", opts.name, message);
    refusal_logged = true;
  } else {
    log->debug("{}: unauthorized: {}", opts.name, message);
  }
}

void agent::impl::connect() {
  monitor.reset();
  dealer = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
  dealer->set(zmq::sockopt::linger, 0);
  dealer->set(zmq::sockopt::sndhwm, 100'000);
  dealer->set(zmq::sockopt::rcvhwm, 100'000);
  dealer->set(zmq::sockopt::reconnect_ivl, 50);
  dealer->set(zmq::sockopt::reconnect_ivl_max, 1000);
  secure(*dealer);
  open_monitor();
  dealer->connect(opts.broker);
  last_from_broker = steady::now();
  events_unconfirmed = 0;
  is_registered = false;
  send_hello(true);
}

void agent::impl::broker_reset(const std::string& why) {
  ++generation;
  is_registered = false;
  rejoin_needed = true;
  log->warn("{}: {}; registering again", opts.name, why);
}

void agent::impl::fail_calls(const std::string& code, const std::string& why,
                             bool all_generations) {
  const auto to_fail = calls.keys_where(
      [&](const pending_call& c) { return all_generations || c.generation < generation; });
  for (const auto number : to_fail) {
    // A callback may have answered (or started) other calls meanwhile: look each up again.
    if (const auto* c = calls.find(number)) {
      complete_call(number, error{code, why + " while waiting for " + c->what(), true});
    }
  }
}

// The pending call an answer's id belongs to: one whose id the caller chose, else the number
// the SDK wrote into the id; 0 when it is neither.
std::uint64_t agent::impl::call_number(const std::string& id) const {
  if (!named_calls.empty()) {
    if (auto it = named_calls.find(id); it != named_calls.end()) return it->second;
  }
  return ids.number_of(id).value_or(0);
}

// Registers a pending call under `number`, with a backstop timer at `backstop`. `given_id`: the id
// the caller chose (empty when the SDK made it), by which its answer finds the number.
void agent::impl::add_call(std::uint64_t number, std::string given_id, pending_call c,
                           steady::time_point backstop) {
  if (!given_id.empty()) {
    named_calls[given_id] = number;
    c.given_id = std::move(given_id);
  }
  calls.put(number, std::move(c));
  // Entries of answered calls pile up while calls are answered long before their deadlines
  // (pipelined callers): once they are most of the heap, keep only the live ones. Amortised,
  // this costs O(1) per call and bounds the heap to about twice the calls in flight.
  if (call_deadlines.size() >= 1024 && call_deadlines.size() > 2 * calls.size()) {
    std::erase_if(call_deadlines, [this](const timer& t) { return !calls.contains(t.second); });
    std::make_heap(call_deadlines.begin(), call_deadlines.end(), std::greater<>{});
  }
  call_deadlines.emplace_back(backstop, number);
  std::push_heap(call_deadlines.begin(), call_deadlines.end(), std::greater<>{});
}

void agent::impl::complete_call(std::uint64_t number, call_result r) {
  auto c = calls.take(number);
  if (!c) return;
  if (!c->given_id.empty()) {
    if (auto it = named_calls.find(c->given_id); it != named_calls.end() && it->second == number) {
      named_calls.erase(it);
    }
  }
  if (c->done) c->done(std::move(r));
}

void agent::impl::execute(outbound& o) {
  switch (o.what) {
    case outbound::kind::request:
    case outbound::kind::publish: {
      const bool is_request = o.what == outbound::kind::request;
      if (o.done && o.number == 0) {
        // An id the caller chose: its answer is matched by that id, so it must not be one of a
        // call still in flight (two calls could not tell their answers apart).
        if (const auto n = call_number(o.hdr.id); n != 0 && calls.contains(n)) {
          refuse(o, error{std::string(common::errc::bad_request),
                          "id '" + o.hdr.id + "' is already used by a call of agent " + opts.name +
                              " in flight; ids given in send_options must be unique among them",
                          false});
          break;
        }
      }
      // A call's number: the one in its id, or a fresh one for an id the caller chose.
      const std::uint64_t number = !o.done ? 0 : o.number != 0 ? o.number : ids.next_number();
      if (is_request) {
        o.hdr.deadline_ms =
            std::max<std::uint64_t>(1, common::millis_until(o.deadline, steady::now()));
      }
      send(is_request ? command::request : command::publish, o.hdr, std::move(o.payload),
           send_tag{number, o.counted});
      if (o.done) {
        pending_call c;
        c.done = std::move(o.done);
        c.deadline = o.deadline;
        c.generation = generation;
        c.kind = is_request ? pending_call::about::request : pending_call::about::ack;
        c.subject = std::move(is_request ? o.hdr.service : o.hdr.topic);
        c.action = std::move(o.hdr.action);
        // The broker answers at the deadline itself; the local timer is the backstop for a
        // broker that is gone, a little later so that the broker's own answer wins.
        add_call(number, o.number == 0 ? std::move(o.hdr.id) : std::string(), std::move(c),
                 o.deadline + 20ms);
      }
      break;
    }
    case outbound::kind::reply:
      send(command::reply, o.hdr, std::move(o.payload));
      break;
    case outbound::kind::subscribe:
      sub->set(zmq::sockopt::subscribe, o.prefix);
      break;
    case outbound::kind::sync: {
      // Subscribing to a fresh probe topic after the real subscriptions and seeing a probe
      // come back proves that the broker applies them (docs/protocol.md, Subscription).
      probe p;
      p.topic = "_ensemble.sync." + ids.next();
      sub->set(zmq::sockopt::subscribe, p.topic);
      p.next_publish = steady::now();
      p.deadline = o.deadline;
      p.synced = o.synced;
      probes.push_back(std::move(p));
      break;
    }
    case outbound::kind::hello:
      send_hello();
      break;
    case outbound::kind::consume: {
      auto& st = o.consumer;
      io_consumers[st->key()] = st;
      send_consume(st);
      break;
    }
    case outbound::kind::consume_stop: {
      const consumer_key key{o.hdr.stream, o.hdr.consumer};
      if (auto it = io_consumers.find(key); it != io_consumers.end()) {
        remove_consumer(it->second, "stop_consuming() was called", false);
      }
      const std::uint64_t number = ids.next_number();
      o.hdr.id = ids.format(number);
      send(command::consume_stop, o.hdr, {}, send_tag{number, false});
      auto synced = o.synced;
      pending_call c;
      c.done = [synced, key](call_result r) {
        // A broker that forgot this member (restarted, or lost it) has nothing to stop.
        if (r || r.err().code == errc::broker_lost || r.err().code == errc::not_registered) {
          synced->set_value(common::ok_status());
        } else {
          synced->set_value(
              error{r.err().code, describe(key) + ": " + r.err().message, r.err().retryable});
        }
      };
      c.deadline = o.deadline;
      c.generation = generation;
      c.subject = "CONSUME_STOP of " + describe(key);
      add_call(number, {}, std::move(c), o.deadline);
      break;
    }
    case outbound::kind::progress:
      send(command::progress, o.hdr);
      break;
    case outbound::kind::answer: {
      auto& st = *o.consumer;
      switch (o.answer) {
        case command::ack:
          ++st.count.acked;
          break;
        case command::nack:
          ++st.count.nacked;
          break;
        default:
          ++st.count.termed;
          break;
      }
      log->debug("{}: {} stream={} consumer={} stream_seq={}{}{}", opts.name,
                 common::command_name(static_cast<std::uint8_t>(o.answer)), o.hdr.stream,
                 o.hdr.consumer, o.hdr.stream_seq, o.hdr.error_code.empty() ? "" : " ",
                 o.hdr.error_code);
      send(o.answer, o.hdr);
      --st.in_hand;
      --st.count.in_flight;
      pump(o.consumer);
      break;
    }
  }
}

void agent::impl::drain_outbox() {
  // Consume the wake-up before taking the batch: a post that lands after the swap then
  // signals again instead of waiting for the next timer.
  std::uint64_t value = 0;
  [[maybe_unused]] auto n = ::read(wake_fd, &value, sizeof value);
  // Two vectors trade places so that both keep their capacity: a busy caller (the
  // orchestrator posts thousands of calls per second) does not reallocate on every post.
  std::vector<outbound>& batch = drained;
  {
    std::lock_guard lock(out_mutex);
    batch.swap(outbox);
    wake_pending = false;
  }
  for (auto& o : batch) execute(o);
  batch.clear();
}

void agent::impl::on_dispatch(header& h, bytes payload) {
  auto answer_error = [&](error e) {
    header r;
    r.id = std::move(h.id);
    r.token = h.token;
    r.worker = opts.name;
    r.correlation_id = std::move(h.correlation_id);
    r.error_code = std::move(e.code);
    r.error_message = std::move(e.message);
    r.retryable = e.retryable;
    send(command::reply, r);
  };
  if (stopping) {
    answer_error(common::error::make(errc::shutting_down, opts.name + " is stopping"));
    return;
  }
  auto handler = handler_for(h);
  if (!handler) {
    answer_error(error{std::string(errc::unknown_action),
                       "agent '" + opts.name + "' has no handler for " + h.service + "." + h.action,
                       false});
    return;
  }
  const std::uint64_t token = h.token;
  if (opts.inline_handlers) {
    message m = message_access::make(message::kind::request, h, std::move(payload));
    answer_request(m, token, run_handler(*handler, m));
    return;
  }
  auto m = std::make_shared<message>(
      message_access::make(message::kind::request, h, std::move(payload)));
  handler_jobs.push([this, m, token, handler = std::move(handler)] {
    answer_request(*m, token, run_handler(*handler, *m));
  });
}

// The handler for a DISPATCH's service and action (or the service's "*"), or nullptr.
std::shared_ptr<const request_handler> agent::impl::handler_for(const header& h) {
  std::lock_guard lock(config_mutex);
  auto s = services.find(h.service);
  if (s == services.end()) return nullptr;
  auto a = s->second.actions.find(h.action);
  if (a == s->second.actions.end()) a = s->second.actions.find("*");
  return a != s->second.actions.end() ? a->second : nullptr;
}

handler_result agent::impl::run_handler(const request_handler& handler, const message& m) {
  current_scope scope(&m);
  try {
    return handler(m);
  } catch (const std::exception& e) {
    return error{std::string(errc::handler_failed),
                 m.service() + "." + m.action() + " threw: " + e.what(), false};
  } catch (...) {
    return error{std::string(errc::handler_failed),
                 m.service() + "." + m.action() + " threw a non-standard exception", false};
  }
}

// Sends the REPLY for the handled request `m` (whose id and correlation id it takes). On the
// I/O thread (inline handlers) the header is encoded once, for the size check and the frame;
// from a pool thread the reply is handed to the I/O thread.
void agent::impl::answer_request(message& m, std::uint64_t token, handler_result result) {
  header r;
  r.token = token;
  r.worker = opts.name;
  bytes payload;
  if (result) {
    payload = std::move(result).value();
  } else {
    error& e = result.err();
    r.error_code = e.code.empty() ? std::string(errc::handler_failed) : std::move(e.code);
    r.error_message = std::move(e.message);
    r.retryable = e.retryable;
  }
  auto too_big = [&](const error& e) {
    payload.clear();
    r.error_code = e.code;
    r.error_message = "reply of " + m.service() + "." + m.action() + ": " + e.message;
    r.retryable = false;
  };
  message_access::reply_header(m, r);
  if (on_io_thread()) {
    thread_local std::string encoded;
    encoded.clear();
    common::encode_header(r, encoded);
    if (auto e = check_size(encoded.size() + payload.size())) {
      too_big(*e);
      encoded.clear();
      common::encode_header(r, encoded);
    }
    send_encoded(command::reply, encoded, r, std::move(payload), {});
    return;
  }
  if (auto e = check_size(r, payload)) too_big(*e);
  outbound o;
  o.what = outbound::kind::reply;
  o.hdr = std::move(r);
  o.payload = std::move(payload);
  post(std::move(o));
}

// --- durable consumers ------------------------------------------------------------------------

// How long a re-join (after a broker restart) waits for the broker's answer before it is sent
// again; nobody waits on it.
constexpr auto k_rejoin_wait = 10s;
// A NACK's or TERM's reason is stored with a dead letter; the header must stay far below the
// broker's 16 KiB limit.
constexpr std::size_t k_max_reason_bytes = 4096;

void agent::impl::spawn_handler_thread() {
  handler_threads.push_back(spawn_quiet([this] {
    std::function<void()> job;
    while (handler_jobs.pop(job)) {
      job();
      handler_jobs.done();
    }
  }));
}

// A consumer added after start() gets threads for its capacity, as start() gives every service
// and consumer (unless options.handler_threads fixed the pool, or handlers run inline).
void agent::impl::grow_pool() {
  if (opts.inline_handlers || opts.handler_threads != 0) return;
  std::size_t total = 0;
  {
    std::lock_guard lock(config_mutex);
    for (const auto& [name, def] : services) total += def.capacity;
    for (const auto& [key, st] : consumers) total += st->opts.capacity;
  }
  std::lock_guard lock(pool_mutex);
  if (!running || stopping) return;
  const auto want = std::clamp<std::size_t>(total, 1, 64);
  while (handler_threads.size() < want) spawn_handler_thread();
}

void agent::impl::send_consume(const std::shared_ptr<consumer_state>& st) {
  const std::uint64_t number = ids.next_number();
  header h;
  h.id = ids.format(number);
  h.stream = st->opts.stream;
  h.consumer = st->opts.consumer;
  h.capacity = st->opts.capacity;
  st->join_call = number;
  const auto deadline = st->first_join ? st->join_deadline : steady::now() + k_rejoin_wait;
  send(command::consume, h, st->config_payload, send_tag{number, false});
  pending_call c;
  c.done = [this, st, number](call_result r) { on_consume_answer(st, number, std::move(r)); };
  c.deadline = deadline;
  c.generation = generation;
  c.subject = "CONSUME of " + describe(st->key());
  add_call(number, {}, std::move(c), deadline + 20ms);
}

void agent::impl::settle_join(consumer_state& st, status s) {
  if (!st.first_join) return;
  st.first_join->set_value(std::move(s));
  st.first_join.reset();
}

// Nothing new starts for `st`; handlers still running finish and are answered. What waited for
// a slot is the broker's to hand out again.
void agent::impl::remove_consumer(const std::shared_ptr<consumer_state>& st, const std::string& why,
                                  bool leave) {
  st->removed = true;
  if (!st->waiting.empty()) {
    st->count.dropped += st->waiting.size();
    log->debug("{}: {}: {}; {} delivery(ies) not handled", opts.name, describe(st->key()), why,
               st->waiting.size());
    st->waiting.clear();
  }
  if (auto it = io_consumers.find(st->key()); it != io_consumers.end() && it->second == st) {
    io_consumers.erase(it);
  }
  if (st->joined || st->join_call != 0) {
    // It may have been (or be about to be) accepted: leave. The REPLY matches no call.
    header h;
    h.id = ids.next();
    h.stream = st->opts.stream;
    h.consumer = st->opts.consumer;
    if (st->join_call != 0) calls.take(st->join_call);
    st->join_call = 0;
    st->joined = false;
    if (leave) send(command::consume_stop, h);
  }
}

void agent::impl::on_consume_answer(const std::shared_ptr<consumer_state>& st, std::uint64_t call,
                                    call_result r) {
  if (st->join_call != call) return;  // superseded by a later CONSUME
  st->join_call = 0;
  if (st->removed) return;
  if (r) {
    const bool again = st->count.joins.fetch_add(1) > 0;
    st->joined = true;
    log->info("{}: {} {} (capacity {})", opts.name, again ? "joined again" : "joined",
              describe(st->key()), st->opts.capacity);
    settle_join(*st, common::ok_status());
    return;
  }
  const error& e = r.err();
  if (!running) {
    settle_join(*st, error{e.code, describe(st->key()) + ": " + e.message, e.retryable});
    return;
  }
  if (e.code == errc::broker_lost) return;  // the next WELCOME joins again
  if (e.code == errc::not_registered) {
    // The broker does not know this agent (it restarted): register; the WELCOME joins again.
    if (is_registered) broker_reset("the broker does not know this agent (restarted?)");
    rejoin_needed = true;
    send_hello();
    return;
  }
  if (e.code == errc::deadline_exceeded) {
    // No answer in time. A caller waiting on it is told by its own deadline (on_timers); a
    // re-join is sent again.
    if (!st->first_join) send_consume(st);
    return;
  }
  if (st->first_join) {
    settle_join(*st, error{e.code, describe(st->key()) + ": " + e.message, e.retryable});
    remove_consumer(st, "the broker refused it", false);
    return;
  }
  log->warn(
      "{}: the broker refused to let this agent join {} again: {}: {}; it is not consuming it "
      "until it registers again",
      opts.name, describe(st->key()), e.code, e.message);
}

// The broker forgot this agent's memberships: join every consumer again. Deliveries still
// waiting for a slot came from the old membership; the broker delivers them again.
void agent::impl::rejoin_consumers() {
  for (auto& [key, st] : io_consumers) {
    if (!st->waiting.empty()) {
      st->count.dropped += st->waiting.size();
      st->waiting.clear();
    }
    st->joined = false;
    if (!st->first_join) {
      log->info("{}: joining {} again (the broker forgot this member)", opts.name, describe(key));
    }
    send_consume(st);
  }
}

void agent::impl::on_deliver(header& h, bytes payload) {
  auto it = io_consumers.find({h.stream, h.consumer});
  if (it == io_consumers.end()) {
    // Left (or never joined): the broker hands it to another member.
    log->debug(
        "{}: delivery of stream_seq {} for consumer '{}' of stream '{}', which this agent "
        "does not consume (any more); not handled",
        opts.name, h.stream_seq, h.consumer, h.stream);
    return;
  }
  auto st = it->second;
  ++st->count.delivered;
  if (h.deliveries > 1) ++st->count.redelivered;
  if (stopping) {
    ++st->count.dropped;  // BYE hands it back
    return;
  }
  log->debug("{}: DELIVER stream={} consumer={} stream_seq={} deliveries={} id={} topic={}",
             opts.name, h.stream, h.consumer, h.stream_seq, h.deliveries, h.id, h.topic);
  st->waiting.push_back(std::make_shared<message>(
      message_access::make(message::kind::delivery, h, std::move(payload))));
  pump(st);
}

// Starts waiting deliveries while the consumer has free slots. Answers come back through
// execute(answer), which frees the slot and pumps again.
void agent::impl::pump(const std::shared_ptr<consumer_state>& st) {
  if (st->pumping) return;
  st->pumping = true;
  while (!stopping && !st->removed && st->in_hand < st->opts.capacity && !st->waiting.empty()) {
    auto m = std::move(st->waiting.front());
    st->waiting.pop_front();
    ++st->in_hand;
    ++st->count.in_flight;
    handle_delivery(st, std::move(m));
  }
  st->pumping = false;
}

void agent::impl::handle_delivery(const std::shared_ptr<consumer_state>& st,
                                  std::shared_ptr<message> m) {
  auto job = [this, st, m = std::move(m)] {
    status result = error{};
    {
      current_scope scope(m.get());
      try {
        result = st->handler(*m);
      } catch (const std::exception& e) {
        ++st->count.threw;
        result = error{std::string(errc::handler_failed),
                       describe(st->key()) + ": the handler threw: " + e.what(), true};
      } catch (...) {
        ++st->count.threw;
        result = error{std::string(errc::handler_failed),
                       describe(st->key()) + ": the handler threw a non-standard exception", true};
      }
    }
    outbound o;
    o.what = outbound::kind::answer;
    o.consumer = st;
    o.hdr.stream = m->stream();
    o.hdr.consumer = m->consumer();
    o.hdr.stream_seq = m->stream_seq();
    if (!result) {
      const error& e = result.err();
      o.answer = e.retryable ? command::nack : command::term;
      o.hdr.error_code = e.code.substr(0, common::k_max_id_length);
      o.hdr.error_message = e.message.substr(0, k_max_reason_bytes);
    }
    submit(std::move(o));  // refused only once the agent stopped: its BYE hands it back
  };
  if (opts.inline_handlers) {
    job();
  } else {
    handler_jobs.push(std::move(job));
  }
}

// An ACK, NACK or TERM the broker refused. `not_pending` is what a member sees when its
// delivery expired and another member acked it first, or an ack that crossed a broker restart:
// harmless.
void agent::impl::on_answer_refused(const header& h) {
  if (auto it = io_consumers.find({h.stream, h.consumer}); it != io_consumers.end()) {
    ++it->second->count.refused;
  }
  if (h.error_code == "not_pending" || h.error_code == "not_held") {
    log->debug(
        "{}: the broker refused the answer for stream_seq {} of consumer '{}' of stream "
        "'{}': {}: {}",
        opts.name, h.stream_seq, h.consumer, h.stream, h.error_code, h.error_message);
  } else {
    log->warn(
        "{}: the broker refused the answer for stream_seq {} of consumer '{}' of stream "
        "'{}': {}: {}",
        opts.name, h.stream_seq, h.consumer, h.stream, h.error_code, h.error_message);
  }
}

void agent::impl::on_dealer_message(steady::time_point now) {
  auto parsed = common::parse_message(frames, 0);
  if (!parsed) {
    log->warn("{}: malformed message from the broker: {}", opts.name, parsed.err().message);
    return;
  }
  last_from_broker = now;
  events_unconfirmed = 0;
  auto& m = parsed.value();
  switch (m.cmd) {
    case command::welcome: {
      if (!known_broker.empty() && known_broker != m.hdr.broker) {
        // A new broker run: calls sent to the old one will never be answered. Calls sent
        // since the reset was noticed went to the new broker and stay.
        if (generation == welcome_generation) ++generation;
        rejoin_needed = true;
        fail_calls(std::string(errc::broker_lost), "the broker restarted", false);
      }
      welcome_generation = generation;
      known_broker = m.hdr.broker;
      if (m.hdr.heartbeat_ms > 0) {
        // The broker's interval rules from now on; the first beat may have been scheduled
        // with our default, which can be longer than the broker tolerates.
        heartbeat = std::chrono::milliseconds(m.hdr.heartbeat_ms);
        next_heartbeat = std::min(next_heartbeat, now + heartbeat);
      }
      if (m.hdr.max_message_size > 0) max_message_size = m.hdr.max_message_size;
      {
        std::lock_guard lock(state_mutex);
        broker_id = m.hdr.broker;
        if (!welcomed_once) {
          welcomed_once = true;
          first_welcome.set_value(common::ok_status());
        }
      }
      is_registered = true;
      ++registration_count;
      log->info("{}: registered with broker {} (heartbeat {} ms)", opts.name, m.hdr.broker,
                heartbeat.count());
      if (rejoin_needed) {
        rejoin_needed = false;
        rejoin_consumers();
      }
      break;
    }
    case command::deliver:
      on_deliver(m.hdr, to_bytes(m.payload));
      break;
    case command::dispatch:
      on_dispatch(m.hdr, to_bytes(m.payload));
      break;
    case command::reply: {
      const std::uint64_t number = call_number(m.hdr.id);
      if (!calls.contains(number)) break;  // answered already (its deadline), or not a call
      if (m.hdr.is_error()) {
        complete_call(number, error{std::move(m.hdr.error_code), std::move(m.hdr.error_message),
                                    m.hdr.retryable});
      } else {
        complete_call(number,
                      message_access::make(message::kind::reply, m.hdr, to_bytes(m.payload)));
      }
      break;
    }
    case command::publish_ack: {
      const std::uint64_t number = call_number(m.hdr.id);
      if (!calls.contains(number)) break;
      complete_call(number, message_access::make(message::kind::event, m.hdr, {}));
      break;
    }
    case command::heartbeat:
      break;
    case command::error:
      if (m.hdr.error_code == errc::not_registered) {
        if (is_registered) broker_reset("the broker does not know this agent (restarted?)");
        send_hello();
      } else if (const auto number = call_number(m.hdr.id); calls.contains(number)) {
        complete_call(number, error{m.hdr.error_code, m.hdr.error_message, m.hdr.retryable});
      } else if (!m.hdr.consumer.empty()) {
        on_answer_refused(m.hdr);
      } else if (m.hdr.error_code == errc::unauthorized) {
        // In secured mode: before the first WELCOME, what the agent sent is its HELLO (and the
        // probes, which every identity may publish): its name or a service is not its identity's.
        {
          std::lock_guard lock(state_mutex);
          if (!welcomed_once) {
            welcomed_once = true;
            first_welcome.set_value(error{
                m.hdr.error_code,
                "the broker at " + opts.broker + " refused this agent: " + m.hdr.error_message,
                false});
            break;
          }
        }
        log->error("{}: the broker refused a message (id={}): {}: {}", opts.name, m.hdr.id,
                   m.hdr.error_code, m.hdr.error_message);
      } else {
        log->warn("{}: broker refused a message (id={}): {}: {}", opts.name, m.hdr.id,
                  m.hdr.error_code, m.hdr.error_message);
      }
      break;
    default:
      log->warn("{}: unexpected {} from the broker", opts.name,
                common::command_name(static_cast<std::uint8_t>(m.cmd)));
  }
}

void agent::impl::on_event(steady::time_point now) {
  (void)now;
  if (frames.size() < 2) return;
  std::string topic(common::as_view(frames[0]));
  if (topic.rfind("_ensemble.sync.", 0) == 0) {
    for (auto it = probes.begin(); it != probes.end(); ++it) {
      if (it->topic != topic) continue;
      sub->set(zmq::sockopt::unsubscribe, it->topic);
      it->synced->set_value(common::ok_status());
      probes.erase(it);
      break;
    }
    return;
  }
  auto decoded = common::decode_header(common::as_view(frames[1]));
  if (!decoded) {
    log->warn("{}: malformed event on '{}': {}", opts.name, topic, decoded.err().message);
    return;
  }
  auto handlers = handlers_for(topic);
  if (handlers->empty()) return;
  if (decoded->topic.empty()) decoded->topic = std::move(topic);
  bytes payload = frames.size() > 2 ? to_bytes(frames[2]) : bytes();
  event_batch.push_back(
      event_job{message_access::make(message::kind::event, decoded.value(), std::move(payload)),
                std::move(handlers)});
}

// The handlers whose prefix matches `topic`, computed once per topic and kept until the
// subscriptions change. Topics are the publishers' choice, so the cache is cleared when it
// holds k_max_cached_topics of them rather than growing with every new one.
std::shared_ptr<const std::vector<event_handler>> agent::impl::handlers_for(
    const std::string& topic) {
  constexpr std::size_t k_max_cached_topics = 1024;
  const auto version = subscriptions_version.load(std::memory_order_acquire);
  if (version != cached_subscriptions || handler_cache.size() >= k_max_cached_topics) {
    handler_cache.clear();
    cached_subscriptions = version;
  }
  if (auto it = handler_cache.find(topic); it != handler_cache.end()) return it->second;
  auto matching = std::make_shared<std::vector<event_handler>>();
  {
    std::lock_guard lock(config_mutex);
    for (const auto& [prefix, h] : subscriptions) {
      if (topic.compare(0, prefix.size(), prefix) == 0) matching->push_back(h);
    }
  }
  handler_cache.emplace(topic, matching);
  return matching;
}

// Event thread: runs one event's handlers, in subscription order.
void agent::impl::handle_event(const event_job& job) {
  current_scope scope(&job.m);
  for (const auto& h : *job.handlers) {
    try {
      h(job.m);
    } catch (const std::exception& e) {
      log->error("{}: event handler for '{}' (id={}) threw: {}", opts.name, job.m.topic(),
                 job.m.id(), e.what());
    }
  }
}

void agent::impl::on_timers(steady::time_point now) {
  while (!call_deadlines.empty() && call_deadlines.front().first <= now) {
    std::pop_heap(call_deadlines.begin(), call_deadlines.end(), std::greater<>{});
    const std::uint64_t number = call_deadlines.back().second;
    call_deadlines.pop_back();
    const auto* c = calls.find(number);
    if (c == nullptr) continue;
    complete_call(number, error{std::string(errc::deadline_exceeded),
                                c->what() + " got no answer before its deadline", true});
  }
  std::vector<std::shared_ptr<consumer_state>> expired;
  for (const auto& [key, st] : io_consumers) {
    if (st->first_join && now >= st->join_deadline) expired.push_back(st);
  }
  for (const auto& st : expired) {
    settle_join(*st, error{std::string(errc::deadline_exceeded),
                           describe(st->key()) + ": the broker at " + opts.broker +
                               " did not accept this agent as a member before the deadline",
                           true});
    remove_consumer(st, "joining it timed out", true);
  }
  for (auto it = probes.begin(); it != probes.end();) {
    if (now >= it->deadline) {
      sub->set(zmq::sockopt::unsubscribe, it->topic);
      // A secured broker does not apply a subscription the identity has no right to, and
      // cannot say so (a SUB has no way back).
      it->synced->set_value(
          error{std::string(errc::deadline_exceeded),
                std::string("subscription not confirmed by the broker before the deadline") +
                    (secured ? " (a secured broker ignores a subscription outside this identity's "
                               "'subscribe' right)"
                             : ""),
                true});
      it = probes.erase(it);
      continue;
    }
    if (now >= it->next_publish) {
      header h;
      h.id = ids.next();
      h.topic = it->topic;
      send(command::publish, h);
      it->next_publish = now + 20ms;
    }
    ++it;
  }
  if (now >= next_heartbeat) {
    send(command::heartbeat, header{});
    next_heartbeat = now + heartbeat;
  }
  if (now - last_from_broker > heartbeat * opts.liveness) {
    // Nothing from the broker for `liveness` intervals: replace the connection. What the old
    // socket still queues goes with it; held messages go out on the new one.
    if (events_unconfirmed > 0) {
      log->info(
          "{}: up to {} event(s) sent since the broker was last heard from may be lost "
          "with the connection; publish_acked / publish_async confirm delivery",
          opts.name, events_unconfirmed);
    }
    broker_reset("no message from the broker for " +
                 std::to_string((heartbeat * opts.liveness).count()) + " ms");
    fail_calls(std::string(errc::broker_lost), "the connection to the broker was reset", true);
    connect();
  }
}

steady::time_point agent::impl::next_wakeup() const {
  auto t = std::min(next_heartbeat, last_from_broker + heartbeat * opts.liveness + 1ms);
  if (!call_deadlines.empty()) t = std::min(t, call_deadlines.front().first);
  for (const auto& p : probes) t = std::min({t, p.next_publish, p.deadline});
  for (const auto& [key, st] : io_consumers) {
    if (st->first_join) t = std::min(t, st->join_deadline);
  }
  return t;
}

void agent::impl::io_main() {
  io_id = std::this_thread::get_id();
  next_heartbeat = steady::now() + heartbeat;
  while (running) {
    const auto now = steady::now();
    const auto wake = next_wakeup();
    const auto timeout =
        wake <= now ? 0ms : std::chrono::ceil<std::chrono::milliseconds>(wake - now);
    const short dealer_events = held.empty() ? ZMQ_POLLIN : ZMQ_POLLIN | ZMQ_POLLOUT;
    // No room for events: leave them in the SUB socket until the event thread catches up.
    const std::size_t event_room = inbox.room();
    std::array<zmq::pollitem_t, 4> items{{
        {dealer->handle(), 0, dealer_events, 0},
        {sub->handle(), 0, static_cast<short>(event_room > 0 ? ZMQ_POLLIN : 0), 0},
        {nullptr, wake_fd, ZMQ_POLLIN, 0},
        {monitor->handle(), 0, ZMQ_POLLIN, 0},
    }};
    try {
      zmq::poll(items.data(), items.size(), std::min(timeout, std::chrono::milliseconds(1000)));
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) break;
      continue;
    }
    if ((items[0].revents & ZMQ_POLLOUT) != 0) flush_held();
    if ((items[2].revents & ZMQ_POLLIN) != 0) drain_outbox();
    if ((items[0].revents & ZMQ_POLLIN) != 0) {
      for (int i = 0; i < 1024 && common::recv_frames(*dealer, frames); ++i) {
        on_dealer_message(steady::now());
      }
    }
    if ((items[1].revents & ZMQ_POLLIN) != 0) {
      const std::size_t most = std::min<std::size_t>(1024, event_room);
      for (std::size_t i = 0; i < most && common::recv_frames(*sub, frames); ++i) {
        on_event(steady::now());
      }
      inbox.push(event_batch);
    }
    if ((items[3].revents & ZMQ_POLLIN) != 0) {
      while (common::recv_frames(*monitor, monitor_frames)) on_monitor_event();
    }
    on_timers(steady::now());
  }
  // Final flush: replies and events posted before stop(). The outbox closes first, so that a
  // publish racing with stop() is refused (its caller told) instead of left behind.
  {
    std::lock_guard lock(out_mutex);
    outbox_closed = true;
  }
  drain_outbox();
  flush_before(flush_deadline);
  fail_calls(std::string(errc::broker_lost), "the agent stopped", true);
  for (auto& p : probes) {
    p.synced->set_value(error{std::string(errc::shutting_down), "the agent stopped", false});
  }
  probes.clear();
  for (auto& [key, st] : io_consumers) {
    settle_join(*st, error{std::string(errc::shutting_down),
                           describe(key) + ": the agent stopped before joining it", false});
  }
}

// ---------------------------------------------------------------------------------------------

agent::agent(options opts) : impl_(std::make_unique<impl>(std::move(opts))) {}

agent::~agent() {
  stop();
}

const std::string& agent::name() const {
  return impl_->opts.name;
}
bool agent::registered() const {
  return impl_->is_registered.load();
}
std::uint64_t agent::registrations() const {
  return impl_->registration_count.load();
}
std::string agent::broker_id() const {
  std::lock_guard lock(impl_->state_mutex);
  return impl_->broker_id;
}
std::size_t agent::queued_events() const {
  return impl_->queued.load();
}
std::size_t agent::waiting_events() const {
  return impl_->inbox.size();
}

void agent::handle(const std::string& service, const std::string& action, request_handler h) {
  {
    std::lock_guard lock(impl_->config_mutex);
    impl_->services[service].actions[action] =
        std::make_shared<const request_handler>(std::move(h));
  }
  if (impl_->running) impl_->post_hello();
}

void agent::set_capacity(const std::string& service, std::uint32_t capacity) {
  {
    std::lock_guard lock(impl_->config_mutex);
    impl_->services[service].capacity = std::max<std::uint32_t>(1, capacity);
  }
  if (impl_->running) impl_->post_hello();
}

status agent::subscribe(const std::string& prefix, event_handler h,
                        std::chrono::milliseconds deadline) {
  {
    std::lock_guard lock(impl_->config_mutex);
    impl_->subscriptions.emplace_back(prefix, std::move(h));
    impl_->subscriptions_version.fetch_add(1, std::memory_order_release);
  }
  if (!impl_->running) return common::ok_status();
  if (impl_->on_io_thread()) {
    return error{"bad_request", "subscribe() cannot wait on the agent's I/O thread", false};
  }
  outbound s;
  s.what = outbound::kind::subscribe;
  s.prefix = prefix;
  impl_->post(std::move(s));
  auto synced = std::make_shared<std::promise<status>>();
  auto confirmed = synced->get_future();
  outbound p;
  p.what = outbound::kind::sync;
  p.deadline = steady::now() + deadline;
  p.synced = synced;
  impl_->post(std::move(p));
  return confirmed.get();  // the I/O thread always settles it by the deadline
}

status agent::start() {
  auto& d = *impl_;
  if (d.running) return common::ok_status();
  if (d.started_once) {
    return error{"bad_request", "an agent can be started once; make a new one", false};
  }
  d.started_once = true;
  for (const auto& [name, def] : d.services) {
    if (auto problem = common::check_name("service", name); !problem.empty()) {
      return error{"bad_request", problem, false};
    }
  }
  if (d.opts.key_file.empty() != d.opts.broker_key.empty()) {
    return error{"bad_request",
                 std::string(d.opts.key_file.empty() ? "options.broker_key is set but not "
                                                       "options.key_file"
                                                     : "options.key_file is set but not "
                                                       "options.broker_key") +
                     ": a secured broker needs both (this agent's secret key file and the "
                     "broker's public key), a plain broker neither",
                 false};
  }
  if (!d.opts.key_file.empty()) {
    try {
      d.keys = common::read_curve_key_file(d.opts.key_file, "options.key_file", true);
      d.broker_public_key = common::read_public_key(d.opts.broker_key, "options.broker_key");
    } catch (const common::config_error& e) {
      return error{"bad_request", e.what(), false};
    }
    d.secured = true;
    if (!d.name_given && !d.keys.name.empty()) d.opts.name = d.keys.name;
  }
  try {
    d.sub = std::make_unique<zmq::socket_t>(d.ctx, zmq::socket_type::sub);
    d.sub->set(zmq::sockopt::linger, 0);
    d.sub->set(zmq::sockopt::rcvhwm, 100'000);
    d.sub->set(zmq::sockopt::reconnect_ivl, 50);
    d.sub->set(zmq::sockopt::reconnect_ivl_max, 1000);
    d.secure(*d.sub);
    d.sub->connect(d.opts.events);
    d.heartbeat = d.opts.heartbeat;
    d.connect();
  } catch (const zmq::error_t& e) {
    return error{"bad_request",
                 "cannot connect to " + d.opts.broker + " / " + d.opts.events + ": " + e.what(),
                 false};
  }
  std::size_t threads = d.opts.handler_threads;
  if (threads == 0) {
    std::size_t total = 0;
    for (const auto& [name, def] : d.services) total += def.capacity;
    for (const auto& [key, st] : d.consumers) total += st->opts.capacity;
    threads = std::clamp<std::size_t>(total, 1, 64);
  }
  if (d.opts.inline_handlers) threads = 0;
  {
    std::lock_guard lock(d.out_mutex);
    d.outbox_closed = false;
  }
  d.running = true;
  d.stopping = false;
  auto welcome = d.first_welcome.get_future();
  // Subscriptions made before start() are applied first, then one probe confirms them all.
  std::vector<std::string> prefixes;
  {
    std::lock_guard lock(d.config_mutex);
    for (const auto& [prefix, h] : d.subscriptions) prefixes.push_back(prefix);
  }
  for (const auto& prefix : prefixes) d.sub->set(zmq::sockopt::subscribe, prefix);
  std::future<status> synced;
  if (!prefixes.empty()) {
    auto promise = std::make_shared<std::promise<status>>();
    synced = promise->get_future();
    outbound p;
    p.what = outbound::kind::sync;
    p.deadline = steady::now() + d.opts.start_timeout;
    p.synced = promise;
    d.post(std::move(p));
  }
  // Consumers given to consume() before: their CONSUMEs follow the HELLO on the connection.
  std::vector<std::pair<consumer_key, std::future<status>>> joins;
  {
    std::lock_guard lock(d.config_mutex);
    for (const auto& [key, st] : d.consumers) {
      st->first_join = std::make_shared<std::promise<status>>();
      st->join_deadline = steady::now() + d.opts.start_timeout;
      joins.emplace_back(key, st->first_join->get_future());
      outbound c;
      c.what = outbound::kind::consume;
      c.consumer = st;
      d.post(std::move(c));
    }
  }
  {
    std::lock_guard lock(d.pool_mutex);
    for (std::size_t i = 0; i < threads; ++i) d.spawn_handler_thread();
  }
  d.event_thread = spawn_quiet([&d] {
    std::vector<event_job> batch;
    while (d.inbox.take(batch, d.wake_fd)) {
      for (const auto& job : batch) d.handle_event(job);
    }
  });
  d.io = spawn_quiet([&d] { d.io_main(); });

  if (welcome.wait_until(steady::now() + d.opts.start_timeout) != std::future_status::ready) {
    stop(0ms);
    return error{std::string(errc::broker_lost),
                 "no WELCOME from the broker at " + d.opts.broker + " within " +
                     std::to_string(d.opts.start_timeout.count()) + " ms",
                 true};
  }
  if (auto w = welcome.get(); !w) {  // refused at the handshake, or its HELLO refused
    stop(0ms);
    return w.err();
  }
  if (synced.valid()) {
    auto s = synced.get();
    if (!s) {
      stop(0ms);
      return error{s.err().code, "subscriptions on " + d.opts.events + ": " + s.err().message,
                   s.err().retryable};
    }
  }
  for (auto& [key, joined] : joins) {
    auto s = joined.get();  // the I/O thread settles it by start_timeout
    if (!s) {
      stop(0ms);
      return s.err();  // its message names the consumer
    }
  }
  return common::ok_status();
}

void agent::stop(std::chrono::milliseconds grace) {
  auto& d = *impl_;
  if (!d.running) return;
  d.stopping = true;
  // Let running handlers finish and their replies go out, then say goodbye. Queued events and
  // replies may take what is left of the grace period to go out.
  const auto deadline = steady::now() + grace;
  d.flush_deadline = deadline;
  d.handler_jobs.wait_idle(deadline);
  d.running = false;
  {
    // Publishers waiting for room give up now.
    std::lock_guard lock(d.room_mutex);
    d.room_cv.notify_all();
  }
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(d.wake_fd, &one, sizeof one);
  if (d.io.joinable()) d.io.join();
  d.close_outbox();
  // The I/O thread has flushed the outbox; now the last word. ZeroMQ keeps sending what its
  // socket still queues for the rest of the grace period (at least 200 ms).
  if (d.dealer) {
    try {
      std::vector<zmq::message_t> bye;
      common::build_message(bye, command::bye, header{});
      d.try_send(bye);
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now());
      d.dealer->set(zmq::sockopt::linger,
                    static_cast<int>(std::max<std::int64_t>(200, left.count())));
    } catch (const zmq::error_t&) {
    }
  }
  d.handler_jobs.close();
  {
    std::lock_guard lock(d.pool_mutex);
    for (auto& t : d.handler_threads) t.join();
    d.handler_threads.clear();
  }
  d.inbox.close();
  if (d.event_thread.joinable()) d.event_thread.join();
  d.monitor.reset();
  d.dealer.reset();
  d.sub.reset();
  d.is_registered = false;
}

namespace {

// Stream and consumer names: [A-Za-z0-9_-]{1,64} (docs/protocol.md section 11).
std::string check_consumer_name(const char* what, const std::string& name) {
  if (name.empty() || name.size() > 64) {
    return std::string(what) + " must be 1..64 characters of [A-Za-z0-9_-], got " +
           std::to_string(name.size()) + " characters";
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (std::isalnum(c) == 0 && c != '_' && c != '-') {
      return std::string(what) + " '" + name + "' has '" + std::string(1, name[i]) + "' at byte " +
             std::to_string(i) + "; names are [A-Za-z0-9_-]{1,64}";
    }
  }
  return {};
}

// The CONSUME payload: the fields the caller set, under the keys of docs/protocol.md section 11.
// Empty when none is set (join the consumer as it is).
result<bytes> encode_consumer_config(const consumer_config& c) {
  nlohmann::json m = nlohmann::json::object();
  auto bad = [](const std::string& why) { return error{"bad_request", why, false}; };
  if (c.filter) m["filter"] = *c.filter;
  if (c.start) {
    static constexpr const char* k_names[] = {"all", "new", "seq", "time"};
    m["start"] = k_names[static_cast<int>(*c.start)];
  }
  if (c.start_seq) m["start_seq"] = *c.start_seq;
  if (c.start_time_ms) m["start_time_ms"] = *c.start_time_ms;
  if (c.ack_wait) {
    if (c.ack_wait->count() < 1) {
      return bad("consumer config ack_wait must be at least 1 ms, got " +
                 std::to_string(c.ack_wait->count()) + " ms");
    }
    m["ack_wait_ms"] = static_cast<std::uint64_t>(c.ack_wait->count());
  }
  if (c.max_deliver) m["max_deliver"] = *c.max_deliver;
  if (c.max_ack_pending) m["max_ack_pending"] = *c.max_ack_pending;
  if (c.ordered_by) m["ordered_by"] = *c.ordered_by;
  if (c.backoff) {
    auto delays = nlohmann::json::array();
    for (std::size_t i = 0; i < c.backoff->size(); ++i) {
      const auto ms = (*c.backoff)[i].count();
      if (ms < 0) {
        return bad("consumer config backoff[" + std::to_string(i) + "] must not be negative, got " +
                   std::to_string(ms) + " ms");
      }
      delays.push_back(static_cast<std::uint64_t>(ms));
    }
    m["backoff_ms"] = std::move(delays);
  }
  if (m.empty()) return bytes();
  const auto packed = nlohmann::json::to_msgpack(m);
  return bytes(packed.begin(), packed.end());
}

}  // namespace

status agent::consume(const consume_options& o, consume_handler h,
                      std::chrono::milliseconds deadline) {
  auto& d = *impl_;
  auto bad = [&](const std::string& why) {
    return error{"bad_request", "consume " + o.stream + "/" + o.consumer + ": " + why, false};
  };
  for (const auto& [what, value] :
       {std::pair{"stream", &o.stream}, std::pair{"consumer", &o.consumer}}) {
    if (auto problem = check_consumer_name(what, *value); !problem.empty()) return bad(problem);
  }
  if (o.capacity < 1 || o.capacity > 100'000) {
    return bad("capacity must be 1..100000, got " + std::to_string(o.capacity));
  }
  if (!h) return bad("the handler is empty");
  if (deadline.count() <= 0) {
    return bad("deadline must be positive, got " + std::to_string(deadline.count()) + " ms");
  }
  auto payload = encode_consumer_config(o.config);
  if (!payload) return bad(payload.err().message);
  if (d.on_io_thread()) return bad("consume() cannot wait on the agent's I/O thread");

  auto st = std::make_shared<consumer_state>();
  st->opts = o;
  st->handler = std::move(h);
  st->config_payload = std::move(payload).value();
  const consumer_key key = st->key();
  {
    std::lock_guard lock(d.config_mutex);
    if (d.consumers.count(key) != 0) {
      return bad("this agent already consumes it (stop_consuming() first to change it)");
    }
    d.consumers[key] = st;
  }
  if (!d.running) return common::ok_status();  // start() joins it
  auto joined = std::make_shared<std::promise<status>>();
  auto answer = joined->get_future();
  st->first_join = joined;
  st->join_deadline = steady::now() + deadline;
  d.grow_pool();
  outbound c;
  c.what = outbound::kind::consume;
  c.consumer = st;
  c.synced = joined;  // settled by post() if the agent stopped meanwhile
  d.post(std::move(c));
  auto s = answer.get();  // the I/O thread settles it by the deadline
  if (!s) {
    std::lock_guard lock(d.config_mutex);
    if (auto it = d.consumers.find(key); it != d.consumers.end() && it->second == st) {
      d.consumers.erase(it);
    }
  }
  return s;
}

status agent::stop_consuming(const std::string& stream, const std::string& consumer,
                             std::chrono::milliseconds deadline) {
  auto& d = *impl_;
  const consumer_key key{stream, consumer};
  {
    std::lock_guard lock(d.config_mutex);
    if (d.consumers.erase(key) == 0) {
      return error{"not_found", "this agent does not consume " + describe(key), false};
    }
  }
  if (!d.running) return common::ok_status();
  if (d.on_io_thread()) {
    return error{"bad_request", "stop_consuming() cannot wait on the agent's I/O thread", false};
  }
  auto stopped = std::make_shared<std::promise<status>>();
  auto answer = stopped->get_future();
  outbound c;
  c.what = outbound::kind::consume_stop;
  c.hdr.stream = stream;
  c.hdr.consumer = consumer;
  c.deadline = steady::now() + deadline;
  c.synced = stopped;
  d.post(std::move(c));
  return answer.get();  // settled by the REPLY, the call's deadline, or the agent stopping
}

status agent::progress(const message& delivery) {
  if (delivery.what() != message::kind::delivery) {
    return error{"bad_request",
                 "progress() is for deliveries of a durable consumer; message '" + delivery.id() +
                     "' is not one",
                 false};
  }
  outbound o;
  o.what = outbound::kind::progress;
  o.hdr.stream = delivery.stream();
  o.hdr.consumer = delivery.consumer();
  o.hdr.stream_seq = delivery.stream_seq();
  if (!impl_->submit(std::move(o))) {
    return error{std::string(errc::broker_lost), "the agent stopped", false};
  }
  return common::ok_status();
}

std::optional<consume_stats> agent::consumer_stats(const std::string& stream,
                                                   const std::string& consumer) const {
  std::shared_ptr<consumer_state> st;
  {
    std::lock_guard lock(impl_->config_mutex);
    auto it = impl_->consumers.find({stream, consumer});
    if (it == impl_->consumers.end()) return std::nullopt;
    st = it->second;
  }
  const auto& c = st->count;
  consume_stats out;
  out.delivered = c.delivered;
  out.acked = c.acked;
  out.nacked = c.nacked;
  out.termed = c.termed;
  out.threw = c.threw;
  out.refused = c.refused;
  out.joins = c.joins;
  out.dropped = c.dropped;
  out.redelivered = c.redelivered;
  out.in_flight = c.in_flight;
  return out;
}

call_result agent::call(const std::string& service, const std::string& action, bytes payload,
                        std::chrono::milliseconds deadline, const send_options& opts) {
  if (impl_->on_io_thread()) {
    return error{"bad_request", "call() would block the agent's I/O thread; use call_async", false};
  }
  // Waits on the caller's stack rather than through a promise: nothing to allocate, and the
  // callback (a reference) fits std::function's local buffer. It runs exactly once, notifying
  // under the lock, so `w` outlives its last use.
  struct waiter {
    std::mutex mutex;
    std::condition_variable cv;
    std::optional<call_result> result;
  } w;
  call_async(
      service, action, std::move(payload), deadline,
      [&w](call_result r) {
        std::lock_guard lock(w.mutex);
        w.result.emplace(std::move(r));
        w.cv.notify_one();
      },
      opts);
  std::unique_lock lock(w.mutex);
  w.cv.wait(lock, [&w] { return w.result.has_value(); });
  return std::move(*w.result);
}

std::future<call_result> agent::call_future(const std::string& service, const std::string& action,
                                            bytes payload, std::chrono::milliseconds deadline,
                                            const send_options& opts) {
  auto promise = std::make_shared<std::promise<call_result>>();
  auto future = promise->get_future();
  call_async(
      service, action, std::move(payload), deadline,
      [promise](call_result r) { promise->set_value(std::move(r)); }, opts);
  return future;
}

void agent::call_async(const std::string& service, const std::string& action, bytes payload,
                       std::chrono::milliseconds deadline, call_callback done,
                       const send_options& opts) {
  auto& d = *impl_;
  auto refuse = [&done](std::string code, std::string why, bool retryable) {
    done(error{std::move(code), std::move(why), retryable});
  };
  if (!d.running) return refuse(std::string(errc::broker_lost), "agent is not started", false);
  if (deadline.count() <= 0) {
    return refuse("bad_request",
                  "deadline must be positive, got " + std::to_string(deadline.count()) + " ms",
                  false);
  }
  for (const auto& [what, value] : {std::pair{"service", &service}, std::pair{"action", &action}}) {
    if (auto problem = common::check_name(what, *value); !problem.empty()) {
      return refuse("bad_request", problem, false);
    }
  }
  outbound o;
  o.what = outbound::kind::request;
  o.hdr.service = service;
  o.hdr.action = action;
  o.number = d.fill_context(o.hdr, opts);
  o.hdr.deadline_ms = static_cast<std::uint64_t>(deadline.count());
  if (auto too_big = d.check_size(o.hdr, payload)) {
    return refuse(too_big->code, service + "." + action + ": " + too_big->message, false);
  }
  o.payload = std::move(payload);
  o.deadline = steady::now() + deadline;
  o.done = std::move(done);
  d.submit(std::move(o));
}

result<published> agent::publish(const std::string& topic, bytes payload,
                                 const send_options& opts) {
  auto& d = *impl_;
  if (!d.running) return error{std::string(errc::broker_lost), "agent is not started", false};
  if (auto problem = common::check_topic(topic); !problem.empty()) {
    return error{"bad_request", problem, false};
  }
  outbound o;
  o.what = outbound::kind::publish;
  o.hdr.topic = topic;
  d.fill_context(o.hdr, opts);
  if (auto too_big = d.check_size(o.hdr, payload)) return *too_big;
  if (auto full = d.reserve_room(topic, steady::now() + d.opts.publish_timeout, true)) {
    return *full;
  }
  o.counted = true;
  o.payload = std::move(payload);
  published p;
  p.id = o.hdr.id;
  if (!d.submit(std::move(o))) {
    return error{std::string(errc::broker_lost), "publish to '" + topic + "': the agent stopped",
                 false};
  }
  return p;
}

// publish_async and publish_acked: the same, except whether the caller may wait for room.
void agent::impl::publish_with_ack(const std::string& topic, bytes payload,
                                   std::chrono::milliseconds deadline, call_callback done,
                                   const send_options& so, bool wait_for_room) {
  auto& d = *this;
  if (!d.running) {
    return done(error{std::string(errc::broker_lost), "agent is not started", false});
  }
  if (auto problem = common::check_topic(topic); !problem.empty()) {
    return done(error{"bad_request", problem, false});
  }
  outbound o;
  o.what = outbound::kind::publish;
  o.hdr.topic = topic;
  o.number = d.fill_context(o.hdr, so);
  o.hdr.ack = true;
  if (auto too_big = d.check_size(o.hdr, payload)) return done(*too_big);
  o.deadline = steady::now() + deadline;
  if (auto full = d.reserve_room(topic, o.deadline, wait_for_room)) return done(*full);
  o.counted = true;
  o.payload = std::move(payload);
  o.done = std::move(done);
  d.submit(std::move(o));  // refused: `done` is told
}

void agent::publish_async(const std::string& topic, bytes payload,
                          std::chrono::milliseconds deadline, call_callback done,
                          const send_options& opts) {
  impl_->publish_with_ack(topic, std::move(payload), deadline, std::move(done), opts, false);
}

result<published> agent::publish_acked(const std::string& topic, bytes payload,
                                       std::chrono::milliseconds deadline,
                                       const send_options& opts) {
  if (impl_->on_io_thread()) {
    return error{"bad_request", "publish_acked() would block the agent's I/O thread", false};
  }
  auto promise = std::make_shared<std::promise<call_result>>();
  auto future = promise->get_future();
  impl_->publish_with_ack(
      topic, std::move(payload), deadline,
      [promise](call_result r) { promise->set_value(std::move(r)); }, opts, true);
  auto r = future.get();
  if (!r) return r.err();
  return published{r->id(), r->seq(), r->stream(), r->stream_seq(), r->duplicate()};
}

const message* current_message() {
  return t_current;
}

int wait_for_shutdown_signal() {
  common::block_stop_signals();
  const sigset_t set = common::stop_signals();
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

}  // namespace ensemble::agent
