#include "ensemble/common/config_reader.hpp"

#include <algorithm>
#include <cctype>
#include <tuple>

namespace ensemble::common {
namespace {

using json = nlohmann::json;

std::string pointer_token(std::string_view key) {
  std::string out;
  out.reserve(key.size());
  for (char c : key) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      const bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                        std::tolower(static_cast<unsigned char>(b[j - 1]));
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (same ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// Scans a valid JSON text, recording where each value (a member: its key) starts.
class position_scanner {
 public:
  explicit position_scanner(std::string_view text) : text_(text) {}

  std::map<std::string, text_position> run() {
    skip_space();
    value("");
    return std::move(out_);
  }

 private:
  text_position here() const { return {line_, static_cast<int>(i_ - line_start_) + 1}; }

  void advance() {
    if (text_[i_] == '\n') {
      ++line_;
      line_start_ = i_ + 1;
    }
    ++i_;
  }

  void skip_space() {
    while (i_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[i_])) != 0) {
      advance();
    }
  }

  // A string starting at '"'; returns its contents with the simple escapes decoded.
  std::string string() {
    std::string s;
    advance();  // '"'
    while (i_ < text_.size() && text_[i_] != '"') {
      if (text_[i_] == '\\' && i_ + 1 < text_.size()) {
        advance();
        const char e = text_[i_];
        s += e == 'n'   ? '\n'
             : e == 't' ? '\t'
             : e == 'r' ? '\r'
             : e == 'b' ? '\b'
             : e == 'f' ? '\f'
                        : e;
      } else {
        s += text_[i_];
      }
      advance();
    }
    if (i_ < text_.size()) advance();  // '"'
    return s;
  }

  void value(const std::string& path) {
    if (i_ >= text_.size()) return;
    out_.emplace(path, here());
    const char c = text_[i_];
    if (c == '{') {
      advance();
      skip_space();
      while (i_ < text_.size() && text_[i_] == '"') {
        const text_position key_at = here();
        const std::string key_path = path + "/" + pointer_token(string());
        skip_space();
        if (i_ < text_.size() && text_[i_] == ':') advance();
        skip_space();
        value(key_path);
        out_[key_path] = key_at;
        skip_space();
        if (i_ < text_.size() && text_[i_] == ',') advance();
        skip_space();
      }
      if (i_ < text_.size()) advance();  // '}'
    } else if (c == '[') {
      advance();
      skip_space();
      for (std::size_t n = 0; i_ < text_.size() && text_[i_] != ']'; ++n) {
        value(path + "/" + std::to_string(n));
        skip_space();
        if (i_ < text_.size() && text_[i_] == ',') advance();
        skip_space();
      }
      if (i_ < text_.size()) advance();  // ']'
    } else if (c == '"') {
      (void)string();
    } else {
      while (i_ < text_.size() &&
             std::string_view(",]} \t\r\n").find(text_[i_]) == std::string_view::npos) {
        advance();
      }
    }
  }

  std::string_view text_;
  std::size_t i_ = 0;
  std::size_t line_start_ = 0;
  int line_ = 1;
  std::map<std::string, text_position> out_;
};

}  // namespace

namespace {

// config_error(where, what) prints "where: what": the first problem's message, then the
// other problems' lines.
std::string all_but_first_where(const std::vector<diagnostic>& all) {
  std::string out = all.empty() ? std::string() : all.front().message;
  for (std::size_t i = 1; i < all.size(); ++i) out += "\n" + all[i].to_string();
  return out;
}

}  // namespace

config_errors::config_errors(std::vector<diagnostic> all)
    : config_error(all.empty() ? std::string() : all.front().where, all_but_first_where(all)),
      all_(std::move(all)) {}

std::vector<diagnostic> diagnostics_of(const config_error& e) {
  if (const auto* many = dynamic_cast<const config_errors*>(&e)) return many->diagnostics();
  std::string message = e.what();
  if (!e.where().empty() && message.rfind(e.where() + ": ", 0) == 0) {
    message = message.substr(e.where().size() + 2);
  }
  return {diagnostic{e.where(), std::move(message)}};
}

std::map<std::string, text_position> json_positions(std::string_view text) {
  return position_scanner(text).run();
}

std::optional<std::string_view> closest_word(std::string_view word,
                                             const std::vector<std::string_view>& candidates) {
  std::optional<std::string_view> best;
  std::size_t best_distance = std::min<std::size_t>(3, word.size());
  for (std::string_view candidate : candidates) {
    const std::size_t d = edit_distance(word, candidate);
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  }
  return best;
}

config_reader::config_reader(std::string file, path_style style,
                             std::map<std::string, text_position> positions)
    : file_(std::move(file)), style_(style), positions_(std::move(positions)) {}

std::string config_reader::child(const std::string& path, std::string_view key) const {
  if (style_ == path_style::json_pointer) return path + "/" + pointer_token(key);
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string config_reader::child(const std::string& path, std::size_t index) const {
  if (style_ == path_style::json_pointer) return path + "/" + std::to_string(index);
  return path + "[" + std::to_string(index) + "]";
}

std::string config_reader::where(const std::string& path) const {
  return path.empty() ? file_ : file_ + ": " + path;
}

void config_reader::report(const std::string& path, const std::string& message) {
  problems_.push_back(problem{path, message, position_of(path), problems_.size()});
}

void config_reader::fail(const std::string& path, const std::string& message) {
  report(path, message);
  throw abandoned{};
}

text_position config_reader::position_of(const std::string& path) const {
  // A path that names nothing in the file (a missing key) takes its closest ancestor's place.
  std::string p = path;
  while (true) {
    if (const auto it = positions_.find(p); it != positions_.end()) return it->second;
    if (p.empty()) return {};
    const auto cut = style_ == path_style::json_pointer ? p.rfind('/') : p.find_last_of(".[");
    p = cut == std::string::npos ? std::string() : p.substr(0, cut);
  }
}

std::vector<std::string> config_reader::tokens(const std::string& path) const {
  std::vector<std::string> out;
  std::string current;
  const std::string_view separators = style_ == path_style::json_pointer ? "/" : ".[]";
  for (char c : path) {
    if (separators.find(c) == std::string_view::npos) {
      current += c;
    } else if (!current.empty()) {
      out.push_back(std::move(current));
      current.clear();
    }
  }
  if (!current.empty()) out.push_back(std::move(current));
  return out;
}

std::vector<diagnostic> config_reader::diagnostics() const {
  std::vector<const problem*> sorted;
  for (const auto& p : problems_) sorted.push_back(&p);
  // By line and column where known; then by path, indexes numerically, a parent before its
  // children; then in the order found.
  auto path_less = [this](const std::string& a, const std::string& b) {
    auto number = [](const std::string& t) {
      return std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; });
    };
    const auto ta = tokens(a);
    const auto tb = tokens(b);
    for (std::size_t i = 0; i < ta.size() && i < tb.size(); ++i) {
      if (ta[i] == tb[i]) continue;
      if (number(ta[i]) && number(tb[i]) && ta[i].size() != tb[i].size())
        return ta[i].size() < tb[i].size();
      return ta[i] < tb[i];
    }
    return ta.size() < tb.size();
  };
  std::stable_sort(sorted.begin(), sorted.end(), [&](const problem* a, const problem* b) {
    if (a->at.line != 0 && b->at.line != 0 &&
        std::tie(a->at.line, a->at.column) != std::tie(b->at.line, b->at.column)) {
      return std::tie(a->at.line, a->at.column) < std::tie(b->at.line, b->at.column);
    }
    if (a->path != b->path) return path_less(a->path, b->path);
    return a->seq < b->seq;
  });
  std::vector<diagnostic> out;
  for (const problem* p : sorted) {
    std::string message = p->message;
    if (p->at.line != 0) {
      message +=
          " (line " + std::to_string(p->at.line) + ", column " + std::to_string(p->at.column) + ")";
    }
    out.push_back(diagnostic{where(p->path), std::move(message)});
  }
  return out;
}

void config_reader::throw_if_any() const {
  if (!problems_.empty()) throw config_errors(diagnostics());
}

std::string config_reader::got(const json& v) const {
  const bool yaml = style_ == path_style::dotted;
  if (v.is_object()) return yaml ? "a mapping" : "an object";
  if (v.is_array()) {
    if (yaml) return v.empty() ? "an empty list" : "a list";
    return v.empty() ? "an empty array" : "an array";
  }
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

std::string config_reader::string_at(const json& v, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  if (style_ == path_style::dotted && v.is_object() && v.size() == 1 &&
      v.begin().value().is_null()) {
    // [--broker, {broker}] is YAML for a mapping: the placeholder needs quotes.
    fail(path, "must be a string, got a mapping; write placeholders in quotes: \"{" +
                   v.begin().key() + "}\"");
  }
  fail(path, "must be a string, got " + got(v));
}

bool config_reader::bool_at(const json& v, const std::string& path) {
  if (!v.is_boolean()) fail(path, "must be true or false, got " + got(v));
  return v.get<bool>();
}

std::int64_t config_reader::integer_at(const json& v, const std::string& path, std::int64_t min,
                                       std::int64_t max) {
  bool in_range = false;
  if (v.is_number_unsigned()) {
    const auto n = v.get<std::uint64_t>();
    in_range = (min <= 0 || n >= static_cast<std::uint64_t>(min)) &&
               (max >= 0 && n <= static_cast<std::uint64_t>(max));
  } else if (v.is_number_integer()) {
    const auto n = v.get<std::int64_t>();
    in_range = n >= min && n <= max;
  }
  if (!in_range) {
    fail(path, "must be an integer from " + std::to_string(min) + " to " + std::to_string(max) +
                   ", got " + got(v));
  }
  return v.get<std::int64_t>();
}

const json& config_reader::require(const json& obj, const std::string& path, std::string_view key,
                                   std::string_view why) {
  const auto it = obj.find(key);
  if (it != obj.end()) return *it;
  // An unknown key close to this one was reported as the likely typo: that is the problem.
  const std::size_t skip = style_ == path_style::dotted && path.empty() ? 0 : 1;
  for (const problem& p : problems_) {
    if (p.path.size() <= path.size() + skip || p.path.compare(0, path.size(), path) != 0 ||
        p.message.rfind("unknown key ", 0) != 0) {
      continue;
    }
    const std::string typo = p.path.substr(path.size() + skip);
    if (typo.find_first_of("/.[") == std::string::npos && closest_word(typo, {key})) {
      throw abandoned{};
    }
  }
  fail(path, "missing required key " + in_quotes(key) + " (" + std::string(why) + ")");
}

bool config_reader::check_keys(const json& obj, const std::string& path,
                               const std::vector<std::string_view>& allowed, std::string_view what,
                               const std::map<std::string_view, std::string_view>& hints) {
  bool all_known = true;
  for (const auto& [key, value] : obj.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) != allowed.end()) continue;
    all_known = false;
    std::string msg = "unknown key " + in_quotes(key) + " in " + std::string(what);
    if (const auto hint = hints.find(key); hint != hints.end()) {
      msg += " (" + std::string(hint->second) + ")";
    } else if (const auto best = closest_word(key, allowed)) {
      msg += " (did you mean " + in_quotes(*best) + "?)";
    }
    std::string names;
    for (std::string_view name : allowed) names += (names.empty() ? "" : ", ") + std::string(name);
    report(child(path, key), msg + "; allowed keys: " + names);
  }
  return all_known;
}

}  // namespace ensemble::common
