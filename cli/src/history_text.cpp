#include "history_text.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>

namespace ensemble::cli {

namespace {

const json* find_field(const json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

// A list of topics (or any array) as "a, b"; a single value as its text.
std::string list_text(const json& v) {
  if (!v.is_array()) return v.is_string() ? v.get<std::string>() : v.is_null() ? "" : v.dump();
  std::string out;
  for (const auto& item : v) {
    if (!out.empty()) out += ", ";
    out += item.is_string() ? item.get<std::string>() : item.dump();
  }
  return out;
}

// An error object ({code, message, attempts?}) as "code: message (after N attempt(s))".
std::string error_text(const json& err) {
  if (!err.is_object()) return err.is_null() ? "" : list_text(err);
  std::string s = text_field(err, "code", "error");
  const std::string message = text_field(err, "message");
  if (!message.empty()) s += ": " + message;
  if (const auto attempts = int_field(err, "attempts"); attempts > 0) {
    s += " (after " + std::to_string(attempts) + " attempt(s))";
  }
  return s;
}

std::string step_started(const json& d) {
  const std::string kind = text_field(d, "kind");
  const std::string attempt = "attempt " + std::to_string(int_field(d, "attempt", 1));
  if (kind == "command" || (kind.empty() && find_field(d, "service") != nullptr)) {
    return "(" + text_field(d, "service", "?") + "." + text_field(d, "action", "?") + ", " +
           attempt + ")";
  }
  if (kind == "publish") return "(publish " + text_field(d, "topic", "?") + ")";
  if (kind == "await" || kind == "choreography") {
    std::string s = "(";
    if (kind == "choreography") s += "choreography: publish " + text_field(d, "topic", "?") + ", ";
    s += "await " + list_text(array_field(d, "until"));
    if (const auto& fail_on = array_field(d, "fail_on"); !fail_on.empty()) {
      s += ", fails on " + list_text(fail_on);
    }
    return s + ", " + attempt + ")";
  }
  if (kind == "parallel") return "(parallel)";
  if (kind == "switch") {
    const auto chosen = int_field(d, "case", -1);
    return chosen < 0 ? "(switch: no case holds, default)"
                      : "(switch: case " + std::to_string(chosen + 1) + ")";
  }
  if (kind == "wait") return "(wait " + format_us(int_field(d, "ms") * 1000) + ")";
  if (kind == "workflow") {
    return "(sub-workflow " + text_field(d, "workflow", "?") + ", instance " +
           text_field(d, "child", "?") + ")";
  }
  return kind.empty() ? "" : "(" + kind + ")";
}

}  // namespace

std::string text_field(const json& obj, std::string_view key, std::string_view fallback) {
  const json* v = find_field(obj, key);
  if (v == nullptr || v->is_null()) return std::string(fallback);
  return v->is_string() ? v->get<std::string>() : v->dump();
}

std::int64_t int_field(const json& obj, std::string_view key, std::int64_t fallback) {
  const json* v = find_field(obj, key);
  if (v == nullptr) return fallback;
  if (v->is_number_integer()) return v->get<std::int64_t>();
  if (v->is_number_float()) return static_cast<std::int64_t>(v->get<double>());
  return fallback;
}

const json& object_field(const json& obj, std::string_view key) {
  static const json empty = json::object();
  const json* v = find_field(obj, key);
  return v != nullptr && v->is_object() ? *v : empty;
}

const json& array_field(const json& obj, std::string_view key) {
  static const json empty = json::array();
  const json* v = find_field(obj, key);
  return v != nullptr && v->is_array() ? *v : empty;
}

std::string format_us(std::int64_t us) {
  char buf[32];
  if (us < 1000) {
    std::snprintf(buf, sizeof buf, "%lldus", static_cast<long long>(us));
  } else if (us < 1'000'000) {
    std::snprintf(buf, sizeof buf, "%.1fms", static_cast<double>(us) / 1e3);
  } else if (us < 60'000'000) {
    std::snprintf(buf, sizeof buf, "%.2fs", static_cast<double>(us) / 1e6);
  } else {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(us / 60'000'000),
                  static_cast<long long>(us / 1'000'000 % 60));
  }
  return buf;
}

std::int64_t wall_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string format_due(std::int64_t due_us, std::int64_t now_us) {
  const std::time_t secs = static_cast<std::time_t>(due_us / 1'000'000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%02d:%02d:%02d.%03d UTC", tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>((due_us % 1'000'000) / 1000));
  const std::int64_t delta = due_us - now_us;
  return std::string(buf) +
         (delta >= 0 ? " (in " + format_us(delta) + ")" : " (" + format_us(-delta) + " ago)");
}

std::string describe_entry(const json& e) {
  const std::string kind = text_field(e, "kind", "?");
  const std::string step = text_field(e, "step");
  const json& d = object_field(e, "data");
  std::string line = kind;
  if (!step.empty()) line += " " + step;
  std::string detail;
  if (kind == "started") {
    if (const auto parent = text_field(d, "parent"); !parent.empty()) {
      detail = "(sub-workflow of " + parent + ")";
    }
  } else if (kind == "step_started") {
    detail = step_started(d);
  } else if (kind == "step_completed") {
    std::string by = text_field(d, "worker");
    if (!by.empty()) by = "by " + by;
    if (const auto attempts = int_field(d, "attempts"); attempts > 1) {
      by += (by.empty() ? "after " : ", after ") + std::to_string(attempts) + " attempts";
    }
    if (!by.empty()) detail = "(" + by + ")";
  } else if (kind == "attempt_failed" || kind == "step_failed" ||
             kind == "compensation_attempt_failed" || kind == "compensation_failed") {
    line += ": " + error_text(d);
  } else if (kind == "retry_scheduled") {
    detail = "(attempt " + std::to_string(int_field(d, "attempt")) + " in " +
             std::to_string(int_field(d, "delay_ms")) + " ms)";
  } else if (kind == "event_matched") {
    detail = "(" + text_field(d, "topic", "?") + " from " + text_field(d, "publisher", "?") + ")";
  } else if (kind == "step_skipped") {
    if (const auto target = text_field(d, "goto"); !target.empty())
      detail = "(goto " + target + ")";
  } else if (kind == "compensating") {
    line += ": " + error_text(object_field(d, "reason"));
    const auto& steps = array_field(d, "steps");
    detail = steps.empty() ? "(nothing to compensate)" : "(compensating " + list_text(steps) + ")";
  } else if (kind == "compensation_started") {
    if (find_field(d, "service") != nullptr) {
      const auto attempt = int_field(d, "attempt", 1);
      detail = "(" + text_field(d, "service", "?") + "." + text_field(d, "action", "?") +
               (attempt > 1 ? ", attempt " + std::to_string(attempt) : std::string()) + ")";
    } else {
      detail = "(publish " + text_field(d, "topic", "?") + ")";
    }
  } else if (kind == "compensated") {
    if (const auto worker = text_field(d, "worker"); !worker.empty())
      detail = "(by " + worker + ")";
  } else if (kind == "failed" || kind == "cancelled" || kind == "timed_out") {
    line += ": " + error_text(object_field(d, "error"));
  }
  if (!detail.empty()) line += " " + detail;
  return line;
}

std::string describe_waiting(const json& w, std::int64_t now_us) {
  if (!w.is_object()) return {};
  const std::string phase = text_field(w, "phase");
  const std::string kind = text_field(w, "kind");
  const auto deadline = [&](std::string_view key, std::string_view word) {
    const auto us = int_field(w, key);
    return us > 0 ? ", " + std::string(word) + " " + format_due(us, now_us) : std::string();
  };
  const std::string call = text_field(w, "service", "?") + "." + text_field(w, "action", "?");
  const std::string attempt = "attempt " + std::to_string(int_field(w, "attempt", 1));
  if (phase == "calling") {
    return "waits for the reply of " + call + " (" + attempt + ", request " +
           text_field(w, "request_id", "?") + ")" + deadline("deadline_us", "deadline");
  }
  if (phase == "backoff") {
    return "retry: " + attempt + (kind == "command" ? " of " + call : std::string()) +
           deadline("due_us", "due");
  }
  if (phase == "awaiting") {
    std::string s = "waits for an event on " + list_text(array_field(w, "until"));
    if (const auto& fail_on = array_field(w, "fail_on"); !fail_on.empty()) {
      s += " (fails on " + list_text(fail_on) + ")";
    }
    if (const auto match = text_field(w, "match"); !match.empty()) {
      s += " matching " + match;
    } else {
      s += " with correlation_id " + text_field(w, "correlation_id", "?");
    }
    return s + " (" + attempt + ")" + deadline("deadline_us", "deadline");
  }
  if (phase == "waiting") {
    const auto due = int_field(w, "due_us");
    return due > 0 ? "waits until " + format_due(due, now_us) : "waits";
  }
  if (phase == "publishing") {
    return "publishes " + text_field(w, "topic", "?") + " (event " +
           text_field(w, "event_id", "?") + "), waits for the broker's acknowledgement";
  }
  if (phase == "child") {
    return "waits for sub-workflow " + text_field(w, "workflow", "?") + " instance " +
           text_field(w, "child_id", "?") + deadline("deadline_us", "deadline");
  }
  if (phase == "branches") return "waits for the steps inside it";
  return phase.empty() ? std::string() : "phase " + phase;
}

}  // namespace ensemble::cli
