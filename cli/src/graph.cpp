#include "ensemble/cli/graph.hpp"

#include <map>
#include <sstream>
#include <vector>

namespace ensemble::cli {

namespace eo = ensemble::orchestrator;
using json = nlohmann::json;

namespace {

// Step names are [A-Za-z0-9_-]; '_' is doubled and '-' becomes "_h", so that distinct names
// ("A-B", "A_B") get distinct ids, and none collides with a "<id>_join" or "<id>_undo" node.
std::string node_id(const std::string& step) {
  std::string id = "s_";
  for (char c : step) {
    if (c == '_') {
      id += "__";
    } else if (c == '-') {
      id += "_h";
    } else {
      id += c;
    }
  }
  return id;
}

// Mermaid labels are quoted; quotes inside become #quot;.
std::string label(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '"') {
      out += "#quot;";
    } else {
      out += c;
    }
  }
  return "\"" + out + "\"";
}

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : sep) + p;
  return out;
}

class emitter {
 public:
  explicit emitter(const json& instance) : instance_(instance) {}

  std::string run(const eo::definition& def) {
    out_ << "flowchart TD\n";
    out_ << "  start((start))\n";
    const std::string last = sequence(def.steps, {"start"}, "");
    out_ << "  finish((end))\n";
    for (const auto& from : split(last)) out_ << "  " << from << " --> finish\n";
    out_ << "  classDef done fill:#d4edda,stroke:#28a745\n"
         << "  classDef failed fill:#f8d7da,stroke:#dc3545\n"
         << "  classDef compensated fill:#fff3cd,stroke:#d39e00\n"
         << "  classDef running fill:#cce5ff,stroke:#004085\n"
         << "  classDef skipped fill:#eeeeee,stroke:#999999,stroke-dasharray: 3 3\n"
         << "  classDef unreached fill:#ffffff,stroke:#cccccc,color:#999999\n";
    for (const auto& [cls, ids] : classes_) {
      out_ << "  class " << join(ids, ",") << " " << cls << "\n";
    }
    return out_.str();
  }

 private:
  // Emits `seq` after the nodes in `from` (edge label `edge` on the first edge); returns the
  // node ids the sequence ends in, joined by ','.
  std::string sequence(const eo::sequence& seq, std::vector<std::string> from,
                       const std::string& edge) {
    std::string first_edge = edge;
    for (const auto& s : seq) {
      const std::string id = node_id(s.name);
      std::vector<std::string> exits{id};
      switch (s.kind) {
        case eo::step_kind::command:
          out_ << "  " << id << "[" << label(s.name + "<br/>" + s.service + "." + s.action)
               << "]\n";
          break;
        case eo::step_kind::publish:
          out_ << "  " << id << ">" << label(s.name + "<br/>publish " + s.event.topic) << "]\n";
          break;
        case eo::step_kind::await:
          out_ << "  " << id << "([" << label(s.name + "<br/>await " + join(s.until, ", "))
               << "])\n";
          break;
        case eo::step_kind::choreography: {
          std::string text = s.name + "<br/>publish " + s.event.topic + "<br/>until " +
                             join(s.until, ", ");
          if (!s.fail_on.empty()) text += "<br/>fails on " + join(s.fail_on, ", ");
          out_ << "  " << id << "[[" << label(text) << "]]\n";
          break;
        }
        case eo::step_kind::wait:
          out_ << "  " << id << "((" << label(s.name + "<br/>wait " +
                                              std::to_string(s.duration.count()) + " ms")
               << "))\n";
          break;
        case eo::step_kind::workflow:
          out_ << "  " << id << "[[" << label(s.name + "<br/>workflow " + s.workflow) << "]]\n";
          break;
        case eo::step_kind::parallel: {
          out_ << "  " << id << "{{" << label(s.name + "<br/>parallel") << "}}\n";
          connect(from, id, first_edge);
          first_edge.clear();
          const std::string join_id = id + "_join";
          std::vector<std::string> ends;
          for (const auto& branch : s.branches) {
            for (const auto& e : split(sequence(branch, {id}, ""))) ends.push_back(e);
          }
          out_ << "  " << join_id << "{{" << label("join") << "}}\n";
          connect(ends, join_id, "");
          style(s.name, id);
          from = {join_id};
          compensation(s, id);
          continue;
        }
        case eo::step_kind::switch_: {
          out_ << "  " << id << "{" << label(s.name) << "}\n";
          connect(from, id, first_edge);
          first_edge.clear();
          std::vector<std::string> ends;
          for (const auto& c : s.cases) {
            for (const auto& e : split(sequence(c.steps, {id}, c.when))) ends.push_back(e);
          }
          if (s.default_steps.empty()) {
            ends.push_back(id);
          } else {
            for (const auto& e : split(sequence(s.default_steps, {id}, "default"))) {
              ends.push_back(e);
            }
          }
          style(s.name, id);
          from = ends;
          compensation(s, id);
          continue;
        }
      }
      connect(from, id, first_edge);
      first_edge.clear();
      style(s.name, id);
      compensation(s, id);
      from = exits;
    }
    return join(from, ",");
  }

  void compensation(const eo::step& s, const std::string& id) {
    if (!s.compensate) return;
    const auto& c = *s.compensate;
    const std::string comp = id + "_undo";
    const std::string text = c.what == eo::compensation::kind::command
                                 ? "undo " + s.name + "<br/>" + c.service + "." + c.action
                                 : "undo " + s.name + "<br/>publish " + c.event.topic;
    out_ << "  " << comp << "[" << label(text) << "]\n";
    out_ << "  " << id << " -.->|compensate| " << comp << "\n";
    if (instance_.is_object()) {
      const std::string st = instance_["steps"].value(s.name, json::object()).value("status", "");
      if (st == "compensated") classes_["compensated"].push_back(comp);
    }
  }

  void connect(const std::vector<std::string>& from, const std::string& to,
               const std::string& edge) {
    for (const auto& f : from) {
      if (edge.empty()) {
        out_ << "  " << f << " --> " << to << "\n";
      } else {
        out_ << "  " << f << " -->|" << label(edge) << "| " << to << "\n";
      }
    }
  }

  void style(const std::string& step, const std::string& id) {
    if (!instance_.is_object()) return;
    const auto& steps = instance_.value("steps", json::object());
    const std::string st =
        steps.contains(step) ? steps[step].value("status", std::string()) : std::string();
    std::string cls = "unreached";
    if (st == "completed") cls = "done";
    if (st == "failed" || st == "compensation_failed") cls = "failed";
    if (st == "compensated") cls = "compensated";
    if (st == "running") cls = "running";
    if (st == "skipped" || st == "cancelled") cls = "skipped";
    classes_[cls].push_back(id);
  }

  static std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    std::string cur;
    for (char c : s) {
      if (c == ',') {
        out.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
  }

  const json& instance_;
  std::ostringstream out_;
  std::map<std::string, std::vector<std::string>> classes_;
};

}  // namespace

std::string mermaid_graph(const eo::definition& def, const json& instance) {
  return emitter(instance).run(def);
}

}  // namespace ensemble::cli
