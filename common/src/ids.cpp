#include "ensemble/common/ids.hpp"

#include <cstdio>
#include <random>

namespace ensemble::common {
namespace {
std::uint64_t random_u64() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}
std::string hex64(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

id_generator::id_generator() : prefix_(hex64(random_u64())) {}

std::string id_generator::next() {
  return format(next_number());
}

std::string id_generator::format(std::uint64_t n) const {
  char buf[24];
  const int len = std::snprintf(buf, sizeof buf, "-%llx", static_cast<unsigned long long>(n));
  std::string out;
  out.reserve(prefix_.size() + static_cast<std::size_t>(len));
  out.append(prefix_).append(buf, static_cast<std::size_t>(len));
  return out;
}

std::optional<std::uint64_t> id_generator::number_of(std::string_view id) const {
  // prefix, '-', 1..16 lowercase hex digits without leading zeros (as format() writes them)
  if (id.size() <= prefix_.size() + 1 || id.size() > prefix_.size() + 17) return std::nullopt;
  if (id.compare(0, prefix_.size(), prefix_) != 0 || id[prefix_.size()] != '-') return std::nullopt;
  const std::string_view digits = id.substr(prefix_.size() + 1);
  if (digits[0] == '0') return std::nullopt;
  std::uint64_t n = 0;
  for (const char c : digits) {
    if (c >= '0' && c <= '9') {
      n = n * 16 + static_cast<std::uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      n = n * 16 + static_cast<std::uint64_t>(c - 'a' + 10);
    } else {
      return std::nullopt;
    }
  }
  return n;
}

std::string random_id() {
  return hex64(random_u64()) + hex64(random_u64());
}

}  // namespace ensemble::common
