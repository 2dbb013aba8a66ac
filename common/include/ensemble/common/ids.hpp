#pragma once
// Message ids: a random 64-bit prefix per generator and a counter, as lowercase hex
// ("9f86d081884c7d65-2a"). Unique across processes without coordination, cheap to make, and
// short enough to read in a log line or a trace.

#include <atomic>
#include <cstdint>
#include <string>

namespace ensemble::common {

class id_generator {
 public:
  id_generator();
  std::string next();
  const std::string& prefix() const { return prefix_; }

 private:
  std::string prefix_;
  std::atomic<std::uint64_t> counter_{0};
};

// A fresh random 128-bit id as 32 hex characters (trace ids, broker instance ids).
std::string random_id();

}  // namespace ensemble::common
