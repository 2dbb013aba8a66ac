#pragma once
// Message ids: a random 64-bit prefix per generator and a counter, as lowercase hex
// ("9f86d081884c7d65-2a"). Unique across processes without coordination, cheap to make, and
// short enough to read in a log line or a trace.

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ensemble::common {

class id_generator {
 public:
  id_generator();
  std::string next();
  const std::string& prefix() const { return prefix_; }
  // The same ids by their number: next() == format(next_number()). A number is never handed out
  // twice by one generator, so it can key a table of the ids in flight without hashing strings;
  // number_of() reads it back from an id this generator made (nullopt for any other id).
  std::uint64_t next_number() { return counter_.fetch_add(1, std::memory_order_relaxed) + 1; }
  std::string format(std::uint64_t number) const;
  std::optional<std::uint64_t> number_of(std::string_view id) const;

 private:
  std::string prefix_;
  std::atomic<std::uint64_t> counter_{0};
};

// A fresh random 128-bit id as 32 hex characters (trace ids, broker instance ids).
std::string random_id();

}  // namespace ensemble::common
