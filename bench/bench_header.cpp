// The header codec on its own: encode and decode of a typical REQUEST header and a typical
// event header, in nanoseconds per operation. The broker decodes and encodes one header per
// message it routes, and the SDK one per message it sends or receives, so this is on the hot
// path of every message.
//
// The encoder is driven by k_header_fields (common/include/ensemble/common/protocol.hpp). The
// baseline, measured in the same run, is the encoder it replaced: every field written by hand,
// frozen below. Both must produce the same bytes (checked before measuring). Rounds of the two
// alternate, and the fastest round of each is reported (a noisy neighbour on a shared machine
// only ever adds time), with the median beside it.
//
// The decoder reads msgpack in place; its baseline is the decoder it replaced, which unpacked
// the frame into a msgpack-c object tree (tests/support/reference_header_decoder.hpp, which
// tests/protocol_differential_test.cpp holds the two to agree with).
//
//   build/bin/bench_header [iterations per round, default 200000] [rounds, default 15]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <msgpack.hpp>
#include <string>
#include <vector>

#include "ensemble/common/protocol.hpp"
#include "reference_header_decoder.hpp"

namespace {

using ensemble::common::header;

// ---- baseline: the hand-written encoder that k_header_fields replaced ----------------------

struct string_sink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};
using packer = msgpack::packer<string_sink>;

void pack_str(packer& p, std::string_view s) {
  p.pack_str(static_cast<std::uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

void hand_written_encode(const header& h, std::string& out) {
  string_sink sink{out};
  packer p(sink);
  std::uint32_t n = h.extra_count;
  auto count_str = [&n](const std::string& s) { n += s.empty() ? 0 : 1; };
  auto count_num = [&n](std::uint64_t v) { n += v == 0 ? 0 : 1; };
  count_str(h.id), count_str(h.service), count_str(h.action), count_str(h.topic);
  count_num(h.deadline_ms);
  count_str(h.correlation_id), count_str(h.causation_id), count_str(h.trace_id);
  count_num(h.attempt), count_str(h.idempotency_key);
  n += h.retryable ? 1 : 0;
  n += h.ack ? 1 : 0;
  count_num(h.token), count_str(h.worker), count_num(h.seq), count_num(h.ts);
  count_str(h.publisher), count_str(h.error_code), count_str(h.error_message);
  count_str(h.caller), count_str(h.caller_scope);
  count_str(h.agent);
  n += h.services.empty() ? 0 : 1;
  count_num(h.heartbeat_ms), count_num(h.max_message_size), count_str(h.broker);
  count_str(h.stream), count_num(h.stream_seq);
  n += h.duplicate ? 1 : 0;
  count_str(h.consumer), count_num(h.deliveries), count_num(h.capacity), count_num(h.delay_ms);

  p.pack_map(n);
  auto put_str = [&p](std::string_view key, const std::string& v) {
    if (v.empty()) return;
    pack_str(p, key);
    pack_str(p, v);
  };
  auto put_num = [&p](std::string_view key, std::uint64_t v) {
    if (v == 0) return;
    pack_str(p, key);
    p.pack_uint64(v);
  };
  auto put_true = [&p](std::string_view key, bool v) {
    if (!v) return;
    pack_str(p, key);
    p.pack_true();
  };
  put_str("id", h.id);
  put_str("service", h.service);
  put_str("action", h.action);
  put_str("topic", h.topic);
  put_num("deadline_ms", h.deadline_ms);
  put_str("correlation_id", h.correlation_id);
  put_str("causation_id", h.causation_id);
  put_str("trace_id", h.trace_id);
  put_num("attempt", h.attempt);
  put_str("idempotency_key", h.idempotency_key);
  put_true("retryable", h.retryable);
  put_true("ack", h.ack);
  put_num("token", h.token);
  put_str("worker", h.worker);
  put_num("seq", h.seq);
  put_num("ts", h.ts);
  put_str("publisher", h.publisher);
  put_str("caller", h.caller);
  put_str("caller_scope", h.caller_scope);
  put_str("error_code", h.error_code);
  put_str("error_message", h.error_message);
  put_str("agent", h.agent);
  if (!h.services.empty()) {
    pack_str(p, "services");
    p.pack_array(static_cast<std::uint32_t>(h.services.size()));
    for (const auto& s : h.services) {
      p.pack_map(2);
      pack_str(p, "name");
      pack_str(p, s.name);
      pack_str(p, "capacity");
      p.pack_uint32(s.capacity);
    }
  }
  put_num("heartbeat_ms", h.heartbeat_ms);
  put_num("max_message_size", h.max_message_size);
  put_str("broker", h.broker);
  put_str("stream", h.stream);
  put_num("stream_seq", h.stream_seq);
  put_true("duplicate", h.duplicate);
  put_str("consumer", h.consumer);
  put_num("deliveries", h.deliveries);
  put_num("capacity", h.capacity);
  put_num("delay_ms", h.delay_ms);
  out.append(h.extra);
}

// ---- the headers measured --------------------------------------------------------------------

// What the SDK sends for a call made while handling a workflow step.
header request_header() {
  header h;
  h.id = "9f86d081884c7d65-1a2b";
  h.service = "PaymentService";
  h.action = "charge";
  h.deadline_ms = 5000;
  h.correlation_id = "wf-0b6f2e4c-42";
  h.causation_id = "9f86d081884c7d65-1a2a";
  h.trace_id = "t-5e884898da280471";
  h.attempt = 1;
  h.idempotency_key = "wf-0b6f2e4c-42/charge/1";
  h.retryable = true;
  return h;
}

// What the broker fans out for a PUBLISH to a topic a durable stream stores.
header event_header() {
  header h;
  h.id = "3c59dc048e885024-00ff";
  h.topic = "order.created";
  h.correlation_id = "o-1764050000";
  h.causation_id = "3c59dc048e885024-00fe";
  h.trace_id = "t-a87ff679a2f3e71d";
  h.seq = 123456;
  h.ts = 1764050000123456ULL;
  h.publisher = "orders";
  h.stream = "orders";
  h.stream_seq = 4711;
  return h;
}

using clock_type = std::chrono::steady_clock;

// Nanoseconds per call of `op` over `iterations` calls.
template <class Op>
double ns_per_op(std::size_t iterations, Op&& op) {
  const auto start = clock_type::now();
  for (std::size_t i = 0; i < iterations; ++i) op();
  const auto elapsed = std::chrono::duration<double, std::nano>(clock_type::now() - start);
  return elapsed.count() / static_cast<double>(iterations);
}

struct summary {
  double best, median;
};

summary summarise(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v.front(), v[v.size() / 2]};
}

std::size_t g_sink = 0;  // keeps the compiler from dropping the work

}  // namespace

int main(int argc, char** argv) {
  const std::size_t iterations = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 200000;
  const std::size_t rounds = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 15;
  if (iterations == 0 || rounds == 0) {
    std::fprintf(stderr, "usage: bench_header [iterations per round > 0] [rounds > 0]\n");
    return 2;
  }
  struct subject {
    const char* name;
    header h;
  };
  const subject subjects[] = {{"request", request_header()}, {"event", event_header()}};

  std::printf("header codec, ns per operation: fastest (median) of %zu rounds of %zu\n", rounds,
              iterations);
  std::printf("%-8s %6s %18s %18s %6s %18s %18s %6s\n", "header", "bytes", "encode: by hand",
              "by the table", "ratio", "decode: msgpack-c", "in place", "ratio");
  for (const auto& s : subjects) {
    std::string a, b;
    hand_written_encode(s.h, a);
    ensemble::common::encode_header(s.h, b);
    if (a != b) {
      std::fprintf(stderr, "%s: the table-driven encoder wrote other bytes than the baseline\n",
                   s.name);
      return 1;
    }
    std::vector<double> hand, table, tree, decode;
    std::string out;
    out.reserve(512);
    for (std::size_t r = 0; r < rounds; ++r) {
      hand.push_back(ns_per_op(iterations, [&] {
        out.clear();
        hand_written_encode(s.h, out);
        g_sink += out.size();
      }));
      table.push_back(ns_per_op(iterations, [&] {
        out.clear();
        ensemble::common::encode_header(s.h, out);
        g_sink += out.size();
      }));
      tree.push_back(ns_per_op(iterations, [&] {
        auto decoded = ensemble::test_support::reference::decode_header(b);
        g_sink += decoded.ok() ? decoded->id.size() : 0;
      }));
      decode.push_back(ns_per_op(iterations, [&] {
        auto decoded = ensemble::common::decode_header(b);
        g_sink += decoded.ok() ? decoded->id.size() : 0;
      }));
    }
    const summary h = summarise(hand), t = summarise(table), o = summarise(tree),
                  d = summarise(decode);
    std::printf("%-8s %6zu %8.1f (%7.1f) %8.1f (%7.1f) %6.2f %8.1f (%7.1f) %8.1f (%7.1f) %6.2f\n",
                s.name, b.size(), h.best, h.median, t.best, t.median, t.best / h.best, o.best,
                o.median, d.best, d.median, d.best / o.best);
  }
  return g_sink == 0 ? 1 : 0;
}
