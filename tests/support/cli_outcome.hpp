#pragma once
// A command-line program of the project run to its end in a test: its exit code and every line
// it printed (stdout and stderr), for the `ensemble` tests and the validators' tests.
//
//   auto p = testkit::process::spawn({testkit::binary_path("ensemble"), {"validate", f}});
//   const test::outcome o = test::finish(*p, 30s);
//   EXPECT_EQ(o.code, 1) << o;   // prints the exit code and the output
//   EXPECT_TRUE(o.has("f.json: /workflow/steps/0/name: ")) << o;

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/testkit/process.hpp"

namespace ensemble::test {

// A finished run: its exit code (nullopt if it was still running at the deadline, then
// killed) and every line of its stdout and stderr.
struct outcome {
  std::optional<int> code;
  std::vector<std::string> lines;

  std::string text() const {
    std::string out;
    for (const auto& l : lines) out += l + "\n";
    return out;
  }
  bool has(std::string_view s) const { return text().find(s) != std::string::npos; }
  // The line containing `s`, or "".
  std::string line(std::string_view s) const {
    const int i = index(s);
    return i < 0 ? std::string() : lines[static_cast<std::size_t>(i)];
  }
  // The index of the first line containing `s`, or -1.
  int index(std::string_view s) const {
    for (std::size_t i = 0; i < lines.size(); ++i) {
      if (lines[i].find(s) != std::string::npos) return static_cast<int>(i);
    }
    return -1;
  }
  // The JSON document a command printed with dump(2): from the first line that is exactly
  // "{" (or "[") to the last that is exactly "}" (or "]"). Log lines before or after are
  // skipped. Null if there is none.
  nlohmann::json document() const {
    std::size_t first = lines.size(), last = lines.size();
    for (std::size_t i = 0; i < lines.size(); ++i) {
      if (first == lines.size() && (lines[i] == "{" || lines[i] == "[")) first = i;
      if (lines[i] == "}" || lines[i] == "]") last = i;
    }
    if (first == lines.size() || last == lines.size() || last < first) return nullptr;
    std::string body;
    for (std::size_t i = first; i <= last; ++i) body += lines[i] + "\n";
    return nlohmann::json::parse(body, nullptr, false);
  }
};

inline std::ostream& operator<<(std::ostream& os, const outcome& o) {
  os << "exit " << (o.code ? std::to_string(*o.code) : std::string("(still running)"))
     << ", output:\n"
     << o.text();
  return os;
}

// Waits until `p` has closed its output and exited (or the deadline passes: then kills it).
inline outcome finish(testkit::process& p, std::chrono::milliseconds deadline) {
  using steady = std::chrono::steady_clock;
  const auto until = steady::now() + deadline;
  // No line ever contains this: the wait ends when the output is closed, i.e. at exit.
  (void)p.wait_for_line("\x1f(end of output)\x1f", deadline);
  outcome o;
  o.code = p.wait_exit(std::chrono::ceil<std::chrono::milliseconds>(
      std::max(until - steady::now(), steady::duration::zero())));
  if (!o.code) {
    p.kill();
    (void)p.wait_exit(std::chrono::seconds(5));
  }
  o.lines = p.lines();
  return o;
}

}  // namespace ensemble::test
