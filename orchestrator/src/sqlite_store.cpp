// The SQLite implementation of the workflow store (store.hpp).
//
// One connection, used from the engine's thread only. Every statement is prepared once at open
// and reset after each use, so that commit() costs one bind + step per row and one WAL append
// per batch. JSON documents (instance state, history data, buffered events) are stored as
// MessagePack blobs (see k_json_as_msgpack for why); the reader also accepts JSON text, so the
// encoding can change without a schema change. An instance's state is stored in parts (the
// instances row, and a row per step: see k_instance_steps_sql), so that a commit rewrites only
// the steps the engine changed. Definitions are stored as JSON text: they are few, and an
// operator can read them with the sqlite3 shell.

#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "ensemble/common/logging.hpp"
#include "ensemble/common/msgpack_write.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/store.hpp"

namespace ensemble::orchestrator {

std::string_view to_string(instance_status s) {
  switch (s) {
    case instance_status::running:
      return "running";
    case instance_status::compensating:
      return "compensating";
    case instance_status::completed:
      return "completed";
    case instance_status::failed:
      return "failed";
    case instance_status::cancelled:
      return "cancelled";
    case instance_status::timed_out:
      return "timed_out";
  }
  return "unknown";
}

std::optional<instance_status> parse_instance_status(std::string_view s) {
  for (auto v :
       {instance_status::running, instance_status::compensating, instance_status::completed,
        instance_status::failed, instance_status::cancelled, instance_status::timed_out}) {
    if (to_string(v) == s) return v;
  }
  return std::nullopt;
}

std::string_view to_string(store_check c) {
  switch (c) {
    case store_check::off:
      return "off";
    case store_check::quick:
      return "quick";
    case store_check::full:
      return "full";
  }
  return "unknown";
}

std::optional<store_check> parse_store_check(std::string_view s) {
  for (auto v : {store_check::off, store_check::quick, store_check::full}) {
    if (to_string(v) == s) return v;
  }
  return std::nullopt;
}

std::string_view to_string(store_sync s) {
  return s == store_sync::full ? "full" : "normal";
}

std::optional<store_sync> parse_store_sync(std::string_view s) {
  for (auto v : {store_sync::normal, store_sync::full}) {
    if (to_string(v) == s) return v;
  }
  return std::nullopt;
}

namespace {

namespace mpw = common::msgpack_write;

// What to do about a damaged store, appended to the error.
constexpr const char* k_way_out =
    ". Restore the file from a backup (docs/workflows.md, \"The store\"); "
    "--store-check off starts on it anyway, at the risk of losing or misreading instances";
// How many problems the integrity check reports at most (the first ones name the damage; a
// badly damaged file would produce thousands of lines).
constexpr int k_check_max_errors = 10;
// PRAGMA application_id: marks the file as an Ensemble store ("EnSt").
constexpr std::int64_t k_application_id = 0x456e5374;
// PRAGMA user_version: the schema version this build writes and reads. Versions 1 (no
// instances.started_by) and 2 (each instance's whole state in instances.state, no
// instance_steps) are still read: they are upgraded in place at open.
constexpr std::int64_t k_schema_version = 3;
constexpr std::int64_t k_oldest_schema_version = 1;
constexpr int k_busy_timeout_ms = 5000;
// The WAL is checkpointed into the database file by a background thread once it holds this
// many pages (SQLite's own default threshold: ~4 MB with 4 KiB pages) ...
constexpr int k_checkpoint_pages = 1000;
// ... and by commit() itself if the background thread falls this far behind, so that the WAL
// stays bounded whatever the scheduling.
constexpr int k_wal_pages_limit = 16 * k_checkpoint_pages;
// After a checkpoint the WAL file is reused from its start; beyond this it is truncated.
constexpr std::int64_t k_journal_size_limit = 64 * 1024 * 1024;
// MessagePack instead of JSON text for the opaque documents: measured with the engine's batch
// shape (200 instance upserts + 600 history rows per commit), commit() costs 15-25% less CPU,
// rows decode ~3x faster and the file is ~15% smaller.
constexpr bool k_json_as_msgpack = true;

constexpr std::array<std::string_view, 5> k_tables = {"definitions", "instances", "history",
                                                      "triggers", "buffer"};
// Since version 3 (the upgrade creates it).
constexpr std::array<std::string_view, 1> k_tables_3 = {"instance_steps"};

constexpr const char* k_schema_sql = R"sql(
CREATE TABLE definitions(
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY(name, version));
CREATE TABLE instances(
  id TEXT NOT NULL PRIMARY KEY,
  workflow TEXT NOT NULL,
  version INTEGER NOT NULL,
  status TEXT NOT NULL,
  parent_id TEXT NOT NULL,
  created_us INTEGER NOT NULL,
  updated_us INTEGER NOT NULL,
  active INTEGER NOT NULL,
  state BLOB,
  started_by TEXT NOT NULL DEFAULT '');
CREATE INDEX instances_active ON instances(created_us) WHERE active = 1;
CREATE INDEX instances_created ON instances(created_us);
CREATE INDEX instances_status ON instances(status, created_us);
CREATE INDEX instances_workflow ON instances(workflow, created_us);
CREATE INDEX instances_started_by ON instances(started_by, created_us);
CREATE TABLE history(
  instance_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  ts_us INTEGER NOT NULL,
  kind TEXT NOT NULL,
  step TEXT NOT NULL,
  data BLOB,
  PRIMARY KEY(instance_id, seq)) WITHOUT ROWID;
CREATE TABLE triggers(
  workflow TEXT NOT NULL,
  event_id TEXT NOT NULL,
  instance_id TEXT NOT NULL,
  PRIMARY KEY(workflow, event_id)) WITHOUT ROWID;
CREATE TABLE buffer(
  id TEXT NOT NULL PRIMARY KEY,
  topic TEXT NOT NULL,
  correlation_id TEXT NOT NULL,
  received_us INTEGER NOT NULL,
  event BLOB);
CREATE INDEX buffer_received ON buffer(received_us);
)sql";

// An instance's state document is stored in parts, so that a commit rewrites only the steps that
// changed (instance_record::changed_steps): each step's "steps.<name>" (visible) and
// "run.steps.<name>" (run) in a row of instance_steps, NULL where the document has no such
// entry; the rest in instances.state, where "steps" and "run.steps" are empty maps standing for
// the rows. Reads put the parts back into exactly the committed document.
constexpr const char* k_instance_steps_sql = R"sql(
CREATE TABLE instance_steps(
  instance_id TEXT NOT NULL,
  step TEXT NOT NULL,
  visible BLOB,
  run BLOB,
  PRIMARY KEY(instance_id, step)) WITHOUT ROWID;
)sql";

// Small values kept across restarts, by key ("virtual_now_us": a virtual clock's time). Created
// when first written, so that a store that never needs it is unchanged, and without a schema
// version of its own: builds that do not know it ignore it.
constexpr const char* k_meta_sql =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT NOT NULL PRIMARY KEY, value INTEGER NOT NULL) "
    "WITHOUT ROWID";

// Version 1 -> 2: who started each instance (`list` of a caller_scope own caller filters on it).
constexpr const char* k_upgrade_to_2_sql = R"sql(
ALTER TABLE instances ADD COLUMN started_by TEXT NOT NULL DEFAULT '';
CREATE INDEX instances_started_by ON instances(started_by, created_us);
)sql";

constexpr const char* k_upsert_step_sql =
    "INSERT INTO instance_steps(instance_id, step, visible, run) VALUES (?1, ?2, ?3, ?4) "
    "ON CONFLICT(instance_id, step) DO UPDATE SET visible = excluded.visible, run = excluded.run";

// An instance's columns (from table alias i), then one of its step rows
// (NULLs if it has none): one row per step, an instance's rows together.
constexpr const char* k_select_instance_with_steps =
    "SELECT i.id, i.workflow, i.version, i.status, i.parent_id, i.created_us, i.updated_us, "
    "i.active, i.state, i.started_by, s.step, s.visible, s.run";
constexpr int k_step_column = 10;

// The parts of a state document kept in instance_steps: "steps" and "run.steps", where they are
// objects (nullptr otherwise).
const json::object_t* visible_steps(const json& state) {
  if (!state.is_object()) return nullptr;
  const auto& o = state.get_ref<const json::object_t&>();
  const auto it = o.find("steps");
  return it != o.end() && it->second.is_object() ? &it->second.get_ref<const json::object_t&>()
                                                 : nullptr;
}
const json::object_t* run_steps(const json& state) {
  if (!state.is_object()) return nullptr;
  const auto& o = state.get_ref<const json::object_t&>();
  const auto it = o.find("run");
  return it != o.end() ? visible_steps(it->second) : nullptr;
}
const json* find_step(const json::object_t* steps, const std::string& name) {
  if (steps == nullptr) return nullptr;
  const auto it = steps->find(name);
  return it != steps->end() ? &it->second : nullptr;
}
json::object_t* mutable_steps(json& doc) {
  if (!doc.is_object()) return nullptr;
  auto& o = doc.get_ref<json::object_t&>();
  const auto it = o.find("steps");
  return it != o.end() && it->second.is_object() ? &it->second.get_ref<json::object_t&>() : nullptr;
}

std::string_view primary_code_name(int rc) {
  switch (rc & 0xff) {
    case SQLITE_ERROR:
      return "SQLITE_ERROR";
    case SQLITE_INTERNAL:
      return "SQLITE_INTERNAL";
    case SQLITE_PERM:
      return "SQLITE_PERM";
    case SQLITE_ABORT:
      return "SQLITE_ABORT";
    case SQLITE_BUSY:
      return "SQLITE_BUSY";
    case SQLITE_LOCKED:
      return "SQLITE_LOCKED";
    case SQLITE_NOMEM:
      return "SQLITE_NOMEM";
    case SQLITE_READONLY:
      return "SQLITE_READONLY";
    case SQLITE_INTERRUPT:
      return "SQLITE_INTERRUPT";
    case SQLITE_IOERR:
      return "SQLITE_IOERR";
    case SQLITE_CORRUPT:
      return "SQLITE_CORRUPT";
    case SQLITE_FULL:
      return "SQLITE_FULL";
    case SQLITE_CANTOPEN:
      return "SQLITE_CANTOPEN";
    case SQLITE_PROTOCOL:
      return "SQLITE_PROTOCOL";
    case SQLITE_SCHEMA:
      return "SQLITE_SCHEMA";
    case SQLITE_TOOBIG:
      return "SQLITE_TOOBIG";
    case SQLITE_CONSTRAINT:
      return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH:
      return "SQLITE_MISMATCH";
    case SQLITE_MISUSE:
      return "SQLITE_MISUSE";
    case SQLITE_RANGE:
      return "SQLITE_RANGE";
    case SQLITE_NOTADB:
      return "SQLITE_NOTADB";
    default:
      return "SQLITE_?";
  }
}

// An SQLite failure inside this file. Never leaves it: the public methods turn it into a
// common::status (commit, save_definition), a log line (queries) or a config_error (open).
class sqlite_failure : public std::runtime_error {
 public:
  sqlite_failure(int rc, const std::string& message) : std::runtime_error(message), rc_(rc) {}
  int rc() const { return rc_; }

 private:
  int rc_;
};

// "<operation>: <sqlite message> (SQLITE_CONSTRAINT, extended code 1555)"
std::string describe(sqlite3* db, int rc, std::string_view operation) {
  std::string out(operation);
  out += ": ";
  out += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  out += " (";
  out += primary_code_name(rc);
  if (rc != (rc & 0xff)) out += ", extended code " + std::to_string(rc);
  out += ')';
  return out;
}

[[noreturn]] void fail(sqlite3* db, int rc, std::string_view operation) {
  throw sqlite_failure(rc, describe(db, rc, operation));
}

// A row whose content this build cannot read (a document that does not decode, an unknown
// status). Like SQLite's own corruption errors, it is reported, never skipped.
[[noreturn]] void undecodable(const std::string& what) {
  throw sqlite_failure(SQLITE_CORRUPT, what);
}

bool is_corruption(int rc) {
  return (rc & 0xff) == SQLITE_CORRUPT;
}

struct db_closer {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using db_handle = std::unique_ptr<sqlite3, db_closer>;

// MessagePack encoding of a JSON document into a buffer the store reuses, byte for byte what
// nlohmann's json::to_msgpack writes (same type choices, keys in the document's order), so that
// the stored blobs are unchanged. It exists because to_msgpack was a third of commit()'s CPU
// (bench_store_commit): it allocates an output adapter per document, makes a virtual call per
// byte and copies every object key into a temporary json value. Here each value is a bounds
// check and a memcpy; encoding costs ~40% less. Unsigned integers, strings and container heads
// are the header encoder's writers (ensemble/common/msgpack_write.hpp); what only JSON documents
// have (nil, booleans, negative integers, floats, bin/ext) is written here.
class msgpack_encoder {
 public:
  // Encodes `doc`; the bytes stay valid until the next encode().
  std::pair<const void*, std::size_t> encode(const json& doc) {
    size_ = 0;
    value(doc);
    return {buffer_.data(), size_};
  }

  // Encodes what instances.state keeps of a state document: `state` with "steps" and
  // "run.steps" (where they are objects) as empty maps; their entries go to instance_steps.
  std::pair<const void*, std::size_t> encode_rest(const json& state) {
    size_ = 0;
    if (!state.is_object()) {
      value(state);
    } else {
      object(state.get_ref<const json::object_t&>(), /*levels=*/2);
    }
    return {buffer_.data(), size_};
  }

 private:
  void value(const json& j) {
    switch (j.type()) {
      case json::value_t::null:
        byte(0xC0);
        break;
      case json::value_t::boolean:
        byte(j.get_ref<const json::boolean_t&>() ? 0xC3 : 0xC2);
        break;
      case json::value_t::number_integer: {
        const auto v = j.get_ref<const json::number_integer_t&>();
        if (v >= 0) {
          unsigned_number(static_cast<std::uint64_t>(v));
        } else {
          signed_number(v);
        }
        break;
      }
      case json::value_t::number_unsigned:
        unsigned_number(j.get_ref<const json::number_unsigned_t&>());
        break;
      case json::value_t::number_float: {
        const double v = j.get_ref<const json::number_float_t&>();
        // As nlohmann's write_compact_float: a float 32 when it holds the value exactly (NaN
        // and the infinities fail the range test and go as float 64).
        if (v >= static_cast<double>(std::numeric_limits<float>::lowest()) &&
            v <= static_cast<double>(std::numeric_limits<float>::max()) &&
            static_cast<double>(static_cast<float>(v)) == v) {
          tagged<4>(0xCA, std::bit_cast<std::uint32_t>(static_cast<float>(v)));
        } else {
          tagged<8>(0xCB, std::bit_cast<std::uint64_t>(v));
        }
        break;
      }
      case json::value_t::string:
        string(j.get_ref<const json::string_t&>());
        break;
      case json::value_t::array: {
        const auto& a = j.get_ref<const json::array_t&>();
        done(mpw::put_array_header(room(mpw::k_max_container_head), a.size()));
        for (const auto& el : a) value(el);
        break;
      }
      case json::value_t::object:
        object(j.get_ref<const json::object_t&>(), 0);
        break;
      case json::value_t::binary:
        binary(j.get_ref<const json::binary_t&>());
        break;
      case json::value_t::discarded:
        break;  // nlohmann writes nothing for it either
    }
  }

  // `levels` > 0: a "steps" object in it is written as an empty map (2: and so is "run.steps").
  void object(const json::object_t& o, int levels = 0) {
    done(mpw::put_map_header(room(mpw::k_max_container_head), o.size()));
    for (const auto& [key, el] : o) {
      string(key);
      if (levels > 0 && el.is_object() && key == "steps") {
        byte(0x80);
      } else if (levels > 1 && el.is_object() && key == "run") {
        object(el.get_ref<const json::object_t&>(), levels - 1);
      } else {
        value(el);
      }
    }
  }
  void string(std::string_view s) { done(mpw::put_str(room(mpw::k_max_str_head + s.size()), s)); }
  void byte(std::uint8_t b) {
    *room(1) = static_cast<char>(b);
    ++size_;
  }
  void unsigned_number(std::uint64_t v) { done(mpw::put_uint(room(mpw::k_max_uint_size), v)); }

  void signed_number(std::int64_t v) {  // v < 0
    const auto bits = static_cast<std::uint64_t>(v);
    if (v >= -32) {
      byte(static_cast<std::uint8_t>(bits));  // negative fixint
    } else if (v >= std::numeric_limits<std::int8_t>::min()) {
      tagged<1>(0xD0, bits);
    } else if (v >= std::numeric_limits<std::int16_t>::min()) {
      tagged<2>(0xD1, bits);
    } else if (v >= std::numeric_limits<std::int32_t>::min()) {
      tagged<4>(0xD2, bits);
    } else {
      tagged<8>(0xD3, bits);
    }
  }

  void binary(const json::binary_t& b) {
    const bool ext = b.has_subtype();
    const std::size_t n = b.size();
    if (n <= std::numeric_limits<std::uint8_t>::max()) {
      if (!ext) {
        tagged<1>(0xC4, n);
      } else if (n == 1 || n == 2 || n == 4 || n == 8 || n == 16) {
        byte(n == 1 ? 0xD4 : n == 2 ? 0xD5 : n == 4 ? 0xD6 : n == 8 ? 0xD7 : 0xD8);  // fixext
      } else {
        tagged<1>(0xC7, n);
      }
    } else if (n <= std::numeric_limits<std::uint16_t>::max()) {
      tagged<2>(ext ? 0xC8 : 0xC5, n);
    } else {
      tagged<4>(ext ? 0xC9 : 0xC6, n);
    }
    if (ext) byte(static_cast<std::uint8_t>(static_cast<std::int8_t>(b.subtype())));
    if (n != 0) {
      std::memcpy(room(n), b.data(), n);
      size_ += n;
    }
  }

  // A type byte, then the low Bytes bytes of `v` big-endian.
  template <std::size_t Bytes>
  void tagged(std::uint8_t tag, std::uint64_t v) {
    char* at = room(1 + Bytes);
    *at = static_cast<char>(tag);
    done(mpw::put_be<Bytes>(at + 1, v));
  }

  // Room for at most n more bytes at the end of what is written; done() says where it ended.
  char* room(std::size_t n) {
    if (size_ + n > buffer_.size()) buffer_.resize(std::max(size_ + n, 2 * buffer_.size()));
    return buffer_.data() + size_;
  }
  void done(const char* end) { size_ = static_cast<std::size_t>(end - buffer_.data()); }

  std::vector<char> buffer_;  // grows to the largest document, never shrinks
  std::size_t size_ = 0;
};

// A prepared statement that lives as long as the store.
class statement {
 public:
  statement() = default;
  statement(sqlite3* db, const char* sql) {
    const int rc = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt_, nullptr);
    if (rc != SQLITE_OK) fail(db, rc, std::string("prepare \"") + sql + '"');
  }
  statement(const statement&) = delete;
  statement& operator=(const statement&) = delete;
  statement(statement&& other) noexcept : stmt_(std::exchange(other.stmt_, nullptr)) {}
  statement& operator=(statement&& other) noexcept {
    std::swap(stmt_, other.stmt_);
    return *this;
  }
  ~statement() { sqlite3_finalize(stmt_); }

  sqlite3_stmt* get() const { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

// One use of a cached statement: binds, steps, reads columns, and resets it when it goes out
// of scope, whatever happens — a statement left un-reset would keep its read transaction open
// and stop WAL checkpoints. Text and blobs are bound without a copy (SQLITE_STATIC): the caller
// keeps them alive until the last step(), and the bindings are cleared on reset.
class use {
 public:
  use(sqlite3* db, const statement& s) : db_(db), stmt_(s.get()) {}
  use(const use&) = delete;
  use& operator=(const use&) = delete;
  ~use() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  use& bind(int index, std::string_view text) {
    // A null pointer would bind SQL NULL, not an empty string.
    const char* p = text.data() != nullptr ? text.data() : "";
    check(sqlite3_bind_text(stmt_, index, p, static_cast<int>(text.size()), SQLITE_STATIC));
    return *this;
  }
  use& bind(int index, std::int64_t value) {
    check(sqlite3_bind_int64(stmt_, index, value));
    return *this;
  }
  use& bind_blob(int index, const void* data, std::size_t size) {
    check(sqlite3_bind_blob(stmt_, index, data, static_cast<int>(size), SQLITE_STATIC));
    return *this;
  }
  use& bind_null(int index) {
    check(sqlite3_bind_null(stmt_, index));
    return *this;
  }

  // True while a row is available; throws on an error. `what` describes the operation and
  // is only called on failure.
  template <class Describe>
  bool step(Describe&& what) {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    fail(db_, rc, what());
  }

  std::string text(int column) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
    return p == nullptr ? std::string() : std::string(p, sqlite3_column_bytes(stmt_, column));
  }
  std::string_view view(int column) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
    return p == nullptr
               ? std::string_view()
               : std::string_view(p, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
  }
  bool is_null(int column) const { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }
  std::int64_t integer(int column) const { return sqlite3_column_int64(stmt_, column); }
  // A stored JSON document: NULL is json null, a blob is MessagePack, text is JSON text.
  // A document that does not decode comes back as a discarded value (is_discarded()).
  json document(int column) const {
    switch (sqlite3_column_type(stmt_, column)) {
      case SQLITE_NULL:
        return json();
      case SQLITE_BLOB: {
        const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(stmt_, column));
        const auto n = static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column));
        return json::from_msgpack(p, p + n, /*strict=*/true, /*allow_exceptions=*/false);
      }
      default: {
        const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
        const auto n = static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column));
        return json::parse(p, p + n, nullptr, /*allow_exceptions=*/false);
      }
    }
  }

 private:
  void check(int rc) {
    if (rc != SQLITE_OK) fail(db_, rc, "bind");
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;
};

// Copies the WAL into the database file on a thread and a connection of its own, so that the
// checkpoint's writes and fsyncs do not stall the engine's thread inside commit(). Measured with
// the engine's batch shape on 2 shared cores: ~1.4x more batches/s and about half the p99
// commit latency compared with SQLite's automatic checkpoint in the committing connection.
// Requested by the WAL hook of the engine's connection after a commit; PASSIVE, so it never
// blocks the writer (it copies what it can and leaves the rest for the next request).
class checkpointer {
 public:
  checkpointer(const std::string& path, std::shared_ptr<spdlog::logger> log)
      : path_(path), log_(std::move(log)) {
    sqlite3* raw = nullptr;
    const int rc =
        sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
    db_.reset(raw);
    if (rc != SQLITE_OK) fail(raw, rc, "open the checkpoint connection");
    sqlite3_extended_result_codes(raw, 1);
    sqlite3_busy_timeout(raw, k_busy_timeout_ms);
    // synchronous is per connection: the checkpoint fsyncs the WAL, then the database file.
    const int sync_rc = sqlite3_exec(raw, "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr);
    if (sync_rc != SQLITE_OK) fail(raw, sync_rc, "set synchronous=NORMAL (checkpoint connection)");
    thread_ = std::thread([this] { run(); });
  }
  checkpointer(const checkpointer&) = delete;
  checkpointer& operator=(const checkpointer&) = delete;
  ~checkpointer() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

  void request() {
    {
      std::lock_guard lock(mutex_);
      if (requested_) return;
      requested_ = true;
    }
    wake_.notify_one();
  }

 private:
  void run() {
    int last_rc = SQLITE_OK;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [this] { return requested_ || stop_; });
        if (stop_) return;
        requested_ = false;
      }
      const int rc = sqlite3_wal_checkpoint_v2(db_.get(), nullptr, SQLITE_CHECKPOINT_PASSIVE,
                                               nullptr, nullptr);
      // BUSY: another checkpoint (commit()'s fallback) is running; the next request retries.
      if (rc != SQLITE_OK && (rc & 0xff) != SQLITE_BUSY && rc != last_rc) {
        log_->warn("store {}: {}", path_, describe(db_.get(), rc, "background checkpoint"));
      }
      last_rc = rc;
    }
  }

  std::string path_;
  std::shared_ptr<spdlog::logger> log_;
  db_handle db_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool requested_ = false;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything it uses exists
};

class sqlite_store final : public store {
 public:
  sqlite_store(const std::string& path, const sqlite_options& opts)
      : path_(path), log_(common::component_logger("orchestrator")) {
    const bool in_memory = path == ":memory:";
    if (!in_memory) check_location();

    sqlite3* raw = nullptr;
    const int rc =
        sqlite3_open_v2(path.c_str(), &raw,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    db_.reset(raw);  // a handle is allocated even when opening fails
    if (rc != SQLITE_OK) {
      throw common::config_error(path_, describe(raw, rc, "cannot open the store"));
    }
    try {
      sqlite3_extended_result_codes(db(), 1);
      sqlite3_busy_timeout(db(), k_busy_timeout_ms);
      if (sqlite3_db_readonly(db(), "main") == 1) {
        throw common::config_error(path_, "the store file is read-only");
      }
      // Look before writing anything: a foreign file is refused untouched.
      const bool fresh = inspect();
      configure(in_memory, opts.sync);
      const bool created = fresh && create_schema();
      check_tables(k_tables);
      if (!created && !in_memory) check_integrity(opts.check);
      if (!created) upgrade_schema();
      check_tables(k_tables_3);
      if (opts.max_size_bytes > 0) limit_size(opts.max_size_bytes);
      prepare();
      if (!in_memory) start_checkpointer();
      log_->info("store {}: opened ({}, schema version {})", path_,
                 created ? "created" : "existing", k_schema_version);
    } catch (const sqlite_failure& e) {
      if ((e.rc() & 0xff) == SQLITE_NOTADB) {
        throw common::config_error(path_, std::string("not an SQLite database: ") + e.what());
      }
      if (is_corruption(e.rc())) {
        throw store_damaged(path_, std::string("the store is damaged: ") + e.what() + k_way_out);
      }
      throw common::config_error(path_, e.what());
    } catch (const std::system_error& e) {  // the checkpoint thread
      throw common::config_error(path_,
                                 std::string("cannot start the checkpoint thread: ") + e.what());
    }
  }

  sqlite_store(const sqlite_store&) = delete;
  sqlite_store& operator=(const sqlite_store&) = delete;
  ~sqlite_store() override {
    if (checkpointer_) sqlite3_wal_hook(db(), nullptr, nullptr);
    checkpointer_.reset();
    // The statements are finalized and then db_ is closed by the members' destructors; as the
    // last connection, closing checkpoints the whole WAL and deletes it.
  }

  common::status save_definition(const std::string& name, std::uint32_t version,
                                 const json& doc) override {
    try {
      std::optional<json> existing = load_definition_or_throw(name, version);
      if (existing) {
        if (*existing == doc) return common::ok_status();
        return common::error::make(
            common::errc::bad_request,
            "workflow '" + name + "' version " + std::to_string(version) +
                " is already stored with a different definition; give the changed "
                "definition a new version");
      }
      const std::string text = doc.dump(-1, ' ', false, json::error_handler_t::replace);
      use u(db(), insert_definition_);
      u.bind(1, name).bind(2, static_cast<std::int64_t>(version)).bind(3, text);
      u.step([&] {
        return "save definition of workflow '" + name + "' version " + std::to_string(version);
      });
      return common::ok_status();
    } catch (const std::exception& e) {
      return common::error::make(k_store_error, e.what());
    }
  }

  std::optional<json> load_definition(const std::string& name, std::uint32_t version) override {
    try {
      return load_definition_or_throw(name, version);
    } catch (const std::exception& e) {
      log_->error("store {}: {}", path_, e.what());
      return std::nullopt;
    }
  }

  common::status commit(const commit_batch& batch) override {
    if (batch.empty()) return common::ok_status();
    try {
      // A failed ROLLBACK earlier may have left a transaction open; never nest into it.
      if (sqlite3_get_autocommit(db()) == 0) rollback();
      if (batch.virtual_now_us) ensure_meta();
      {
        use u(db(), begin_);
        u.step([] { return "commit: begin"; });
      }
      for (const auto& r : batch.instances) {
        // Most upserts change a running instance, whose id, workflow, version, parent,
        // creation time and starter never change: the narrow UPDATE leaves the indexes on those
        // columns alone (the full upsert rewrites all five). It matches only a row with the
        // same values in them, so anything else — a new id, or a record that does change one of
        // them — goes through the insert, or else the full update, with the same result as an
        // upsert.
        write_instance(update_instance_, r);
        step_rows rows = r.changed_steps ? step_rows::named : step_rows::all;
        if (sqlite3_changes(db()) == 0) {
          // A new instance has no step rows yet: all of them are written, none can be stale.
          write_instance(insert_instance_, r);
          rows = step_rows::all_new;
          if (sqlite3_changes(db()) == 0) {
            write_instance(full_update_instance_, r);
            rows = step_rows::all;
          }
        }
        write_steps(r, rows);
      }
      for (const auto& h : batch.history) {
        use u(db(), insert_history_);
        u.bind(1, h.instance_id)
            .bind(2, static_cast<std::int64_t>(h.seq))
            .bind(3, h.ts_us)
            .bind(4, h.kind)
            .bind(5, h.step);
        bind_document(u, 6, h.data);
        u.step([&] {
          return "commit: append history entry " + std::to_string(h.seq) + " (" + h.kind +
                 ") of instance '" + h.instance_id + "'";
        });
      }
      for (const auto& t : batch.triggers) {
        use u(db(), insert_trigger_);
        u.bind(1, t.workflow).bind(2, t.event_id).bind(3, t.instance_id);
        u.step([&] {
          return "commit: mark event '" + t.event_id + "' as the trigger of instance '" +
                 t.instance_id + "' of workflow '" + t.workflow + "'";
        });
      }
      for (const auto& b : batch.buffer_add) {
        use u(db(), insert_buffer_);
        u.bind(1, b.id).bind(2, b.topic).bind(3, b.correlation_id).bind(4, b.received_us);
        bind_document(u, 5, b.event);
        u.step([&] { return "commit: buffer event '" + b.id + "' on topic '" + b.topic + "'"; });
      }
      for (const auto& id : batch.buffer_remove) {
        use u(db(), delete_buffer_);
        u.bind(1, id);
        u.step([&] { return "commit: remove buffered event '" + id + "'"; });
      }
      if (batch.virtual_now_us) {
        use u(db(), put_meta_);
        u.bind(1, std::string_view("virtual_now_us")).bind(2, *batch.virtual_now_us);
        u.step([] { return "commit: store the virtual clock's time"; });
      }
      {
        use u(db(), commit_);
        u.step([] { return "commit: commit"; });
      }
      if (wal_pages_ >= k_wal_pages_limit) {
        // The background checkpoint is not keeping up: checkpoint here (BUSY if it is running).
        sqlite3_wal_checkpoint_v2(db(), nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
      }
      return common::ok_status();
    } catch (const sqlite_failure& e) {
      rollback();
      const bool full = (e.rc() & 0xff) == SQLITE_FULL;
      return common::error{std::string(full ? k_storage_full : k_store_error),
                           "store " + path_ + ": " + e.what() +
                               (full ? "; the disk or the store's size limit is full" : "") +
                               "; the batch was rolled back, nothing of it is stored",
                           full};
    } catch (const std::exception& e) {
      rollback();
      return common::error::make(k_store_error, "store " + path_ + ": " + e.what() +
                                                    "; the batch was rolled back, nothing of "
                                                    "it is stored");
    }
  }

  common::result<std::vector<instance_record>> load_active() override {
    std::vector<instance_record> out;
    try {
      use u(db(), load_active_);
      read_instances(u, out, [] { return "load active instances"; });
    } catch (const std::exception& e) {
      return read_error(e);
    }
    return out;
  }

  common::result<std::optional<instance_record>> get(const std::string& id) override {
    std::vector<instance_record> out;
    try {
      use u(db(), get_instance_);
      u.bind(1, id);
      read_instances(u, out, [&] { return "get instance '" + id + "'"; });
    } catch (const std::exception& e) {
      return read_error(e);
    }
    if (out.empty()) return std::optional<instance_record>();
    return std::optional<instance_record>(std::move(out.front()));
  }

  common::result<std::vector<instance_record>> list(const list_filter& filter) override {
    std::vector<instance_record> out;
    try {
      const bool by_status = filter.status.has_value();
      const bool by_workflow = !filter.workflow.empty();
      const bool by_starter = filter.started_by.has_value();
      const statement& s =
          list_[(by_status ? 1 : 0) + (by_workflow ? 2 : 0) + (by_starter ? 4 : 0)];
      use u(db(), s);
      if (by_status) u.bind(2, to_string(*filter.status));
      if (by_workflow) u.bind(3, filter.workflow);
      if (by_starter) u.bind(4, *filter.started_by);
      read_instances(
          u, out, [] { return "list instances"; }, filter.limit);
    } catch (const std::exception& e) {
      return read_error(e);
    }
    return out;
  }

  common::result<std::vector<history_entry>> history(const std::string& instance_id) override {
    std::vector<history_entry> out;
    try {
      use u(db(), load_history_);
      u.bind(1, instance_id);
      while (u.step([&] { return "read the history of instance '" + instance_id + "'"; })) {
        history_entry h;
        h.instance_id = instance_id;
        h.seq = static_cast<std::uint64_t>(u.integer(0));
        h.ts_us = u.integer(1);
        h.kind = u.text(2);
        h.step = u.text(3);
        h.data = u.document(4);
        if (h.data.is_discarded()) {
          undecodable("the data of history entry " + std::to_string(h.seq) + " of instance '" +
                      instance_id + "' does not decode");
        }
        out.push_back(std::move(h));
      }
    } catch (const std::exception& e) {
      return read_error(e);
    }
    return out;
  }

  std::vector<std::pair<instance_status, std::uint64_t>> count_by_status() override {
    std::vector<std::pair<instance_status, std::uint64_t>> out;
    try {
      use u(db(), count_by_status_);
      while (u.step([] { return "count instances by status"; })) {
        const std::string text = u.text(0);
        if (auto s = parse_instance_status(text)) {
          out.emplace_back(*s, static_cast<std::uint64_t>(u.integer(1)));
        } else {
          log_->error("store {}: {} instances have the unknown status '{}'", path_, u.integer(1),
                      text);
        }
      }
    } catch (const std::exception& e) {
      log_->error("store {}: {}", path_, e.what());
    }
    return out;
  }

  common::result<std::optional<std::string>> triggered_by(const std::string& workflow,
                                                          const std::string& event_id) override {
    try {
      use u(db(), triggered_by_);
      u.bind(1, workflow).bind(2, event_id);
      if (u.step([&] {
            return "look up the instance that event '" + event_id + "' started for workflow '" +
                   workflow + "'";
          })) {
        return std::optional<std::string>(u.text(0));
      }
    } catch (const std::exception& e) {
      return read_error(e);
    }
    return std::optional<std::string>();
  }

  common::result<std::vector<buffered_event>> load_buffer() override {
    std::vector<buffered_event> out;
    try {
      use u(db(), load_buffer_);
      while (u.step([] { return "load buffered events"; })) {
        buffered_event b;
        b.id = u.text(0);
        b.topic = u.text(1);
        b.correlation_id = u.text(2);
        b.received_us = u.integer(3);
        b.event = u.document(4);
        if (b.event.is_discarded()) {
          undecodable("buffered event '" + b.id + "' on topic '" + b.topic + "' does not decode");
        }
        out.push_back(std::move(b));
      }
    } catch (const std::exception& e) {
      return read_error(e);
    }
    return out;
  }

  common::result<std::optional<std::int64_t>> load_virtual_now() override {
    try {
      if (!meta_ready_ &&
          query_int("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'") ==
              0) {
        return std::optional<std::int64_t>();
      }
      ensure_meta();
      use u(db(), get_meta_);
      u.bind(1, std::string_view("virtual_now_us"));
      if (!u.step([] { return "load the virtual clock's time"; })) {
        return std::optional<std::int64_t>();
      }
      return std::optional<std::int64_t>(u.integer(0));
    } catch (const std::exception& e) {
      return read_error(e);
    }
  }

  std::size_t purge_buffer(std::int64_t before_us) override {
    try {
      use u(db(), purge_buffer_);
      u.bind(1, before_us);
      u.step([] { return "purge buffered events"; });
      return static_cast<std::size_t>(sqlite3_changes(db()));
    } catch (const std::exception& e) {
      log_->error("store {}: {}", path_, e.what());
      return 0;
    }
  }

 private:
  sqlite3* db() const { return db_.get(); }

  // The file's directory must exist and be writable: WAL mode creates FILE-wal and FILE-shm
  // next to it.
  void check_location() const {
    namespace fs = std::filesystem;
    const fs::path file(path_);
    fs::path dir = file.parent_path();
    if (dir.empty()) dir = ".";
    std::error_code ec;
    if (!fs::exists(dir, ec)) {
      throw common::config_error(path_, "directory '" + dir.string() + "' does not exist");
    }
    if (!fs::is_directory(dir, ec)) {
      throw common::config_error(path_, "'" + dir.string() + "' is not a directory");
    }
    if (fs::is_directory(file, ec)) {
      throw common::config_error(path_, "is a directory, not a store file");
    }
    if (::access(dir.c_str(), W_OK | X_OK) != 0) {
      throw common::config_error(path_, "directory '" + dir.string() +
                                            "' is not writable (the store creates its -wal "
                                            "and -shm files there)");
    }
  }

  // Replaces SQLite's automatic checkpoint (which would run inside commit()) by the
  // background checkpointer.
  void start_checkpointer() {
    exec(("PRAGMA journal_size_limit=" + std::to_string(k_journal_size_limit)).c_str(),
         "set journal_size_limit");
    checkpointer_ = std::make_unique<checkpointer>(path_, log_);
    sqlite3_wal_hook(db(), &sqlite_store::on_wal_commit, this);
  }

  // Called by SQLite in the engine's thread after each commit, with the WAL's size in pages.
  static int on_wal_commit(void* self, sqlite3* /*db*/, const char* /*schema*/, int pages) {
    auto* store = static_cast<sqlite_store*>(self);
    store->wal_pages_ = pages;
    if (pages >= k_checkpoint_pages) store->checkpointer_->request();
    return SQLITE_OK;
  }

  std::int64_t query_int(const char* sql) {
    statement s(db(), sql);
    use u(db(), s);
    if (!u.step([&] { return std::string("read ") + sql; })) return 0;
    return u.integer(0);
  }

  void exec(const char* sql, std::string_view operation) {
    const int rc = sqlite3_exec(db(), sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) fail(db(), rc, operation);
  }

  // True for an empty database (a new file); throws config_error for a database that is not
  // an Ensemble store of a schema version this build reads. Fails with SQLITE_NOTADB for a
  // file that is not SQLite at all.
  bool inspect() {
    const std::int64_t app_id = query_int("PRAGMA application_id");
    const std::int64_t version = query_int("PRAGMA user_version");
    const std::int64_t objects = query_int("SELECT count(*) FROM sqlite_master");
    return classify(app_id, version, objects);
  }

  bool classify(std::int64_t app_id, std::int64_t version, std::int64_t objects) const {
    if (app_id == k_application_id) {
      if (version >= k_oldest_schema_version && version <= k_schema_version) return false;
      if (version > k_schema_version) {
        throw common::config_error(
            path_, "store schema version " + std::to_string(version) +
                       " was written by a newer Ensemble; this build reads version " +
                       std::to_string(k_schema_version));
      }
      throw common::config_error(path_, "store schema version " + std::to_string(version) +
                                            " is not supported; this build reads versions " +
                                            std::to_string(k_oldest_schema_version) + " to " +
                                            std::to_string(k_schema_version));
    }
    if (app_id == 0 && version == 0 && objects == 0) return true;
    throw common::config_error(
        path_, "an SQLite database but not an Ensemble store (application_id " +
                   std::to_string(app_id) + ", user_version " + std::to_string(version) + ", " +
                   std::to_string(objects) + " schema objects); refusing to touch it");
  }

  void configure(bool in_memory, store_sync sync) {
    // WAL with synchronous=NORMAL (the default, --sync normal): a commit appends to the WAL
    // file without an fsync, the WAL is fsynced only at checkpoints. A committed transaction is
    // in the OS page cache when commit() returns, so it survives the orchestrator being killed
    // (SIGKILL, a crash). Only an OS crash or power loss can lose the last transactions (never
    // corrupt the file). synchronous=FULL (--sync full) fsyncs the WAL at every commit, which
    // bounds the commit rate by the disk's fsync rate. Checkpoints (which do fsync) run on a
    // background thread, see checkpointer.
    if (!in_memory) {
      const std::string mode = [&] {
        statement s(db(), "PRAGMA journal_mode=WAL");
        use u(db(), s);
        return u.step([] { return "set journal_mode=WAL"; }) ? u.text(0) : std::string();
      }();
      if (mode != "wal") {
        throw common::config_error(path_,
                                   "cannot switch the store to WAL mode (journal mode "
                                   "stays '" +
                                       mode + "')");
      }
    }
    // --sync full: the WAL is fsynced at every commit, so a commit that returned survives a
    // power loss too, at the cost of one fsync per batch (docs/benchmarks.md).
    if (sync == store_sync::full) {
      exec("PRAGMA synchronous=FULL", "set synchronous=FULL");
    } else {
      exec("PRAGMA synchronous=NORMAL", "set synchronous=NORMAL");
    }
    exec("PRAGMA cache_size=-32768", "set cache_size");  // 32 MiB of page cache
  }

  // Creates the schema in one transaction, unless another process created it meanwhile.
  bool create_schema() {
    exec("BEGIN IMMEDIATE", "create schema: begin");
    try {
      const bool still_fresh =
          classify(query_int("PRAGMA application_id"), query_int("PRAGMA user_version"),
                   query_int("SELECT count(*) FROM sqlite_master"));
      if (still_fresh) {
        exec(k_schema_sql, "create schema");
        exec(k_instance_steps_sql, "create schema: table instance_steps");
        exec(("PRAGMA application_id=" + std::to_string(k_application_id)).c_str(),
             "create schema: set application_id");
        exec(("PRAGMA user_version=" + std::to_string(k_schema_version)).c_str(),
             "create schema: set user_version");
      }
      exec("COMMIT", "create schema: commit");
      return still_fresh;
    } catch (...) {
      sqlite3_exec(db(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }
  }

  // Brings a store of an older schema version this build reads up to k_schema_version, in one
  // transaction (and not at all if another process did it meanwhile).
  void upgrade_schema() {
    if (query_int("PRAGMA user_version") == k_schema_version) return;
    exec("BEGIN IMMEDIATE", "upgrade schema: begin");
    try {
      const std::int64_t from = query_int("PRAGMA user_version");
      if (from < 2) exec(k_upgrade_to_2_sql, "upgrade schema to version 2 (instances.started_by)");
      if (from < 3) split_states();
      exec(("PRAGMA user_version=" + std::to_string(k_schema_version)).c_str(),
           "upgrade schema: set user_version");
      exec("COMMIT", "upgrade schema: commit");
      if (from != k_schema_version) {
        log_->info("store {}: schema upgraded from version {} to {}", path_, from,
                   k_schema_version);
      }
    } catch (...) {
      sqlite3_exec(db(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }
  }

  template <std::size_t N>
  void check_tables(const std::array<std::string_view, N>& tables) {
    for (auto table : tables) {
      statement s(db(), "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1");
      use u(db(), s);
      u.bind(1, table);
      if (!u.step([] { return "check tables"; }) || u.integer(0) != 1) {
        throw store_damaged(path_, "the store has no table '" + std::string(table) +
                                       "' (damaged schema)" + k_way_out);
      }
    }
  }

  // Preparing every statement also checks that the tables have the columns this build uses.
  void prepare() {
    begin_ = statement(db(), "BEGIN IMMEDIATE");
    commit_ = statement(db(), "COMMIT");
    rollback_ = statement(db(), "ROLLBACK");
    insert_instance_ =
        statement(db(),
                  "INSERT INTO instances(id, workflow, version, status, parent_id, created_us, "
                  "updated_us, active, state, started_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, "
                  "?8, ?9, ?10) ON CONFLICT(id) DO NOTHING");
    full_update_instance_ =
        statement(db(),
                  "UPDATE instances SET workflow = ?2, version = ?3, status = ?4, parent_id = ?5, "
                  "created_us = ?6, updated_us = ?7, active = ?8, state = ?9, started_by = ?10 "
                  "WHERE id = ?1");
    update_instance_ = statement(db(),
                                 "UPDATE instances SET status = ?4, updated_us = ?7, active = ?8, "
                                 "state = ?9 WHERE id = ?1 AND workflow = ?2 AND version = ?3 AND "
                                 "parent_id = ?5 AND created_us = ?6 AND started_by = ?10");
    insert_history_ = statement(db(),
                                "INSERT INTO history(instance_id, seq, ts_us, kind, step, data) "
                                "VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
    insert_trigger_ = statement(
        db(), "INSERT INTO triggers(workflow, event_id, instance_id) VALUES (?1, ?2, ?3)");
    insert_buffer_ = statement(db(),
                               "INSERT INTO buffer(id, topic, correlation_id, received_us, "
                               "event) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(id) DO NOTHING");
    delete_buffer_ = statement(db(), "DELETE FROM buffer WHERE id = ?1");
    purge_buffer_ = statement(db(), "DELETE FROM buffer WHERE received_us < ?1");
    load_buffer_ = statement(db(),
                             "SELECT id, topic, correlation_id, received_us, event FROM buffer "
                             "ORDER BY received_us, rowid");
    upsert_step_ = statement(db(), k_upsert_step_sql);
    insert_step_ = statement(db(),
                             "INSERT INTO instance_steps(instance_id, step, visible, run) VALUES "
                             "(?1, ?2, ?3, ?4)");
    delete_step_ =
        statement(db(), "DELETE FROM instance_steps WHERE instance_id = ?1 AND step = ?2");
    count_steps_ = statement(db(), "SELECT count(*) FROM instance_steps WHERE instance_id = ?1");
    step_names_ = statement(db(), "SELECT step FROM instance_steps WHERE instance_id = ?1");
    // One query per read, whatever the number of instances: each instance's row joined with
    // its step rows, an instance's rows together (ordered by its unique rowid).
    const std::string with_steps = std::string(k_select_instance_with_steps);
    load_active_ =
        statement(db(), (with_steps + " FROM instances AS i LEFT JOIN instance_steps AS s ON "
                                      "s.instance_id = i.id WHERE i.active = 1 ORDER BY "
                                      "i.created_us, i.rowid")
                            .c_str());
    get_instance_ =
        statement(db(), (with_steps + " FROM instances AS i LEFT JOIN instance_steps AS s ON "
                                      "s.instance_id = i.id WHERE i.id = ?1")
                            .c_str());
    // Indexed by [has status filter + 2 * has workflow filter + 4 * has started_by filter].
    const char* k_where[] = {"i.status = ?2", "i.workflow = ?3", "i.started_by = ?4"};
    for (std::size_t i = 0; i < list_.size(); ++i) {
      std::string where;
      for (std::size_t bit = 0; bit < 3; ++bit) {
        if ((i & (std::size_t{1} << bit)) == 0) continue;
        where += (where.empty() ? " WHERE " : " AND ") + std::string(k_where[bit]);
      }
      // No LIMIT: read_instances stops after `limit` instances (a LIMIT on the joined rows
      // would cut an instance's steps; one in a subquery makes SQLite sort the joined rows).
      list_[i] = statement(db(), (with_steps +
                                  " FROM instances AS i LEFT JOIN instance_steps AS s ON "
                                  "s.instance_id = i.id" +
                                  where + " ORDER BY i.created_us DESC, i.rowid DESC")
                                     .c_str());
    }
    load_history_ = statement(db(),
                              "SELECT seq, ts_us, kind, step, data FROM history "
                              "WHERE instance_id = ?1 ORDER BY seq");
    count_by_status_ =
        statement(db(), "SELECT status, count(*) FROM instances GROUP BY status ORDER BY status");
    triggered_by_ =
        statement(db(), "SELECT instance_id FROM triggers WHERE workflow = ?1 AND event_id = ?2");
    load_definition_ =
        statement(db(), "SELECT doc FROM definitions WHERE name = ?1 AND version = ?2");
    insert_definition_ =
        statement(db(), "INSERT INTO definitions(name, version, doc) VALUES (?1, ?2, ?3)");
  }

  // The table meta and its statements, created on first use (outside any transaction).
  void ensure_meta() {
    if (meta_ready_) return;
    exec(k_meta_sql, "create table meta");
    put_meta_ = statement(db(),
                          "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO "
                          "UPDATE SET value = excluded.value");
    get_meta_ = statement(db(), "SELECT value FROM meta WHERE key = ?1");
    meta_ready_ = true;
  }

  std::optional<json> load_definition_or_throw(const std::string& name, std::uint32_t version) {
    use u(db(), load_definition_);
    u.bind(1, name).bind(2, static_cast<std::int64_t>(version));
    const auto what = [&] {
      return "load definition of workflow '" + name + "' version " + std::to_string(version);
    };
    if (!u.step(what)) return std::nullopt;
    json doc = u.document(0);
    if (doc.is_discarded()) throw sqlite_failure(SQLITE_CORRUPT, what() + ": does not decode");
    return doc;
  }

  // Binds the record to an instance statement (?1..?10 as in insert_instance_) and steps it.
  void write_instance(const statement& s, const instance_record& r) {
    use u(db(), s);
    u.bind(1, r.id)
        .bind(2, r.workflow)
        .bind(3, static_cast<std::int64_t>(r.version))
        .bind(4, to_string(r.status))
        .bind(5, r.parent_id)
        .bind(6, r.created_us)
        .bind(7, r.updated_us)
        .bind(8, std::int64_t{r.active ? 1 : 0})
        .bind(10, r.started_by);
    if (r.state.is_null()) {
      u.bind_null(9);
    } else {
      const auto [data, size] = msgpack_.encode_rest(r.state);
      u.bind_blob(9, data, size);
    }
    u.step([&] { return "commit: upsert instance '" + r.id + "'"; });
  }

  // Encodes into the store's reused buffer (no allocation per row once warm) and binds it
  // without a copy; the buffer stays untouched until the statement has stepped.
  void bind_document(use& u, int index, const json& doc) {
    if (doc.is_null()) {
      u.bind_null(index);
      return;
    }
    if constexpr (k_json_as_msgpack) {
      const auto [data, size] = msgpack_.encode(doc);
      u.bind_blob(index, data, size);
    } else {
      text_buffer_ = doc.dump(-1, ' ', false, json::error_handler_t::replace);
      u.bind(index, text_buffer_);
    }
  }

  // Which step rows of an instance a commit writes: those `changed_steps` names, or all (and
  // then the rows of steps the state no longer has are deleted, unless the instance is new).
  enum class step_rows { named, all, all_new };
  void write_steps(const instance_record& r, step_rows rows) {
    const json::object_t* visible = visible_steps(r.state);
    const json::object_t* run = run_steps(r.state);
    if (rows == step_rows::named) {
      for (const auto& name : *r.changed_steps) write_step(upsert_step_, r.id, name, visible, run);
      return;
    }
    // A new instance's rows are plain inserts (no conflict to look for).
    const statement& write = rows == step_rows::all_new ? insert_step_ : upsert_step_;
    std::int64_t written = 0;
    if (visible != nullptr) {
      for (const auto& [name, part] : *visible) {
        write_step(write, r.id, name, visible, run);
        ++written;
      }
    }
    if (run != nullptr) {
      for (const auto& [name, part] : *run) {
        if (find_step(visible, name) != nullptr) continue;
        write_step(write, r.id, name, visible, run);
        ++written;
      }
    }
    if (rows == step_rows::all_new) return;
    // Rows of steps the state no longer has (rare: the engine does not remove steps).
    const auto what = [&] { return "commit: count the step rows of instance '" + r.id + "'"; };
    std::int64_t stored = 0;
    {
      use u(db(), count_steps_);
      u.bind(1, r.id);
      if (u.step(what)) stored = u.integer(0);
    }
    if (stored <= written) return;
    std::vector<std::string> gone;
    {
      use u(db(), step_names_);
      u.bind(1, r.id);
      while (u.step(what)) {
        std::string name = u.text(0);
        if (find_step(visible, name) == nullptr && find_step(run, name) == nullptr) {
          gone.push_back(std::move(name));
        }
      }
    }
    for (const auto& name : gone) write_step(upsert_step_, r.id, name, nullptr, nullptr);
  }

  // Writes step `name` of instance `id` from the state's step objects: its row upserted, or
  // deleted when neither has it.
  void write_step(const statement& upsert, const std::string& id, const std::string& name,
                  const json::object_t* visible, const json::object_t* run) {
    const json* v = find_step(visible, name);
    const json* rn = find_step(run, name);
    const auto what = [&] { return "commit: write step '" + name + "' of instance '" + id + "'"; };
    if (v == nullptr && rn == nullptr) {
      use u(db(), delete_step_);
      u.bind(1, id).bind(2, name);
      u.step(what);
      return;
    }
    use u(db(), upsert);
    u.bind(1, id).bind(2, name);
    // NULL: the document has no such entry (a JSON null is stored as MessagePack nil).
    if (v != nullptr) {
      const auto [data, size] = msgpack_.encode(*v);
      u.bind_blob(3, data, size);
    } else {
      u.bind_null(3);
    }
    if (rn != nullptr) {
      const auto [data, size] = msgpack_run_.encode(*rn);
      u.bind_blob(4, data, size);
    } else {
      u.bind_null(4);
    }
    u.step(what);
  }

  // Reads the rows of a k_select_instance_with_steps query: each instance's columns, then its
  // step rows put back into its state.
  template <class Describe>
  void read_instances(use& u, std::vector<instance_record>& out, Describe&& what,
                      std::size_t limit = std::numeric_limits<std::size_t>::max()) {
    if (limit == 0) return;
    bool row = u.step(what);
    while (row && out.size() < limit) {
      instance_record r;
      r.id = u.text(0);
      r.workflow = u.text(1);
      r.version = static_cast<std::uint32_t>(u.integer(2));
      const std::string status = u.text(3);
      const auto parsed = parse_instance_status(status);
      if (!parsed) undecodable("instance '" + r.id + "' has the unknown status '" + status + "'");
      r.status = *parsed;
      r.parent_id = u.text(4);
      r.created_us = u.integer(5);
      r.updated_us = u.integer(6);
      r.active = u.integer(7) != 0;
      r.state = u.document(8);
      r.started_by = u.text(9);
      if (r.state.is_discarded()) {
        undecodable("the state of instance '" + r.id + "' (workflow " + r.workflow +
                    ") does not decode");
      }
      json::object_t* visible = mutable_steps(r.state);
      json::object_t* run = nullptr;
      if (r.state.is_object()) {
        auto& o = r.state.get_ref<json::object_t&>();
        if (auto it = o.find("run"); it != o.end()) run = mutable_steps(it->second);
      }
      do {
        if (!u.is_null(k_step_column)) {
          const std::string step = u.text(k_step_column);
          read_step_part(u, k_step_column + 1, visible, r, step, "visible");
          read_step_part(u, k_step_column + 2, run, r, step, "run");
        }
        row = u.step(what);
      } while (row && u.view(0) == r.id);
      out.push_back(std::move(r));
    }
  }

  // One part of a step row, put into the state's step object (when the rest of the state has
  // one: a row the state has no place for is ignored).
  void read_step_part(const use& u, int column, json::object_t* steps, const instance_record& r,
                      const std::string& step, const char* part) {
    if (u.is_null(column) || steps == nullptr) return;
    json doc = u.document(column);
    if (doc.is_discarded()) {
      undecodable("step '" + step + "' of instance '" + r.id + "' (workflow " + r.workflow +
                  ") does not decode (table instance_steps, column " + part + ")");
    }
    (*steps)[step] = std::move(doc);
  }

  // Version 2 -> 3: each instance's state split into instances.state and instance_steps rows,
  // inside upgrade_schema's transaction. A state that does not decode is left whole (it reads as
  // before: an error naming the instance).
  void split_states() {
    exec(k_instance_steps_sql, "upgrade schema to version 3 (table instance_steps)");
    statement select(db(),
                     "SELECT rowid, id, state FROM instances WHERE rowid > ?1 ORDER BY rowid "
                     "LIMIT 256");
    statement update(db(), "UPDATE instances SET state = ?2 WHERE rowid = ?1");
    statement upsert(db(), k_upsert_step_sql);
    const auto what = [] { return std::string("upgrade schema to version 3 (split states)"); };
    std::int64_t after = std::numeric_limits<std::int64_t>::min();
    std::size_t split = 0;
    for (;;) {
      std::vector<std::tuple<std::int64_t, std::string, json>> chunk;
      {
        use u(db(), select);
        u.bind(1, after);
        while (u.step(what)) chunk.emplace_back(u.integer(0), u.text(1), u.document(2));
      }
      if (chunk.empty()) break;
      after = std::get<0>(chunk.back());
      for (const auto& [rowid, id, state] : chunk) {
        if (state.is_discarded()) {
          log_->warn("store {}: upgrade: the state of instance '{}' does not decode; kept as it is",
                     path_, id);
          continue;
        }
        const json::object_t* visible = visible_steps(state);
        const json::object_t* run = run_steps(state);
        if (visible == nullptr && run == nullptr) continue;
        {
          use u(db(), update);
          const auto [data, size] = msgpack_.encode_rest(state);
          u.bind(1, rowid).bind_blob(2, data, size);
          u.step(what);
        }
        std::vector<std::string> names;
        if (visible != nullptr) {
          for (const auto& [name, part] : *visible) names.push_back(name);
        }
        if (run != nullptr) {
          for (const auto& [name, part] : *run) {
            if (find_step(visible, name) == nullptr) names.push_back(name);
          }
        }
        for (const auto& name : names) write_step(upsert, id, name, visible, run);
        ++split;
      }
    }
    log_->info("store {}: upgrade: {} instance states split into step rows", path_, split);
  }

  // A query that failed or met a row it cannot read: an error for the caller (which names the
  // store and the row), logged here too since it means the file is damaged or foreign.
  common::error read_error(const std::exception& e) {
    log_->error("store {}: {}", path_, e.what());
    return common::error{std::string(k_store_error), "store " + path_ + ": " + e.what(), false};
  }

  // PRAGMA quick_check / integrity_check on an existing store; throws store_damaged with the
  // first problems found.
  void check_integrity(store_check check) {
    if (check == store_check::off) {
      log_->warn("store {}: integrity check skipped (--store-check off)", path_);
      return;
    }
    const char* pragma = check == store_check::full ? "integrity_check" : "quick_check";
    const auto started = std::chrono::steady_clock::now();
    const std::string sql =
        std::string("PRAGMA ") + pragma + "(" + std::to_string(k_check_max_errors) + ")";
    statement s(db(), sql.c_str());
    use u(db(), s);
    std::vector<std::string> problems;
    while (u.step([&] { return std::string("PRAGMA ") + pragma; })) {
      std::string line = u.text(0);
      // The first problem starts with "*** in database main ***\n": keep the error one line.
      std::replace(line.begin(), line.end(), '\n', ' ');
      if (line != "ok") problems.push_back(std::move(line));
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - started)
                        .count();
    if (!problems.empty()) {
      std::string what = "the store is damaged: PRAGMA " + std::string(pragma) + " found";
      for (std::size_t i = 0; i < problems.size(); ++i) {
        what += (i == 0 ? ": " : "; ") + problems[i];
      }
      if (problems.size() == static_cast<std::size_t>(k_check_max_errors)) what += "; ...";
      throw store_damaged(path_, what + k_way_out);
    }
    log_->info("store {}: {} ok in {} ms", path_, pragma, ms);
  }

  void limit_size(std::int64_t max_bytes) {
    const std::int64_t page_size = query_int("PRAGMA page_size");
    const std::int64_t pages = std::max<std::int64_t>(1, max_bytes / page_size);
    const std::int64_t now = query_int("PRAGMA page_count");
    const std::int64_t set = query_int(("PRAGMA max_page_count=" + std::to_string(pages)).c_str());
    if (set != pages) {
      log_->warn(
          "store {}: size limit {} bytes is below the file's size ({} pages of {} bytes); "
          "the store cannot grow",
          path_, max_bytes, now, page_size);
    }
  }

  void rollback() {
    if (sqlite3_get_autocommit(db()) != 0) return;  // SQLite already rolled back
    const int rc = sqlite3_step(rollback_.get());
    sqlite3_reset(rollback_.get());
    if (rc != SQLITE_DONE) {
      log_->error("store {}: {}", path_, describe(db(), rc, "rollback"));
    }
  }

  std::string path_;
  std::shared_ptr<spdlog::logger> log_;
  db_handle db_;  // declared before the statements: finalized first, closed last
  statement begin_, commit_, rollback_;
  statement insert_instance_, full_update_instance_, update_instance_, insert_history_,
      insert_trigger_, insert_buffer_, delete_buffer_;
  statement purge_buffer_, load_buffer_, load_active_, get_instance_, load_history_;
  statement count_by_status_, triggered_by_, load_definition_, insert_definition_;
  statement upsert_step_, insert_step_, delete_step_, count_steps_, step_names_;
  statement put_meta_, get_meta_;  // ensure_meta()
  bool meta_ready_ = false;
  std::array<statement, 8> list_;
  msgpack_encoder msgpack_;
  msgpack_encoder msgpack_run_;  // a step row's second part, bound alongside msgpack_'s
  std::string text_buffer_;
  int wal_pages_ = 0;
  std::unique_ptr<checkpointer> checkpointer_;  // after db_: stopped before db_ is closed
};

}  // namespace

std::unique_ptr<store> open_sqlite_store(const std::string& path, const sqlite_options& opts) {
  return std::make_unique<sqlite_store>(path, opts);
}

}  // namespace ensemble::orchestrator
