#pragma once
// Who may do what in secured mode (docs/protocol.md section 12): the auth file's identities,
// the public keys that authenticate as each, and the rights decisions the broker asks for on
// every HELLO, REQUEST, PUBLISH, CONSUME and subscription.
//
// Like the registry, this is policy without I/O: the broker loop looks the sender's identity up
// (by the name libzmq's ZAP handshake attached to the connection), asks check_*() and does what
// the verdict says; tests drive it directly. Default deny: what no right grants is refused,
// except what every identity may do (broker.ping, the SDK's `_ensemble.sync.` probe topics,
// HELLO/HEARTBEAT/BYE).
//
// load_auth_file() is start-up (and SIGHUP) code: it throws common::config_error naming the
// file, the path in it, the line and the rule that is broken. diff() tells a reload what it
// has to undo: the identities whose rights changed and the keys that no longer authenticate as
// the identity they did.

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ensemble::broker::auth {

enum class right { offer, call, call_own, publish, subscribe, consume, admin, name };
inline constexpr std::size_t k_rights = 8;
std::string_view right_name(right r);

// One entry of the auth file.
struct identity {
  std::string name;
  std::vector<std::string> keys;  // Z85 public keys, 40 characters each
  std::vector<std::string> offer, call, call_own, publish, subscribe, consume, admin;

  // Same rights (keys aside): a reload leaves the identity's connections alone.
  bool same_rights(const identity& o) const {
    return offer == o.offer && call == o.call && call_own == o.call_own && publish == o.publish &&
           subscribe == o.subscribe && consume == o.consume && admin == o.admin;
  }
};

enum class verdict {
  allowed,
  allowed_own,  // call only: by a call_own right; the worker acts on what the caller owns
  refused,
};

// The identities of one auth file, looked up by key (the ZAP handshake) and by name (every
// message: libzmq hands the name back as the connection's User-Id).
class table {
 public:
  table() = default;
  explicit table(std::vector<identity> identities);

  const identity* by_key(std::string_view z85_key) const;
  const identity* by_name(std::string_view name) const;
  const std::vector<identity>& identities() const { return identities_; }

 private:
  struct hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::vector<identity> identities_;
  std::unordered_map<std::string, std::size_t, hash, std::equal_to<>> by_key_;
  std::unordered_map<std::string, std::size_t, hash, std::equal_to<>> by_name_;
};

// Reads an auth file (YAML or JSON). Keys given as certificate files are read relative to the
// file's directory. Throws common::config_error: "<file>: identities.payments.offer[1]: <what>
// (line 7)".
table load_auth_file(const std::string& path);

// `*` in `pattern` matches any run of characters (also none); everything else matches itself.
bool glob_match(std::string_view pattern, std::string_view text);

// The decisions. A null identity (a connection whose identity a reload removed, before the
// broker closed it) has no rights but the ones every identity has.
verdict check_offer(const identity* who, std::string_view service);
// A REQUEST to `service`.`action`; to the broker's own service this is check_admin().
verdict check_call(const identity* who, std::string_view service, std::string_view action);
verdict check_admin(const identity* who, std::string_view action);
verdict check_publish(const identity* who, std::string_view topic);
// A subscription to prefix P is allowed when P starts with one of the identity's prefixes.
verdict check_subscribe(const identity* who, std::string_view prefix);
verdict check_consume(const identity* who, std::string_view stream);

// What the refusal says: "identity 'rogue' has no 'offer' right for service 'PaymentService'".
std::string refusal_message(std::string_view identity, right r, std::string_view what);

// What a reload changes for connections made under `before`.
struct table_diff {
  // Identities whose rights changed or that are gone: their peers are unregistered.
  std::vector<std::string> changed;
  // Of those, the ones whose `subscribe` right changed: their events connections are closed.
  std::vector<std::string> subscribe_changed;
  // Keys no longer listed, or listed under another identity now: their connections are
  // closed (a reconnection goes through the handshake again).
  std::vector<std::string> closed_keys;
};
table_diff diff(const table& before, const table& after);

// Refusals are logged at warning, but a peer that floods refused messages must not fill the
// disk: per identity, the first k_lines_per_second lines of each second are logged; the rest
// are counted, and the count is reported with the next line that is logged.
class refusal_log_limiter {
 public:
  static constexpr std::uint32_t k_lines_per_second = 10;
  // Whether to log this refusal; `suppressed` is set to how many of this identity's refusals
  // went unlogged since its last logged line.
  bool admit(std::string_view identity, std::chrono::steady_clock::time_point now,
             std::uint64_t& suppressed);

 private:
  struct window {
    std::chrono::steady_clock::time_point start;
    std::uint32_t logged = 0;
    std::uint64_t suppressed = 0;
  };
  std::map<std::string, window, std::less<>> windows_;
};

}  // namespace ensemble::broker::auth
