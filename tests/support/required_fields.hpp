#pragma once
// Headers built from k_header_fields (common/include/ensemble/common/protocol.hpp), for the
// tests that go through the table instead of listing fields by hand: a field added to the
// table is covered by them without a change here.

#include <string_view>
#include <tuple>

#include "ensemble/common/protocol.hpp"

namespace ensemble::test {

// A value of a field that every rule accepts: "x" is a valid id, name, topic, stream and
// consumer; 7 is within every uint field's range.
template <class Row>
void set_sample(const Row&, common::header& h) {
  auto& value = h.*Row::member;
  if constexpr (Row::type == common::field_type::str) {
    value = "x";
  } else if constexpr (Row::type == common::field_type::uint) {
    value = 7;
  } else if constexpr (Row::type == common::field_type::boolean) {
    value = true;
  } else {
    value = {{"x", 1}};
  }
}

// A header with every field that `c` requires, except `except` (a key; empty: none).
inline common::header with_required_fields(common::command c, std::string_view except = {}) {
  common::header h;
  std::apply(
      [&](const auto&... row) {
        ((row.required.contains(c) && row.key != except ? set_sample(row, h) : void()), ...);
      },
      common::k_header_fields);
  return h;
}

// A header with every field set.
inline common::header with_every_field() {
  common::header h;
  std::apply([&](const auto&... row) { (set_sample(row, h), ...); }, common::k_header_fields);
  return h;
}

}  // namespace ensemble::test
