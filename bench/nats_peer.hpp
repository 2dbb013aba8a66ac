#pragma once
// NATS as a peer of the benchmarks: the yardstick beside raw libzmq.
//
// Both benchmarks that compare with NATS use this: bench_streams (JetStream) and bench_all (NATS
// core). A run gets a real nats-server of its own, started from PATH (or a given program) with
// a configuration file in a fresh temporary directory and a free loopback port
// (`listen: 127.0.0.1:-1`), whose real URL the server writes to a ports file there.
//
// NATS is optional: libnats is found at build time (ENSEMBLE_BENCH_HAVE_NATS, from CMake) and
// nats-server at run time; `nats_unavailable()` says in one sentence why a run cannot have
// them, naming the install flag (scripts/install-deps.sh --nats).
//
// bench_all's NATS roles (`--role nats_pub`, ...) are processes like its other roles and speak
// the same line protocol to the orchestrator (roles.hpp); `run_nats_role()` runs one of them.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "harness.hpp"

#if ENSEMBLE_BENCH_HAVE_NATS
#include <nats/nats.h>
#endif

namespace ensemble::bench {

// Why NATS cannot run here ("" when it can): built without libnats, or no `program` to run.
std::string nats_unavailable(const std::string& program);

// The nats-server to run: its path and version ("v2.9.10").
struct nats_facts {
  std::string path;
  std::string version;
};
nats_facts probe_nats(const std::string& program);

// The version of libnats the benchmarks were built with, or "-".
std::string libnats_version();

struct nats_settings {
  bool jetstream = false;    // jetstream { store_dir: <temp dir>/js }
  bool sync_always = false;  // jetstream's `sync_interval: always` (nats-server >= 2.10)
  // Bytes the server may hold for one client before it calls it a slow consumer and closes
  // it; 0 keeps the server's default (64 MB).
  std::int64_t max_pending = 0;
  std::string write_deadline;  // how long a write to a client may stall; "" keeps the default
};

// Whether `facts.path` accepts the configuration (`nats-server -t`).
bool nats_accepts(const nats_facts& facts, const nats_settings& settings);

// A running nats-server; its directory (configuration, log, JetStream store) goes with it.
struct nats_server {
  std::unique_ptr<temp_dir> dir;
  std::unique_ptr<child> proc;
  std::string url;  // nats://127.0.0.1:<port>
  std::string log() const { return dir->file("nats.log"); }
};
// Starts it and waits (15 s at most) until it listens; throws, naming its log, if it does not.
nats_server start_nats(const nats_facts& facts, const nats_settings& settings);

// Lines of the server's log that report a slow consumer (a client it cut off or stalled).
std::size_t nats_slow_consumer_reports(const nats_server& server);

#if ENSEMBLE_BENCH_HAVE_NATS
// "what: <status text> (JetStream error N) [libnats' last error]".
std::string nats_error(const char* what, natsStatus s, jsErrCode code = static_cast<jsErrCode>(0));
#endif

// bench_all's NATS roles. Subjects: events on `bench.event` (the subscriber takes `bench.>`),
// requests on `bench.echo.rtt` (a send-asap connection) and `bench.echo.tput` (a buffered one).
struct nats_role_options {
  std::string url;
  std::size_t size = 64;
  std::size_t messages = 0;
  std::size_t rtt_calls = 0;
  std::size_t pipelined = 0;
  std::size_t window = 100;
  std::size_t warmup = 0;
  double event_rate = 0;
  int hwm = 0;  // pending limit of every subscription, in messages
};
// Runs `nats_pub`, `nats_sub`, `nats_echo` or `nats_client`; 2 for another name.
int run_nats_role(const std::string& role, const nats_role_options& o);

// Room for `hwm` events of `size` bytes: the server's max_pending per client, and (up to 2 GB)
// the bytes limit of every subscription, so that neither drops by design.
std::int64_t nats_max_pending(int hwm, std::size_t size);

}  // namespace ensemble::bench
