// The embedded segment-log implementation of stream_store (docs/streams-storage.md).
//
// Per stream, a directory holds config.json, the segment files (stream_format.hpp) and
// consumers/<name>.state. Everything needed to serve reads is indexed in memory: per segment,
// the offset, size and timestamp of each record (16 bytes a record), rebuilt by reading every
// segment at open, which also verifies every checksum. Retention is logical (first_seq moves
// exactly) and physical by whole segments; since the retention limits are a pure function of the
// log and the clock, it is recomputed at open instead of being persisted.

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <ensemble/broker/stream_store.hpp>
#include <ensemble/common/logging.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include "stream_format.hpp"

namespace ensemble::broker::streams {
namespace {

namespace fs = std::filesystem;
using common::error;
using common::result;
using common::status;

constexpr std::string_view k_config_file = "config.json";
constexpr std::string_view k_consumers_dir = "consumers";
constexpr std::string_view k_state_suffix = ".state";
constexpr std::string_view k_state_magic = "ENCS";
constexpr std::string_view k_creating_suffix = ".creating";
constexpr std::string_view k_deleting_suffix = ".deleting";

error make_error(std::string_view code, std::string message) {
  return error::make(code, std::move(message));
}

// errno (positive) to the error a peer gets.
error io_error(int err, const std::string& what) {
  const bool full = err == ENOSPC || err == EDQUOT;
  return make_error(full ? errc::storage_full : errc::storage_failed,
                    what + ": " + std::strerror(err));
}

class posix_writer final : public file_writer {
 public:
  std::int64_t write(int fd, const void* data, std::size_t size) override {
    for (;;) {
      const auto n = ::write(fd, data, size);
      if (n < 0 && errno == EINTR) continue;
      return n < 0 ? -errno : n;
    }
  }
  int sync_data(int fd) override { return ::fdatasync(fd) == 0 ? 0 : -errno; }
};

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
  });
}

std::int64_t wall_clock_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct index_entry {
  std::uint32_t offset = 0;
  std::uint32_t size = 0;
  std::int64_t ts_ms = 0;
};

struct segment {
  sequence first_seq = 1;
  std::string path;
  int fd = -1;
  std::uint64_t size = 0;          // bytes in the file
  std::vector<index_entry> index;  // index[i] is sequence first_seq + i
  sequence end_seq() const { return first_seq + index.size(); }
  ~segment() {
    if (fd >= 0) ::close(fd);
  }
};

struct pending_record {
  sequence seq = 0;
  std::int64_t ts_ms = 0;
  std::uint32_t size = 0;
  std::string event_id;
};

struct dedup_entry {
  std::int64_t ts_ms;
  std::string event_id;
  sequence seq;
};

struct stream_state {
  stream_config config;
  std::string dir;
  std::vector<std::unique_ptr<segment>> segments;  // never empty unless broken
  sequence first_seq = 1;                          // logical: retention moves it exactly
  std::uint64_t bytes = 0;                         // frames in [first_seq, last_seq]
  std::int64_t stored_last_ts = 0;
  // Appended since the last flush.
  sequence next_seq = 1;
  std::int64_t pending_last_ts = 0;
  std::string pending;
  std::vector<pending_record> pending_meta;
  std::unordered_map<std::string, sequence> pending_dedup;
  // Stored event ids within the duplicate window, oldest first in dedup_order.
  std::unordered_map<std::string, sequence> dedup;
  std::deque<dedup_entry> dedup_order;
  std::optional<error> broken;  // every operation but delete answers this

  sequence last_seq() const { return segments.back()->end_seq() - 1; }
  const index_entry& entry(sequence seq) const {
    return segment_of(seq).index[seq - segment_of(seq).first_seq];
  }
  const segment& segment_of(sequence seq) const {
    auto it = std::upper_bound(segments.begin(), segments.end(), seq,
                               [](sequence s, const auto& seg) { return s < seg->first_seq; });
    return **(it - 1);
  }
};

result<std::string> read_whole_file(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return io_error(errno, "stat " + path);
  std::string data(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < data.size()) {
    const auto n = ::pread(fd, data.data() + done, data.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error(errno, "read " + path);
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  data.resize(done);
  return data;
}

nlohmann::json config_to_json(const stream_config& c) {
  return {{"format", 1},
          {"name", c.name},
          {"topic_prefixes", c.topic_prefixes},
          {"max_age_ms", c.max_age.count()},
          {"max_bytes", c.max_bytes},
          {"max_events", c.max_events},
          {"duplicate_window_ms", c.duplicate_window.count()},
          {"duplicate_ids_max", c.duplicate_ids_max}};
}

stream_config config_from_json(const nlohmann::json& j) {
  stream_config c;
  c.name = j.at("name").get<std::string>();
  c.topic_prefixes = j.at("topic_prefixes").get<std::vector<std::string>>();
  c.max_age = std::chrono::milliseconds(j.at("max_age_ms").get<std::int64_t>());
  c.max_bytes = j.at("max_bytes").get<std::uint64_t>();
  c.max_events = j.at("max_events").get<std::uint64_t>();
  c.duplicate_window = std::chrono::milliseconds(j.at("duplicate_window_ms").get<std::int64_t>());
  c.duplicate_ids_max = j.value("duplicate_ids_max", c.duplicate_ids_max);
  return c;
}

class file_store final : public stream_store {
 public:
  file_store(std::string dir, file_store_options options, int lock_fd)
      : dir_(std::move(dir)),
        opt_(std::move(options)),
        lock_fd_(lock_fd),
        log_(common::component_logger("broker")) {
    if (!opt_.clock) opt_.clock = wall_clock_ms;
    if (!opt_.writer) opt_.writer = posix_file_writer();
    opt_.segment_max_bytes =
        std::clamp<std::uint64_t>(opt_.segment_max_bytes, 4096, std::uint64_t{1} << 30);
  }
  ~file_store() override {
    streams_.clear();
    if (lock_fd_ >= 0) ::close(lock_fd_);
  }

  void open_all() {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) {
      if (!e.is_directory()) continue;
      const std::string name = e.path().filename().string();
      if (name.ends_with(k_creating_suffix) || name.ends_with(k_deleting_suffix)) {
        // A create or delete that did not finish: neither ever happened / finish it.
        std::error_code ec;
        fs::remove_all(e.path(), ec);
        continue;
      }
      if (valid_name(name)) names.push_back(name);
    }
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
      auto s = std::make_unique<stream_state>();
      s->dir = dir_ + "/" + name;
      s->config.name = name;
      load_stream(*s);
      if (s->broken) {
        log_->error("stream {}: cannot be used: {}", name, s->broken->to_string());
      } else {
        log_->info("stream {}: opened, seq {}..{}, {} bytes", name, s->first_seq, s->last_seq(),
                   s->bytes);
      }
      streams_.emplace(name, std::move(s));
    }
  }

  status create_stream(const stream_config& config) override {
    if (!valid_name(config.name)) {
      return make_error(errc::bad_request,
                        "stream name '" + config.name + "' is not [A-Za-z0-9_-]{1,64}");
    }
    if (config.max_age.count() < 0 || config.duplicate_window.count() < 0) {
      return make_error(errc::bad_request,
                        "stream " + config.name + ": max_age and duplicate_window must be >= 0");
    }
    if (streams_.contains(config.name)) {
      return make_error(errc::already_exists, "stream " + config.name + " already exists");
    }
    const std::string final_dir = dir_ + "/" + config.name;
    const std::string tmp_dir = final_dir + std::string(k_creating_suffix);
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);
    if (!fs::create_directory(tmp_dir, ec) || ec) {
      return io_error(ec.value() != 0 ? ec.value() : EEXIST, "create directory " + tmp_dir);
    }
    auto undo = [&] { fs::remove_all(tmp_dir, ec); };
    if (auto st = write_file(tmp_dir + "/" + std::string(k_config_file),
                             config_to_json(config).dump(2) + "\n", true);
        !st) {
      undo();
      return st;
    }
    auto seg = create_segment(tmp_dir, 1, true);
    if (!seg) {
      undo();
      return seg.err();
    }
    if (auto st = sync_dir(tmp_dir); !st) {
      undo();
      return st;
    }
    if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) {
      const int err = errno;
      undo();
      return io_error(err, "rename " + tmp_dir + " to " + final_dir);
    }
    if (auto st = sync_dir(dir_); !st) return st;
    auto s = std::make_unique<stream_state>();
    s->config = config;
    s->dir = final_dir;
    (*seg)->path = final_dir + "/" + format::segment_file_name(1);
    s->segments.push_back(std::move(*seg));
    streams_.emplace(config.name, std::move(s));
    log_->info("stream {}: created", config.name);
    return common::ok_status();
  }

  status delete_stream(std::string_view name) override {
    auto it = streams_.find(name);
    if (it == streams_.end()) return not_found(name);
    const std::string path = it->second->dir;
    dirty_.erase(it->second.get());
    streams_.erase(it);  // closes the files
    const std::string doomed = path + std::string(k_deleting_suffix);
    if (::rename(path.c_str(), doomed.c_str()) != 0) {
      return io_error(errno, "rename " + path + " to " + doomed);
    }
    (void)sync_dir(dir_);
    std::error_code ec;
    fs::remove_all(doomed, ec);
    log_->info("stream {}: deleted", name);
    return common::ok_status();
  }

  std::vector<stream_config> list_streams() const override {
    std::vector<stream_config> out;
    for (const auto& [name, s] : streams_) out.push_back(s->config);
    return out;
  }

  result<stream_info> info(std::string_view name) const override {
    auto found = find(name);
    if (!found) return found.err();
    const stream_state& s = **found;
    stream_info i;
    i.config = s.config;
    i.first_seq = s.first_seq;
    i.last_seq = s.last_seq();
    i.count = i.last_seq + 1 - i.first_seq;
    i.bytes = s.bytes;
    if (i.count > 0) {
      i.first_ts_ms = s.entry(i.first_seq).ts_ms;
      i.last_ts_ms = s.entry(i.last_seq).ts_ms;
    }
    return i;
  }

  result<std::vector<append_result>> append(std::string_view stream,
                                            std::span<const record> records) override {
    auto found = find(stream);
    if (!found) return found.err();
    stream_state& s = **found;
    for (const auto& r : records) {
      const std::size_t size = format::frame_size(r);
      if (size - format::k_frame_header_size > format::k_max_body_size ||
          (s.config.max_bytes != 0 && size > s.config.max_bytes)) {
        return make_error(errc::bad_request, "stream " + s.config.name + ": event " + r.event_id +
                                                 " of " + std::to_string(size) +
                                                 " bytes is larger than the stream allows");
      }
    }
    const std::int64_t now = opt_.clock();
    expire_dedup(s, now);
    std::vector<append_result> out;
    out.reserve(records.size());
    for (const auto& r : records) {
      if (!r.event_id.empty() && s.config.duplicate_window.count() > 0) {
        auto p = s.pending_dedup.find(r.event_id);
        if (p != s.pending_dedup.end()) {
          out.push_back({p->second, true});
          continue;
        }
        auto d = s.dedup.find(r.event_id);
        if (d != s.dedup.end()) {
          out.push_back({d->second, true});
          continue;
        }
      }
      pending_record p;
      p.seq = s.next_seq++;
      p.ts_ms = std::max(r.ts_ms != 0 ? r.ts_ms : now, s.pending_last_ts);
      p.size = static_cast<std::uint32_t>(format::frame_size(r));
      p.event_id = r.event_id;
      s.pending_last_ts = p.ts_ms;
      format::encode_frame(s.pending, p.seq, p.ts_ms, r);
      if (!r.event_id.empty() && s.config.duplicate_window.count() > 0) {
        s.pending_dedup.emplace(r.event_id, p.seq);
      }
      out.push_back({p.seq, false});
      s.pending_meta.push_back(std::move(p));
    }
    if (!s.pending_meta.empty()) dirty_.insert(&s);
    return out;
  }

  status flush() override {
    if (dirty_.empty()) return common::ok_status();
    struct undo_point {
      stream_state* s;
      std::size_t segments;
      std::uint64_t active_size;
      std::size_t active_records;
    };
    std::vector<undo_point> undo;
    std::set<int> touched;
    std::set<std::string> new_files_in;
    for (stream_state* s : dirty_) {
      const segment& act = *s->segments.back();
      undo.push_back({s, s->segments.size(), act.size, act.index.size()});
      if (auto st = write_pending(*s, touched, new_files_in); !st) {
        rollback(undo);
        return st;
      }
    }
    if (opt_.sync_policy == sync::always) {
      for (int fd : touched) {
        ++stats_.syncs;
        if (const int rc = opt_.writer->sync_data(fd); rc != 0) {
          rollback(undo);
          return io_error(-rc, "fdatasync of a segment file");
        }
      }
      for (const auto& d : new_files_in) {
        if (auto st = sync_dir(d); !st) {
          rollback(undo);
          return st;
        }
      }
    }
    const std::int64_t now = opt_.clock();
    for (stream_state* s : dirty_) {
      for (const auto& p : s->pending_meta) {
        s->bytes += p.size;
        if (!p.event_id.empty() && s->config.duplicate_window.count() > 0) {
          s->dedup[p.event_id] = p.seq;
          s->dedup_order.push_back({p.ts_ms, p.event_id, p.seq});
          cap_dedup(*s);
        }
      }
      s->stored_last_ts = s->pending_last_ts;
      clear_pending(*s);
      apply_retention(*s, now);
    }
    dirty_.clear();
    ++stats_.flushes;
    return common::ok_status();
  }

  result<std::vector<record>> read(std::string_view stream, sequence from, std::size_t max_records,
                                   std::size_t max_bytes) override {
    auto found = find(stream);
    if (!found) return found.err();
    const stream_state& s = **found;
    std::vector<record> out;
    sequence seq = std::max(from, s.first_seq);
    const sequence last = s.last_seq();
    std::size_t bytes = 0;
    std::string buf;
    while (seq <= last && out.size() < max_records) {
      const segment& seg = s.segment_of(seq);
      // One pread for the run of records wanted from this segment.
      const std::size_t first_index = seq - seg.first_seq;
      std::size_t n = 0;
      std::size_t run = 0;
      while (first_index + n < seg.index.size() && out.size() + n < max_records) {
        const auto sz = seg.index[first_index + n].size;
        if ((!out.empty() || n > 0) && bytes + run + sz > max_bytes) break;
        run += sz;
        ++n;
      }
      if (n == 0) break;
      const std::uint64_t offset = seg.index[first_index].offset;
      buf.resize(run);
      if (auto st = pread_all(seg, buf, offset); !st) return st.err();
      std::size_t pos = 0;
      for (std::size_t k = 0; k < n; ++k) {
        std::uint32_t size = 0;
        const auto check = format::check_frame(std::string_view(buf).substr(pos), size);
        if (check != format::frame_check::ok || size != seg.index[first_index + k].size) {
          return corrupt(seg, offset + pos,
                         check != format::frame_check::ok ? format::to_string(check)
                                                          : "record size differs from the index");
        }
        record r = format::decode_frame(std::string_view(buf).substr(pos, size));
        if (r.seq != seq) {
          return corrupt(seg, offset + pos,
                         "sequence " + std::to_string(r.seq) + " where " + std::to_string(seq) +
                             " was expected");
        }
        out.push_back(std::move(r));
        pos += size;
        ++seq;
      }
      bytes += run;
      if (bytes >= max_bytes) break;
    }
    return out;
  }

  result<sequence> seq_at_time(std::string_view stream, std::int64_t ts_ms) override {
    auto found = find(stream);
    if (!found) return found.err();
    const stream_state& s = **found;
    for (const auto& seg : s.segments) {
      if (seg->index.empty() || seg->end_seq() <= s.first_seq) continue;
      if (seg->index.back().ts_ms < ts_ms) continue;
      const std::size_t lo = s.first_seq > seg->first_seq ? s.first_seq - seg->first_seq : 0;
      auto it =
          std::lower_bound(seg->index.begin() + static_cast<std::ptrdiff_t>(lo), seg->index.end(),
                           ts_ms, [](const index_entry& e, std::int64_t t) { return e.ts_ms < t; });
      return seg->first_seq + static_cast<sequence>(it - seg->index.begin());
    }
    return s.last_seq() + 1;
  }

  result<std::uint64_t> expire(std::int64_t now_ms) override {
    std::uint64_t removed = 0;
    for (auto& [name, s] : streams_) {
      if (s->broken) continue;
      removed += apply_retention(*s, now_ms);
      expire_dedup(*s, now_ms);
    }
    return removed;
  }

  status save_consumer_state(std::string_view stream, std::string_view consumer,
                             std::string_view blob) override {
    auto found = find(stream);
    if (!found) return found.err();
    if (!valid_name(consumer)) {
      return make_error(errc::bad_request,
                        "consumer name '" + std::string(consumer) + "' is not [A-Za-z0-9_-]{1,64}");
    }
    const std::string dir = (*found)->dir + "/" + std::string(k_consumers_dir);
    std::error_code ec;
    if (!fs::exists(dir, ec)) {
      if (!fs::create_directory(dir, ec) && ec) return io_error(ec.value(), "create " + dir);
      if (opt_.sync_policy == sync::always) {
        if (auto st = sync_dir((*found)->dir); !st) return st;
      }
    }
    std::string data(k_state_magic);
    const std::uint32_t crc = format::crc32c(blob.data(), blob.size());
    for (int i = 0; i < 4; ++i) data.push_back(static_cast<char>((crc >> (8 * i)) & 0xffu));
    data += blob;
    return write_file(dir + "/" + std::string(consumer) + std::string(k_state_suffix), data,
                      opt_.sync_policy == sync::always);
  }

  status delete_consumer_state(std::string_view stream, std::string_view consumer) override {
    auto found = find(stream);
    if (!found) return found.err();
    if (!valid_name(consumer)) return not_found(consumer);
    const std::string path = (*found)->dir + "/" + std::string(k_consumers_dir) + "/" +
                             std::string(consumer) + std::string(k_state_suffix);
    if (::unlink(path.c_str()) != 0) {
      if (errno == ENOENT) return not_found(std::string(stream) + "/" + std::string(consumer));
      return io_error(errno, "unlink " + path);
    }
    return common::ok_status();
  }

  result<std::map<std::string, std::string>> load_consumer_states(
      std::string_view stream) override {
    auto found = find(stream);
    if (!found) return found.err();
    std::map<std::string, std::string> out;
    const std::string dir = (*found)->dir + "/" + std::string(k_consumers_dir);
    std::error_code ec;
    if (!fs::exists(dir, ec)) return out;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string file = e.path().filename().string();
      if (!file.ends_with(k_state_suffix)) continue;  // a .tmp left by a crash
      const std::string name = file.substr(0, file.size() - k_state_suffix.size());
      const std::string path = e.path().string();
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return io_error(errno, "open " + path);
      auto data = read_whole_file(fd, path);
      ::close(fd);
      if (!data) return data.err();
      std::uint32_t crc = 0;
      if (data->size() >= 8) {
        for (int i = 3; i >= 0; --i) {
          crc = (crc << 8) | static_cast<unsigned char>((*data)[4 + static_cast<std::size_t>(i)]);
        }
      }
      if (data->size() < 8 || data->substr(0, 4) != k_state_magic ||
          crc != format::crc32c(data->data() + 8, data->size() - 8)) {
        return make_error(errc::storage_corrupt,
                          "consumer state file " + path + ": bad header or checksum mismatch");
      }
      out.emplace(name, data->substr(8));
    }
    return out;
  }

  store_stats stats() const override { return stats_; }

 private:
  result<stream_state*> find(std::string_view name) const {
    auto it = streams_.find(name);
    if (it == streams_.end()) return not_found(name);
    if (it->second->broken) return *it->second->broken;
    return it->second.get();
  }

  static error not_found(std::string_view name) {
    return make_error(errc::not_found, "no stream " + std::string(name));
  }

  static error corrupt(const segment& seg, std::uint64_t offset, const std::string& what) {
    return make_error(errc::storage_corrupt, "segment file " + seg.path + " offset " +
                                                 std::to_string(offset) + ": " + what);
  }

  status pread_all(const segment& seg, std::string& buf, std::uint64_t offset) const {
    std::size_t done = 0;
    while (done < buf.size()) {
      const auto n =
          ::pread(seg.fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return io_error(errno, "read " + seg.path);
      if (n == 0) return corrupt(seg, offset + done, "file ends before the indexed records");
      done += static_cast<std::size_t>(n);
    }
    return common::ok_status();
  }

  status write_all(int fd, const char* data, std::size_t size, const std::string& path) {
    while (size > 0) {
      const auto n = opt_.writer->write(fd, data, size);
      if (n < 0) return io_error(static_cast<int>(-n), "write " + path);
      if (n == 0) return io_error(EIO, "write " + path + " wrote nothing");
      data += n;
      size -= static_cast<std::size_t>(n);
    }
    return common::ok_status();
  }

  status sync_dir(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return io_error(errno, "open directory " + path);
    ++stats_.syncs;
    const int rc = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    if (rc != 0) return io_error(err, "fsync directory " + path);
    return common::ok_status();
  }

  // Replaces `path` by `data` atomically: a temporary file, then rename.
  status write_file(const std::string& path, const std::string& data, bool durable) {
    const std::string tmp = path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return io_error(errno, "create " + tmp);
    auto st = write_all(fd, data.data(), data.size(), tmp);
    if (st && durable) {
      ++stats_.syncs;
      if (const int rc = opt_.writer->sync_data(fd); rc != 0)
        st = io_error(-rc, "fdatasync " + tmp);
    }
    ::close(fd);
    if (st && ::rename(tmp.c_str(), path.c_str()) != 0) st = io_error(errno, "rename " + tmp);
    if (!st) {
      ::unlink(tmp.c_str());
      return st;
    }
    if (durable) return sync_dir(fs::path(path).parent_path().string());
    return st;
  }

  // A new, empty segment file (its header written) in `dir`.
  result<std::unique_ptr<segment>> create_segment(const std::string& dir, sequence first_seq,
                                                  bool durable) {
    auto seg = std::make_unique<segment>();
    seg->first_seq = first_seq;
    seg->path = dir + "/" + format::segment_file_name(first_seq);
    seg->fd = ::open(seg->path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
    if (seg->fd < 0) return io_error(errno, "create " + seg->path);
    const std::string header = format::segment_header(first_seq);
    auto st = write_all(seg->fd, header.data(), header.size(), seg->path);
    if (st && durable) {
      ++stats_.syncs;
      if (const int rc = opt_.writer->sync_data(seg->fd); rc != 0) {
        st = io_error(-rc, "fdatasync " + seg->path);
      }
    }
    if (!st) {
      ::unlink(seg->path.c_str());
      return st.err();
    }
    seg->size = header.size();
    return seg;
  }

  // Writes the stream's pending frames, rolling to new segments past segment_max_bytes.
  status write_pending(stream_state& s, std::set<int>& touched,
                       std::set<std::string>& new_files_in) {
    const bool always = opt_.sync_policy == sync::always;
    std::size_t pos = 0;
    std::size_t i = 0;
    const auto& meta = s.pending_meta;
    while (i < meta.size()) {
      segment* act = s.segments.back().get();
      if (!act->index.empty() && act->size + meta[i].size > opt_.segment_max_bytes) {
        if (always && touched.contains(act->fd)) {
          // A sealed segment is whole before its successor exists, so a torn tail can only be
          // in the last segment.
          ++stats_.syncs;
          if (const int rc = opt_.writer->sync_data(act->fd); rc != 0) {
            return io_error(-rc, "fdatasync " + act->path);
          }
          touched.erase(act->fd);
        }
        auto seg = create_segment(s.dir, meta[i].seq, always);
        if (!seg) return seg.err();
        s.segments.push_back(std::move(*seg));
        new_files_in.insert(s.dir);
        act = s.segments.back().get();
      }
      std::size_t j = i;
      std::uint64_t run = 0;
      while (j < meta.size() &&
             (j == i || act->size + run + meta[j].size <= opt_.segment_max_bytes)) {
        run += meta[j].size;
        ++j;
      }
      if (auto st = write_all(act->fd, s.pending.data() + pos, run, act->path); !st) return st;
      touched.insert(act->fd);
      for (std::size_t k = i; k < j; ++k) {
        act->index.push_back({static_cast<std::uint32_t>(act->size), meta[k].size, meta[k].ts_ms});
        act->size += meta[k].size;
      }
      pos += run;
      i = j;
    }
    return common::ok_status();
  }

  // Undoes a failed flush: files back to their sizes before it, every pending append dropped.
  template <class Undo>
  void rollback(const std::vector<Undo>& undo) {
    ++stats_.flush_failures;
    for (const auto& u : undo) {
      stream_state& s = *u.s;
      while (s.segments.size() > u.segments) {
        ::unlink(s.segments.back()->path.c_str());
        s.segments.pop_back();
      }
      segment& act = *s.segments.back();
      {
        // Also when act.size did not move: a write may have stored part of its bytes.
        if (::ftruncate(act.fd, static_cast<off_t>(u.active_size)) != 0) {
          s.broken = make_error(
              errc::storage_failed,
              "segment file " + act.path + ": cannot undo a failed write: " + std::strerror(errno));
          log_->error("stream {}: {}", s.config.name, s.broken->message);
        }
        act.size = u.active_size;
      }
      act.index.resize(u.active_records);
    }
    for (stream_state* s : dirty_) {
      clear_pending(*s);
      s->next_seq = s->last_seq() + 1;
      s->pending_last_ts = s->stored_last_ts;
    }
    dirty_.clear();
  }

  static void clear_pending(stream_state& s) {
    s.pending.clear();
    s.pending_meta.clear();
    s.pending_dedup.clear();
  }

  void cap_dedup(stream_state& s) {
    const std::uint64_t cap = std::max<std::uint64_t>(1, s.config.duplicate_ids_max);
    while (s.dedup_order.size() > cap) {
      const auto& e = s.dedup_order.front();
      auto it = s.dedup.find(e.event_id);
      if (it != s.dedup.end() && it->second == e.seq) s.dedup.erase(it);
      s.dedup_order.pop_front();
      ++stats_.dedup_evicted;
    }
  }

  void expire_dedup(stream_state& s, std::int64_t now) {
    const std::int64_t horizon = now - s.config.duplicate_window.count();
    while (!s.dedup_order.empty() && s.dedup_order.front().ts_ms < horizon) {
      const auto& e = s.dedup_order.front();
      auto it = s.dedup.find(e.event_id);
      if (it != s.dedup.end() && it->second == e.seq) s.dedup.erase(it);
      s.dedup_order.pop_front();
    }
  }

  // Moves first_seq past what the limits exclude at `now`, then deletes the segment files
  // holding only excluded records (never the last one: it carries last_seq).
  std::uint64_t apply_retention(stream_state& s, std::int64_t now) {
    const auto& c = s.config;
    const sequence last = s.last_seq();
    std::uint64_t removed = 0;
    while (s.first_seq <= last) {
      const std::uint64_t count = last + 1 - s.first_seq;
      const index_entry& e = s.entry(s.first_seq);
      const bool over = (c.max_events != 0 && count > c.max_events) ||
                        (c.max_bytes != 0 && s.bytes > c.max_bytes) ||
                        (c.max_age.count() > 0 && e.ts_ms < now - c.max_age.count());
      if (!over) break;
      s.bytes -= e.size;
      ++s.first_seq;
      ++removed;
    }
    while (s.segments.size() > 1 && s.segments.front()->end_seq() <= s.first_seq) {
      if (::unlink(s.segments.front()->path.c_str()) != 0) {
        log_->warn("stream {}: cannot delete expired segment file {}: {}", c.name,
                   s.segments.front()->path, std::strerror(errno));
      }
      s.segments.erase(s.segments.begin());
    }
    return removed;
  }

  // Opens a stream's files: config, then every segment, checking every record.
  void load_stream(stream_state& s) {
    const std::string config_path = s.dir + "/" + std::string(k_config_file);
    try {
      std::ifstream in(config_path);
      if (!in) throw std::runtime_error("cannot be read");
      const auto j = nlohmann::json::parse(in);
      s.config = config_from_json(j);
    } catch (const std::exception& e) {
      s.broken = make_error(errc::storage_corrupt, "config file " + config_path + ": " + e.what());
      return;
    }
    std::vector<std::pair<sequence, std::string>> files;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(s.dir, ec)) {
      const std::string file = e.path().filename().string();
      if (const sequence first = format::parse_segment_file_name(file); first != 0) {
        files.emplace_back(first, e.path().string());
      }
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) {
      s.broken =
          make_error(errc::storage_corrupt, "stream directory " + s.dir + ": no segment file (" +
                                                format::segment_file_name(1) + " ...)");
      return;
    }
    const std::int64_t now = opt_.clock();
    const std::int64_t dedup_horizon = now - s.config.duplicate_window.count();
    for (std::size_t i = 0; i < files.size(); ++i) {
      const bool last_file = i + 1 == files.size();
      auto seg = std::make_unique<segment>();
      seg->first_seq = files[i].first;
      seg->path = files[i].second;
      seg->fd = ::open(seg->path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
      if (seg->fd < 0) {
        s.broken = io_error(errno, "open " + seg->path);
        return;
      }
      auto data = read_whole_file(seg->fd, seg->path);
      if (!data) {
        s.broken = data.err();
        return;
      }
      if (!s.segments.empty() && seg->first_seq != s.segments.back()->end_seq()) {
        s.broken = make_error(errc::storage_corrupt,
                              "stream " + s.config.name + ": records " +
                                  std::to_string(s.segments.back()->end_seq()) + ".." +
                                  std::to_string(seg->first_seq - 1) +
                                  " are missing: segment file " + s.segments.back()->path +
                                  " ends at " + std::to_string(s.segments.back()->end_seq() - 1) +
                                  ", the next is " + seg->path);
        return;
      }
      if (data->size() < format::k_segment_header_size) {
        if (!last_file) {
          s.broken = corrupt(
              *seg, 0, "segment header cut short (" + std::to_string(data->size()) + " bytes)");
          return;
        }
        // Created, then the process died before its header was written.
        if (auto st = cut_torn_tail(s, *seg, 0, data->size(), "segment header cut short"); !st) {
          s.broken = st.err();
          return;
        }
        const std::string header = format::segment_header(seg->first_seq);
        if (auto st = write_all(seg->fd, header.data(), header.size(), seg->path); !st) {
          s.broken = st.err();
          return;
        }
        seg->size = header.size();
        s.segments.push_back(std::move(seg));
        continue;
      }
      if (format::parse_segment_header(*data) != seg->first_seq) {
        s.broken = corrupt(*seg, 0, "bad segment header (magic or first sequence)");
        return;
      }
      std::size_t off = format::k_segment_header_size;
      while (off < data->size()) {
        const std::string_view rest = std::string_view(*data).substr(off);
        std::uint32_t size = 0;
        const auto check = format::check_frame(rest, size);
        if (check != format::frame_check::ok) {
          if (last_file && torn(check, rest)) {
            if (auto st = cut_torn_tail(s, *seg, off, rest.size(), format::to_string(check)); !st) {
              s.broken = st.err();
              return;
            }
            break;
          }
          s.broken = corrupt(*seg, off, format::to_string(check));
          return;
        }
        sequence seq = 0;
        std::int64_t ts = 0;
        std::string_view id;
        format::peek_frame(rest.substr(0, size), seq, ts, id);
        if (seq != seg->end_seq()) {
          s.broken = corrupt(*seg, off,
                             "sequence " + std::to_string(seq) + " where " +
                                 std::to_string(seg->end_seq()) + " was expected");
          return;
        }
        seg->index.push_back({static_cast<std::uint32_t>(off), size, ts});
        s.bytes += size;
        if (!id.empty() && s.config.duplicate_window.count() > 0 && ts >= dedup_horizon) {
          s.dedup[std::string(id)] = seq;
          s.dedup_order.push_back({ts, std::string(id), seq});
          cap_dedup(s);
        }
        off += size;
      }
      seg->size = off;
      s.segments.push_back(std::move(seg));
    }
    s.first_seq = s.segments.front()->first_seq;
    s.next_seq = s.last_seq() + 1;
    if (s.next_seq > s.first_seq) s.stored_last_ts = s.entry(s.last_seq()).ts_ms;
    s.pending_last_ts = s.stored_last_ts;
    apply_retention(s, now);
  }

  // Whether a bad frame at the end of the last segment is a write that died half-way, rather
  // than damage: the bytes after it are what an interrupted append leaves.
  static bool torn(format::frame_check check, std::string_view rest) {
    switch (check) {
      case format::frame_check::short_header:
      case format::frame_check::short_body:  // the length is intact and runs past the end
        return true;
      case format::frame_check::bad_length:  // zeros a crash left where the length goes
        return std::all_of(rest.begin(), rest.end(), [](char c) { return c == 0; });
      case format::frame_check::bad_body: {  // the very last frame, partly written
        const std::uint32_t len =
            static_cast<unsigned char>(rest[0]) |
            (static_cast<std::uint32_t>(static_cast<unsigned char>(rest[1])) << 8) |
            (static_cast<std::uint32_t>(static_cast<unsigned char>(rest[2])) << 16) |
            (static_cast<std::uint32_t>(static_cast<unsigned char>(rest[3])) << 24);
        return format::k_frame_header_size + len == rest.size();
      }
      default:
        return false;
    }
  }

  status cut_torn_tail(stream_state& s, segment& seg, std::uint64_t offset, std::uint64_t bytes,
                       const char* why) {
    if (::ftruncate(seg.fd, static_cast<off_t>(offset)) != 0) {
      return io_error(errno, "truncate " + seg.path);
    }
    ++stats_.syncs;
    if (::fdatasync(seg.fd) != 0) return io_error(errno, "fdatasync " + seg.path);
    ++stats_.torn_records;
    stats_.torn_bytes += bytes;
    log_->warn("stream {}: segment file {}: cut off a torn tail of {} bytes at offset {} ({})",
               s.config.name, seg.path, bytes, offset, why);
    return common::ok_status();
  }

  std::string dir_;
  file_store_options opt_;
  int lock_fd_ = -1;
  std::shared_ptr<spdlog::logger> log_;
  std::map<std::string, std::unique_ptr<stream_state>, std::less<>> streams_;
  std::set<stream_state*> dirty_;
  store_stats stats_;
};

}  // namespace

std::shared_ptr<file_writer> posix_file_writer() {
  static const auto writer = std::make_shared<posix_writer>();
  return writer;
}

result<std::unique_ptr<stream_store>> open_file_store(const std::string& dir,
                                                      file_store_options options) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return io_error(ec.value(), "create store directory " + dir);
  const std::string lock_path = dir + "/LOCK";
  const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) return io_error(errno, "open " + lock_path);
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(lock_fd);
    return make_error(
        errc::storage_failed,
        "store directory " + dir + " is in use by another process (" + std::strerror(err) + ")");
  }
  auto store = std::make_unique<file_store>(dir, std::move(options), lock_fd);
  try {
    store->open_all();
  } catch (const fs::filesystem_error& e) {
    return make_error(errc::storage_failed, std::string("open store ") + dir + ": " + e.what());
  }
  return std::unique_ptr<stream_store>(std::move(store));
}

}  // namespace ensemble::broker::streams
