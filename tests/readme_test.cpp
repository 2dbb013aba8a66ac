// The command blocks of README.md and examples/*/README.md, run exactly as written: what a new
// user types from a clone with a build in build/. One test per README file.
//
// The conventions (CONTRIBUTING.md, "README command blocks"):
// - every ```sh block is run, one command at a time (`\` continues a line), each in its own
//   `sh -c`, from a temporary directory that looks like the clone: the repository's top-level
//   entries linked in, and `build` linked to the build tree. Nothing carries over between
//   commands but files — no `cd`, no `export`;
// - a block preceded by the line `<!-- readme-test: skip (REASON) -->` is not run (installing
//   packages, building, the whole test suite, fixed ports);
// - a command whose comment says `runs until Ctrl-C` is started in the background; the harness
//   waits for its ready line (one that starts with `ensemble up: ready` or `ensemble-NAME ready`)
//   and sends it SIGINT after the file's last block; it must then exit 0;
// - a command whose comment says `(exits N)` must exit with N; every other command with 0.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "ensemble/testkit/process.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using namespace std::chrono_literals;

// Bounds on waiting, not timings.
constexpr auto k_command_deadline = 60s;
constexpr auto k_ready_deadline = 60s;
const fs::path k_source = ENSEMBLE_SOURCE_DIR;
const std::string k_skip_marker = "<!-- readme-test: skip";

struct command {
  std::string text;
  int line = 0;  // in the README, for messages
  bool background = false;
  int expected_exit = 0;
};

struct block {
  int line = 0;
  bool skipped = false;
  std::vector<command> commands;
};

std::vector<block> sh_blocks(const fs::path& readme) {
  std::ifstream in(readme);
  std::vector<block> blocks;
  std::string text;
  std::string previous;  // the last non-empty line before the fence
  int number = 0;
  static const std::regex exits(R"(\(exits (\d+)\))");
  while (std::getline(in, text)) {
    ++number;
    if (text != "```sh") {
      if (!text.empty()) previous = text;
      continue;
    }
    block b;
    b.line = number;
    b.skipped = previous.rfind(k_skip_marker, 0) == 0;
    std::string pending;
    int pending_line = 0;
    while (std::getline(in, text)) {
      ++number;
      if (text.rfind("```", 0) == 0) break;
      if (pending.empty()) {
        const auto first = text.find_first_not_of(' ');
        if (first == std::string::npos || text[first] == '#') continue;
        pending_line = number;
      }
      if (!text.empty() && text.back() == '\\') {
        pending += text + "\n";  // sh takes backslash-newline as a continuation
        continue;
      }
      pending += text;
      command c{pending, pending_line};
      c.background = pending.find("runs until Ctrl-C") != std::string::npos;
      std::smatch m;
      if (std::regex_search(pending, m, exits)) c.expected_exit = std::stoi(m[1]);
      b.commands.push_back(std::move(c));
      pending.clear();
    }
    previous.clear();
    blocks.push_back(std::move(b));
  }
  return blocks;
}

// A directory that looks like a clone with a build: the repository's entries linked in, and
// `build` linked to the build tree the tests run from.
class clone_dir {
 public:
  clone_dir() {
    std::string pattern = (fs::temp_directory_path() / "ensemble-readme-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
    for (const auto& entry : fs::directory_iterator(k_source)) {
      const auto name = entry.path().filename().string();
      if (name == ".git" || name.rfind("build", 0) == 0 || name == ".ensemble") continue;
      fs::create_directory_symlink(entry.path(), path_ / name);
    }
    const fs::path bin = fs::path(tk::binary_path("ensemble")).parent_path();
    fs::create_directory_symlink(bin.parent_path(), path_ / "build");
  }
  ~clone_dir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);  // removes the links, not what they point to
  }
  clone_dir(const clone_dir&) = delete;
  clone_dir& operator=(const clone_dir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::unique_ptr<tk::process> shell(const std::string& text, const fs::path& dir) {
  return tk::process::spawn({"/bin/sh",
                             {"-c", text},
                             {{"ENSEMBLE_BROKER", ""}, {"ENSEMBLE_EVENTS", ""}, {"NO_COLOR", "1"}},
                             dir.string(),
                             "sh"});
}

std::vector<fs::path> readmes() {
  std::vector<fs::path> out{k_source / "README.md"};
  std::vector<fs::path> examples;
  for (const auto& entry : fs::directory_iterator(k_source / "examples")) {
    if (fs::exists(entry.path() / "README.md")) examples.push_back(entry.path() / "README.md");
  }
  std::sort(examples.begin(), examples.end());
  out.insert(out.end(), examples.begin(), examples.end());
  return out;
}

class readme : public ::testing::TestWithParam<fs::path> {};

TEST_P(readme, command_blocks_work_as_written) {
  const fs::path file = GetParam();
  const auto where = [&](int line) {
    return fs::relative(file, k_source).string() + ":" + std::to_string(line);
  };
  const auto blocks = sh_blocks(file);
  ASSERT_FALSE(blocks.empty()) << file << " has no ```sh block";
  clone_dir dir;
  std::vector<std::pair<command, std::unique_ptr<tk::process>>> background;
  static const std::regex ready_line(R"(^(ensemble up: ready|ensemble-[a-z]+ ready))");
  std::size_t ran = 0;
  for (const auto& b : blocks) {
    if (b.skipped) continue;
    ASSERT_FALSE(b.commands.empty()) << where(b.line) << ": a ```sh block with no command";
    for (const auto& c : b.commands) {
      SCOPED_TRACE(where(c.line) + ": " + c.text);
      ++ran;
      if (c.background) {
        auto p = shell("exec " + c.text, dir.path());
        const bool ready = tk::wait_until(
            [&] {
              for (const auto& l : p->lines()) {
                if (std::regex_search(l, ready_line)) return true;
              }
              return !p->running();
            },
            k_ready_deadline, 20ms);
        ASSERT_TRUE(ready && p->running()) << "not ready:\n" << p->tail(60);
        background.emplace_back(c, std::move(p));
        continue;
      }
      auto p = shell(c.text, dir.path());
      const auto code = p->wait_exit(k_command_deadline);
      (void)p->wait_for_line("\x1f(end of output)\x1f", 10s);  // the rest of its output
      ASSERT_TRUE(code) << "still running after " << k_command_deadline.count() << " s:\n"
                        << p->tail(60);
      EXPECT_EQ(*code, c.expected_exit) << p->tail(60);
      if (*code != c.expected_exit) {
        for (auto& [bc, bp] : background) ADD_FAILURE() << bc.text << ":\n" << bp->tail(40);
        break;
      }
    }
  }
  for (auto& [c, p] : background) {
    SCOPED_TRACE(where(c.line) + ": " + c.text);
    p->signal(SIGINT);
    const auto code = p->wait_exit(k_command_deadline);
    EXPECT_EQ(code, 0) << p->tail(60);
  }
  EXPECT_FALSE(fs::exists(dir.path() / ".ensemble" / "up.json"))
      << "`ensemble up` left its run file behind";
  RecordProperty("commands_run", static_cast<int>(ran));
}

INSTANTIATE_TEST_SUITE_P(files, readme, ::testing::ValuesIn(readmes()),
                         [](const ::testing::TestParamInfo<fs::path>& param) {
                           std::string name =
                               fs::relative(param.param, k_source).parent_path().string();
                           if (name.empty()) name = "top";
                           for (auto& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// The harness itself must run something: a README whose blocks were all skipped, or a parser
// that found none, would pass the test above while checking nothing.
TEST(readme_harness, the_readmes_have_commands_to_run) {
  std::size_t run = 0;
  for (const auto& f : readmes()) {
    for (const auto& b : sh_blocks(f)) {
      if (!b.skipped) run += b.commands.size();
    }
  }
  EXPECT_GE(run, 10u);
  const auto top = sh_blocks(k_source / "README.md");
  EXPECT_TRUE(std::any_of(top.begin(), top.end(), [](const block& b) {
    return !b.skipped && std::any_of(b.commands.begin(), b.commands.end(),
                                     [](const command& c) { return c.background; });
  })) << "README.md: no `ensemble up` for the commands to run against";
}

}  // namespace
