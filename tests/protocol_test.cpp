// The wire codec on its own: header encode/decode round-trips, the errors decode_header and
// parse_message give for every kind of bad input (each must name the field or frame), and the
// topic and name rules. No sockets are connected; zmq::message_t is only used as a frame.
#include "ensemble/common/protocol.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <msgpack.hpp>
#include <string>
#include <vector>

#include "ensemble/common/frames.hpp"
#include "support/required_fields.hpp"

namespace ec = ensemble::common;
using ec::command;
using ec::header;

namespace {

// gtest without gmock: a substring check whose failure shows both strings.
::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

// Raw msgpack, for inputs encode_header would never produce.
std::string pack(const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& fill) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> p(buffer);
  fill(p);
  return {buffer.data(), buffer.size()};
}

void pack_str(msgpack::packer<msgpack::sbuffer>& p, std::string_view s) {
  p.pack_str(static_cast<std::uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

// A one-entry map {key: <value written by fill>}.
std::string one_field(std::string_view key,
                      const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& value) {
  return pack([&](auto& p) {
    p.pack_map(1);
    pack_str(p, key);
    value(p);
  });
}

header full_header() {
  header h;
  h.id = "c1-1";
  h.service = "PaymentService";
  h.action = "charge";
  h.topic = "order.created";
  h.deadline_ms = 5000;
  h.correlation_id = "wf-42";
  h.causation_id = "c1-0";
  h.trace_id = "t-9";
  h.attempt = 3;
  h.idempotency_key = "wf-42/charge/3";
  h.retryable = true;
  h.ack = true;
  h.token = 0x1'0000'0001ULL;  // wider than 32 bits
  h.worker = "payments";
  h.seq = 12;
  h.ts = 1764050000123456ULL;
  h.publisher = "orders";
  h.caller = "shop";
  h.caller_scope = "own";
  h.error_code = "card_declined";
  h.error_message = "the card was declined";
  h.agent = "payments";
  h.services = {{"PaymentService", 4}, {"RefundService", 1}};
  h.heartbeat_ms = 1000;
  h.max_message_size = 1048576;
  h.broker = "3f2a";
  return h;
}

void expect_same(const header& a, const header& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.service, b.service);
  EXPECT_EQ(a.action, b.action);
  EXPECT_EQ(a.topic, b.topic);
  EXPECT_EQ(a.deadline_ms, b.deadline_ms);
  EXPECT_EQ(a.correlation_id, b.correlation_id);
  EXPECT_EQ(a.causation_id, b.causation_id);
  EXPECT_EQ(a.trace_id, b.trace_id);
  EXPECT_EQ(a.attempt, b.attempt);
  EXPECT_EQ(a.idempotency_key, b.idempotency_key);
  EXPECT_EQ(a.retryable, b.retryable);
  EXPECT_EQ(a.ack, b.ack);
  EXPECT_EQ(a.token, b.token);
  EXPECT_EQ(a.worker, b.worker);
  EXPECT_EQ(a.seq, b.seq);
  EXPECT_EQ(a.ts, b.ts);
  EXPECT_EQ(a.publisher, b.publisher);
  EXPECT_EQ(a.caller, b.caller);
  EXPECT_EQ(a.caller_scope, b.caller_scope);
  EXPECT_EQ(a.stream, b.stream);
  EXPECT_EQ(a.stream_seq, b.stream_seq);
  EXPECT_EQ(a.duplicate, b.duplicate);
  EXPECT_EQ(a.consumer, b.consumer);
  EXPECT_EQ(a.deliveries, b.deliveries);
  EXPECT_EQ(a.capacity, b.capacity);
  EXPECT_EQ(a.delay_ms, b.delay_ms);
  EXPECT_EQ(a.error_code, b.error_code);
  EXPECT_EQ(a.error_message, b.error_message);
  EXPECT_EQ(a.agent, b.agent);
  ASSERT_EQ(a.services.size(), b.services.size());
  for (std::size_t i = 0; i < a.services.size(); ++i) {
    EXPECT_EQ(a.services[i].name, b.services[i].name);
    EXPECT_EQ(a.services[i].capacity, b.services[i].capacity);
  }
  EXPECT_EQ(a.heartbeat_ms, b.heartbeat_ms);
  EXPECT_EQ(a.max_message_size, b.max_message_size);
  EXPECT_EQ(a.broker, b.broker);
  EXPECT_EQ(a.extra, b.extra);
  EXPECT_EQ(a.extra_count, b.extra_count);
}

// Decodes `bytes`, expecting failure; returns the error message.
std::string decode_error(std::string_view bytes) {
  auto r = ec::decode_header(bytes);
  EXPECT_FALSE(r.ok()) << "decoded what should have been refused";
  if (r.ok()) return {};
  EXPECT_EQ(r.err().code, ec::errc::bad_request);
  EXPECT_FALSE(r.err().retryable);
  return r.err().message;
}

// Keys of a msgpack map, in order.
std::vector<std::string> keys_of(std::string_view bytes) {
  auto handle = msgpack::unpack(bytes.data(), bytes.size());
  const msgpack::object& o = handle.get();
  EXPECT_EQ(o.type, msgpack::type::MAP);
  std::vector<std::string> keys;
  for (std::uint32_t i = 0; o.type == msgpack::type::MAP && i < o.via.map.size; ++i) {
    keys.push_back(o.via.map.ptr[i].key.as<std::string>());
  }
  return keys;
}

std::vector<zmq::message_t> frames_of(const std::vector<std::string>& parts) {
  std::vector<zmq::message_t> frames;
  for (const auto& p : parts) frames.emplace_back(p.data(), p.size());
  return frames;
}

const std::string k_tag(ec::k_protocol_tag);
std::string cmd(std::uint8_t byte) {
  return std::string(1, static_cast<char>(byte));
}

// Parses frames[first...], expecting failure; returns the failure.
ec::parse_failure parse_error(std::vector<zmq::message_t> frames, std::size_t first = 0) {
  ec::parse_failure failure;
  auto r = ec::parse_message(frames, first, &failure);
  EXPECT_FALSE(r.ok()) << "parsed what should have been refused";
  if (!r.ok()) {
    EXPECT_EQ(r.err().code, ec::errc::bad_request);
    EXPECT_EQ(r.err().message, failure.err.message);
  }
  return failure;
}

// ---- header codec ---------------------------------------------------------------------------

TEST(protocol_test, header_every_field_round_trips) {
  const header h = full_header();
  auto decoded = ec::decode_header(ec::encode_header(h));
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  expect_same(*decoded, h);
}

TEST(protocol_test, header_encoding_is_stable_across_round_trips) {
  const std::string once = ec::encode_header(full_header());
  auto decoded = ec::decode_header(once);
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  EXPECT_EQ(ec::encode_header(*decoded), once);
}

TEST(protocol_test, header_encode_appends_to_existing_bytes) {
  std::string out = "prefix";
  ec::encode_header(full_header(), out);
  EXPECT_EQ(out.substr(0, 6), "prefix");
  EXPECT_EQ(out.substr(6), ec::encode_header(full_header()));
}

// ---- the field table (k_header_fields) -------------------------------------------------------

// A value of row `f` as a peer would write it, by hand: the largest the field accepts (so that a
// 32-bit field read into a wider member, or the reverse, shows), "v" for a str.
void pack_sample(msgpack::packer<msgpack::sbuffer>& p, const ec::header_field_info& f) {
  switch (f.type) {
    case ec::field_type::str:
      pack_str(p, "v");
      break;
    case ec::field_type::uint:
      p.pack_uint64(f.max);
      break;
    case ec::field_type::boolean:
      p.pack_true();
      break;
    case ec::field_type::services:
      p.pack_array(1);
      p.pack_map(2);
      pack_str(p, "name");
      pack_str(p, "S");
      pack_str(p, "capacity");
      p.pack_uint32(7);
      break;
  }
}

TEST(protocol_test, table_each_field_alone_round_trips_and_is_the_only_key) {
  // One header per row of the table, so that a field written under the wrong key or read into
  // the wrong member (or into the member of another row) cannot hide behind another one.
  for (const auto& f : ec::k_header_field_infos) {
    SCOPED_TRACE(std::string(f.key));
    const std::string bytes = one_field(f.key, [&](auto& p) { pack_sample(p, f); });
    auto decoded = ec::decode_header(bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.err().message;
    EXPECT_EQ(decoded->extra_count, 0u) << "read as an unknown key";
    EXPECT_EQ(ec::encode_header(*decoded), bytes);
    EXPECT_EQ(keys_of(ec::encode_header(*decoded)), std::vector<std::string>{std::string(f.key)});
  }
}

TEST(protocol_test, table_uint_fields_refuse_values_out_of_their_range) {
  int checked = 0;
  for (const auto& f : ec::k_header_field_infos) {
    if (f.type != ec::field_type::uint) continue;
    SCOPED_TRACE(std::string(f.key));
    if (f.max != ~std::uint64_t{0}) {
      auto msg = decode_error(one_field(f.key, [&](auto& p) { p.pack_uint64(f.max + 1); }));
      EXPECT_TRUE(contains(msg, "'" + std::string(f.key) + "' is " + std::to_string(f.max + 1)));
      EXPECT_TRUE(contains(msg, std::string(f.rule)));
      ++checked;
    }
    if (f.min > 0) {
      auto msg = decode_error(one_field(f.key, [&](auto& p) { p.pack_uint64(f.min - 1); }));
      EXPECT_TRUE(contains(msg, std::string(f.rule)));
      ++checked;
    }
    auto msg = decode_error(one_field(f.key, [](auto& p) { p.pack_int64(-1); }));
    EXPECT_TRUE(contains(msg, "negative int -1"));
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(protocol_test, table_header_with_every_field_round_trips_in_table_order) {
  header h = ensemble::test::with_every_field();
  auto unknown = ec::decode_header(std::string("\x81\xa1z\x01", 4));
  ASSERT_TRUE(unknown.ok()) << unknown.err().message;
  h.extra = unknown->extra;
  h.extra_count = unknown->extra_count;
  const std::string bytes = ec::encode_header(h);
  std::vector<std::string> expected;
  for (const auto& f : ec::k_header_field_infos) expected.emplace_back(f.key);
  expected.emplace_back("z");
  EXPECT_EQ(keys_of(bytes), expected);
  auto decoded = ec::decode_header(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  expect_same(*decoded, h);
  EXPECT_EQ(ec::encode_header(*decoded), bytes);
}

// The bytes the hand-written encoder of protocol version 1 produced for this header (every
// field set, and an unknown key): the table-driven encoder must write them byte for byte, since
// peers in other languages and recorded streams hold headers in this form.
TEST(protocol_test, header_with_every_field_is_encoded_as_version_1_encoded_it) {
  header h = full_header();
  h.stream = "orders";
  h.stream_seq = 4711;
  h.duplicate = true;
  h.consumer = "billing";
  h.deliveries = 2;
  h.capacity = 8;
  h.delay_ms = 250;
  auto unknown = ec::decode_header(std::string("\x81\xa1z\x01", 4));
  ASSERT_TRUE(unknown.ok()) << unknown.err().message;
  h.extra = unknown->extra;
  h.extra_count = unknown->extra_count;
  const std::string expected_hex =
      "de0022a26964a463312d31a773657276696365ae5061796d656e7453657276696365a6616374696f6ea663"
      "6861726765a5746f706963ad6f726465722e63726561746564ab646561646c696e655f6d73cd1388ae636f"
      "7272656c6174696f6e5f6964a577662d3432ac636175736174696f6e5f6964a463312d30a874726163655f"
      "6964a3742d39a7617474656d707403af6964656d706f74656e63795f6b6579ae77662d34322f6368617267"
      "652f33a9726574727961626c65c3a361636bc3a5746f6b656ecf0000000100000001a6776f726b6572a870"
      "61796d656e7473a37365710ca27473cf00064464e59f9640a97075626c6973686572a66f7264657273a663"
      "616c6c6572a473686f70ac63616c6c65725f73636f7065a36f776eaa6572726f725f636f6465ad63617264"
      "5f6465636c696e6564ad6572726f725f6d657373616765b5746865206361726420776173206465636c696e"
      "6564a56167656e74a87061796d656e7473a873657276696365739282a46e616d65ae5061796d656e745365"
      "7276696365a863617061636974790482a46e616d65ad526566756e6453657276696365a863617061636974"
      "7901ac6865617274626561745f6d73cd03e8b06d61785f6d6573736167655f73697a65ce00100000a66272"
      "6f6b6572a433663261a673747265616da66f7264657273aa73747265616d5f736571cd1267a96475706c69"
      "63617465c3a8636f6e73756d6572a762696c6c696e67aa64656c6976657269657302a86361706163697479"
      "08a864656c61795f6d73ccfaa17a01";
  std::string hex;
  for (unsigned char c : ec::encode_header(h)) {
    char buf[3];
    std::snprintf(buf, sizeof buf, "%02x", c);
    hex += buf;
  }
  EXPECT_EQ(hex, expected_hex);
}

// encode_header writes msgpack itself; each length and value class must come out as msgpack-c's
// packer writes it (the smallest encoding): fixstr/str8/str16/str32, fixint/uint8..uint64,
// fixarray/array16, fixmap/map16.
TEST(protocol_test, header_encoding_matches_msgpack_at_every_size_boundary) {
  for (std::size_t length : {0u, 1u, 31u, 32u, 255u, 256u, 65535u, 65536u}) {
    for (std::uint64_t value : {0ULL, 1ULL, 127ULL, 128ULL, 255ULL, 256ULL, 65535ULL, 65536ULL,
                                0xFFFF'FFFFULL, 0x1'0000'0000ULL, ~0ULL}) {
      SCOPED_TRACE("length " + std::to_string(length) + ", value " + std::to_string(value));
      header h;
      h.trace_id = std::string(length, 't');
      h.token = value;
      h.capacity = static_cast<std::uint32_t>(value);
      const std::size_t offers = length % 20;  // 16 and more: array16
      for (std::size_t i = 0; i < offers; ++i) {
        h.services.push_back(
            {std::string(length % 40 + 1, 's'), static_cast<std::uint32_t>(i + 1)});
      }
      const std::string expected = pack([&](auto& p) {
        std::uint32_t n = (length > 0) + (value > 0) * 2 + (offers > 0);
        std::uint32_t capacity = static_cast<std::uint32_t>(value);
        n -= value > 0 && capacity == 0 ? 1 : 0;
        p.pack_map(n);
        if (length > 0) {
          pack_str(p, "trace_id");
          pack_str(p, h.trace_id);
        }
        if (value > 0) {
          pack_str(p, "token");
          p.pack_uint64(value);
        }
        if (offers > 0) {
          pack_str(p, "services");
          p.pack_array(static_cast<std::uint32_t>(offers));
          for (const auto& s : h.services) {
            p.pack_map(2);
            pack_str(p, "name");
            pack_str(p, s.name);
            pack_str(p, "capacity");
            p.pack_uint32(s.capacity);
          }
        }
        if (capacity > 0) {
          pack_str(p, "capacity");
          p.pack_uint64(capacity);
        }
      });
      EXPECT_EQ(ec::encode_header(h), expected);
    }
  }
}

TEST(protocol_test, table_each_required_field_is_checked_for_each_command_that_requires_it) {
  int checked = 0;
  for (command c : ec::k_commands) {
    const std::string name = ec::command_name(static_cast<std::uint8_t>(c));
    SCOPED_TRACE(name);
    EXPECT_EQ(ec::check_required(c, ensemble::test::with_required_fields(c)), "");
    for (const auto& f : ec::k_header_field_infos) {
      if (!f.required.contains(c)) continue;
      const std::string problem =
          ec::check_required(c, ensemble::test::with_required_fields(c, f.key));
      EXPECT_EQ(problem, name + " without '" + std::string(f.key) + "': every " + name + " needs " +
                             std::string(f.needs));
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
  // The wording docs/protocol.md section 4 quotes.
  EXPECT_EQ(ec::check_required(command::request, ensemble::test::with_required_fields(
                                                     command::request, "deadline_ms")),
            "REQUEST without 'deadline_ms': every REQUEST needs a time budget, a whole number of "
            "milliseconds of at least 1");
}

TEST(protocol_test, table_required_fields_are_named_in_table_order) {
  // Nothing at all: the first required row is the one named.
  EXPECT_TRUE(contains(ec::check_required(command::request, header{}), "without 'id'"));
  header h;
  h.id = "r-1";
  EXPECT_TRUE(contains(ec::check_required(command::request, h), "without 'service'"));
  EXPECT_EQ(ec::check_required(command::heartbeat, header{}), "");
  EXPECT_EQ(ec::check_required(command::hello, header{}), "");
}

// docs/protocol.md section 3 is the field list a person in another language implements from:
// it must list every row of the table, with the same key and type, say which commands require
// it, and list nothing the table does not have.
TEST(protocol_test, docs_section_3_lists_the_fields_of_the_table) {
  const std::string path = std::string(ENSEMBLE_SOURCE_DIR) + "/docs/protocol.md";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "cannot read " << path;
  struct doc_row {
    std::string type, default_value, used_in;
  };
  std::multimap<std::string, doc_row> rows;
  bool in_section = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("## ", 0) == 0) in_section = line.rfind("## 3. Header fields", 0) == 0;
    if (!in_section || line.rfind("| `", 0) != 0) continue;
    std::vector<std::string> cells;
    std::size_t at = 1;
    for (std::size_t bar; (bar = line.find(" |", at)) != std::string::npos; at = bar + 2) {
      std::string cell = line.substr(at, bar - at);
      cell.erase(0, cell.find_first_not_of(' '));
      cells.push_back(cell);
    }
    ASSERT_GE(cells.size(), 4u) << line;
    ASSERT_EQ(cells[0].front(), '`') << line;
    rows.emplace(cells[0].substr(1, cells[0].find('`', 1) - 1),
                 doc_row{cells[1], cells[2], cells[3]});
  }
  ASSERT_FALSE(rows.empty()) << "no field table in section 3 of " << path;
  for (const auto& f : ec::k_header_field_infos) {
    const std::string key(f.key);
    SCOPED_TRACE(key);
    ASSERT_TRUE(rows.count(key) > 0) << "docs/protocol.md section 3 has no row for '" << key << "'";
    const std::string type = f.type == ec::field_type::str       ? "str"
                             : f.type == ec::field_type::uint    ? "uint"
                             : f.type == ec::field_type::boolean ? "bool"
                                                                 : "array of maps";
    std::string defaults;
    for (auto [it, end] = rows.equal_range(key); it != end; ++it) {
      EXPECT_EQ(it->second.type.substr(0, type.size()), type)
          << "docs/protocol.md gives '" << key << "' the type '" << it->second.type << "'";
      defaults += it->second.default_value + " ";
    }
    for (command c : ec::k_commands) {
      if (!f.required.contains(c)) continue;
      const std::string name = ec::command_name(static_cast<std::uint8_t>(c));
      EXPECT_TRUE(contains(defaults, "required on")) << "the default column says nothing";
      EXPECT_TRUE(contains(defaults, name)) << "'" << key << "' is required on " << name;
    }
  }
  for (const auto& [key, row] : rows) {
    bool known = false;
    for (const auto& f : ec::k_header_field_infos) known = known || f.key == key;
    EXPECT_TRUE(known) << "docs/protocol.md section 3 lists '" << key
                       << "', which k_header_fields does not have";
  }
}

TEST(protocol_test, header_services_array_round_trips) {
  header h;
  h.agent = "multi";
  h.services = {{"A", 1}, {"B", 1'000'000}, {"C.sub-service:v2", 17}};
  auto decoded = ec::decode_header(ec::encode_header(h));
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  expect_same(*decoded, h);
}

TEST(protocol_test, header_service_capacity_defaults_to_one) {
  const std::string bytes = one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(1);
    pack_str(p, "name");
    pack_str(p, "S");
  });
  auto decoded = ec::decode_header(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  ASSERT_EQ(decoded->services.size(), 1u);
  EXPECT_EQ(decoded->services[0].capacity, 1u);
}

TEST(protocol_test, header_empty_is_an_empty_map_both_ways) {
  EXPECT_EQ(ec::encode_header(header{}), std::string("\x80", 1));
  auto decoded = ec::decode_header(std::string("\x80", 1));
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  expect_same(*decoded, header{});
}

TEST(protocol_test, header_absent_fields_are_not_written) {
  header h;
  h.id = "only";
  h.retryable = false;  // false and zero are "absent"
  h.deadline_ms = 0;
  EXPECT_EQ(keys_of(ec::encode_header(h)), std::vector<std::string>{"id"});
}

TEST(protocol_test, header_unknown_keys_are_preserved_verbatim) {
  // Encoded with the same packer rules as the codec (smallest encodings), so "verbatim" can be
  // checked byte for byte.
  const std::string unknown_1 = pack([](auto& p) {
    pack_str(p, "x_future");
    p.pack_array(3);
    p.pack_uint64(1);
    p.pack_map(1);
    pack_str(p, "nested");
    pack_str(p, "value");
    p.pack_nil();
  });
  const std::string unknown_2 = pack([](auto& p) {
    pack_str(p, "z_flag");
    p.pack_true();
  });
  const std::string input = pack([&](auto& p) {
                              p.pack_map(4);
                              pack_str(p, "id");
                              pack_str(p, "e-1");
                            }) +
                            unknown_1 + pack([](auto& p) {
                              pack_str(p, "deadline_ms");
                              p.pack_uint64(10);
                            }) +
                            unknown_2;

  auto decoded = ec::decode_header(input);
  ASSERT_TRUE(decoded.ok()) << decoded.err().message;
  EXPECT_EQ(decoded->id, "e-1");
  EXPECT_EQ(decoded->deadline_ms, 10u);
  EXPECT_EQ(decoded->extra_count, 2u);
  EXPECT_EQ(decoded->extra, unknown_1 + unknown_2);

  // Re-encoded (e.g. forwarded in a DISPATCH with a token added): the unknown pairs are still
  // there, byte for byte, and the map count includes them.
  header forwarded = *decoded;
  forwarded.token = 17;
  const std::string out = ec::encode_header(forwarded);
  EXPECT_NE(out.find(unknown_1 + unknown_2), std::string::npos);
  EXPECT_EQ(keys_of(out),
            (std::vector<std::string>{"id", "deadline_ms", "token", "x_future", "z_flag"}));
  auto again = ec::decode_header(out);
  ASSERT_TRUE(again.ok()) << again.err().message;
  EXPECT_EQ(again->extra, decoded->extra);
  EXPECT_EQ(again->extra_count, 2u);
  EXPECT_EQ(again->token, 17u);
}

// ---- header decode errors -------------------------------------------------------------------

TEST(protocol_test, decode_error_wrong_type_names_the_field_and_the_types) {
  auto msg = decode_error(one_field("deadline_ms", [](auto& p) { pack_str(p, "soon"); }));
  EXPECT_TRUE(contains(msg, "'deadline_ms'"));
  EXPECT_TRUE(contains(msg, "whole number of milliseconds"));
  EXPECT_TRUE(contains(msg, "got str 'soon'"));

  msg = decode_error(one_field("id", [](auto& p) { p.pack_uint64(7); }));
  EXPECT_TRUE(contains(msg, "'id'"));
  EXPECT_TRUE(contains(msg, "must be a str, got uint 7"));

  msg = decode_error(one_field("retryable", [](auto& p) { p.pack_uint64(1); }));
  EXPECT_TRUE(contains(msg, "'retryable'"));
  EXPECT_TRUE(contains(msg, "bool"));

  msg = decode_error(one_field("deadline_ms", [](auto& p) { p.pack_int64(-5); }));
  EXPECT_TRUE(contains(msg, "'deadline_ms'"));
  EXPECT_TRUE(contains(msg, "negative"));

  msg = decode_error(one_field("token", [](auto& p) { p.pack_double(1.5); }));
  EXPECT_TRUE(contains(msg, "'token'"));
  EXPECT_TRUE(contains(msg, "float"));

  msg = decode_error(one_field("ts", [](auto& p) { p.pack_nil(); }));
  EXPECT_TRUE(contains(msg, "'ts'"));
  EXPECT_TRUE(contains(msg, "nil"));
}

TEST(protocol_test, decode_error_out_of_range_integer_names_the_field) {
  const auto msg = decode_error(one_field("attempt", [](auto& p) { p.pack_uint64(1ULL << 32); }));
  EXPECT_TRUE(contains(msg, "'attempt' is 4294967296"));
  EXPECT_TRUE(contains(msg, "up to 4294967295"));
  const auto msg2 =
      decode_error(one_field("heartbeat_ms", [](auto& p) { p.pack_uint64(1ULL << 33); }));
  EXPECT_TRUE(contains(msg2, "'heartbeat_ms'"));
}

TEST(protocol_test, decode_error_bad_services_names_the_element) {
  auto msg = decode_error(one_field("services", [](auto& p) { pack_str(p, "A"); }));
  EXPECT_TRUE(contains(msg, "'services'"));
  EXPECT_TRUE(contains(msg, "array"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(2);
    p.pack_map(1);
    pack_str(p, "name");
    pack_str(p, "A");
    pack_str(p, "B");  // not a map
  }));
  EXPECT_TRUE(contains(msg, "services[1]"));
  EXPECT_TRUE(contains(msg, "map"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(2);
    pack_str(p, "name");
    pack_str(p, "A");
    pack_str(p, "capacity");
    p.pack_uint64(0);
  }));
  EXPECT_TRUE(contains(msg, "services[0].capacity"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(2);
    pack_str(p, "name");
    pack_str(p, "A");
    pack_str(p, "capacity");
    p.pack_uint64(1'000'001);
  }));
  EXPECT_TRUE(contains(msg, "services[0].capacity"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(1);
    pack_str(p, "name");
    pack_str(p, "has space");
  }));
  EXPECT_TRUE(contains(msg, "services[0].name"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(1);
    pack_str(p, "capacity");
    p.pack_uint64(2);
  }));
  EXPECT_TRUE(contains(msg, "services[0].name"));
  EXPECT_TRUE(contains(msg, "empty"));

  msg = decode_error(one_field("services", [](auto& p) {
    p.pack_array(1);
    p.pack_map(1);
    p.pack_uint64(1);
    pack_str(p, "A");
  }));
  EXPECT_TRUE(contains(msg, "services[0] key"));
}

TEST(protocol_test, decode_error_root_must_be_a_map) {
  auto msg = decode_error(pack([](auto& p) {
    p.pack_array(1);
    pack_str(p, "id");
  }));
  EXPECT_TRUE(contains(msg, "must be a msgpack map"));
  EXPECT_TRUE(contains(msg, "array"));
  msg = decode_error(pack([](auto& p) { pack_str(p, "hello"); }));
  EXPECT_TRUE(contains(msg, "must be a msgpack map"));
  EXPECT_TRUE(contains(msg, "str"));
}

TEST(protocol_test, decode_error_empty_frame) {
  EXPECT_TRUE(contains(decode_error(""), "empty"));
}

TEST(protocol_test, decode_error_truncated_bytes) {
  const std::string whole = ec::encode_header(full_header());
  for (std::size_t cut : {std::size_t{1}, std::size_t{5}, whole.size() / 2, whole.size() - 1}) {
    SCOPED_TRACE(cut);
    EXPECT_TRUE(contains(decode_error(whole.substr(0, cut)), "truncated"));
  }
}

TEST(protocol_test, decode_error_trailing_bytes) {
  const std::string bytes = ec::encode_header(full_header()) + std::string("\xc0\xc0", 2);
  const auto msg = decode_error(bytes);
  EXPECT_TRUE(contains(msg, "2 trailing bytes"));
  // Two maps back to back are also "one map and trailing bytes".
  EXPECT_TRUE(contains(decode_error(std::string("\x80\x80", 2)), "trailing"));
}

TEST(protocol_test, decode_error_keys_must_be_str) {
  auto msg = decode_error(pack([](auto& p) {
    p.pack_map(1);
    p.pack_uint64(1);
    pack_str(p, "x");
  }));
  EXPECT_TRUE(contains(msg, "keys must be str"));
  EXPECT_TRUE(contains(msg, "uint"));
  msg = decode_error(pack([](auto& p) {
    p.pack_map(1);
    p.pack_bin(2);
    p.pack_bin_body("id", 2);
    pack_str(p, "x");
  }));
  EXPECT_TRUE(contains(msg, "keys must be str"));
  EXPECT_TRUE(contains(msg, "bin"));
}

TEST(protocol_test, decode_error_too_large) {
  header h;
  h.id = "big-1";
  h.correlation_id = std::string(ec::k_max_header_bytes, 'x');  // a few bytes more than that
  const std::string bytes = ec::encode_header(h);
  ASSERT_GT(bytes.size(), ec::k_max_header_bytes);
  header partial;
  auto r = ec::decode_header(bytes, &partial);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.err().code, ec::errc::too_large);  // not malformed: too large, like a payload
  EXPECT_TRUE(contains(r.err().message, std::to_string(bytes.size()) + " bytes"));
  EXPECT_TRUE(contains(r.err().message, "limit of 16384"));
  EXPECT_EQ(partial.id, "big-1") << "the refusal must be able to name the message";

  // Just under the limit is fine.
  h.correlation_id = std::string(ec::k_max_header_bytes - 64, 'x');
  EXPECT_TRUE(ec::decode_header(ec::encode_header(h)).ok());
}

// docs/protocol.md section 3: the header map is level 1, each array or map inside it adds one.
TEST(protocol_test, decode_error_nesting_deeper_than_four_levels) {
  const auto nested = [](int containers) {
    return one_field("x_deep", [containers](auto& p) {
      for (int i = 0; i < containers; ++i) p.pack_array(1);
      p.pack_uint64(1);
    });
  };
  auto four = ec::decode_header(nested(3));  // the map and 3 arrays: 4 levels
  ASSERT_TRUE(four.ok()) << four.err().message;
  EXPECT_EQ(four->extra_count, 1u);
  const auto msg = decode_error(nested(4));
  EXPECT_TRUE(contains(msg, "deeper than 4 levels"));
  EXPECT_TRUE(contains(msg, "header map is level 1"));
}

// docs/protocol.md section 3: a non-negative integer is accepted in any msgpack encoding; a
// client library may well write 5000 as int16 or int64.
TEST(protocol_test, non_negative_integers_in_any_encoding_are_accepted) {
  const std::vector<std::pair<std::string, std::string>> encodings = {
      {"positive fixint", std::string("\x7f", 1)},
      {"uint8", std::string("\xcc\x7f", 2)},
      {"uint16", std::string("\xcd\x00\x7f", 3)},
      {"uint32", std::string("\xce\x00\x00\x00\x7f", 5)},
      {"uint64", std::string("\xcf\x00\x00\x00\x00\x00\x00\x00\x7f", 9)},
      {"int8", std::string("\xd0\x7f", 2)},
      {"int16", std::string("\xd1\x00\x7f", 3)},
      {"int32", std::string("\xd2\x00\x00\x00\x7f", 5)},
      {"int64", std::string("\xd3\x00\x00\x00\x00\x00\x00\x00\x7f", 9)},
  };
  for (const auto& [name, value] : encodings) {
    SCOPED_TRACE(name);
    const std::string bytes = std::string("\x81\xab") + "deadline_ms" + value;
    auto decoded = ec::decode_header(bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.err().message;
    EXPECT_EQ(decoded->deadline_ms, 127u);
  }
  // A negative value is refused whatever its encoding, naming it.
  EXPECT_TRUE(contains(
      decode_error(std::string("\x81\xab") + "deadline_ms" + std::string("\xd1\xff\xfe", 3)),
      "negative int -2"));
}

// A header refused for one bad field still tells which message it was: every field that did
// read, wherever the bad one is in the map, so that the refusal can carry the id.
TEST(protocol_test, refused_header_still_yields_the_fields_that_read) {
  const std::string bytes = pack([](auto& p) {
    p.pack_map(4);
    pack_str(p, "deadline_ms");
    pack_str(p, "soon");
    pack_str(p, "id");
    pack_str(p, "c-7");
    pack_str(p, "service");
    p.pack_uint64(7);
    pack_str(p, "action");
    pack_str(p, "say");
  });
  header partial;
  auto r = ec::decode_header(bytes, &partial);
  ASSERT_FALSE(r.ok());
  // The first problem is the one reported, named with its value and the rule.
  EXPECT_EQ(r.err().message,
            "header field 'deadline_ms' must be a whole number of milliseconds, at least 1 "
            "(omit it rather than send 0), got str 'soon'");
  EXPECT_EQ(partial.id, "c-7");
  EXPECT_EQ(partial.action, "say");
  EXPECT_TRUE(partial.service.empty());

  // A map with trailing bytes was read too.
  header h;
  h.id = "t-1";
  partial = header{};
  EXPECT_FALSE(ec::decode_header(ec::encode_header(h) + "x", &partial).ok());
  EXPECT_EQ(partial.id, "t-1");

  // Not a map: nothing to read.
  partial = header{};
  EXPECT_FALSE(ec::decode_header(std::string("\x91\x01", 2), &partial).ok());
  EXPECT_TRUE(partial.id.empty());
}

TEST(protocol_test, decode_error_deadline_zero_is_not_absent) {
  const auto msg = decode_error(one_field("deadline_ms", [](auto& p) { p.pack_uint64(0); }));
  EXPECT_TRUE(contains(msg, "'deadline_ms' is 0"));
  EXPECT_TRUE(contains(msg, "at least 1"));
}

TEST(protocol_test, decode_error_not_msgpack_at_all) {
  // 0xc1 is the one byte msgpack never uses.
  EXPECT_TRUE(contains(decode_error(std::string("\xc1", 1)), "msgpack"));
}

// ---- parse_message / build_message -----------------------------------------------------------

TEST(protocol_test, parse_build_then_parse_round_trips) {
  std::vector<zmq::message_t> frames;
  header h = full_header();
  ec::build_message(frames, command::request, h, zmq::message_t(std::string_view("payload")));
  ASSERT_EQ(frames.size(), 4u);
  EXPECT_EQ(ec::as_view(frames[0]), ec::k_protocol_tag);
  EXPECT_EQ(ec::as_view(frames[1]), cmd(0x10));

  auto parsed = ec::parse_message(frames, 0);
  ASSERT_TRUE(parsed.ok()) << parsed.err().message;
  EXPECT_EQ(parsed->cmd, command::request);
  expect_same(parsed->hdr, h);
  EXPECT_EQ(ec::as_view(parsed->payload), "payload");
}

TEST(protocol_test, parse_routing_id_in_front_and_no_payload_frame) {
  auto frames = frames_of({"routing-id", k_tag, cmd(0x30), std::string("\x80", 1)});
  auto parsed = ec::parse_message(frames, 1);
  ASSERT_TRUE(parsed.ok()) << parsed.err().message;
  EXPECT_EQ(parsed->cmd, command::heartbeat);
  EXPECT_EQ(parsed->payload.size(), 0u);
  EXPECT_EQ(ec::as_view(frames[0]), "routing-id");  // untouched
}

TEST(protocol_test, parse_every_command_byte_is_accepted) {
  for (command c :
       {command::hello, command::welcome, command::bye, command::request, command::dispatch,
        command::reply, command::publish, command::publish_ack, command::heartbeat,
        command::consume, command::deliver, command::ack, command::nack, command::term,
        command::progress, command::consume_stop, command::error}) {
    const auto byte = static_cast<std::uint8_t>(c);
    SCOPED_TRACE(ec::command_name(byte));
    EXPECT_TRUE(ec::is_known_command(byte));
    auto frames = frames_of({k_tag, cmd(byte), std::string("\x80", 1)});
    auto parsed = ec::parse_message(frames, 0);
    ASSERT_TRUE(parsed.ok()) << parsed.err().message;
    EXPECT_EQ(parsed->cmd, c);
  }
  EXPECT_EQ(ec::command_name(0x12), "REPLY");
  EXPECT_EQ(ec::command_name(0x42), "ACK");
  EXPECT_EQ(ec::command_name(0x47), "0x47");
  EXPECT_FALSE(ec::is_known_command(0x00));
  EXPECT_FALSE(ec::is_known_command(0x47));
  EXPECT_FALSE(ec::is_known_command(0xff));
}

TEST(protocol_test, parse_wrong_tag) {
  auto f = parse_error(frames_of({"ENS\x02", cmd(0x10), std::string("\x80", 1)}));
  EXPECT_TRUE(contains(f.err.message, "frame 0"));
  EXPECT_TRUE(contains(f.err.message, "protocol tag"));
  EXPECT_FALSE(f.header_decoded);

  // A garbage single frame fails on the tag too, with a hex preview of what came.
  f = parse_error(frames_of({"garbage!"}));
  EXPECT_TRUE(contains(f.err.message, "frame 0"));
  EXPECT_TRUE(contains(f.err.message, "8 bytes"));
  EXPECT_TRUE(contains(f.err.message, "67617262616765"));  // "garbage" in hex
}

TEST(protocol_test, parse_too_few_frames) {
  auto f = parse_error(frames_of({k_tag, cmd(0x10)}));
  EXPECT_TRUE(contains(f.err.message, "2 frames"));
  EXPECT_TRUE(contains(f.err.message, "at least 3"));
  f = parse_error(frames_of({k_tag}));
  EXPECT_TRUE(contains(f.err.message, "1 frames"));
  f = parse_error(frames_of({"routing-id"}), 1);
  EXPECT_TRUE(contains(f.err.message, "no frames"));
}

TEST(protocol_test, parse_too_many_frames) {
  auto f =
      parse_error(frames_of({k_tag, cmd(0x10), std::string("\x80", 1), "payload", "one too many"}));
  EXPECT_TRUE(contains(f.err.message, "REQUEST has 5 frames"));
  EXPECT_TRUE(contains(f.err.message, "at most 4"));
  EXPECT_EQ(f.command_byte, 0x10);
}

TEST(protocol_test, parse_unknown_command_byte) {
  header h;
  h.id = "u-1";
  auto f = parse_error(frames_of({k_tag, cmd(0x47), ec::encode_header(h)}));
  EXPECT_TRUE(contains(f.err.message, "unknown command 0x47"));
  EXPECT_TRUE(contains(f.err.message, "0x10 REQUEST"));  // and which ones there are
  EXPECT_EQ(f.command_byte, 0x47);
  EXPECT_EQ(f.hdr.id, "u-1") << "the header is read so that the ERROR can carry the id";
}

TEST(protocol_test, parse_command_frame_of_two_bytes) {
  auto f = parse_error(frames_of({k_tag, std::string("\x10\x00", 2), std::string("\x80", 1)}));
  EXPECT_TRUE(contains(f.err.message, "frame 1 (command)"));
  EXPECT_TRUE(contains(f.err.message, "got 2"));
  f = parse_error(frames_of({k_tag, std::string(), std::string("\x80", 1)}));
  EXPECT_TRUE(contains(f.err.message, "got 0"));
}

TEST(protocol_test, parse_bad_header_names_the_command_and_the_field) {
  auto f = parse_error(frames_of(
      {k_tag, cmd(0x10), one_field("deadline_ms", [](auto& p) { pack_str(p, "soon"); })}));
  EXPECT_TRUE(contains(f.err.message, "REQUEST"));
  EXPECT_TRUE(contains(f.err.message, "'deadline_ms'"));
  EXPECT_EQ(f.command_byte, 0x10);
  EXPECT_FALSE(f.header_decoded);

  // What did read is kept: the id, for the REPLY that refuses the request.
  f = parse_error(frames_of({k_tag, cmd(0x10), pack([](auto& p) {
                               p.pack_map(2);
                               pack_str(p, "id");
                               pack_str(p, "c-1");
                               pack_str(p, "retryable");
                               pack_str(p, "yes");
                             })}));
  EXPECT_FALSE(f.header_decoded);
  EXPECT_EQ(f.hdr.id, "c-1");
  EXPECT_TRUE(contains(f.err.message, "'retryable' must be a bool (true or false), got str 'yes'"));
}

// The broker keeps one parse_failure for every message it parses: each failure is written
// whole, none keeps what an earlier one said.
TEST(protocol_test, parse_failure_kept_across_messages_is_written_whole) {
  ec::parse_failure f;
  header h;
  h.id = "u-1";
  auto first = frames_of({k_tag, cmd(0x47), ec::encode_header(h)});
  ec::parsed_message m1;
  ASSERT_FALSE(ec::parse_message(first, 0, m1, &f).ok());
  EXPECT_EQ(f.command_byte, 0x47);
  EXPECT_EQ(f.hdr.id, "u-1");
  EXPECT_TRUE(f.header_decoded);

  auto second = frames_of({"ENS\x02", cmd(0x10), std::string("\x80", 1)});
  ec::parsed_message m2;
  ASSERT_FALSE(ec::parse_message(second, 0, m2, &f).ok());
  EXPECT_TRUE(contains(f.err.message, "protocol tag"));
  EXPECT_EQ(f.command_byte, 0);
  EXPECT_EQ(f.hdr.id, "");
  EXPECT_FALSE(f.header_decoded);

  // And a message that parses leaves it alone, decoded into the message given.
  auto third = frames_of({k_tag, cmd(0x10), ec::encode_header(h), "payload"});
  ec::parsed_message m3;
  ASSERT_TRUE(ec::parse_message(third, 0, m3, &f).ok());
  EXPECT_EQ(m3.cmd, command::request);
  EXPECT_EQ(m3.hdr.id, "u-1");
  EXPECT_EQ(ec::as_view(m3.payload), "payload");
  EXPECT_TRUE(contains(f.err.message, "protocol tag"));
}

// ---- topics and names -----------------------------------------------------------------------

TEST(protocol_test, topic_valid) {
  for (std::string_view t : {"a", "order.created", "workflow.OrderProcessing.completed",
                             "a-b_c:d.E9", "_ensemble.sync.0123abcd"}) {
    EXPECT_EQ(ec::check_topic(t), "") << t;
  }
  EXPECT_EQ(ec::check_topic(std::string(ec::k_max_topic_length, 'x')), "");
}

TEST(protocol_test, topic_invalid_says_why) {
  EXPECT_TRUE(contains(ec::check_topic(""), "empty"));
  EXPECT_TRUE(contains(ec::check_topic(".order"), "empty segment"));
  EXPECT_TRUE(contains(ec::check_topic("order..created"), "empty segment"));
  EXPECT_TRUE(contains(ec::check_topic("order."), "ends with '.'"));
  EXPECT_TRUE(contains(ec::check_topic("order created"), "character outside"));
  EXPECT_TRUE(contains(ec::check_topic("order/created"), "character outside"));
  EXPECT_TRUE(contains(ec::check_topic("ordér"), "character outside"));
  EXPECT_TRUE(contains(ec::check_topic(std::string(ec::k_max_topic_length + 1, 'x')), "257 bytes"));
}

TEST(protocol_test, name_valid) {
  for (std::string_view n : {"PaymentService", "charge", "a", "x.y-z_1:2", "!~"}) {
    EXPECT_EQ(ec::check_name("'service'", n), "") << n;
  }
  EXPECT_EQ(ec::check_name("'service'", std::string(ec::k_max_name_length, 'n')), "");
}

// Each message names the field, what is wrong with the value, and the rule.
TEST(protocol_test, name_invalid_names_what_was_checked) {
  const std::string rule = "; names are 1..128 bytes of printable ASCII without spaces (0x21-0x7e)";
  EXPECT_EQ(ec::check_name("'service'", ""), "'service' is empty" + rule);
  EXPECT_EQ(ec::check_name("'action'", "has space"),
            "'action' 'has space' has a space at byte 3" + rule);
  EXPECT_EQ(ec::check_name("'agent'", std::string("tab\there")),
            "'agent' 'tab\\x09here' has the control character 0x09 at byte 3" + rule);
  EXPECT_TRUE(contains(ec::check_name("'agent'", std::string("del\x7f")),
                       "the control character 0x7f at byte 3"));
  EXPECT_TRUE(
      contains(ec::check_name("'agent'", "caf\xc3\xa9"), "the non-ASCII byte 0xc3 at byte 3"));
  EXPECT_EQ(ec::check_name("'service'", std::string(ec::k_max_name_length + 1, 'n')).substr(0, 56),
            "'service' is 129 bytes, longer than the limit of 128; na");
}

}  // namespace
