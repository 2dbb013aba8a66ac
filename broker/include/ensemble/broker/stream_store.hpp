#pragma once
// Storage for durable streams: named, ordered, persistent logs of events (docs/streams-storage.md).
//
// A stream_store holds streams and, per stream, the opaque states of its durable consumers.
// It is a passive object driven by one thread (the broker's loop): it starts no threads and
// never blocks on anything but its own files. The broker uses it in poll batches:
//
//   for each event of the batch:  store.append(stream, {records})   // seqs assigned, not durable
//   store.flush();                                                  // one write (+ one fdatasync)
//   ack every publish of the batch if flush() succeeded, else answer the error code
//
// Guarantees:
//  - Sequences start at 1, increase by one per stored record and are never reused, also across
//    reopen and after retention removed everything. A read never skips a sequence except below
//    first_seq, where retention removed records.
//  - append() de-duplicates by event_id within the stream's duplicate_window (a duplicate
//    returns the original sequence, flagged, and stores nothing), also across reopen.
//  - Nothing appended is durable or readable before flush() returns ok. After an ok flush,
//    with sync::os the records are in the kernel (they survive the broker being killed, not a
//    power loss or kernel crash); with sync::always they were fdatasync'ed (they survive both).
//  - flush() is all or nothing: if it fails (storage_full, storage_failed) none of the records
//    appended since the previous flush is stored, their sequences are handed out again, and
//    every record stored before is intact. Appends work again once the cause is gone.
//  - Corruption is never skipped: a damaged record anywhere but the torn tail of the last
//    segment makes the stream answer storage_corrupt, naming the file, the offset and what is
//    wrong. A torn tail (a write the process or machine died in) is cut off at open, logged
//    and counted in stats().
// Errors carry the codes in streams::errc, meant to be sent to the peer as they are.

#include <cstddef>
#include <cstdint>
#include <ensemble/broker/stream_types.hpp>
#include <ensemble/common/result.hpp>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ensemble::broker::streams {

namespace errc {
inline constexpr std::string_view storage_full = "storage_full";        // disk or quota full
inline constexpr std::string_view storage_corrupt = "storage_corrupt";  // damaged file
inline constexpr std::string_view storage_failed = "storage_failed";    // other I/O error
inline constexpr std::string_view not_found = "not_found";
inline constexpr std::string_view already_exists = "already_exists";
inline constexpr std::string_view bad_request = common::errc::bad_request;
}  // namespace errc

// When an ok flush() may be acknowledged to a publisher (see the guarantees above).
enum class sync {
  os,      // write(2) before flush() returns: survives a killed broker, not a power loss
  always,  // fdatasync before flush() returns, once per touched file per flush (group commit)
};

struct stream_info {
  stream_config config;
  sequence first_seq = 1;  // first retained; last_seq + 1 when the stream is empty
  sequence last_seq = 0;   // last stored; 0 when nothing was ever stored
  std::uint64_t count = 0;
  std::uint64_t bytes = 0;  // retained, as stored (framing included)
  std::int64_t first_ts_ms = 0;
  std::int64_t last_ts_ms = 0;
};

struct append_result {
  sequence seq = 0;
  bool duplicate = false;  // seq is the original record's; nothing was appended
};

struct store_stats {
  std::uint64_t torn_records = 0;  // torn tails cut off at open
  std::uint64_t torn_bytes = 0;
  std::uint64_t flushes = 0;
  std::uint64_t flush_failures = 0;
  std::uint64_t syncs = 0;  // fdatasync/fsync calls
  // Event ids forgotten before their duplicate window ended (duplicate_ids_max reached).
  std::uint64_t dedup_evicted = 0;
};

class stream_store {
 public:
  virtual ~stream_store() = default;

  // Streams. Names are [A-Za-z0-9_-]{1,64}; the config is persisted with the stream.
  virtual common::status create_stream(const stream_config& config) = 0;
  virtual common::status delete_stream(std::string_view name) = 0;  // and its consumer states
  virtual std::vector<stream_config> list_streams() const = 0;
  virtual common::result<stream_info> info(std::string_view name) const = 0;

  // Assigns sequences to `records` in order (their seq is ignored; a ts_ms of 0 is stamped
  // with the store's clock, and timestamps are kept non-decreasing). Not durable, not
  // readable, until flush().
  virtual common::result<std::vector<append_result>> append(std::string_view stream,
                                                            std::span<const record> records) = 0;
  // Makes every append since the last flush durable per the sync policy, then applies
  // retention. All or nothing (see above).
  virtual common::status flush() = 0;

  // Records from `from` (or first_seq, if `from` is below it) in order: at most max_records,
  // and at most max_bytes as stored (stream_info::bytes counts the same way), except that the
  // first record is always returned.
  // Empty past last_seq.
  virtual common::result<std::vector<record>> read(std::string_view stream, sequence from,
                                                   std::size_t max_records,
                                                   std::size_t max_bytes) = 0;
  // The first retained sequence stored at or after ts_ms; last_seq + 1 when there is none
  // (where a consumer starting at that time begins).
  virtual common::result<sequence> seq_at_time(std::string_view stream, std::int64_t ts_ms) = 0;

  // Applies max_age (and the other limits) at `now_ms`; returns how many records went.
  virtual common::result<std::uint64_t> expire(std::int64_t now_ms) = 0;

  // Consumer states: an opaque blob per consumer name ([A-Za-z0-9_-]{1,64}), replaced as a
  // whole (written to a temporary file, then renamed; fdatasync'ed with sync::always).
  virtual common::status save_consumer_state(std::string_view stream, std::string_view consumer,
                                             std::string_view blob) = 0;
  virtual common::status delete_consumer_state(std::string_view stream,
                                               std::string_view consumer) = 0;
  virtual common::result<std::map<std::string, std::string>> load_consumer_states(
      std::string_view stream) = 0;

  virtual store_stats stats() const = 0;
};

// The seam under the file store's writes, so tests can make the disk fail (ENOSPC) on demand.
// Return values follow the system calls, with -errno instead of -1.
class file_writer {
 public:
  virtual ~file_writer() = default;
  virtual std::int64_t write(int fd, const void* data, std::size_t size) = 0;  // bytes or -errno
  virtual int sync_data(int fd) = 0;                                           // 0 or -errno
};
std::shared_ptr<file_writer> posix_file_writer();

struct file_store_options {
  sync sync_policy = sync::os;
  // A segment file is closed and a new one started past this size (a segment holds at least
  // one record). Retention deletes whole segment files.
  std::uint64_t segment_max_bytes = 64ull << 20;
  // Milliseconds since the Unix epoch; the wall clock when empty.
  std::function<std::int64_t()> clock;
  // The writes; posix_file_writer() when empty.
  std::shared_ptr<file_writer> writer;
};

// The embedded segment-log store in `dir` (created if missing). Takes an exclusive lock on the
// directory. Fails only if the directory cannot be used; a damaged stream opens broken and
// answers storage_corrupt (so that the other streams stay available).
common::result<std::unique_ptr<stream_store>> open_file_store(const std::string& dir,
                                                              file_store_options options = {});

}  // namespace ensemble::broker::streams
