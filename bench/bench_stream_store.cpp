// bench_stream_store: appends/s of the durable-stream storage candidates, on this machine's disk.
//
// Two engines, measured the same way (docs/streams-storage.md, "Measurements"):
//  - segment: the shipped segment log (ensemble::broker::streams::open_file_store);
//  - sqlite:  a prototype of the alternative, one table per stream in WAL mode, one
//             transaction per batch, a prepared INSERT; synchronous=NORMAL stands for sync::os
//             (the commit is written to the WAL, not fsync'ed) and FULL for sync::always.
// Both de-duplicate by event id in memory (a hash map), as the store does.
// For each engine, sync policy, event size and batch size, events are appended in batches
// (append x batch, then one flush / one COMMIT) for --seconds, and the rate is printed.

#include <sqlite3.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <ensemble/broker/stream_store.hpp>
#include <ensemble/common/logging.hpp>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

namespace streams = ensemble::broker::streams;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

struct scenario {
  std::string engine;
  streams::sync policy;
  std::size_t size;
  std::size_t batch;
};

struct outcome {
  std::uint64_t events = 0;
  double seconds = 0;
};

streams::record make_record(std::uint64_t n, std::size_t size) {
  streams::record r;
  r.topic = "order.created";
  r.event_id = "evt-" + std::to_string(n);
  r.header = std::string(24, 'h');
  r.payload = std::string(size, static_cast<char>('a' + n % 26));
  return r;
}

outcome run_segment(const scenario& s, const std::string& dir, double seconds) {
  streams::file_store_options o;
  o.sync_policy = s.policy;
  auto store = streams::open_file_store(dir, o);
  if (!store) throw std::runtime_error(store.err().to_string());
  streams::stream_config c;
  c.name = "bench";
  if (auto st = (*store)->create_stream(c); !st) throw std::runtime_error(st.err().to_string());
  std::vector<streams::record> batch;
  outcome out;
  const auto start = clock_type::now();
  const auto end = start + std::chrono::duration<double>(seconds);
  while (clock_type::now() < end) {
    batch.clear();
    for (std::size_t i = 0; i < s.batch; ++i) batch.push_back(make_record(out.events + i, s.size));
    // The broker appends each event of a poll batch on its own, then flushes once.
    for (const auto& r : batch) {
      auto res = (*store)->append("bench", std::span(&r, 1));
      if (!res) throw std::runtime_error(res.err().to_string());
    }
    if (auto st = (*store)->flush(); !st) throw std::runtime_error(st.err().to_string());
    out.events += s.batch;
  }
  out.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  return out;
}

void check(int rc, sqlite3* db, const char* what) {
  if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
    throw std::runtime_error(std::string(what) + ": " + sqlite3_errmsg(db));
  }
}

outcome run_sqlite(const scenario& s, const std::string& dir, double seconds) {
  fs::create_directories(dir);
  sqlite3* db = nullptr;
  check(sqlite3_open((dir + "/streams.db").c_str(), &db), db, "open");
  auto exec = [&](const char* sql) {
    check(sqlite3_exec(db, sql, nullptr, nullptr, nullptr), db, sql);
  };
  exec("PRAGMA journal_mode=WAL");
  exec(s.policy == streams::sync::always ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
  exec(
      "CREATE TABLE stream_bench (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, topic TEXT "
      "NOT NULL, event_id TEXT NOT NULL, header BLOB NOT NULL, payload BLOB NOT NULL)");
  sqlite3_stmt* insert = nullptr;
  check(sqlite3_prepare_v2(db,
                           "INSERT INTO stream_bench (seq, ts_ms, topic, event_id, header, "
                           "payload) VALUES (?, ?, ?, ?, ?, ?)",
                           -1, &insert, nullptr),
        db, "prepare");
  std::unordered_map<std::string, std::uint64_t> dedup;
  std::vector<streams::record> batch;
  outcome out;
  std::uint64_t seq = 0;
  const auto start = clock_type::now();
  const auto end = start + std::chrono::duration<double>(seconds);
  while (clock_type::now() < end) {
    batch.clear();
    for (std::size_t i = 0; i < s.batch; ++i) batch.push_back(make_record(out.events + i, s.size));
    exec("BEGIN");
    for (const auto& r : batch) {
      if (!dedup.emplace(r.event_id, seq + 1).second) continue;
      ++seq;
      const auto ts = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
      sqlite3_bind_int64(insert, 1, static_cast<sqlite3_int64>(seq));
      sqlite3_bind_int64(insert, 2, ts);
      sqlite3_bind_text(insert, 3, r.topic.data(), static_cast<int>(r.topic.size()), SQLITE_STATIC);
      sqlite3_bind_text(insert, 4, r.event_id.data(), static_cast<int>(r.event_id.size()),
                        SQLITE_STATIC);
      sqlite3_bind_blob(insert, 5, r.header.data(), static_cast<int>(r.header.size()),
                        SQLITE_STATIC);
      sqlite3_bind_blob(insert, 6, r.payload.data(), static_cast<int>(r.payload.size()),
                        SQLITE_STATIC);
      check(sqlite3_step(insert), db, "insert");
      sqlite3_reset(insert);
    }
    exec("COMMIT");
    out.events += s.batch;
  }
  out.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  sqlite3_finalize(insert);
  sqlite3_close(db);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 2.0;
  std::string base = fs::temp_directory_path().string();
  std::vector<std::string> engines{"segment", "sqlite"};
  std::vector<std::size_t> sizes{64, 1024};
  std::vector<std::size_t> batches{1, 100};
  int repeat = 1;
  CLI::App app{"bench_stream_store: appends/s of the stream storage engines on this disk"};
  app.add_option("--seconds", seconds, "measuring time per case")->capture_default_str();
  app.add_option("--dir", base, "where the files go (the disk under test)")->capture_default_str();
  app.add_option("--engines", engines, "segment, sqlite")->delimiter(',')->capture_default_str();
  app.add_option("--sizes", sizes, "event payload sizes")->delimiter(',')->capture_default_str();
  app.add_option("--batches", batches, "events per flush")->delimiter(',')->capture_default_str();
  app.add_option("--repeat", repeat, "runs of each case (the best is printed)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  ensemble::common::set_log_level("warn");
  std::printf("%-8s %-7s %6s %6s %12s %10s\n", "engine", "sync", "bytes", "batch", "events/s",
              "MB/s");
  int run = 0;
  for (auto policy : {streams::sync::os, streams::sync::always}) {
    for (auto size : sizes) {
      for (auto batch : batches) {
        for (const auto& engine : engines) {
          scenario s{engine, policy, size, batch};
          double best = 0;
          for (int r = 0; r < repeat; ++r) {
            const std::string dir = base + "/bench_stream_store." + std::to_string(::getpid()) +
                                    "." + std::to_string(run++);
            fs::remove_all(dir);
            const outcome o =
                engine == "segment" ? run_segment(s, dir, seconds) : run_sqlite(s, dir, seconds);
            fs::remove_all(dir);
            best = std::max(best, static_cast<double>(o.events) / o.seconds);
          }
          std::printf("%-8s %-7s %6zu %6zu %12.0f %10.1f\n", engine.c_str(),
                      policy == streams::sync::os ? "os" : "always", size, batch, best,
                      best * static_cast<double>(size) / 1e6);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}
