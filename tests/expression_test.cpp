// Expressions on their own: path lookup, template rendering (whole-value and in-string
// substitution, the "$${" escape, nested objects and arrays, missing paths), conditions (every
// operator, precedence, short-circuit, literals, type errors, syntax errors) and the load-time
// checks that report syntax problems and the roots and steps an expression refers to.
#include "ensemble/orchestrator/expression.hpp"

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

namespace eo = ensemble::orchestrator;
using eo::json;

namespace {

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

json context() {
  return json::parse(R"({
    "workflow": {"id": "wf-1", "name": "OrderProcessing",
                 "input": {"orderId": "o-42", "amount": 99.5, "count": 3, "vip": true,
                           "note": "", "tags": [], "items": [{"sku": "A1", "qty": 2},
                                                             {"sku": "B2", "qty": 1}]}},
    "steps": {"ChargePayment": {"output": {"transactionId": "t-7", "ok": true},
                                "error": null, "attempts": 2},
              "Reserve": {"output": null, "error": {"code": "out_of_stock", "message": "none"},
                          "attempts": 3}},
    "event": {"topic": "payment.done", "payload": {"orderId": "o-42", "total": 100}}
  })");
}

bool eval(std::string_view condition, const json& ctx = context()) {
  const auto r = eo::evaluate(condition, ctx);
  EXPECT_TRUE(r.ok()) << condition << ": " << (r.ok() ? "" : r.err().to_string());
  return r.ok() && *r;
}

std::string eval_error(std::string_view condition, const json& ctx = context()) {
  const auto r = eo::evaluate(condition, ctx);
  EXPECT_FALSE(r.ok()) << condition << " evaluated without error";
  if (r.ok()) return {};
  EXPECT_EQ(r.err().code, "bad_request");
  return r.err().message;
}

json rendered(const json& tmpl, const json& ctx = context()) {
  const auto r = eo::render(tmpl, ctx);
  EXPECT_TRUE(r.ok()) << tmpl.dump() << ": " << (r.ok() ? "" : r.err().to_string());
  return r.ok() ? *r : json("<error>");
}

}  // namespace

// ---- lookup -----------------------------------------------------------------------------------

TEST(Lookup, FollowsDottedPathsAndIndexes) {
  const json ctx = context();
  EXPECT_EQ(eo::lookup("workflow.input.orderId", ctx), "o-42");
  EXPECT_EQ(eo::lookup("workflow.input.items[1].sku", ctx), "B2");
  EXPECT_EQ(eo::lookup("workflow.input.items.0.qty", ctx), 2);
  EXPECT_EQ(eo::lookup("steps.ChargePayment.output", ctx),
            json::parse(R"({"transactionId": "t-7", "ok": true})"));
  EXPECT_EQ(eo::lookup(" workflow.id ", ctx), "wf-1");
}

TEST(Lookup, PathsThatLeadNowhereAreNull) {
  const json ctx = context();
  EXPECT_TRUE(eo::lookup("workflow.input.missing", ctx).is_null());
  EXPECT_TRUE(eo::lookup("workflow.input.items[7].sku", ctx).is_null());
  EXPECT_TRUE(eo::lookup("workflow.input.orderId.deeper", ctx).is_null());
  EXPECT_TRUE(eo::lookup("workflow.input[0]", ctx).is_null());
  EXPECT_TRUE(eo::lookup("steps.Reserve.output.x", ctx).is_null());
  EXPECT_TRUE(eo::lookup("nothing", ctx).is_null());
  EXPECT_TRUE(eo::lookup("", ctx).is_null());
  EXPECT_TRUE(eo::lookup("a..b", ctx).is_null());
  EXPECT_TRUE(eo::lookup("workflow.input.items[x]", ctx).is_null());
}

// ---- templates --------------------------------------------------------------------------------

TEST(Render, WholeValueSubstitutionKeepsTheType) {
  EXPECT_EQ(rendered("${workflow.input.amount}"), 99.5);
  EXPECT_EQ(rendered("${workflow.input.count}"), 3);
  EXPECT_EQ(rendered("${workflow.input.vip}"), true);
  EXPECT_EQ(rendered("${workflow.input.items[0]}"), json::parse(R"({"sku": "A1", "qty": 2})"));
  EXPECT_EQ(rendered("${workflow.input.items}").size(), 2u);
  EXPECT_EQ(rendered("${ workflow.input.orderId }"), "o-42");
}

TEST(Render, InStringSubstitutionUsesText) {
  EXPECT_EQ(rendered("order ${workflow.input.orderId} of ${workflow.input.count} items"),
            "order o-42 of 3 items");
  EXPECT_EQ(rendered("vip=${workflow.input.vip} first=${workflow.input.items[0]}"),
            R"(vip=true first={"qty":2,"sku":"A1"})");
  EXPECT_EQ(rendered("${workflow.id}/${steps.ChargePayment.attempts}"), "wf-1/2");
  EXPECT_EQ(rendered("[${steps.ChargePayment.error}]"), "[]");  // null renders as ""
  EXPECT_EQ(rendered("[${workflow.input.nope}]"), "[]");
}

TEST(Render, MissingPathsAreNull) {
  EXPECT_TRUE(rendered("${workflow.input.nope}").is_null());
  EXPECT_TRUE(rendered("${steps.Unknown.output}").is_null());
  EXPECT_TRUE(rendered("${event.payload.x}", json::object()).is_null());
}

TEST(Render, ObjectsAndArraysAreRenderedMemberByMember) {
  const json tmpl = json::parse(R"({
    "id": "${workflow.input.orderId}",
    "lines": ["${workflow.input.items[0].sku}", "${workflow.input.items[1].qty}", 7, null],
    "nested": {"tx": "tx:${steps.ChargePayment.output.transactionId}", "keep": false},
    "${not.a.key}": 1
  })");
  const json expected = json::parse(R"({
    "id": "o-42",
    "lines": ["A1", 1, 7, null],
    "nested": {"tx": "tx:t-7", "keep": false},
    "${not.a.key}": 1
  })");
  EXPECT_EQ(rendered(tmpl), expected);
  EXPECT_EQ(rendered(json::array()), json::array());
  EXPECT_EQ(rendered(json::object()), json::object());
  EXPECT_EQ(rendered(42), 42);
  EXPECT_TRUE(rendered(json()).is_null());
}

TEST(Render, DollarDollarBraceIsALiteral) {
  EXPECT_EQ(rendered("$${workflow.id}"), "${workflow.id}");
  EXPECT_EQ(rendered("cost: $5 and $${x} and ${workflow.id}"), "cost: $5 and ${x} and wf-1");
  EXPECT_EQ(rendered("$"), "$");
  EXPECT_EQ(rendered("plain text"), "plain text");
}

TEST(Render, MalformedReferencesAreErrorsNotExceptions) {
  const auto unterminated =
      eo::render(json::parse(R"({"a": ["ok", "x ${workflow.id"]})"), context());
  ASSERT_FALSE(unterminated.ok());
  EXPECT_EQ(unterminated.err().code, "bad_request");
  EXPECT_TRUE(contains(unterminated.err().message, "x ${workflow.id"));
  EXPECT_TRUE(contains(unterminated.err().message, "unterminated"));

  const auto empty = eo::render("${}", context());
  ASSERT_FALSE(empty.ok());
  EXPECT_TRUE(contains(empty.err().message, "empty reference"));

  const auto bad_path = eo::render("id: ${workflow..id}", context());
  ASSERT_FALSE(bad_path.ok());
  EXPECT_TRUE(contains(bad_path.err().message, "workflow..id"));

  const auto bad_index = eo::render("${workflow.input.items[-1]}", context());
  ASSERT_FALSE(bad_index.ok());
  EXPECT_TRUE(contains(bad_index.err().message, "not a non-negative integer"));
}

TEST(Render, InvalidUtf8InTheContextIsNotAnException) {
  // Payloads come from agents: a string that is not UTF-8 must not make rendering throw.
  json ctx = {{"workflow", {{"input", {{"bad", {{"s", std::string("a\xff")}}}}}}}};
  const auto r = eo::render("x=${workflow.input.bad}", ctx);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(contains(r->get<std::string>(), "x={\"s\":\"a"));
  const auto e = eo::evaluate("${workflow.input.bad} < 1", ctx);
  ASSERT_FALSE(e.ok());
  EXPECT_TRUE(contains(e.err().message, "cannot compare object"));
}

// ---- conditions -------------------------------------------------------------------------------

TEST(Evaluate, Equality) {
  EXPECT_TRUE(eval("${workflow.input.orderId} == 'o-42'"));
  EXPECT_TRUE(eval("${workflow.input.orderId} == \"o-42\""));
  EXPECT_TRUE(eval("${event.payload.orderId} == ${workflow.input.orderId}"));
  EXPECT_FALSE(eval("${workflow.input.orderId} != 'o-42'"));
  EXPECT_TRUE(eval("${workflow.input.count} == 3"));
  EXPECT_TRUE(eval("${workflow.input.count} == 3.0"));  // numbers compare by value
  EXPECT_TRUE(eval("${workflow.input.vip} == true"));
  EXPECT_TRUE(eval("${steps.ChargePayment.error} == null"));
  EXPECT_TRUE(eval("${workflow.input.missing} == null"));
  EXPECT_TRUE(eval("${steps.Reserve.error.code} != null"));
  EXPECT_TRUE(eval("${workflow.input.items[0]} == ${workflow.input.items[0]}"));
}

TEST(Evaluate, EqualityBetweenDifferentTypesIsFalse) {
  EXPECT_FALSE(eval("${workflow.input.count} == '3'"));
  EXPECT_TRUE(eval("${workflow.input.count} != '3'"));
  EXPECT_FALSE(eval("${workflow.input.vip} == 1"));
  EXPECT_FALSE(eval("${workflow.input.note} == null"));
  EXPECT_FALSE(eval("null == false"));
}

TEST(Evaluate, Ordering) {
  EXPECT_TRUE(eval("${workflow.input.amount} > 50"));
  EXPECT_FALSE(eval("${workflow.input.amount} < 50"));
  EXPECT_TRUE(eval("${workflow.input.count} >= 3"));
  EXPECT_TRUE(eval("${workflow.input.count} <= 3"));
  EXPECT_FALSE(eval("${workflow.input.count} < 3"));
  EXPECT_FALSE(eval("${workflow.input.count} > 3"));
  EXPECT_TRUE(eval("-1 < 0"));
  EXPECT_TRUE(eval("1.5e2 == 150"));
  EXPECT_TRUE(eval("${event.payload.total} > ${workflow.input.amount}"));
  EXPECT_TRUE(eval("'abc' < 'abd'"));
  EXPECT_TRUE(eval("${workflow.input.orderId} >= 'o-4'"));
}

TEST(Evaluate, OrderingAcrossTypesIsAnError) {
  std::string msg = eval_error("${workflow.input.orderId} < 5");
  EXPECT_TRUE(contains(msg, "cannot compare string \"o-42\" with number 5 using <"));
  EXPECT_TRUE(contains(msg, "${workflow.input.orderId} < 5"));  // names the condition
  msg = eval_error("${workflow.input.missing} >= 1");
  EXPECT_TRUE(contains(msg, "cannot compare null"));
  msg = eval_error("${workflow.input.vip} > false");
  EXPECT_TRUE(contains(msg, "boolean"));
}

TEST(Evaluate, LogicAndPrecedence) {
  EXPECT_TRUE(eval("true && true"));
  EXPECT_FALSE(eval("true && false"));
  EXPECT_TRUE(eval("false || true"));
  EXPECT_FALSE(eval("false || false"));
  EXPECT_TRUE(eval("!false"));
  EXPECT_TRUE(eval("!!true"));
  // && binds tighter than ||.
  EXPECT_TRUE(eval("true || false && false"));
  EXPECT_FALSE(eval("(true || false) && false"));
  // Comparison binds tighter than && and ||.
  EXPECT_TRUE(eval("${workflow.input.count} == 3 && ${workflow.input.vip} == true"));
  EXPECT_TRUE(eval("${workflow.input.count} == 4 || ${workflow.input.orderId} == 'o-42'"));
  // ! applies to the whole comparison after it.
  EXPECT_TRUE(eval("!${workflow.input.count} == 4"));
  EXPECT_FALSE(eval("!(${workflow.input.count} == 3)"));
  EXPECT_TRUE(eval("((${workflow.input.count} > 1) && (${workflow.input.count} < 5))"));
}

TEST(Evaluate, ShortCircuitSkipsTypeErrors) {
  EXPECT_FALSE(eval("${workflow.input.missing} != null && ${workflow.input.missing} > 5"));
  EXPECT_TRUE(eval("${workflow.input.missing} == null || ${workflow.input.missing} > 5"));
  // Without the guard it is an error.
  eval_error("${workflow.input.missing} > 5 || true");
}

TEST(Evaluate, BareReferenceIsTruthiness) {
  EXPECT_TRUE(eval("${workflow.input.vip}"));
  EXPECT_TRUE(eval("${workflow.input.orderId}"));
  EXPECT_TRUE(eval("${workflow.input.items}"));
  EXPECT_TRUE(eval("${steps.ChargePayment.output}"));
  EXPECT_FALSE(eval("${workflow.input.note}"));     // ""
  EXPECT_FALSE(eval("${workflow.input.tags}"));     // []
  EXPECT_FALSE(eval("${workflow.input.missing}"));  // null
  EXPECT_FALSE(eval("${steps.Reserve.output}"));
  EXPECT_FALSE(eval("0"));
  EXPECT_TRUE(eval("0.5"));
  EXPECT_FALSE(eval("''"));
  EXPECT_TRUE(eval("!${workflow.input.note}"));
  EXPECT_TRUE(eval("${workflow.input.vip} && ${workflow.input.count}"));
}

TEST(Evaluate, StringLiteralsWithEscapesAndSpaces) {
  json ctx = {{"workflow", {{"input", {{"s", "it's \"quoted\""}}}}}};
  EXPECT_TRUE(eval(R"(${workflow.input.s} == 'it\'s "quoted"')", ctx));
  EXPECT_TRUE(eval(R"(${workflow.input.s} == "it's \"quoted\"")", ctx));
  EXPECT_TRUE(eval("'a && b' == 'a && b'"));
  EXPECT_TRUE(eval("  ${ workflow.id }   ==   'wf-1'  "));
}

TEST(Evaluate, SyntaxErrorsNameThePosition) {
  EXPECT_TRUE(contains(eval_error(""), "empty"));
  EXPECT_TRUE(contains(eval_error("${workflow.id} =="), "expected a value"));
  EXPECT_TRUE(contains(eval_error("(${workflow.id} == 'x'"), "expected ')'"));
  EXPECT_TRUE(contains(eval_error("${workflow.id} == 'x"), "unterminated string"));
  EXPECT_TRUE(contains(eval_error("${workflow.id == 'x'"), "at position"));
  EXPECT_TRUE(contains(eval_error("${workflow.id} = 'x'"), "'=' is not an operator"));
  EXPECT_TRUE(contains(eval_error("true & false"), "use && or ||"));
  EXPECT_TRUE(contains(eval_error("${workflow.id} == wf"), "unexpected 'wf'"));
  EXPECT_TRUE(contains(eval_error("1 < 2 < 3"), "cannot be chained"));
  EXPECT_TRUE(contains(eval_error("true false"), "after a complete expression"));
  EXPECT_TRUE(contains(eval_error("1.2.3 == 1"), "not a number"));
  EXPECT_TRUE(contains(eval_error("${} == 1"), "empty reference"));
  // A syntax error in a short-circuited branch is still an error.
  EXPECT_TRUE(contains(eval_error("true || (1 =="), "expected a value"));
}

// ---- load-time checks -------------------------------------------------------------------------

TEST(CheckTemplate, ReportsRootsStepsAndPaths) {
  const json tmpl = json::parse(R"({
    "a": "${workflow.input.orderId}",
    "b": ["x ${steps.ChargePayment.output.transactionId} y ${steps.Reserve.error}"],
    "c": {"d": "${steps.ChargePayment.attempts}", "e": "$${steps.Escaped}"},
    "f": 12
  })");
  const auto c = eo::check_template(tmpl);
  EXPECT_TRUE(c.problem.empty()) << c.problem;
  EXPECT_EQ(c.roots, (std::vector<std::string>{"workflow", "steps"}));
  EXPECT_EQ(c.step_names, (std::vector<std::string>{"ChargePayment", "Reserve"}));
  EXPECT_EQ(c.paths, (std::vector<std::string>{
                         "workflow.input.orderId", "steps.ChargePayment.output.transactionId",
                         "steps.Reserve.error", "steps.ChargePayment.attempts"}));
}

TEST(CheckTemplate, ReportsSyntaxProblems) {
  auto c = eo::check_template(json::parse(R"({"a": ["ok", "${steps.A.output"]})"));
  EXPECT_TRUE(contains(c.problem, "unterminated"));
  EXPECT_TRUE(contains(c.problem, "${steps.A.output"));
  c = eo::check_template("${steps.A output}");
  EXPECT_TRUE(contains(c.problem, "unexpected ' '"));
  EXPECT_TRUE(eo::check_template(json::parse(R"({"n": 1, "s": "plain"})")).problem.empty());
  EXPECT_TRUE(eo::check_template(json::parse(R"({"n": 1, "s": "plain"})")).roots.empty());
}

TEST(CheckCondition, ReportsRootsStepsAndPaths) {
  const auto c = eo::check_condition(
      "${event.payload.orderId} == ${workflow.input.orderId} && (${steps.A.output.ok} || "
      "${steps.B[0]} != 'x')");
  EXPECT_TRUE(c.problem.empty()) << c.problem;
  EXPECT_EQ(c.roots, (std::vector<std::string>{"event", "workflow", "steps"}));
  EXPECT_EQ(c.step_names, (std::vector<std::string>{"A", "B"}));
  EXPECT_EQ(c.paths.size(), 4u);
}

TEST(CheckCondition, ReportsSyntaxProblemsWithoutEvaluating) {
  // No type errors at check time: the values are unknown.
  EXPECT_TRUE(eo::check_condition("${workflow.input.x} < 'a'").problem.empty());
  EXPECT_TRUE(contains(eo::check_condition("${a} ==").problem, "expected a value"));
  EXPECT_TRUE(contains(eo::check_condition("(${a}").problem, "expected ')'"));
  EXPECT_TRUE(contains(eo::check_condition("   ").problem, "empty"));
  EXPECT_TRUE(contains(eo::check_condition("${a} == 1 )").problem, "unexpected ')'"));
}

// Rendering does not depend on the context object being copied: a large context renders fast
// enough that a loop of many renders stays cheap. (Correctness only: no timing assertion.)
TEST(Render, ManyRendersAgainstALargeContext) {
  json ctx = context();
  for (int i = 0; i < 1000; ++i) {
    ctx["steps"]["S" + std::to_string(i)] = {{"output", {{"v", i}}}};
  }
  const json tmpl = {{"v", "${steps.S999.output.v}"}, {"t", "n=${steps.S500.output.v}"}};
  for (int i = 0; i < 2000; ++i) {
    const auto r = eo::render(tmpl, ctx);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ((*r)["v"], 999);
    ASSERT_EQ((*r)["t"], "n=500");
    ASSERT_TRUE(*eo::evaluate("${steps.S10.output.v} == 10 && ${steps.S11.output.v} > 10", ctx));
  }
}
