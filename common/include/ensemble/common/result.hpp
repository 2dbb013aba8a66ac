#pragma once
// Result types for the message loops.
//
// Start-up and configuration code may throw (see config_error); everything that runs per
// message returns a result instead, so that one bad frame is counted, logged and answered
// without unwinding the loop that serves everybody else. `error` is also what travels on the
// wire in a REPLY: a code from errc (or an application's own), a human message, and whether
// the caller may retry.

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace ensemble::common {

// Error codes defined by the protocol (docs/protocol.md, "Error codes").
namespace errc {
inline constexpr std::string_view no_such_service = "no_such_service";
inline constexpr std::string_view deadline_exceeded = "deadline_exceeded";
inline constexpr std::string_view worker_lost = "worker_lost";
inline constexpr std::string_view bad_request = "bad_request";
inline constexpr std::string_view too_large = "too_large";
inline constexpr std::string_view queue_full = "queue_full";
inline constexpr std::string_view shutting_down = "shutting_down";
inline constexpr std::string_view unauthorized = "unauthorized";
inline constexpr std::string_view not_registered = "not_registered";
inline constexpr std::string_view unknown_action = "unknown_action";
// Raised by the SDK itself, never sent by the broker.
inline constexpr std::string_view broker_lost = "broker_lost";
inline constexpr std::string_view handler_failed = "handler_failed";
}  // namespace errc

struct error {
  std::string code;
  std::string message;
  bool retryable = false;

  // The broker errors a caller may safely retry (the request may not have run, or may be
  // re-run idempotently): the default policy of the SDK and the orchestrator.
  static bool retryable_by_default(std::string_view code) {
    return code == errc::no_such_service || code == errc::worker_lost ||
           code == errc::deadline_exceeded || code == errc::queue_full ||
           code == errc::shutting_down || code == errc::broker_lost;
  }
  static error make(std::string_view code, std::string message) {
    return error{std::string(code), std::move(message), retryable_by_default(code)};
  }
  std::string to_string() const { return code + ": " + message; }
};

// A value or an error. Small on purpose: the subset of std::expected that the code needs.
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : v_(std::move(value)) {}                // NOLINT(google-explicit-constructor)
  result(error err) : v_(std::in_place_index<1>, std::move(err)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  const error& err() const { return std::get<1>(v_); }
  error& err() { return std::get<1>(v_); }

 private:
  std::variant<T, error> v_;
};

struct ok_t {};
using status = result<ok_t>;
inline status ok_status() { return ok_t{}; }

// Thrown only at start-up and configuration time. `where` names the file, option or JSON path.
class config_error : public std::runtime_error {
 public:
  config_error(std::string where, const std::string& what)
      : std::runtime_error(where.empty() ? what : where + ": " + what), where_(std::move(where)) {}
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

}  // namespace ensemble::common
