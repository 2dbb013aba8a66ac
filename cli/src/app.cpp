// The top-level app: global options, where the broker is, Ctrl-C, and the subcommand families.
#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <string_view>
#include <tuple>
#include <vector>

#include "client.hpp"
#include "ensemble/cli/cli.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/result.hpp"
#include "run_file.hpp"

namespace ensemble::cli {

std::string context::events_endpoint() const {
  if (!events.empty()) return events;
  // tcp://host:PORT -> tcp://host:PORT+1, the broker's default layout (5555/5556).
  const auto colon = broker.rfind(':');
  if (broker.rfind("tcp://", 0) == 0 && colon != std::string::npos) {
    try {
      const int port = std::stoi(broker.substr(colon + 1));
      return broker.substr(0, colon + 1) + std::to_string(port + 1);
    } catch (const std::exception&) {
    }
  }
  return "tcp://127.0.0.1:5556";
}

namespace {

// Global options that take a value as the next word (for finding the subcommand in argv).
constexpr std::string_view k_valued_globals[] = {"--broker", "--events", "--log-level", "--key",
                                                 "--broker-key"};

// Edit distance with transpositions (optimal string alignment), for "did you mean": "evnets"
// is one edit from "events".
std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

// The candidate nearest to `word`, if it is near enough to be what was meant.
std::string nearest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_distance = std::string::npos;
  for (const auto& c : candidates) {
    const auto d = edit_distance(word, c);
    if (d < best_distance) {
      best = c;
      best_distance = d;
    }
  }
  const std::size_t near_enough = std::max<std::size_t>(1, word.size() / 3);
  return best_distance <= near_enough ? best : std::string();
}

std::vector<std::string> subcommand_names(CLI::App& app) {
  std::vector<std::string> names;
  for (const auto* s : app.get_subcommands([](CLI::App*) { return true; })) {
    names.push_back(s->get_name());
  }
  return names;
}

// The first word of argv that is not a global option or its value: what should name the
// subcommand. Empty if there is none, or if an unknown option comes first (whether it takes
// the next word as its value cannot be known; CLI11 reports it).
std::string subcommand_word(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg.empty() || arg[0] != '-') return std::string(arg);
    const auto name = arg.substr(0, arg.find('='));
    const bool valued = std::find(std::begin(k_valued_globals), std::end(k_valued_globals), name) !=
                        std::end(k_valued_globals);
    if (valued && name == arg) {
      ++i;
    } else if (!valued && arg != "-h" && arg != "--help") {
      return {};
    }
  }
  return {};
}

// "ensemble: unknown command 'evnets'; did you mean 'events'?" and the list of commands.
int unknown_command(CLI::App& app, const std::string& word) {
  const auto names = subcommand_names(app);
  std::string all;
  for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
  const auto guess = nearest(word, names);
  std::cerr << "ensemble: unknown command '" << word << "'"
            << (guess.empty() ? std::string() : "; did you mean '" + guess + "'?") << "\n"
            << "commands: " << all << " (ensemble --help; ensemble COMMAND --help)\n";
  return 2;
}

// The option names (long and short, with dashes) an app accepts.
std::vector<std::string> option_names(const CLI::App& app) {
  std::vector<std::string> names;
  for (const auto* o : app.get_options()) {
    for (const auto& l : o->get_lnames()) names.push_back("--" + l);
    for (const auto& s : o->get_snames()) names.push_back("-" + s);
  }
  return names;
}

// For arguments CLI11 did not expect: names each unknown option of the subcommand that was
// given, with the nearest option it has. False if there was no unknown option (then CLI11's
// own message stands).
bool explain_unknown_options(CLI::App& app) {
  CLI::App* sub = &app;
  while (true) {
    const auto parsed = sub->get_subcommands();
    if (parsed.empty()) break;
    sub = parsed.front();
  }
  auto candidates = option_names(*sub);
  if (sub != &app) {
    const auto globals = option_names(app);
    candidates.insert(candidates.end(), globals.begin(), globals.end());
  }
  bool any = false;
  bool named_word = false;  // the first unexpected word is named; those after it are its arguments
  for (const CLI::App* a = sub; a != nullptr; a = a->get_parent()) {
    const std::string who = a == &app ? "ensemble" : "ensemble " + a->get_name();
    for (const auto& extra : a->remaining()) {
      // Words fall through to the parents too (app.fallthrough()), so they are looked for at
      // every level; the first one is where a subcommand was expected.
      if (!extra.empty() && extra[0] != '-' && sub != &app && !named_word) {
        // A word where a subcommand of `streams`, `consumers` or `dlq` was expected.
        const auto names = subcommand_names(*sub);
        if (names.empty()) continue;
        const auto guess = nearest(extra, names);
        std::string all;
        for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
        std::cerr << "ensemble " << sub->get_name() << ": unknown command '" << extra << "'"
                  << (guess.empty() ? std::string() : "; did you mean '" + guess + "'?")
                  << " (its commands: " << all << ")\n";
        any = true;
        named_word = true;
        continue;
      }
      if (extra.size() < 2 || extra[0] != '-') continue;
      const auto name = extra.substr(0, extra.find('='));
      const auto guess = nearest(name, candidates);
      // Global options fall through from the subcommands (app.fallthrough()), and so do
      // unknown ones: they were given to the innermost command.
      const std::string owner = sub == &app ? "ensemble" : "ensemble " + sub->get_name();
      std::cerr << owner << ": unknown option '" << name << "'"
                << (guess.empty() ? std::string() : "; did you mean '" + guess + "'?") << " ("
                << owner << " --help lists its options)\n";
      any = true;
    }
  }
  return any;
}

// Where the broker is when neither --broker nor ENSEMBLE_BROKER says: the run file of an
// `ensemble up` running in this directory (run_file.hpp), else the default.
void resolve_broker(context& ctx, bool broker_given, bool events_given) {
  if (broker_given) return;
  const auto file = run_file_path();
  std::optional<run_record> r;
  try {
    r = read_run_file(file);
  } catch (const common::config_error& e) {
    ctx.broker_problem = e.what();
    return;
  }
  if (!r) return;
  ctx.broker_source = file.string();
  if (!process_alive(r->pid)) {
    ctx.broker_problem = file.string() + " records a deployment (" +
                         (r->deployment.empty() ? std::string("ensemble up") : r->deployment) +
                         ", router=" + r->router + ") whose `ensemble up` (pid " +
                         std::to_string(r->pid) +
                         ") is no longer running; start it again, or remove the file, or give "
                         "--broker / ENSEMBLE_BROKER";
    return;
  }
  ctx.broker = r->router;
  if (!events_given) ctx.events = r->events;
  // A secured `up` records the broker's public key, and may name a key file for its commands.
  if (ctx.broker_key.empty() && !r->broker_key.empty()) {
    ctx.broker_key = r->broker_key;
    ctx.broker_key_source = file.string() + " (broker_key)";
  }
  if (ctx.key_file.empty() && !r->key.empty()) {
    ctx.key_file = r->key;
    ctx.key_source = file.string() + " (key)";
  }
}

// Commands that never connect to the broker: they ignore the keys.
bool connects(CLI::App& app) {
  for (const char* name : {"up", "keygen", "validate", "graph"}) {
    if (app.got_subcommand(name)) return false;
  }
  return true;
}

// Both keys or neither; the secret key file readable and private, the broker's key well formed.
// Throws common::config_error naming the option (or variable, or run file) and the file.
void check_keys(context& ctx) {
  if (ctx.key_file.empty() && ctx.broker_key.empty()) return;
  if (ctx.key_file.empty()) {
    throw common::config_error(ctx.broker_key_source,
                               "the broker's public key is given but not this process's secret "
                               "key: give --key FILE or ENSEMBLE_KEY too (`ensemble keygen NAME` "
                               "writes one)");
  }
  if (ctx.broker_key.empty()) {
    throw common::config_error(ctx.key_source + " '" + ctx.key_file + "'",
                               "a key is given but not the broker's public key: give "
                               "--broker-key KEY|FILE or ENSEMBLE_BROKER_KEY too");
  }
  common::read_curve_key_file(ctx.key_file, ctx.key_source, true);
  ctx.broker_key = common::read_public_key(ctx.broker_key, ctx.broker_key_source);
}

}  // namespace

int run(int argc, char** argv) {
  context ctx;
  const char* env_broker = std::getenv("ENSEMBLE_BROKER");
  const char* env_events = std::getenv("ENSEMBLE_EVENTS");
  if (env_broker != nullptr && *env_broker != '\0') {
    ctx.broker = env_broker;
    ctx.broker_source = "ENSEMBLE_BROKER";
  }
  if (env_events != nullptr && *env_events == '\0') env_events = nullptr;
  if (env_events != nullptr) ctx.events = env_events;
  for (auto [variable, value, source] :
       {std::tuple{"ENSEMBLE_KEY", &ctx.key_file, &ctx.key_source},
        std::tuple{"ENSEMBLE_BROKER_KEY", &ctx.broker_key, &ctx.broker_key_source}}) {
    const char* env = std::getenv(variable);
    if (env != nullptr && *env != '\0') {
      *value = env;
      *source = variable;
    }
  }
  if (ctx.broker.empty()) ctx.broker = "tcp://127.0.0.1:5555";
  ctx.log_level = "warn";

  CLI::App app{"ensemble: launch a deployment, drive and trace workflows, talk to the broker"};
  app.require_subcommand(1);
  app.footer(
      "Without --broker or ENSEMBLE_BROKER, commands use the deployment that `ensemble up` runs "
      "from the same directory (it records its endpoints in .ensemble/up.json), else "
      "tcp://127.0.0.1:5555. A secured broker (docs/agents.md, \"Keys\") takes --key and "
      "--broker-key, or ENSEMBLE_KEY and ENSEMBLE_BROKER_KEY. Ctrl-C ends any command at once "
      "(exit 130; SIGTERM: 143); `up` and "
      "`agent` stop cleanly and exit 0.");
  auto* broker_opt =
      app.add_option("--broker", ctx.broker, "broker router endpoint (env ENSEMBLE_BROKER)")
          ->capture_default_str();
  auto* events_opt =
      app.add_option("--events", ctx.events,
                     "broker events endpoint (env ENSEMBLE_EVENTS; default: router port + 1)");
  app.add_option("--log-level", ctx.log_level, "trace, debug, info, warn, error, off")
      ->capture_default_str();
  auto* key_opt = app.add_option("--key", ctx.key_file,
                                 "secured broker: this process's secret key file, NAME.key_secret "
                                 "(env ENSEMBLE_KEY; `ensemble keygen`)");
  auto* broker_key_opt =
      app.add_option("--broker-key", ctx.broker_key,
                     "secured broker: its public key, 40 characters or a key file (env "
                     "ENSEMBLE_BROKER_KEY)");
  // The global options may also follow the command (`ensemble call --key K ...`).
  app.fallthrough();
  app.parse_complete_callback([&] {
    try {
      common::set_log_level(ctx.log_level);
    } catch (const common::config_error& e) {
      throw CLI::ValidationError("--log-level", e.what());
    }
    if (broker_opt->count() > 0) ctx.broker_source = "--broker";
    if (key_opt->count() > 0) ctx.key_source = "--key";
    if (broker_key_opt->count() > 0) ctx.broker_key_source = "--broker-key";
    const bool events_given = events_opt->count() > 0 || env_events != nullptr;
    if (!app.got_subcommand("up")) {
      resolve_broker(ctx, !ctx.broker_source.empty(), events_given);
    }
    if (connects(app)) check_keys(ctx);
    // `up` and `agent` take SIGINT/SIGTERM themselves and stop cleanly; every other command
    // ends at once, whatever it is waiting for.
    if (!app.got_subcommand("up") && !app.got_subcommand("agent")) exit_on_stop_signal();
  });
  add_up_commands(app, ctx);
  add_key_commands(app, ctx);
  add_agent_commands(app, ctx);
  add_workflow_commands(app, ctx);
  add_broker_commands(app, ctx);

  if (const auto word = subcommand_word(argc, argv); !word.empty()) {
    const auto names = subcommand_names(app);
    if (std::find(names.begin(), names.end(), word) == names.end()) {
      return unknown_command(app, word);
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ExtrasError& e) {
    if (!explain_unknown_options(app)) return app.exit(e) == 0 ? 0 : 2;
    return 2;
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const common::config_error& e) {
    std::cerr << "ensemble: " << e.what() << "\n";
    return 2;
  }
  return ctx.exit_code;
}

}  // namespace ensemble::cli
