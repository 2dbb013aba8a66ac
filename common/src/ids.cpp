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
  const auto n = counter_.fetch_add(1, std::memory_order_relaxed) + 1;
  char buf[24];
  const int len = std::snprintf(buf, sizeof buf, "-%llx", static_cast<unsigned long long>(n));
  std::string out;
  out.reserve(prefix_.size() + static_cast<std::size_t>(len));
  out.append(prefix_).append(buf, static_cast<std::size_t>(len));
  return out;
}

std::string random_id() { return hex64(random_u64()) + hex64(random_u64()); }

}  // namespace ensemble::common
