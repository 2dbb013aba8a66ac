#include "run_file.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "ensemble/common/result.hpp"

namespace ensemble::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path run_file_path(const fs::path& dir) {
  std::error_code ec;
  const fs::path base = dir.empty() ? fs::current_path(ec) : fs::absolute(dir, ec);
  return base / ".ensemble" / "up.json";
}

std::optional<run_record> read_run_file(const fs::path& file) {
  std::ifstream in(file);
  if (!in) {
    std::error_code ec;
    if (!fs::exists(file, ec)) return std::nullopt;
    throw common::config_error(file.string(), "cannot read the run file");
  }
  std::stringstream text;
  text << in.rdbuf();
  const json j = json::parse(text.str(), nullptr, false);
  if (!j.is_object() || !j.contains("router") || !j["router"].is_string() ||
      !j.contains("events") || !j["events"].is_string() || !j.contains("pid") ||
      !j["pid"].is_number_integer()) {
    throw common::config_error(
        file.string(),
        "not a run file of `ensemble up` (expected a JSON object with router, events and pid); "
        "remove it");
  }
  run_record r;
  r.router = j["router"];
  r.events = j["events"];
  r.pid = j["pid"].get<pid_t>();
  if (j.contains("deployment") && j["deployment"].is_string()) r.deployment = j["deployment"];
  if (j.contains("broker_key") && j["broker_key"].is_string()) r.broker_key = j["broker_key"];
  if (j.contains("key") && j["key"].is_string()) {
    const fs::path key = j["key"].get<std::string>();
    r.key = key.is_relative() ? (file.parent_path().parent_path() / key).string() : key.string();
  }
  return r;
}

void write_run_file(const fs::path& file, const run_record& r) {
  std::error_code ec;
  fs::create_directories(file.parent_path(), ec);
  if (ec) {
    throw std::runtime_error("cannot create " + file.parent_path().string() + ": " + ec.message());
  }
  json j = {
      {"router", r.router}, {"events", r.events}, {"deployment", r.deployment}, {"pid", r.pid}};
  if (!r.broker_key.empty()) j["broker_key"] = r.broker_key;
  if (!r.key.empty()) j["key"] = r.key;
  const fs::path tmp = file.string() + "." + std::to_string(::getpid()) + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write " + tmp.string());
  }
  fs::rename(tmp, file, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error("cannot write " + file.string() + ": " + ec.message());
  }
}

void remove_run_file(const fs::path& file, pid_t owner) {
  std::optional<run_record> r;
  try {
    r = read_run_file(file);
  } catch (const common::config_error&) {
    return;  // not ours to remove
  }
  if (!r || r->pid != owner) return;
  std::error_code ec;
  fs::remove(file, ec);
  fs::remove(file.parent_path(), ec);  // only if empty
}

bool process_alive(pid_t pid) {
  if (pid <= 0) return false;
  return ::kill(pid, 0) == 0 || errno == EPERM;
}

}  // namespace ensemble::cli
