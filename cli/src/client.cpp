#include "client.hpp"

#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "ensemble/agent/json.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/signals.hpp"
#include "ensemble/orchestrator/definition.hpp"

namespace ensemble::cli {

client::client(const context& ctx, std::chrono::milliseconds start_timeout) : ctx_(ctx) {
  agent::options o;
  o.broker = ctx.broker;
  o.events = ctx.events_endpoint();
  o.key_file = ctx.key_file;
  o.broker_key = ctx.broker_key;
  // A secured broker names the CLI with its key's identity (any other name is refused).
  if (o.key_file.empty()) o.name = "ensemble-cli-" + common::random_id().substr(0, 8);
  o.start_timeout = start_timeout;
  agent_ = std::make_unique<agent::agent>(o);
}

common::status client::start() {
  if (!ctx_.broker_problem.empty()) {
    return common::error{std::string(common::errc::broker_lost), ctx_.broker_problem, false};
  }
  auto s = agent_->start();
  if (!s && s.err().code == common::errc::unauthorized) {
    // The broker answered: it is reachable, and refused this key or this identity.
    const std::string key = ctx_.key_file.empty()
                                ? std::string(
                                      "no key given: --key and --broker-key, or "
                                      "ENSEMBLE_KEY and ENSEMBLE_BROKER_KEY")
                                : "key " + ctx_.key_file + " from " + ctx_.key_source;
    return common::error{s.err().code, s.err().message + "; " + key, false};
  }
  if (!s) {
    std::string where;
    if (ctx_.broker_source.empty()) {
      where =
          "; is it running? Give --broker or ENSEMBLE_BROKER, or run this command in the "
          "directory where `ensemble up` runs (it records its endpoints in .ensemble/up.json)";
    } else if (ctx_.broker_source == "--broker" || ctx_.broker_source == "ENSEMBLE_BROKER") {
      where = " (from " + ctx_.broker_source + "); is it running?";
    } else {
      where = ", recorded in " + ctx_.broker_source +
              " by `ensemble up`; is that deployment still running? (--broker or ENSEMBLE_BROKER "
              "to use another broker)";
    }
    return common::error{
        s.err().code,
        "cannot reach the broker at " + ctx_.broker + " (" + s.err().message + ")" + where, false};
  }
  return s;
}

void exit_on_stop_signal() {
  common::block_stop_signals();
  std::thread([] {
    const sigset_t set = common::stop_signals();
    int sig = 0;
    while (::sigwait(&set, &sig) != 0) {
    }
    std::fflush(stdout);
    std::_Exit(128 + sig);
  }).detach();
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
