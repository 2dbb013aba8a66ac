// A secured deployment (docs/deployments.md, "Security"): keys for every process, and the
// broker's auth file derived from what the deployment declares.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "ensemble/cli/deployment.hpp"
#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/definition.hpp"

namespace ensemble::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

void add_unique(std::vector<std::string>& to, const std::string& item) {
  if (std::find(to.begin(), to.end(), item) == to.end()) to.push_back(item);
}

// The fixed part of a topic template: `order.${x}` -> `order.`; a template that is not a plain
// string (computed) allows every topic.
std::string topic_prefix(const json& topic) {
  if (!topic.is_string()) return {};
  const auto text = topic.get<std::string>();
  return text.substr(0, text.find("${"));
}

void add_publishes(rights& r, const std::vector<publish_spec>& list) {
  for (const auto& p : list) add_unique(r.publish, topic_prefix(p.topic));
}

void add_failure_publishes(rights& r, const std::vector<fail_rule>& rules) {
  for (const auto& f : rules) add_publishes(r, f.publish);
}

rights scriptable_rights(const agent_spec& spec) {
  rights r;
  for (const auto& s : spec.services) {
    add_unique(r.offer, s.name);
    for (const auto& a : s.actions) {
      add_publishes(r, a.publish);
      add_failure_publishes(r, a.fail);
    }
  }
  for (const auto& reaction : spec.reactions) {
    for (const auto& topic : reaction.on) add_unique(r.subscribe, topic);
    add_publishes(r, reaction.publish);
    add_failure_publishes(r, reaction.fail);
  }
  if (spec.consume) add_unique(r.consume, spec.consume->stream);
  return r;
}

void add_sequence(rights& r, const orchestrator::sequence& steps);

void add_step(rights& r, const orchestrator::step& s) {
  using orchestrator::step_kind;
  switch (s.kind) {
    case step_kind::command:
      add_unique(r.call, s.service + "." + s.action);
      break;
    case step_kind::publish:
      add_unique(r.publish, s.event.topic);
      break;
    case step_kind::choreography:
      add_unique(r.publish, s.event.topic);
      break;
    case step_kind::parallel:
      for (const auto& branch : s.branches) add_sequence(r, branch);
      break;
    case step_kind::switch_:
      for (const auto& c : s.cases) add_sequence(r, c.steps);
      add_sequence(r, s.default_steps);
      break;
    case step_kind::await:
    case step_kind::wait:
    case step_kind::workflow:  // the child's own steps are in its definition
      break;
  }
  if (s.compensate) {
    if (s.compensate->what == orchestrator::compensation::kind::command) {
      add_unique(r.call, s.compensate->service + "." + s.compensate->action);
    } else {
      add_unique(r.publish, s.compensate->event.topic);
    }
  }
}

void add_sequence(rights& r, const orchestrator::sequence& steps) {
  for (const auto& s : steps) add_step(r, s);
}

// What the orchestrator's workflows need and nothing more: serve `orchestrator`; call the
// commands of their steps and compensations; publish the events their steps and compensations
// publish and their lifecycle events (`workflow.<name>.`); receive the topics they await or are
// triggered by. It consumes any stream (which streams hold its topics is known only at the
// broker, and streams can be added while it runs) and uses the broker actions of its catch-up
// and of its durable consumers.
rights orchestrator_rights(const orchestrator_section& section) {
  rights r{
      .offer = {"orchestrator"},
      .call = {},
      .call_own = {},
      .publish = {},
      .subscribe = {},
      .consume = {"*"},
      .admin = {"trace", "streams", "stream_info", "consumers", "consumer_info", "consumer_add"}};
  for (const auto& def : orchestrator::load_definitions(section.workflows)) {
    add_sequence(r, def.steps);
    add_unique(r.publish, "workflow." + def.name + ".");
    for (const auto& topic : def.listened_topics()) add_unique(r.subscribe, topic);
  }
  return r;
}

rights everything() {
  return rights{.offer = {"*"},
                .call = {"*"},
                .call_own = {},
                .publish = {""},
                .subscribe = {""},
                .consume = {"*"},
                .admin = {"*"}};
}

json to_json(const rights& r) {
  json out = json::object();
  auto put = [&out](const char* key, const std::vector<std::string>& list) {
    if (!list.empty()) out[key] = list;
  };
  put("offer", r.offer);
  put("call", r.call);
  put("call_own", r.call_own);
  put("publish", r.publish);
  put("subscribe", r.subscribe);
  put("consume", r.consume);
  put("admin", r.admin);
  return out;
}

// The identity's key pair in `dir`: reused when its secret file is there, generated otherwise.
std::string ensure_keys(const std::string& dir, const std::string& name) {
  const auto secret = (fs::path(dir) / (name + ".key_secret")).string();
  std::error_code ec;
  if (fs::exists(secret, ec)) {
    (void)common::read_curve_key_file(secret, "security.keys", true);  // readable and sound
    return secret;
  }
  auto keys = common::generate_curve_keys();
  keys.name = name;
  return common::write_curve_key_files(dir, name, keys, true).secret_file;
}

}  // namespace

bool rights::empty() const {
  return offer.empty() && call.empty() && call_own.empty() && publish.empty() &&
         subscribe.empty() && consume.empty() && admin.empty();
}

void rights::merge(const rights& more) {
  for (const auto& x : more.offer) add_unique(offer, x);
  for (const auto& x : more.call) add_unique(call, x);
  for (const auto& x : more.call_own) add_unique(call_own, x);
  for (const auto& x : more.publish) add_unique(publish, x);
  for (const auto& x : more.subscribe) add_unique(subscribe, x);
  for (const auto& x : more.consume) add_unique(consume, x);
  for (const auto& x : more.admin) add_unique(admin, x);
}

std::map<std::string, rights> derive_rights(const deployment& d,
                                            const std::vector<planned_process>& plan) {
  std::map<std::string, rights> out;
  std::map<std::string, agent_spec> specs;  // loaded once per spec file
  for (const auto& p : plan) {
    switch (p.kind) {
      case process_role::broker:
        break;
      case process_role::orchestrator:
        out[p.name].merge(orchestrator_rights(*static_cast<const orchestrator_section*>(p.spec)));
        break;
      case process_role::agent: {
        const auto* section = static_cast<const agent_section*>(p.spec);
        rights r;
        for (const auto& s : p.services) add_unique(r.offer, s);
        if (!section->spec.empty()) {
          auto it = specs.find(section->spec);
          if (it == specs.end())
            it = specs.emplace(section->spec, load_agent_spec(section->spec)).first;
          r.merge(scriptable_rights(it->second));
        }
        r.merge(section->rights);
        out[p.name].merge(r);
        break;
      }
    }
  }
  out[std::string(user_identity)] = everything();
  for (const auto& [name, r] : d.security.identities) out[name].merge(r);
  return out;
}

void prepare_security(deployment& d, const std::vector<planned_process>& plan) {
  if (d.security.kind != security_section::mode::curve) return;
  const auto& dir = d.security.keys_dir;
  const auto all = derive_rights(d, plan);
  security_files files;
  files.broker_secret = ensure_keys(dir, "broker");
  files.broker_public = (fs::path(dir) / "broker.key").string();
  json identities = json::object();
  for (const auto& [name, r] : all) {
    files.secret_files[name] = ensure_keys(dir, name);
    json entry = to_json(r);
    entry["keys"] = json::array({name + ".key"});
    identities[name] = std::move(entry);
  }
  files.auth_file = (fs::path(dir) / "auth.json").string();
  const auto tmp = files.auth_file + ".tmp";
  // Rewritten at each start: it follows the deployment file.
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << json{{"identities", identities}}.dump(2) << "\n";
    out.close();
    if (!out) throw common::config_error(tmp, "cannot write the broker's auth file");
  }
  std::error_code ec;
  fs::rename(tmp, files.auth_file, ec);
  if (ec) throw common::config_error(files.auth_file, "cannot be written: " + ec.message());
  d.keys = std::move(files);
}

}  // namespace ensemble::cli
