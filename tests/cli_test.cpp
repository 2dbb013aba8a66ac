// The `ensemble` CLI against real processes: a broker, the orchestrator, the example C++ agent
// (ensemble-example-order) and scriptable agents (`ensemble agent`), all started here on
// ephemeral ports. Covers each example end to end (examples/order-processing,
// examples/order-fulfillment, examples/cart), `trace` of the mixed example (the choreographed
// hops, the compensation), `graph` (golden files, Mermaid structure, styling by instance),
// `services`, `cancel`, and the errors: bad input, unknown workflow or service, no broker.
//
// Golden files: tests/golden/*.mmd hold the expected `ensemble graph` output. After an
// intended change of the graph's shape, rewrite them with
//   UPDATE_GOLDEN=1 build/bin/cli_test --gtest_filter='cli_graph.*'
// and review the diff; without UPDATE_GOLDEN the tests compare and fail on any difference.
//
// The `ensemble up` launcher is tested in cli_up_test.cpp.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/cli/deployment.hpp"
#include "ensemble/cli/graph.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

// Generous: machines are shared and noisy. Nothing here asserts on timing.
constexpr auto k_deadline = 30s;
// A client that cannot reach a broker gives up after 5 s; it must be done well within this.
constexpr auto k_no_broker_deadline = 20s;

const std::string k_examples = ENSEMBLE_SOURCE_DIR "/examples";
const std::string k_golden = ENSEMBLE_SOURCE_DIR "/tests/golden";
const std::string k_order_processing = k_examples + "/order-processing/workflows";
const std::string k_order_fulfillment = k_examples + "/order-fulfillment/workflows";

std::chrono::milliseconds left(steady::time_point until) {
  return std::chrono::ceil<std::chrono::milliseconds>(
      std::max(until - steady::now(), steady::duration::zero()));
}

// ---------------------------------------------------------------------------------------------
// Running the CLI

using ensemble::test::finish;
using ensemble::test::outcome;

std::unique_ptr<tk::process> spawn_cli(std::vector<std::string> args,
                                       std::map<std::string, std::string> env = {}) {
  return tk::process::spawn(
      {tk::binary_path("ensemble"), std::move(args), std::move(env), {}, "ensemble"});
}

outcome run_cli(std::vector<std::string> args, std::chrono::milliseconds deadline = k_deadline,
                std::map<std::string, std::string> env = {}) {
  auto p = spawn_cli(std::move(args), std::move(env));
  return finish(*p, deadline);
}

// "started ID (Workflow vN)" -> ID
std::string instance_id(const outcome& o) {
  static const std::regex started(R"(^started (\S+) \()");
  for (const auto& l : o.lines) {
    std::smatch m;
    if (std::regex_search(l, m, started)) return m[1];
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// A deployment of real processes

class temp_dir {
 public:
  temp_dir() {
    std::string pattern = (fs::temp_directory_path() / "ensemble-cli-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~temp_dir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::string write(const std::string& name, const std::string& text) const {
    const auto p = path_ / name;
    std::ofstream(p) << text;
    return p.string();
  }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

// A broker on ephemeral ports, and whatever a test adds to it. Processes stop (SIGKILL) in
// reverse order of start, the broker last.
class deployment {
 public:
  // With stream storage (in its own temporary directory) but no stream: the fulfilment
  // example declares its streams at run time, as its deployment file does for `up`.
  deployment()
      : broker_(tk::broker_process::start({"--log-level", "warn", "--data", data_.path()})) {}

  const std::string& router() const { return broker_->router(); }
  const std::string& events() const { return broker_->events(); }

  // The CLI's global options for this broker, then `args`.
  std::vector<std::string> cli(std::vector<std::string> args) const {
    std::vector<std::string> all{"--broker", router(),      "--events",
                                 events(),   "--log-level", "error"};
    all.insert(all.end(), args.begin(), args.end());
    return all;
  }
  outcome ensemble(std::vector<std::string> args,
                   std::chrono::milliseconds deadline = k_deadline) const {
    return run_cli(cli(std::move(args)), deadline);
  }

  void start_orchestrator(const std::vector<std::string>& workflows) {
    std::vector<std::string> args{"--broker", router(),   "--events",    events(),
                                  "--store",  ":memory:", "--log-level", "warn"};
    for (const auto& w : workflows) {
      args.push_back("--workflows");
      args.push_back(w);
    }
    start({tk::binary_path("ensemble-orchestrator"), args, {}, {}, "orchestrator"},
          "ensemble-orchestrator ready");
  }
  // ensemble-example-order: OrderService, PaymentService, NotificationService.
  void start_order_agent() {
    start({tk::binary_path("ensemble-example-order"),
           {"--broker", router(), "--events", events()},
           {},
           {},
           "orders"},
          "[orders] ready");
  }
  // `ensemble agent SPEC`
  void start_scriptable_agent(const std::string& spec) {
    start({tk::binary_path("ensemble"), cli({"agent", spec}), {}, {}, spec},
          "ensemble-agent ready");
  }
  void start_fulfillment() {
    // The example's scriptable agents consume its streams durably: declare them first, from
    // the example's deployment file (one source of truth).
    const auto example = ensemble::cli::load_deployment(k_examples + "/order-fulfillment");
    for (const auto& st : example.streams) {
      std::string topics;
      for (const auto& t : st.topics) topics += (topics.empty() ? "" : ",") + t;
      auto added = ensemble({"streams", "add", st.name, "--topics", topics});
      if (added.code != 0) throw std::runtime_error("streams add " + st.name + ": " + added.text());
    }
    start_order_agent();
    for (const char* a : {"inventory", "shipping", "notification"}) {
      start_scriptable_agent(k_examples + "/order-fulfillment/agents/" + a + ".yaml");
    }
    start_orchestrator({k_order_fulfillment});
  }

  // Output of every process, for failure messages.
  std::string tails() const {
    std::string out = "--- broker:\n" + broker_->proc().tail(10);
    for (const auto& p : procs_) out += "--- " + p->name() + ":\n" + p->tail(10);
    return out;
  }

 private:
  void start(tk::process_options opts, std::string_view ready) {
    auto p = tk::process::spawn(std::move(opts));
    if (!p->wait_for_line(ready, k_deadline)) {
      throw std::runtime_error(p->name() + " not ready:\n" + p->tail());
    }
    procs_.push_back(std::move(p));
  }

  temp_dir data_;  // before broker_: constructed first, removed after it stops
  std::unique_ptr<tk::broker_process> broker_;
  std::vector<std::unique_ptr<tk::process>> procs_;
};

// Polls `ensemble status ID --json` until `pred(view)` holds; the last view seen.
json wait_for_view(const deployment& d, const std::string& id,
                   const std::function<bool(const json&)>& pred) {
  json view;
  tk::wait_until(
      [&] {
        auto o = d.ensemble({"status", id, "--json"});
        view = o.code == 0 ? o.document() : json();
        return view.is_object() && pred(view);
      },
      k_deadline, 50ms);
  return view;
}

std::string step_status(const json& view, const std::string& step) {
  if (!view.is_object() || !view.contains("steps") || !view["steps"].contains(step)) return {};
  return view["steps"][step].value("status", "");
}

// ---------------------------------------------------------------------------------------------
// `ensemble trace` output as a tree

struct trace_line {
  int depth;
  std::string text;
};

// "+12.3ms    <2*depth spaces>text": the time is padded to 10 columns (at least one space).
std::vector<trace_line> parse_trace(const outcome& o) {
  static const std::regex time(R"(^\+[0-9]+\.[0-9]ms )");
  std::vector<trace_line> out;
  for (const auto& l : o.lines) {
    std::smatch m;
    if (!std::regex_search(l, m, time)) continue;
    const std::size_t time_len = static_cast<std::size_t>(m.length(0)) - 1;
    const std::size_t text_at = l.find_first_not_of(' ', time_len);
    const std::size_t base = std::max<std::size_t>(10, time_len + 1);
    if (text_at == std::string::npos || text_at < base) continue;
    out.push_back({static_cast<int>((text_at - base) / 2), l.substr(text_at)});
  }
  return out;
}

// Index of the first line containing all of `needles`, or -1.
int find_line(const std::vector<trace_line>& t, std::initializer_list<std::string_view> needles) {
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (std::all_of(needles.begin(), needles.end(),
                    [&](std::string_view n) { return t[i].text.find(n) != std::string::npos; })) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

// Whether line `child` is in the subtree printed under line `parent`.
bool under(const std::vector<trace_line>& t, int parent, int child) {
  if (parent < 0 || child <= parent) return false;
  for (int i = parent + 1; i <= child; ++i) {
    if (t[static_cast<std::size_t>(i)].depth <= t[static_cast<std::size_t>(parent)].depth) {
      return false;
    }
  }
  return true;
}

std::string show(const std::vector<trace_line>& t) {
  std::string out;
  for (const auto& l : t) out += std::to_string(l.depth) + ": " + l.text + "\n";
  return out;
}

// ---------------------------------------------------------------------------------------------
// Mermaid

// Checks that `text` is a Mermaid flowchart in the grammar `ensemble graph` writes: every line
// a node declaration (one of the shapes, a quoted label), an edge (`-->` or `-.->`, optional
// label), a classDef or a class assignment; every node declared once; every edge endpoint and
// every styled node declared; every class used defined; every node reachable from `start`.
// Returns the problems found (empty: fine); fills `classes` (node -> class) if given.
std::vector<std::string> check_mermaid(const std::string& text,
                                       std::map<std::string, std::string>* classes = nullptr) {
  static const std::string id = R"([A-Za-z][A-Za-z0-9_]*)";
  static const std::string label = R"("[^"]*")";
  // The shapes: ((circle)), [rectangle], >flag], ([stadium]), [[subroutine]], {{hexagon}},
  // {rhombus}; every label quoted, except the bare words of the start and end circles.
  static const std::vector<std::string> shapes{R"(\(\((?:)" + label + R"(|\w+)\)\))",
                                               R"(\[)" + label + R"(\])",
                                               ">" + label + R"(\])",
                                               R"(\(\[)" + label + R"(\]\))",
                                               R"(\[\[)" + label + R"(\]\])",
                                               R"(\{\{)" + label + R"(\}\})",
                                               R"(\{)" + label + R"(\})"};
  static const std::regex node = [] {
    std::string alternatives;
    for (const auto& s : shapes) alternatives += (alternatives.empty() ? "" : "|") + s;
    return std::regex("^  (" + id + ")(" + alternatives + ")$");
  }();
  static const std::regex edge("^  (" + id + R"() (-->|-\.->)(?:\|(?:)" + label + R"(|\w+)\|)? ()" +
                               id + ")$");
  static const std::regex class_def(R"(^  classDef (\w+) (\S.*)$)");
  static const std::regex class_line(R"(^  class ([A-Za-z0-9_,]+) (\w+)$)");

  std::vector<std::string> problems;
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != "flowchart TD") {
    problems.push_back("first line is \"" + line + "\", not \"flowchart TD\"");
  }
  std::set<std::string> nodes, defined_classes;
  std::vector<std::pair<std::string, std::string>> edges;
  std::vector<std::pair<std::string, std::string>> styled;  // node, class
  int number = 1;
  while (std::getline(in, line)) {
    ++number;
    std::smatch m;
    const std::string where = "line " + std::to_string(number) + " \"" + line + "\"";
    if (std::regex_match(line, m, node)) {
      if (!nodes.insert(m[1]).second) problems.push_back(where + ": node declared again");
      if (m[1] == "end") problems.push_back(where + ": \"end\" is a Mermaid keyword");
    } else if (std::regex_match(line, m, edge)) {
      edges.emplace_back(m[1], m[3]);
    } else if (std::regex_match(line, m, class_def)) {
      defined_classes.insert(m[1]);
    } else if (std::regex_match(line, m, class_line)) {
      std::stringstream ids(m[1].str());
      std::string one;
      while (std::getline(ids, one, ',')) styled.emplace_back(one, m[2]);
    } else {
      problems.push_back(where + ": not a node, edge, classDef or class line");
    }
  }
  for (const auto& [from, to] : edges) {
    for (const auto& end : {from, to}) {
      if (nodes.count(end) == 0)
        problems.push_back("edge " + from + " -> " + to + ": " + end + " is not a declared node");
    }
  }
  for (const auto& [n, cls] : styled) {
    if (nodes.count(n) == 0) problems.push_back("class " + cls + " on undeclared node " + n);
    if (defined_classes.count(cls) == 0) problems.push_back("class " + cls + " is not defined");
    if (classes != nullptr && !classes->emplace(n, cls).second) {
      problems.push_back("node " + n + " styled twice");
    }
  }
  std::set<std::string> reached{"start"};
  for (bool grew = true; grew;) {
    grew = false;
    for (const auto& [from, to] : edges) {
      if (reached.count(from) != 0 && reached.insert(to).second) grew = true;
    }
  }
  for (const auto& n : nodes) {
    if (reached.count(n) == 0) problems.push_back("node " + n + " is not reachable from start");
  }
  if (nodes.count("start") == 0 || nodes.count("finish") == 0) {
    problems.push_back("no start or no finish node");
  }
  return problems;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Compares `actual` with tests/golden/NAME; with UPDATE_GOLDEN=1 in the environment, rewrites
// the golden file instead.
void expect_golden(const std::string& name, const std::string& actual) {
  const std::string path = k_golden + "/" + name;
  const char* update = std::getenv("UPDATE_GOLDEN");
  if (update != nullptr && std::string(update) == "1") {
    fs::create_directories(k_golden);
    std::ofstream(path) << actual;
    std::printf("rewrote %s\n", path.c_str());
    return;
  }
  ASSERT_TRUE(fs::exists(path)) << path << " is missing (UPDATE_GOLDEN=1 writes it)";
  EXPECT_EQ(actual, read_file(path))
      << "`ensemble graph` differs from " << path
      << "; if the change is intended, rewrite it with UPDATE_GOLDEN=1 and review the diff";
}

// A definition with every kind of step: parallel, switch (cases with conditions that need
// escaping, and a default), publish, await, choreography with a publish compensation, wait,
// sub-workflow, and a step name with a '-'.
constexpr const char* k_complex_definition = R"({"workflow": {"name": "Complex", "version": 2,
  "steps": [
  {"name": "Reserve-Stock", "service": "InventoryService", "action": "reserve",
   "compensate": {"service": "InventoryService", "action": "release"}},
  {"name": "Prepare", "kind": "parallel", "branches": [
    [{"name": "Pick", "service": "WarehouseService", "action": "pick"},
     {"name": "Pack", "service": "WarehouseService", "action": "pack"}],
    [{"name": "Invoice", "service": "BillingService", "action": "invoice"}]]},
  {"name": "Route", "kind": "switch", "cases": [
    {"when": "${workflow.input.tier} == \"gold\"",
     "steps": [{"name": "Express", "kind": "publish", "topic": "shipping.express"}]},
    {"when": "${workflow.input.total} > 100 && ${workflow.input.total} < 1000",
     "steps": [{"name": "Review", "kind": "await", "topic": "review.done", "timeout": "1h"}]}],
   "default": [{"name": "Standard", "kind": "choreography",
                "start": {"topic": "shipping.requested"}, "until": ["shipping.dispatched"],
                "fail_on": ["shipping.refused"], "timeout": "10m",
                "compensate": {"publish": {"topic": "shipping.cancelled"}}}]},
  {"name": "Cooldown", "kind": "wait", "duration": "1.5s"},
  {"name": "Notify", "kind": "workflow", "workflow": "Notification"}]}})";

// ---------------------------------------------------------------------------------------------
// Examples end to end

TEST(cli_examples, order_processing_runs_to_completion_and_a_declined_card_fails) {
  deployment d;
  d.start_order_agent();
  d.start_orchestrator({k_order_processing});
  temp_dir dir;
  const auto input = dir.write("order.json", R"({"orderId": "o-1", "amount": 25})");

  auto ok =
      d.ensemble({"run", "OrderProcessing", "--input", "@" + input, "--wait", "--timeout", "30s"});
  ASSERT_EQ(ok.code, 0) << ok << d.tails();
  const std::string id = instance_id(ok);
  ASSERT_FALSE(id.empty()) << ok;
  for (const char* step : {"ValidateOrder", "ChargePayment", "SendConfirmation"}) {
    EXPECT_TRUE(ok.has(std::string("step_completed ") + step + " (by orders)")) << ok;
  }
  // The seed workflow has no `output`: the last step's reply is the result.
  EXPECT_EQ(ok.document(), json({{"sent", true}})) << ok;

  auto status = d.ensemble({"status", id});
  ASSERT_EQ(status.code, 0) << status;
  EXPECT_TRUE(status.has("status    completed")) << status;
  EXPECT_TRUE(status.has("workflow  OrderProcessing v1")) << status;
  std::regex row(R"(^SendConfirmation\s+completed\s+1\s+\S+$)");
  EXPECT_TRUE(std::any_of(status.lines.begin(), status.lines.end(), [&](const std::string& l) {
    return std::regex_match(l, row);
  })) << status;

  // The example agent declines charges over 1000: not retryable, so the instance fails at once
  // and SendConfirmation is never reached.
  auto declined = d.ensemble(
      {"run", "OrderProcessing", "--input", R"({"orderId": "o-2", "amount": 5000})", "--wait"});
  ASSERT_EQ(declined.code, 1) << declined;
  EXPECT_TRUE(declined.has("card_declined")) << declined;
  const std::string failed_id = instance_id(declined);
  EXPECT_TRUE(declined.has("ensemble: " + failed_id + " failed: step ChargePayment")) << declined;

  auto graph =
      d.ensemble({"graph", k_order_processing + "/order-processing.json", "--instance", failed_id});
  ASSERT_EQ(graph.code, 0) << graph;
  std::map<std::string, std::string> classes;
  EXPECT_EQ(check_mermaid(graph.text(), &classes), std::vector<std::string>{}) << graph;
  EXPECT_EQ(classes["s_ValidateOrder"], "done") << graph;
  EXPECT_EQ(classes["s_ChargePayment"], "failed") << graph;
  EXPECT_EQ(classes["s_SendConfirmation"], "unreached") << graph;

  auto list = d.ensemble({"list", "--json"});
  ASSERT_EQ(list.code, 0) << list;
  std::map<std::string, std::string> listed;
  for (const auto& v : list.document()) listed[v["id"]] = v["status"];
  EXPECT_EQ(listed[id], "completed") << list;
  EXPECT_EQ(listed[failed_id], "failed") << list;
  auto failed_only = d.ensemble({"list", "--status", "failed"});
  ASSERT_EQ(failed_only.code, 0) << failed_only;
  EXPECT_TRUE(failed_only.has(failed_id)) << failed_only;
  EXPECT_FALSE(failed_only.has(id)) << failed_only;
}

class order_fulfillment : public ::testing::Test {
 protected:
  void SetUp() override { d_.start_fulfillment(); }

  // Runs one order with --wait; returns the outcome.
  outcome order(const std::string& order_id, const std::string& sku) {
    const json input = {{"orderId", order_id}, {"amount", 42}, {"items", {{{"sku", sku}}}}};
    return d_.ensemble({"run", "OrderFulfillment", "--input", input.dump(), "--wait"});
  }

  deployment d_;
};

TEST_F(order_fulfillment, an_order_that_succeeds_is_shipped) {
  auto o = order("o-100", "BOOK");
  ASSERT_EQ(o.code, 0) << o << d_.tails();
  const json output = o.document();
  EXPECT_EQ(output.value("tracking", ""), "TRK-o-100") << o;
  EXPECT_EQ(output.value("orderId", ""), "o-100") << o;
  EXPECT_TRUE(output.contains("transactionId")) << o;
  EXPECT_TRUE(o.has("event_matched Fulfil (shipment.dispatched from shipping)")) << o;

  auto view = d_.ensemble({"status", instance_id(o), "--json"});
  ASSERT_EQ(view.code, 0) << view;
  EXPECT_EQ(view.document()["status"], "completed") << view;
}

TEST_F(order_fulfillment, an_order_that_fails_is_compensated) {
  auto o = order("o-200", "OUT-OF-STOCK");
  ASSERT_EQ(o.code, 1) << o << d_.tails();
  const std::string id = instance_id(o);
  EXPECT_TRUE(o.has("choreography_failed")) << o;
  EXPECT_TRUE(o.has("compensation_started ChargePayment (PaymentService.refund)")) << o;
  EXPECT_TRUE(o.has("ensemble: " + id + " failed")) << o;

  auto view = d_.ensemble({"status", id, "--json"});
  ASSERT_EQ(view.code, 0) << view;
  const json v = view.document();
  EXPECT_EQ(v["status"], "failed") << view;
  EXPECT_EQ(step_status(v, "ChargePayment"), "compensated") << view;
  EXPECT_EQ(step_status(v, "ValidateOrder"), "completed") << view;
  EXPECT_EQ(step_status(v, "Fulfil"), "failed") << view;

  auto text = d_.ensemble({"status", id});
  ASSERT_EQ(text.code, 0) << text;
  EXPECT_TRUE(text.has("status    failed")) << text;
  EXPECT_TRUE(text.has("reason    step Fulfil: choreography_failed")) << text;
  EXPECT_TRUE(std::regex_search(text.text(), std::regex(R"(\nChargePayment\s+compensated\s)")))
      << text;
}

TEST_F(order_fulfillment, trace_shows_the_choreographed_hops_under_the_start_event) {
  // notification.sent follows shipment.dispatched, which completes the instance: wait for it
  // before tracing, or the trace may be taken first.
  auto notified = spawn_cli(d_.cli({"events", "notification.sent", "--count", "1"}));
  ASSERT_TRUE(notified->wait_for_line("ensemble: listening", k_deadline)) << notified->tail();
  auto o = order("o-300", "BOOK");
  ASSERT_EQ(o.code, 0) << o << d_.tails();
  const std::string id = instance_id(o);
  ASSERT_TRUE(notified->wait_for_line("\"correlation_id\":\"" + id + "\"", k_deadline))
      << notified->tail();
  EXPECT_EQ(notified->wait_exit(k_deadline), 0) << notified->tail();

  auto trace = d_.ensemble({"trace", id});
  ASSERT_EQ(trace.code, 0) << trace;
  EXPECT_TRUE(trace.has(id + "  OrderFulfillment v1  completed")) << trace;
  const auto t = parse_trace(trace);
  const int validate = find_line(t, {"command OrderService.validate from orchestrator -> orders",
                                     " ok", "[step ValidateOrder]"});
  const int charge =
      find_line(t, {"command PaymentService.charge", "-> orders", " ok", "[step ChargePayment]"});
  const int paid = find_line(t, {"event order.paid by orchestrator", "[step Fulfil]"});
  const int reserved = find_line(t, {"event inventory.reserved by inventory", "[choreography]"});
  const int dispatched = find_line(t, {"event shipment.dispatched by shipping", "[choreography]"});
  const int sent = find_line(t, {"event notification.sent by notification", "[choreography]"});
  ASSERT_TRUE(validate >= 0 && charge >= 0 && paid >= 0 && reserved >= 0 && dispatched >= 0 &&
              sent >= 0)
      << trace;
  // Each message under the one that caused it.
  EXPECT_TRUE(under(t, validate, charge)) << show(t);
  EXPECT_TRUE(under(t, charge, paid)) << show(t);
  EXPECT_TRUE(under(t, paid, reserved)) << show(t);
  EXPECT_TRUE(under(t, reserved, dispatched)) << show(t);
  EXPECT_TRUE(under(t, dispatched, sent)) << show(t);
  EXPECT_EQ(t[static_cast<std::size_t>(reserved)].depth,
            t[static_cast<std::size_t>(paid)].depth + 1)
      << show(t);
  // The orchestrator's own messages are not marked as choreography.
  EXPECT_EQ(find_line(t, {"by orchestrator", "[choreography]"}), -1) << show(t);
  EXPECT_TRUE(
      trace.has("2 command(s), 6 event(s), 3 published by services outside the "
                "orchestrator's calls"))
      << trace;

  auto as_json = d_.ensemble({"trace", id, "--json"});
  ASSERT_EQ(as_json.code, 0) << as_json;
  const json j = as_json.document();
  ASSERT_TRUE(j.is_object() && j.contains("journal")) << as_json;
  const auto& entries = j["journal"]["entries"];
  ASSERT_TRUE(entries.is_array() && !entries.empty()) << as_json;
  std::set<std::string> kinds, topics;
  for (const auto& e : entries) {
    EXPECT_EQ(e.value("correlation_id", ""), id) << e.dump();
    kinds.insert(e.value("kind", ""));
    if (e.value("kind", "") == "event") topics.insert(e.value("topic", ""));
  }
  EXPECT_EQ(kinds, (std::set<std::string>{"request", "reply", "event"}));
  for (const char* topic :
       {"order.paid", "inventory.reserved", "shipment.dispatched", "notification.sent"}) {
    EXPECT_EQ(topics.count(topic), 1u) << topic << "\n" << as_json;
  }
  EXPECT_EQ(j["journal"].value("truncated", true), false);
  EXPECT_EQ(j["instance"].value("status", ""), "completed");
  EXPECT_TRUE(j["history"]["entries"].is_array());
}

TEST_F(order_fulfillment, trace_of_a_failed_order_shows_the_refund) {
  auto o = order("o-400", "OUT-OF-STOCK");
  ASSERT_EQ(o.code, 1) << o << d_.tails();
  const std::string id = instance_id(o);

  auto trace = d_.ensemble({"trace", id});
  ASSERT_EQ(trace.code, 0) << trace;
  EXPECT_TRUE(trace.has(id + "  OrderFulfillment v1  failed  (step Fulfil: choreography_failed"))
      << trace;
  const auto t = parse_trace(trace);
  const int paid = find_line(t, {"event order.paid by orchestrator", "[step Fulfil]"});
  const int failed = find_line(t, {"event fulfillment.failed by inventory", "[choreography]"});
  const int refund = find_line(t, {"command PaymentService.refund from orchestrator -> orders",
                                   " ok", "[compensate ChargePayment]"});
  const int lifecycle = find_line(t, {"event workflow.OrderFulfillment.failed by orchestrator"});
  ASSERT_TRUE(paid >= 0 && failed >= 0 && refund >= 0 && lifecycle >= 0) << trace;
  EXPECT_TRUE(under(t, paid, failed)) << show(t);
  // The failure event caused the compensation.
  EXPECT_TRUE(under(t, failed, refund)) << show(t);
  EXPECT_EQ(find_line(t, {"event inventory.reserved"}), -1) << show(t);
  EXPECT_TRUE(trace.has("3 command(s), 4 event(s), 1 published by services")) << trace;
}

TEST_F(order_fulfillment, graph_instance_styles_nodes_by_state) {
  const std::string file = k_order_fulfillment + "/order-fulfillment.json";
  auto good = order("o-500", "BOOK");
  ASSERT_EQ(good.code, 0) << good;
  auto bad = order("o-501", "OUT-OF-STOCK");
  ASSERT_EQ(bad.code, 1) << bad;

  auto g = d_.ensemble({"graph", file, "--instance", instance_id(good)});
  ASSERT_EQ(g.code, 0) << g;
  std::map<std::string, std::string> classes;
  EXPECT_EQ(check_mermaid(g.text(), &classes), std::vector<std::string>{}) << g;
  EXPECT_EQ(classes,
            (std::map<std::string, std::string>{
                {"s_ValidateOrder", "done"}, {"s_ChargePayment", "done"}, {"s_Fulfil", "done"}}))
      << g;

  auto f = d_.ensemble({"graph", file, "--instance", instance_id(bad)});
  ASSERT_EQ(f.code, 0) << f;
  classes.clear();
  EXPECT_EQ(check_mermaid(f.text(), &classes), std::vector<std::string>{}) << f;
  EXPECT_EQ(classes, (std::map<std::string, std::string>{{"s_ValidateOrder", "done"},
                                                         {"s_ChargePayment", "compensated"},
                                                         {"s_ChargePayment_undo", "compensated"},
                                                         {"s_Fulfil", "failed"}}))
      << f;
  // Apart from the class lines, the same chart as the bare definition.
  auto bare = run_cli({"graph", file});
  ASSERT_EQ(bare.code, 0) << bare;
  EXPECT_EQ(f.text().rfind(bare.text(), 0), 0u) << f << bare;

  auto unknown = d_.ensemble({"graph", file, "--instance", "no-such-instance"});
  EXPECT_EQ(unknown.code, 1) << unknown;
  EXPECT_TRUE(unknown.has("no-such-instance")) << unknown;
}

TEST_F(order_fulfillment, services_lists_every_service_with_its_workers) {
  auto o = d_.ensemble({"services"});
  ASSERT_EQ(o.code, 0) << o;
  EXPECT_TRUE(o.has("SERVICE")) << o;
  for (const char* service : {"OrderService", "PaymentService", "NotificationService"}) {
    std::regex row(std::string("^") + service + R"(\s+8\s+0\s+0\s+\d+\s+orders \(0/8\)$)");
    EXPECT_TRUE(std::any_of(o.lines.begin(), o.lines.end(),
                            [&](const std::string& l) { return std::regex_match(l, row); }))
        << service << "\n"
        << o;
  }
  EXPECT_TRUE(o.has("orchestrator (0/")) << o;

  // The same through the environment instead of --broker / --events, as JSON.
  auto j = run_cli({"services", "--json"}, k_deadline,
                   {{"ENSEMBLE_BROKER", d_.router()}, {"ENSEMBLE_EVENTS", d_.events()}});
  ASSERT_EQ(j.code, 0) << j;
  std::set<std::string> names;
  const json services = j.document();
  for (const auto& s : services["services"]) names.insert(s["service"]);
  EXPECT_EQ(names, (std::set<std::string>{"NotificationService", "OrderService", "PaymentService",
                                          "orchestrator"}))
      << j;

  auto call = d_.ensemble({"call", "OrderService", "validate", R"({"orderId": "o-9"})"});
  ASSERT_EQ(call.code, 0) << call;
  EXPECT_EQ(call.document(), json({{"orderId", "o-9"}, {"valid", true}})) << call;
}

TEST(cli_examples, cart_is_pure_choreography) {
  deployment d;  // no orchestrator: the services react to each other
  for (const char* a : {"inventory", "recommendation"}) {
    d.start_scriptable_agent(k_examples + "/cart/agents/" + a + ".yaml");
  }
  auto tail = spawn_cli(d.cli({"events", "--count", "4"}));
  ASSERT_TRUE(tail->wait_for_line("ensemble: listening", k_deadline)) << tail->tail();

  auto published = d.ensemble({"publish", "cart.item_added", R"({"cartId":"c1","sku":"X"})"});
  ASSERT_EQ(published.code, 0) << published;
  std::smatch m;
  const std::string line = published.line("published cart.item_added id=");
  ASSERT_TRUE(std::regex_search(line, m, std::regex(R"(id=(\S+) seq=1)"))) << published;
  const std::string event_id = m[1];

  for (const char* topic :
       {"cart.item_added", "recommendation.updated", "inventory.checked", "inventory.held"}) {
    EXPECT_TRUE(tail->wait_for_line("\"topic\":\"" + std::string(topic) + "\"", k_deadline))
        << topic << "\n"
        << tail->tail() << d.tails();
  }
  const auto events = finish(*tail, k_deadline);
  ASSERT_EQ(events.code, 0) << events;
  std::map<std::string, json> by_topic;
  for (const auto& l : events.lines) {
    if (l.empty() || l[0] != '{') continue;
    const json e = json::parse(l);
    by_topic[e["topic"]] = e;
  }
  ASSERT_EQ(by_topic.size(), 4u) << events;
  for (const auto& [topic, e] : by_topic) {
    // One correlation id throughout: the first event's own id.
    EXPECT_EQ(e["correlation_id"], event_id) << e.dump();
  }
  EXPECT_EQ(by_topic["cart.item_added"]["payload"], json({{"cartId", "c1"}, {"sku", "X"}}));
  EXPECT_EQ(by_topic["recommendation.updated"]["payload"]["suggest"], "more-X");
  EXPECT_EQ(by_topic["inventory.checked"]["causation_id"], event_id);
  EXPECT_EQ(by_topic["inventory.held"]["causation_id"], by_topic["inventory.checked"]["id"]);
  EXPECT_EQ(by_topic["inventory.held"]["publisher"], "cart-inventory");

  // trace works without an orchestrator: the broker's journal has the whole story.
  auto trace = d.ensemble({"trace", event_id});
  ASSERT_EQ(trace.code, 0) << trace;
  EXPECT_TRUE(trace.has("not known to the orchestrator")) << trace;
  const auto t = parse_trace(trace);
  const int added = find_line(t, {"event cart.item_added"});
  const int checked = find_line(t, {"event inventory.checked by cart-inventory", "[choreography]"});
  const int held = find_line(t, {"event inventory.held by cart-inventory", "[choreography]"});
  const int rec = find_line(t, {"event recommendation.updated by recommendation"});
  ASSERT_TRUE(added >= 0 && checked >= 0 && held >= 0 && rec >= 0) << trace;
  EXPECT_TRUE(under(t, added, checked) && under(t, checked, held) && under(t, added, rec))
      << show(t);
  EXPECT_TRUE(trace.has("0 command(s), 4 event(s)")) << trace;
}

// ---------------------------------------------------------------------------------------------
// cancel

TEST(cli_workflows, cancel_stops_a_running_instance_and_compensates) {
  deployment d;
  d.start_order_agent();
  temp_dir dir;
  dir.write("sleepy.json", R"({"workflow": {"name": "Sleepy", "steps": [
    {"name": "Charge", "service": "PaymentService", "action": "charge",
     "input": {"orderId": "${workflow.input.orderId}", "amount": 5},
     "compensate": {"service": "PaymentService", "action": "refund",
                    "input": {"transactionId": "${steps.Charge.output.transactionId}"}}},
    {"name": "Nap", "kind": "wait", "duration": "10m"},
    {"name": "Confirm", "service": "NotificationService", "action": "send"}]}})");
  d.start_orchestrator({dir.path()});

  auto started = d.ensemble({"run", "Sleepy", "--input", R"({"orderId": "o-7"})"});
  ASSERT_EQ(started.code, 0) << started;
  const std::string id = instance_id(started);
  ASSERT_FALSE(id.empty()) << started;

  json view =
      wait_for_view(d, id, [](const json& v) { return step_status(v, "Nap") == "running"; });
  ASSERT_EQ(step_status(view, "Nap"), "running") << view.dump(2);
  ASSERT_EQ(view["status"], "running");

  auto graph = d.ensemble({"graph", dir.path() + "/sleepy.json", "--instance", id});
  ASSERT_EQ(graph.code, 0) << graph;
  std::map<std::string, std::string> classes;
  EXPECT_EQ(check_mermaid(graph.text(), &classes), std::vector<std::string>{}) << graph;
  EXPECT_EQ(classes, (std::map<std::string, std::string>{
                         {"s_Charge", "done"}, {"s_Nap", "running"}, {"s_Confirm", "unreached"}}))
      << graph;

  auto cancel = d.ensemble({"cancel", id, "--reason", "customer changed their mind"});
  ASSERT_EQ(cancel.code, 0) << cancel;
  EXPECT_TRUE(cancel.has(id + ": ")) << cancel;

  view = wait_for_view(d, id, [](const json& v) { return v["status"] == "cancelled"; });
  ASSERT_EQ(view.value("status", ""), "cancelled") << view.dump(2);
  EXPECT_EQ(step_status(view, "Charge"), "compensated") << view.dump(2);
  EXPECT_NE(view.dump().find("customer changed their mind"), std::string::npos) << view.dump(2);

  auto status = d.ensemble({"status", id});
  ASSERT_EQ(status.code, 0) << status;
  EXPECT_TRUE(status.has("status    cancelled")) << status;

  auto listed = d.ensemble({"list", "--status", "cancelled"});
  ASSERT_EQ(listed.code, 0) << listed;
  EXPECT_TRUE(listed.has(id)) << listed;

  // Cancelling it again is refused, naming the instance.
  auto again = d.ensemble({"cancel", id});
  EXPECT_EQ(again.code, 1) << again;
  EXPECT_TRUE(again.has(id)) << again;
}

// ---------------------------------------------------------------------------------------------
// graph

TEST(cli_graph, examples_match_their_golden_files) {
  for (const auto& [file, golden] : std::vector<std::pair<std::string, std::string>>{
           {k_order_fulfillment + "/order-fulfillment.json", "order-fulfillment.mmd"},
           {k_order_processing + "/order-processing.json", "order-processing.mmd"}}) {
    auto o = run_cli({"graph", file});
    ASSERT_EQ(o.code, 0) << o;
    // `graph` logs nothing: its output is the chart alone.
    const std::string text = o.text();
    EXPECT_EQ(check_mermaid(text), std::vector<std::string>{}) << text;
    expect_golden(golden, text);
  }
}

TEST(cli_graph, every_step_kind_matches_its_golden_file) {
  temp_dir dir;
  const auto file = dir.write("complex.json", k_complex_definition);
  auto o = run_cli({"graph", file});
  ASSERT_EQ(o.code, 0) << o;
  const std::string text = o.text();
  EXPECT_EQ(check_mermaid(text), std::vector<std::string>{}) << text;
  expect_golden("every-step-kind.mmd", text);

  // The shapes, independent of the golden file.
  for (const char* expected :
       {"  s_Prepare{{\"Prepare<br/>parallel\"}}", "  s_Prepare_join{{\"join\"}}",
        "  s_Pack --> s_Prepare_join", "  s_Invoice --> s_Prepare_join", "  s_Route{\"Route\"}",
        "  s_Route -->|\"${workflow.input.tier} == #quot;gold#quot;\"| s_Express",
        "  s_Route -->|\"default\"| s_Standard",
        "  s_Express>\"Express<br/>publish shipping.express\"]",
        "  s_Review([\"Review<br/>await review.done\"])",
        "  s_Cooldown((\"Cooldown<br/>wait 1500 ms\"))",
        "  s_Notify[[\"Notify<br/>workflow Notification\"]]",
        "  s_Standard -.->|compensate| s_Standard_undo",
        "  s_Reserve_hStock -.->|compensate| s_Reserve_hStock_undo",
        // Every branch of the switch continues to the next step.
        "  s_Express --> s_Cooldown", "  s_Review --> s_Cooldown", "  s_Standard --> s_Cooldown",
        "  s_Notify --> finish"}) {
    EXPECT_NE(text.find(std::string(expected) + "\n"), std::string::npos) << expected << "\n"
                                                                          << text;
  }
}

TEST(cli_graph, distinct_step_names_get_distinct_nodes) {
  // '-' and '_' in names, and names that look like the generated join/undo nodes.
  temp_dir dir;
  const auto file = dir.write("names.json", R"({"workflow": {"name": "Names", "steps": [
    {"name": "A-B", "service": "S", "action": "a",
     "compensate": {"service": "S", "action": "undo"}},
    {"name": "A_B", "service": "S", "action": "b"},
    {"name": "A-B_undo", "service": "S", "action": "c"},
    {"name": "P", "kind": "parallel", "branches": [
      [{"name": "Q", "service": "S", "action": "q"}],
      [{"name": "R", "service": "S", "action": "r"}]]},
    {"name": "P_join", "service": "S", "action": "d"},
    {"name": "end", "service": "S", "action": "e"}]}})");
  auto o = run_cli({"graph", file});
  ASSERT_EQ(o.code, 0) << o;
  EXPECT_EQ(check_mermaid(o.text()), std::vector<std::string>{}) << o;
  // Nodes: start, finish, 8 steps, 1 undo, 1 join.
  const std::regex node_line(R"(^  [A-Za-z][A-Za-z0-9_]*(\[|\(|\{|>))");
  const auto nodes = std::count_if(o.lines.begin(), o.lines.end(), [&](const std::string& l) {
    return std::regex_search(l, node_line);
  });
  EXPECT_EQ(nodes, 12) << o;
}

TEST(cli_graph, styles_every_state) {
  const auto def =
      ensemble::orchestrator::parse_definition(json::parse(k_complex_definition), "complex.json");
  const json view = {{"id", "i-1"},
                     {"status", "running"},
                     {"steps",
                      {{"Reserve-Stock", {{"status", "completed"}}},
                       {"Prepare", {{"status", "completed"}}},
                       {"Pick", {{"status", "completed"}}},
                       {"Pack", {{"status", "compensated"}}},
                       {"Invoice", {{"status", "compensation_failed"}}},
                       {"Route", {{"status", "running"}}},
                       {"Express", {{"status", "skipped"}}},
                       {"Review", {{"status", "failed"}}},
                       {"Standard", {{"status", "cancelled"}}}}}};
  const std::string text = ensemble::cli::mermaid_graph(def, view);
  std::map<std::string, std::string> classes;
  EXPECT_EQ(check_mermaid(text, &classes), std::vector<std::string>{}) << text;
  EXPECT_EQ(classes, (std::map<std::string, std::string>{{"s_Reserve_hStock", "done"},
                                                         {"s_Prepare", "done"},
                                                         {"s_Pick", "done"},
                                                         {"s_Pack", "compensated"},
                                                         {"s_Invoice", "failed"},
                                                         {"s_Route", "running"},
                                                         {"s_Express", "skipped"},
                                                         {"s_Review", "failed"},
                                                         {"s_Standard", "skipped"},
                                                         {"s_Cooldown", "unreached"},
                                                         {"s_Notify", "unreached"}}))
      << text;
  // Without an instance, nothing is styled.
  EXPECT_EQ(ensemble::cli::mermaid_graph(def).find("\n  class "), std::string::npos);
}

TEST(cli_graph, the_checker_rejects_what_mermaid_would) {
  // The structural checker itself: an undeclared endpoint, an unknown line, a missing header.
  EXPECT_FALSE(check_mermaid("flowchart TD\n  start((start))\n  start --> s_X\n").empty());
  EXPECT_FALSE(check_mermaid("flowchart TD\n  start((start))\n  start[\"unclosed\n").empty());
  EXPECT_FALSE(check_mermaid("graph LR\n  start((start))\n  finish((end))\n").empty());
  EXPECT_TRUE(check_mermaid("flowchart TD\n  start((start))\n  finish((end))\n  start --> finish\n")
                  .empty());
}

// ---------------------------------------------------------------------------------------------
// Bad input and unreachable brokers

TEST(cli_errors, invalid_input_json_is_refused_before_connecting) {
  // The endpoint is never contacted: the argument is checked first.
  auto o = run_cli(
      {"--broker", "tcp://127.0.0.1:1", "run", "OrderProcessing", "--input", "{\"orderId\": "});
  EXPECT_EQ(o.code, 2) << o;
  EXPECT_TRUE(o.has("--input")) << o;
  EXPECT_TRUE(o.has("not valid JSON")) << o;

  auto missing = run_cli({"--broker", "tcp://127.0.0.1:1", "run", "OrderProcessing", "--input",
                          "@/nonexistent/input.json"});
  EXPECT_EQ(missing.code, 2) << missing;
  EXPECT_TRUE(missing.has("/nonexistent/input.json")) << missing;

  auto payload = run_cli({"--broker", "tcp://127.0.0.1:1", "publish", "a.b", "not json"});
  EXPECT_EQ(payload.code, 2) << payload;
  EXPECT_TRUE(payload.has("payload")) << payload;
}

TEST(cli_errors, bad_timeouts_are_refused) {
  auto call =
      run_cli({"--broker", "tcp://127.0.0.1:1", "call", "S", "a", "{}", "--timeout", "soon"});
  EXPECT_EQ(call.code, 2) << call;
  EXPECT_TRUE(call.has("--timeout")) << call;
  EXPECT_TRUE(call.has("\"soon\"")) << call;

  auto run =
      run_cli({"--broker", "tcp://127.0.0.1:1", "run", "W", "--wait", "--timeout", "ten seconds"});
  EXPECT_EQ(run.code, 2) << run;
  EXPECT_TRUE(run.has("--timeout")) << run;
}

TEST(cli_errors, unknown_subcommands_and_options_exit_2) {
  auto sub = run_cli({"frobnicate"});
  EXPECT_EQ(sub.code, 2) << sub;
  auto opt = run_cli({"run", "OrderProcessing", "--frobnicate"});
  EXPECT_EQ(opt.code, 2) << opt;
  EXPECT_TRUE(opt.has("--frobnicate")) << opt;
  auto global = run_cli({"--frobnicate", "services"});
  EXPECT_EQ(global.code, 2) << global;
  EXPECT_TRUE(global.has("--frobnicate")) << global;
  auto none = run_cli({});
  EXPECT_EQ(none.code, 2) << none;
  auto level = run_cli({"--log-level", "loud", "services"});
  EXPECT_EQ(level.code, 2) << level;
  EXPECT_TRUE(level.has("--log-level")) << level;
  auto list = run_cli({"list", "--status", "sleeping"});
  EXPECT_EQ(list.code, 2) << list;
  EXPECT_TRUE(list.has("--status")) << list;
  auto help = run_cli({"run", "--help"});
  EXPECT_EQ(help.code, 0) << help;
  EXPECT_TRUE(help.has("--input")) << help;
}

TEST(cli_errors, validate_names_the_file_and_the_json_path) {
  temp_dir dir;
  const auto good = k_order_processing + "/order-processing.json";
  const auto bad = dir.write("bad.json", R"({"workflow": {"name": "Bad", "steps": [
    {"name": "A", "service": "S", "action": "a"},
    {"name": "B", "service": "S", "action": "b", "retry": {"backoff": "fast"}}]}})");
  const auto broken = dir.write("broken.json", "{\"workflow\": {\"name\": \"X\",\n  }");

  auto ok = run_cli({"validate", good, k_order_fulfillment + "/order-fulfillment.json"});
  EXPECT_EQ(ok.code, 0) << ok;
  EXPECT_TRUE(ok.has(good + ": ok (OrderProcessing v1, 3 top-level step(s))")) << ok;

  auto o = run_cli({"validate", good, bad});
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has(good + ": ok")) << o;
  EXPECT_TRUE(o.has(bad + ": /workflow/steps/1/retry/backoff: ")) << o;

  auto syntax = run_cli({"validate", broken});
  EXPECT_EQ(syntax.code, 1) << syntax;
  EXPECT_TRUE(std::regex_search(syntax.text(), std::regex(broken + R"(:2:\d+: invalid JSON)")))
      << syntax;

  // The same definitions as two versions of one name: each file is fine, the set is not.
  const auto twin = dir.write("twin.json", read_file(good));
  auto set = run_cli({"validate", good, twin});
  EXPECT_EQ(set.code, 1) << set;
  EXPECT_TRUE(set.has("OrderProcessing")) << set;

  // A file that does not exist is one of the problems found (exit codes: docs/workflows.md).
  auto missing = run_cli({"validate", dir.path() + "/missing.json"});
  EXPECT_EQ(missing.code, 1) << missing;
  EXPECT_TRUE(missing.has("missing.json: no such file or directory")) << missing;

  auto graph = run_cli({"graph", bad});
  EXPECT_EQ(graph.code, 2) << graph;
  EXPECT_TRUE(graph.has("/workflow/steps/1/retry/backoff")) << graph;
}

TEST(cli_errors, unknown_workflow_and_unknown_service) {
  deployment d;
  d.start_orchestrator({k_order_processing, k_order_fulfillment});
  auto o = d.ensemble({"run", "NoSuchFlow", "--input", "{}", "--wait"});
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has("\"NoSuchFlow\"")) << o;
  EXPECT_TRUE(o.has("OrderFulfillment")) << o;
  EXPECT_TRUE(o.has("OrderProcessing")) << o;

  auto status = d.ensemble({"status", "no-such-instance"});
  EXPECT_EQ(status.code, 1) << status;
  EXPECT_TRUE(status.has("no-such-instance")) << status;

  auto call = d.ensemble({"call", "NoSuchService", "act", "{}", "--timeout", "500ms"});
  EXPECT_EQ(call.code, 1) << call;
  EXPECT_TRUE(call.has("no_such_service")) << call;
  EXPECT_TRUE(call.has("NoSuchService")) << call;
}

TEST(cli_errors, no_broker_is_reported_with_its_endpoint) {
  // Nothing listens on port 1; each client gives up after its start-up timeout. The three run
  // side by side.
  std::vector<std::unique_ptr<tk::process>> clients;
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"services"}, {"run", "OrderProcessing", "--wait"}, {"trace", "x"}}) {
    std::vector<std::string> all{"--broker", "tcp://127.0.0.1:1", "--events", "tcp://127.0.0.1:2"};
    all.insert(all.end(), args.begin(), args.end());
    clients.push_back(spawn_cli(all));
  }
  const auto until = steady::now() + k_no_broker_deadline;
  for (auto& c : clients) {
    auto o = finish(*c, left(until));
    ASSERT_TRUE(o.code.has_value())
        << "still running after " << k_no_broker_deadline.count() << " s: " << o;
    EXPECT_NE(*o.code, 0) << o;
    EXPECT_TRUE(o.has("cannot reach the broker at tcp://127.0.0.1:1")) << o;
  }
}

}  // namespace
