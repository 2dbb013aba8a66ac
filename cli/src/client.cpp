#include "client.hpp"

#include <fstream>
#include <iostream>
#include <sstream>

#include "ensemble/agent/json.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/orchestrator/definition.hpp"

namespace ensemble::cli {

client::client(const context& ctx, std::chrono::milliseconds start_timeout)
    : endpoint_(ctx.broker) {
  agent::options o;
  o.name = "ensemble-cli-" + common::random_id().substr(0, 8);
  o.broker = ctx.broker;
  o.events = ctx.events_endpoint();
  o.start_timeout = start_timeout;
  agent_ = std::make_unique<agent::agent>(o);
}

common::status client::start() {
  auto s = agent_->start();
  if (!s) {
    return common::error{s.err().code,
                         "cannot reach the broker at " + endpoint_ + " (" + s.err().message +
                             "); is it running? (--broker or ENSEMBLE_BROKER)",
                         false};
  }
  return s;
}

common::result<json> client::call(const std::string& service, const std::string& action,
                                  const json& args, std::chrono::milliseconds deadline,
                                  bool retryable) {
  agent::send_options opts;
  opts.retryable = retryable;
  auto r = agent_->call(service, action, agent::to_json_payload(args), deadline, opts);
  if (!r) return r.err();
  return agent::from_json_payload(r->payload());
}

int report(const std::string& what, const common::error& e) {
  std::cerr << "ensemble: " << what << ": " << e.code << ": " << e.message << "\n";
  return 1;
}

json parse_json_arg(const std::string& what, const std::string& text) {
  std::string body = text;
  std::string where = what;
  if (!text.empty() && text[0] == '@') {
    std::ifstream in(text.substr(1));
    if (!in) throw common::config_error(what, "cannot read file " + text.substr(1));
    std::stringstream ss;
    ss << in.rdbuf();
    body = ss.str();
    where = what + " (" + text.substr(1) + ")";
  }
  try {
    return json::parse(body);
  } catch (const json::parse_error& e) {
    throw common::config_error(where, std::string("not valid JSON: ") + e.what());
  }
}

std::chrono::milliseconds parse_duration_arg(const std::string& option, const std::string& text) {
  json value = text;
  if (!text.empty() && std::all_of(text.begin(), text.end(), ::isdigit)) value = std::stoll(text);
  auto d = orchestrator::parse_duration(value);
  if (!d) {
    throw CLI::ValidationError(option, "\"" + text + "\" is not a duration (e.g. 500ms, 2s, 1m)");
  }
  return *d;
}

}  // namespace ensemble::cli
