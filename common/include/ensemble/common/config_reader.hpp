#pragma once
// A reader for configuration documents (workflow definitions, deployment files, scriptable
// agent specs) that finds every problem in one pass instead of stopping at the first.
//
// The document is a nlohmann::json (YAML files are converted first). The parser walks it and
// names each value by its path — a JSON pointer ("/workflow/steps/2/retry") or a dotted YAML
// path ("agents[1].restart.backoff"), built by child(). Problems are collected:
//
//   - report(path, msg) records a problem and carries on (the value is still usable);
//   - fail(path, msg) records one and abandons the item being read, up to the nearest
//     attempt(), which returns false so the parser moves on to the next item;
//   - the typed getters (string_at, bool_at, integer_at, require) fail on a wrong type;
//     check_keys reports every unknown key, suggesting the closest known one.
//
// At the end, throw_if_any() throws one common::config_error listing every problem, sorted by
// position in the file (line and column when the parser was given them, else by path).
//
//   common::config_reader r("orders.json", common::path_style::json_pointer,
//                           common::json_positions(text));
//   r.attempt([&] { name = r.string_at(r.require(doc, "", "name", "every workflow needs one"),
//                                      "/name"); });
//   r.throw_if_any();

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/result.hpp"

namespace ensemble::common {

// One problem of a configuration file: where it is ("<file>: <path>") and what is wrong.
struct diagnostic {
  std::string where;
  std::string message;
  std::string to_string() const { return where.empty() ? message : where + ": " + message; }
};

// The config_error of a validator that found several problems: what() has one line per
// problem ("<where>: <message>"), where() is the first one's.
class config_errors : public config_error {
 public:
  explicit config_errors(std::vector<diagnostic> all);
  const std::vector<diagnostic>& diagnostics() const { return all_; }

 private:
  std::vector<diagnostic> all_;
};

// The problems of any config_error: a config_errors' list, or the one problem it names.
std::vector<diagnostic> diagnostics_of(const config_error& e);

// 1-based; line 0 means unknown.
struct text_position {
  int line = 0;
  int column = 0;
};

enum class path_style {
  json_pointer,  // "" is the document, "/a/0/b" (RFC 6901); values are "objects" and "arrays"
  dotted,        // "" is the document, "a[0].b"; values are "mappings" and "lists" (YAML)
};

// The position of every value of a JSON text, by JSON pointer (for a member: of its key).
// The text must be valid JSON; what cannot be scanned is left out.
std::map<std::string, text_position> json_positions(std::string_view text);

// The closest of `candidates` to `word` (case-insensitive edit distance of at most 2, and less
// than the word's length), or nullopt.
std::optional<std::string_view> closest_word(std::string_view word,
                                             const std::vector<std::string_view>& candidates);

class config_reader {
 public:
  config_reader(std::string file, path_style style,
                std::map<std::string, text_position> positions = {});

  // Paths.
  std::string child(const std::string& path, std::string_view key) const;
  std::string child(const std::string& path, std::size_t index) const;
  // "<file>: <path>", or "<file>" for the document itself.
  std::string where(const std::string& path) const;
  const std::string& file() const { return file_; }
  // Records where `path` is in the file (for a reader that builds its document as it goes).
  void locate(const std::string& path, text_position at) { positions_[path] = at; }

  // Problems.
  void report(const std::string& path, const std::string& message);
  [[noreturn]] void fail(const std::string& path, const std::string& message);
  // Runs `f`; false if it failed (the problem is already recorded).
  template <class F>
  bool attempt(F&& f) {
    try {
      f();
      return true;
    } catch (const abandoned&) {
      return false;
    }
  }
  // When `obj` has `key`, runs f(value, its path) as an attempt(); false if that failed.
  template <class F>
  bool with_key(const nlohmann::json& obj, const std::string& path, std::string_view key, F&& f) {
    const auto it = obj.find(key);
    if (it == obj.end()) return true;
    const std::string at = child(path, key);
    return attempt([&] { f(*it, at); });
  }
  bool ok() const { return problems_.empty(); }
  std::size_t problem_count() const { return problems_.size(); }
  // Every problem so far, sorted by position.
  std::vector<diagnostic> diagnostics() const;
  // Throws one config_error listing every problem, if there is any.
  void throw_if_any() const;

  // Typed getters: a value of another type fails at `path`.
  std::string string_at(const nlohmann::json& v, const std::string& path);
  bool bool_at(const nlohmann::json& v, const std::string& path);
  std::int64_t integer_at(const nlohmann::json& v, const std::string& path, std::int64_t min,
                          std::int64_t max);
  // obj[key]; fails at `path` (the object) when it is missing, saying `why` it is needed —
  // unless check_keys reported a key of that object close to it (the typo says it all).
  const nlohmann::json& require(const nlohmann::json& obj, const std::string& path,
                                std::string_view key, std::string_view why);
  // Reports every key of `obj` not in `allowed`, at its own path: `what` names the place ("a
  // trigger"); a key in `hints` gets that explanation, any other the closest allowed key.
  // Returns whether every key was known.
  bool check_keys(const nlohmann::json& obj, const std::string& path,
                  const std::vector<std::string_view>& allowed, std::string_view what,
                  const std::map<std::string_view, std::string_view>& hints = {});

  // The value as it would appear in the file, shortened: "\"fast\"", "3", "an object".
  std::string got(const nlohmann::json& v) const;

 private:
  struct abandoned {};
  struct problem {
    std::string path;
    std::string message;
    text_position at;
    std::size_t seq = 0;
  };

  text_position position_of(const std::string& path) const;
  std::vector<std::string> tokens(const std::string& path) const;

  std::string file_;
  path_style style_;
  std::map<std::string, text_position> positions_;
  std::vector<problem> problems_;
};

}  // namespace ensemble::common
