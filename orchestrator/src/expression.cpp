// Templates, paths and conditions (expression.hpp, docs/workflows.md "Data").
//
// Everything here runs for every step of every instance, so nothing is compiled or cached:
// templates are scanned and conditions are parsed and evaluated in one pass, references are
// resolved to pointers into the context (no copy of the context, only of the values that end up
// in a result), and failures are results, never exceptions.
#include "ensemble/orchestrator/expression.hpp"

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace ensemble::orchestrator {
namespace {

// ---------------------------------------------------------------------------------------------
// Paths: name ('[' digits ']')* ('.' name ('[' digits ']')*)*

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == ':' || static_cast<unsigned char>(c) >= 0x80;
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Walks the parts of `path`, calling on_key(name) and on_index(n) in order; they return false to
// stop early (the walk then returns an empty problem). Returns what is wrong with the syntax, or
// an empty string.
template <class OnKey, class OnIndex>
std::string walk_path(std::string_view path, OnKey&& on_key, OnIndex&& on_index) {
  if (path.empty()) return "empty reference ${}";
  std::size_t i = 0;
  const std::size_t n = path.size();
  while (true) {
    const std::size_t start = i;
    while (i < n && is_name_char(path[i])) ++i;
    if (i == start) {
      if (i < n) {
        return "unexpected '" + std::string(1, path[i]) + "' at position " + std::to_string(i) +
               " of path '" + std::string(path) + "'";
      }
      return "path '" + std::string(path) + "' ends with '.'";
    }
    if (!on_key(path.substr(start, i - start))) return {};
    while (i < n && path[i] == '[') {
      const std::size_t close = path.find(']', i + 1);
      if (close == std::string_view::npos) {
        return "unclosed '[' in path '" + std::string(path) + "'";
      }
      const std::string_view digits = path.substr(i + 1, close - i - 1);
      std::size_t index = 0;
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
      if (!all_digits(digits) || ec != std::errc() || end != digits.data() + digits.size()) {
        return "index '[" + std::string(digits) + "]' in path '" + std::string(path) +
               "' is not a non-negative integer";
      }
      if (!on_index(index)) return {};
      i = close + 1;
    }
    if (i == n) return {};
    if (path[i] != '.') {
      return "unexpected '" + std::string(1, path[i]) + "' at position " + std::to_string(i) +
             " of path '" + std::string(path) + "'";
    }
    ++i;
  }
}

std::string check_path(std::string_view path) {
  return walk_path(
      path, [](std::string_view) { return true; }, [](std::size_t) { return true; });
}

const json& null_json() {
  static const json k_null;
  return k_null;
}

// The value at `path`, or nullptr when the path leads nowhere or is malformed.
const json* resolve(std::string_view path, const json& context) {
  const json* at = &context;
  const std::string problem = walk_path(
      path,
      [&](std::string_view key) {
        if (at->is_object()) {
          const auto it = at->find(key);
          at = it == at->end() ? nullptr : &*it;
        } else if (at->is_array() && all_digits(key)) {
          std::size_t index = 0;
          std::from_chars(key.data(), key.data() + key.size(), index);
          at = index < at->size() ? &(*at)[index] : nullptr;
        } else {
          at = nullptr;
        }
        return at != nullptr;
      },
      [&](std::size_t index) {
        at = at->is_array() && index < at->size() ? &(*at)[index] : nullptr;
        return at != nullptr;
      });
  return problem.empty() ? at : nullptr;
}

// Records a reference in a check: its path, its root and, for steps.*, the step name.
void record(expression_check& check, std::string_view path) {
  auto add = [](std::vector<std::string>& list, std::string_view v) {
    if (std::find(list.begin(), list.end(), v) == list.end()) list.emplace_back(v);
  };
  add(check.paths, path);
  int segment = 0;
  bool is_steps = false;
  walk_path(
      path,
      [&](std::string_view key) {
        if (segment == 0) {
          add(check.roots, key);
          is_steps = key == "steps";
        } else if (segment == 1 && is_steps) {
          add(check.step_names, key);
        }
        return ++segment < 2;
      },
      [&](std::size_t) { return false; });
}

// ---------------------------------------------------------------------------------------------
// Template strings

// Scans a template string: literal text goes to on_text, each ${path} (trimmed) to on_ref.
// Returns what is wrong, or an empty string.
template <class OnText, class OnRef>
std::string scan_string(std::string_view s, OnText&& on_text, OnRef&& on_ref) {
  std::size_t text_start = 0;
  std::size_t i = 0;
  while (true) {
    i = s.find('$', i);
    if (i == std::string_view::npos) break;
    if (s.compare(i, 3, "$${") == 0) {
      on_text(s.substr(text_start, i - text_start));
      on_text(std::string_view("${"));
      i += 3;
      text_start = i;
    } else if (s.compare(i, 2, "${") == 0) {
      const std::size_t close = s.find('}', i + 2);
      if (close == std::string_view::npos) {
        return "unterminated '${' at position " + std::to_string(i) +
               " (a reference ends with '}'" + "; write '$${' for a literal '${')";
      }
      const std::string_view path = trim(s.substr(i + 2, close - i - 2));
      if (std::string problem = check_path(path); !problem.empty()) return problem;
      on_text(s.substr(text_start, i - text_start));
      on_ref(path);
      i = close + 1;
      text_start = i;
    } else {
      ++i;
    }
  }
  on_text(s.substr(text_start));
  return {};
}

// If `s` is exactly one reference "${path}", its path; otherwise nullopt.
std::optional<std::string_view> whole_reference(std::string_view s) {
  if (s.size() < 3 || s[0] != '$' || s[1] != '{' || s.back() != '}') return std::nullopt;
  if (s.find('}', 2) != s.size() - 1) return std::nullopt;
  return trim(s.substr(2, s.size() - 3));
}

void append_text(std::string& out, const json& value) {
  if (value.is_string()) {
    out += value.get_ref<const std::string&>();
  } else if (!value.is_null()) {
    out += value.dump(-1, ' ', false, json::error_handler_t::replace);
  }
}

std::string render_string(const std::string& s, const json& context, json& out) {
  if (s.find('$') == std::string::npos) {
    out = s;
    return {};
  }
  if (const auto path = whole_reference(s)) {
    if (std::string problem = check_path(*path); !problem.empty()) return problem;
    const json* value = resolve(*path, context);
    out = value ? *value : json();
    return {};
  }
  std::string text;
  text.reserve(s.size() + 16);
  std::string problem = scan_string(
      s, [&](std::string_view part) { text.append(part); },
      [&](std::string_view path) {
        if (const json* value = resolve(path, context)) append_text(text, *value);
      });
  if (!problem.empty()) return problem;
  out = std::move(text);
  return {};
}

// Renders `tmpl` into `out`; on failure returns the problem and sets `bad` to the string.
std::string render_into(const json& tmpl, const json& context, json& out, const std::string*& bad) {
  switch (tmpl.type()) {
    case json::value_t::string: {
      const auto& s = tmpl.get_ref<const std::string&>();
      std::string problem = render_string(s, context, out);
      if (!problem.empty()) bad = &s;
      return problem;
    }
    case json::value_t::object: {
      out = json::object();
      for (const auto& [key, value] : tmpl.items()) {
        std::string problem = render_into(value, context, out[key], bad);
        if (!problem.empty()) return problem;
      }
      return {};
    }
    case json::value_t::array: {
      out = json::array();
      out.get_ref<json::array_t&>().reserve(tmpl.size());
      for (const auto& value : tmpl) {
        out.push_back(json());
        std::string problem = render_into(value, context, out.back(), bad);
        if (!problem.empty()) return problem;
      }
      return {};
    }
    default:
      out = tmpl;
      return {};
  }
}

void check_template_into(const json& tmpl, expression_check& check) {
  if (!check.problem.empty()) return;
  if (tmpl.is_string()) {
    const auto& s = tmpl.get_ref<const std::string&>();
    std::string problem = scan_string(
        s, [](std::string_view) {}, [&](std::string_view path) { record(check, path); });
    if (!problem.empty()) check.problem = "in \"" + s + "\": " + problem;
  } else if (tmpl.is_structured()) {
    for (const auto& value : tmpl) check_template_into(value, check);
  }
}

// ---------------------------------------------------------------------------------------------
// Conditions: a one-pass recursive-descent evaluator.
//
//   or   := and ('||' and)*
//   and  := not ('&&' not)*
//   not  := '!' not | cmp             ('!' applies to a whole comparison: !a == b is !(a == b))
//   cmp  := operand (('=='|'!='|'<'|'<='|'>'|'>=') operand)?
//   operand := '(' or ')' | ${path} | number | 'string' | "string" | true | false | null
//
// When `live` is false the parser only checks syntax (the right side of a short-circuited && or
// ||, and check_condition): nothing is resolved and no type error is raised.

bool truthy(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
    case json::value_t::discarded:
      return false;
    case json::value_t::boolean:
      return v.get<bool>();
    case json::value_t::number_integer:
      return v.get<std::int64_t>() != 0;
    case json::value_t::number_unsigned:
      return v.get<std::uint64_t>() != 0;
    case json::value_t::number_float:
      return v.get<double>() != 0.0;
    case json::value_t::string:
      return !v.get_ref<const std::string&>().empty();
    default:
      return !v.empty();  // array, object, binary
  }
}

std::string_view type_name(const json& v) {
  if (v.is_number()) return "number";
  return v.type_name();
}

std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return std::string(type_name(v)) + " " + s;
}

// An operand: a pointer into the context, or a value of its own (literals, results).
struct value {
  const json* ref = nullptr;
  json own;
  const json& get() const { return ref ? *ref : own; }
};

value of_bool(bool b) {
  return value{nullptr, json(b)};
}

enum class cmp_op { none, eq, ne, lt, le, gt, ge };

std::string_view op_text(cmp_op op) {
  switch (op) {
    case cmp_op::eq:
      return "==";
    case cmp_op::ne:
      return "!=";
    case cmp_op::lt:
      return "<";
    case cmp_op::le:
      return "<=";
    case cmp_op::gt:
      return ">";
    case cmp_op::ge:
      return ">=";
    default:
      return "";
  }
}

class condition_parser {
 public:
  condition_parser(std::string_view src, const json* context, expression_check* check)
      : src_(src), context_(context), check_(check) {}

  // Parses (and, with a context, evaluates) the whole condition.
  value run() {
    value v = parse_or(context_ != nullptr);
    if (!failed()) {
      skip_space();
      if (pos_ < src_.size()) {
        const std::string_view rest = src_.substr(pos_);
        if (peek_cmp() != cmp_op::none) {
          fail("comparisons cannot be chained; combine them with && or ||");
        } else if (rest.starts_with("=")) {
          fail("'=' is not an operator; compare with ==");
        } else if (rest.starts_with("&") || rest.starts_with("|")) {
          fail("'" + std::string(1, rest[0]) + "' is not an operator; use && or ||");
        } else {
          fail("unexpected " + describe_here() + " after a complete expression");
        }
      }
    }
    return v;
  }

  bool failed() const { return !problem_.empty(); }
  const std::string& problem() const { return problem_; }

 private:
  void fail(std::string what) {
    if (problem_.empty()) problem_ = "at position " + std::to_string(pos_) + ": " + std::move(what);
  }

  void skip_space() {
    while (pos_ < src_.size() && is_space(src_[pos_])) ++pos_;
  }

  bool accept(std::string_view token) {
    skip_space();
    if (src_.compare(pos_, token.size(), token) != 0) return false;
    pos_ += token.size();
    return true;
  }

  std::string describe_here() const {
    if (pos_ >= src_.size()) return "end of condition";
    std::size_t end = pos_ + 1;
    while (end < src_.size() && end - pos_ < 12 && !is_space(src_[end])) ++end;
    return "'" + std::string(src_.substr(pos_, end - pos_)) + "'";
  }

  // The comparison operator at the cursor, without consuming it.
  cmp_op peek_cmp() {
    skip_space();
    const std::string_view rest = src_.substr(pos_);
    if (rest.starts_with("==")) return cmp_op::eq;
    if (rest.starts_with("!=")) return cmp_op::ne;
    if (rest.starts_with("<=")) return cmp_op::le;
    if (rest.starts_with(">=")) return cmp_op::ge;
    if (rest.starts_with("<")) return cmp_op::lt;
    if (rest.starts_with(">")) return cmp_op::gt;
    return cmp_op::none;
  }

  value parse_or(bool live) {
    value left = parse_and(live);
    while (!failed() && accept("||")) {
      const bool left_true = live && truthy(left.get());
      value right = parse_and(live && !left_true);
      if (failed()) break;
      if (live) left = of_bool(left_true || truthy(right.get()));
    }
    return left;
  }

  value parse_and(bool live) {
    value left = parse_not(live);
    while (!failed() && accept("&&")) {
      const bool left_true = live && truthy(left.get());
      value right = parse_not(live && left_true);
      if (failed()) break;
      if (live) left = of_bool(left_true && truthy(right.get()));
    }
    return left;
  }

  value parse_not(bool live) {
    skip_space();
    if (pos_ < src_.size() && src_[pos_] == '!' && src_.compare(pos_, 2, "!=") != 0) {
      ++pos_;
      value inner = parse_not(live);
      if (failed() || !live) return {};
      return of_bool(!truthy(inner.get()));
    }
    return parse_cmp(live);
  }

  value parse_cmp(bool live) {
    value left = parse_operand(live);
    if (failed()) return left;
    const cmp_op op = peek_cmp();
    if (op == cmp_op::none) return left;
    pos_ += op_text(op).size();
    value right = parse_operand(live);
    if (failed() || !live) return {};
    return compare(left.get(), op, right.get());
  }

  value compare(const json& a, cmp_op op, const json& b) {
    switch (op) {
      case cmp_op::eq:
        return of_bool(a == b);
      case cmp_op::ne:
        return of_bool(!(a == b));
      default:
        break;
    }
    const bool comparable = (a.is_number() && b.is_number()) || (a.is_string() && b.is_string());
    if (!comparable) {
      fail("cannot compare " + show(a) + " with " + show(b) + " using " + std::string(op_text(op)) +
           " (only numbers with numbers, or strings with strings)");
      return {};
    }
    switch (op) {
      case cmp_op::lt:
        return of_bool(a < b);
      case cmp_op::le:
        return of_bool(a <= b);
      case cmp_op::gt:
        return of_bool(a > b);
      default:
        return of_bool(a >= b);
    }
  }

  value parse_operand(bool live) {
    skip_space();
    if (pos_ >= src_.size()) {
      fail("expected a value, got the end of the condition");
      return {};
    }
    const char c = src_[pos_];
    if (c == '(') {
      ++pos_;
      value inner = parse_or(live);
      if (failed()) return {};
      if (!accept(")")) {
        fail("expected ')', got " + describe_here());
        return {};
      }
      return inner;
    }
    if (c == '$') return parse_reference(live);
    if (c == '\'' || c == '"') return parse_string(c);
    if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.') return parse_number();
    if (is_name_char(c)) {
      std::size_t end = pos_;
      while (end < src_.size() && is_name_char(src_[end])) ++end;
      const std::string_view word = src_.substr(pos_, end - pos_);
      if (word == "true" || word == "false" || word == "null") {
        pos_ = end;
        if (word == "null") return {};
        return of_bool(word == "true");
      }
      fail("unexpected '" + std::string(word) +
           "': a value is ${path}, a number, a quoted string, true, false or null");
      return {};
    }
    fail("expected a value, got " + describe_here());
    return {};
  }

  value parse_reference(bool live) {
    if (src_.compare(pos_, 2, "${") != 0) {
      fail("expected '${' to start a reference, got " + describe_here());
      return {};
    }
    const std::size_t close = src_.find('}', pos_ + 2);
    if (close == std::string_view::npos) {
      fail("unterminated '${' (a reference ends with '}')");
      return {};
    }
    const std::string_view path = trim(src_.substr(pos_ + 2, close - pos_ - 2));
    if (std::string problem = check_path(path); !problem.empty()) {
      fail(std::move(problem));
      return {};
    }
    pos_ = close + 1;
    if (check_) record(*check_, path);
    if (!live) return {};
    const json* found = resolve(path, *context_);
    return value{found ? found : &null_json(), {}};
  }

  value parse_string(char quote) {
    const std::size_t start = pos_++;
    std::string text;
    while (pos_ < src_.size() && src_[pos_] != quote) {
      if (src_[pos_] == '\\' && pos_ + 1 < src_.size()) ++pos_;
      text += src_[pos_++];
    }
    if (pos_ >= src_.size()) {
      pos_ = start;
      fail(std::string("unterminated string (missing closing ") + quote + ")");
      return {};
    }
    ++pos_;
    return value{nullptr, json(std::move(text))};
  }

  value parse_number() {
    const std::size_t start = pos_;
    std::size_t end = pos_;
    if (src_[end] == '-' || src_[end] == '+') ++end;
    bool is_float = false;
    while (end < src_.size()) {
      const char c = src_[end];
      if (c >= '0' && c <= '9') {
        ++end;
      } else if (c == '.' || c == 'e' || c == 'E') {
        is_float = true;
        ++end;
        if ((c == 'e' || c == 'E') && end < src_.size() && (src_[end] == '-' || src_[end] == '+')) {
          ++end;
        }
      } else {
        break;
      }
    }
    std::string_view text = src_.substr(start, end - start);
    if (!text.empty() && text.front() == '+') text.remove_prefix(1);
    value v;
    bool ok = false;
    if (!is_float) {
      std::int64_t n = 0;
      const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
      ok = ec == std::errc() && p == text.data() + text.size();
      if (ok) v.own = n;
    }
    if (!ok) {
      double d = 0;
      const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), d);
      ok = ec == std::errc() && p == text.data() + text.size();
      if (ok) v.own = d;
    }
    if (!ok) {
      fail("'" + std::string(src_.substr(start, end - start)) + "' is not a number");
      return {};
    }
    pos_ = end;
    return v;
  }

  std::string_view src_;
  const json* context_;
  expression_check* check_;
  std::size_t pos_ = 0;
  std::string problem_;
};

common::error bad_request(std::string message) {
  return common::error{std::string(common::errc::bad_request), std::move(message), false};
}

}  // namespace

common::result<json> render(const json& tmpl, const json& context) {
  json out;
  const std::string* bad = nullptr;
  std::string problem = render_into(tmpl, context, out, bad);
  if (!problem.empty()) {
    return bad_request("template \"" + (bad ? *bad : std::string()) + "\": " + problem);
  }
  return out;
}

common::result<bool> evaluate(std::string_view condition, const json& context) {
  if (trim(condition).empty()) return bad_request("condition is empty");
  condition_parser parser(condition, &context, nullptr);
  const value v = parser.run();
  if (parser.failed()) {
    return bad_request("condition \"" + std::string(condition) + "\": " + parser.problem());
  }
  return truthy(v.get());
}

json lookup(std::string_view path, const json& context) {
  const json* found = resolve(trim(path), context);
  return found ? *found : json();
}

expression_check check_template(const json& tmpl) {
  expression_check check;
  check_template_into(tmpl, check);
  return check;
}

expression_check check_condition(std::string_view condition) {
  expression_check check;
  if (trim(condition).empty()) {
    check.problem = "condition is empty";
    return check;
  }
  condition_parser parser(condition, nullptr, &check);
  (void)parser.run();
  if (parser.failed()) check.problem = parser.problem();
  return check;
}

}  // namespace ensemble::orchestrator
