// The durable-stream store on real files in a temp dir: persistence, recovery from torn and
// damaged files, a broker killed mid-write, a full disk (a real tmpfs when mounting is allowed,
// and always through the injected file_writer), de-duplication, retention, consumer states.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ensemble/broker/stream_store.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "stream_format.hpp"

namespace {

namespace fs = std::filesystem;
namespace streams = ensemble::broker::streams;
using streams::record;
using streams::sequence;
using streams::stream_config;

// Fails writes with an errno on demand: after `writes_before_failure` more successful writes,
// optionally writing `partial` bytes of the failing call first.
class failing_writer final : public streams::file_writer {
 public:
  std::int64_t write(int fd, const void* data, std::size_t size) override {
    if (armed && writes_before_failure-- == 0) {
      writes_before_failure = 0;
      if (partial > 0 && partial < size) {
        const std::size_t n = partial;
        partial = 0;
        return streams::posix_file_writer()->write(fd, data, n);
      }
      return -fail_errno;
    }
    return streams::posix_file_writer()->write(fd, data, size);
  }
  int sync_data(int fd) override {
    if (fail_sync) return -fail_errno;
    return streams::posix_file_writer()->sync_data(fd);
  }
  bool armed = false;
  int writes_before_failure = 0;
  std::size_t partial = 0;
  bool fail_sync = false;
  int fail_errno = ENOSPC;
};

record make_record(std::uint64_t n, std::size_t size = 0, std::string id = {}) {
  record r;
  r.topic = "order.created";
  r.event_id = id.empty() ? "evt-" + std::to_string(n) : std::move(id);
  r.header = "hdr-" + std::to_string(n);
  r.payload = std::string(size != 0 ? size : 20 + n % 50, static_cast<char>('a' + n % 26)) + "#" +
              std::to_string(n);
  return r;
}

bool same_content(const record& a, const record& b) {
  return a.topic == b.topic && a.event_id == b.event_id && a.header == b.header &&
         a.payload == b.payload;
}

class stream_store_test : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ensemble-stream-store-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    writer_ = std::make_shared<failing_writer>();
  }
  void TearDown() override {
    store_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  streams::file_store_options options() {
    streams::file_store_options o;
    o.sync_policy = policy_;
    o.segment_max_bytes = segment_max_bytes_;
    o.clock = [this] { return now_; };
    o.writer = writer_;
    return o;
  }
  void open() {
    store_.reset();
    auto s = streams::open_file_store(dir_, options());
    ASSERT_TRUE(s.ok()) << s.err().to_string();
    store_ = std::move(*s);
  }
  void create(stream_config c) {
    auto st = store_->create_stream(c);
    ASSERT_TRUE(st.ok()) << st.err().to_string();
  }
  static stream_config config(std::string name) {
    stream_config c;
    c.name = std::move(name);
    c.topic_prefixes = {"order."};
    return c;
  }
  // Appends records n = from..to one call each, then flushes once; returns their sequences.
  std::vector<sequence> append_range(const std::string& stream, std::uint64_t from,
                                     std::uint64_t to, std::size_t size = 0) {
    std::vector<sequence> seqs;
    for (std::uint64_t n = from; n <= to; ++n) {
      const record r = make_record(n, size);
      auto res = store_->append(stream, std::span(&r, 1));
      EXPECT_TRUE(res.ok()) << res.err().to_string();
      if (res.ok()) seqs.push_back(res->at(0).seq);
    }
    auto st = store_->flush();
    EXPECT_TRUE(st.ok()) << st.err().to_string();
    return seqs;
  }
  std::vector<record> read_all(const std::string& stream) {
    auto r = store_->read(stream, 1, 1u << 30, std::size_t{1} << 40);
    EXPECT_TRUE(r.ok()) << r.err().to_string();
    return r.ok() ? *r : std::vector<record>{};
  }
  streams::stream_info info(const std::string& stream) {
    auto i = store_->info(stream);
    EXPECT_TRUE(i.ok()) << i.err().to_string();
    return i.ok() ? *i : streams::stream_info{};
  }
  std::vector<std::string> segment_files(const std::string& stream) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_ + "/" + stream)) {
      if (e.path().extension() == ".seg") out.push_back(e.path().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  // Checks that the stream holds exactly records n = first..last with seq == n.
  void expect_records(const std::string& stream, std::uint64_t first, std::uint64_t last) {
    const auto recs = read_all(stream);
    ASSERT_EQ(recs.size(), last + 1 - first);
    for (std::size_t i = 0; i < recs.size(); ++i) {
      EXPECT_EQ(recs[i].seq, first + i);
      EXPECT_TRUE(same_content(recs[i], make_record(first + i))) << "seq " << first + i;
    }
  }

  std::string dir_;
  streams::sync policy_ = streams::sync::os;
  std::uint64_t segment_max_bytes_ = 64ull << 20;
  std::int64_t now_ = 1'700'000'000'000;
  std::shared_ptr<failing_writer> writer_;
  std::unique_ptr<streams::stream_store> store_;
};

TEST_F(stream_store_test, streams_and_records_survive_a_reopen) {
  open();
  stream_config orders = config("orders");
  orders.topic_prefixes = {"order.", "shipment."};
  orders.max_age = std::chrono::hours(1);
  orders.max_bytes = 1 << 20;
  orders.max_events = 1000;
  orders.duplicate_window = std::chrono::seconds(30);
  create(orders);
  create(config("audit"));
  EXPECT_EQ(append_range("orders", 1, 3), (std::vector<sequence>{1, 2, 3}));
  EXPECT_EQ(append_range("audit", 1, 2), (std::vector<sequence>{1, 2}));

  open();
  const auto list = store_->list_streams();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "audit");
  EXPECT_EQ(list[1].name, "orders");
  EXPECT_EQ(list[1].topic_prefixes, orders.topic_prefixes);
  EXPECT_EQ(list[1].max_age, orders.max_age);
  EXPECT_EQ(list[1].max_bytes, orders.max_bytes);
  EXPECT_EQ(list[1].max_events, orders.max_events);
  EXPECT_EQ(list[1].duplicate_window, orders.duplicate_window);
  expect_records("orders", 1, 3);
  const auto i = info("orders");
  EXPECT_EQ(i.first_seq, 1u);
  EXPECT_EQ(i.last_seq, 3u);
  EXPECT_EQ(i.count, 3u);
  EXPECT_EQ(i.first_ts_ms, now_);
  EXPECT_EQ(i.last_ts_ms, now_);
  std::uint64_t bytes = 0;
  for (std::uint64_t n = 1; n <= 3; ++n) bytes += streams::format::frame_size(make_record(n));
  EXPECT_EQ(i.bytes, bytes);
  EXPECT_EQ(append_range("orders", 4, 4), (std::vector<sequence>{4}));
}

TEST_F(stream_store_test, refuses_bad_names_duplicates_and_unknown_streams) {
  open();
  EXPECT_EQ(store_->create_stream(config("no/slash")).err().code, streams::errc::bad_request);
  EXPECT_EQ(store_->create_stream(config("")).err().code, streams::errc::bad_request);
  EXPECT_EQ(store_->create_stream(config(std::string(65, 'a'))).err().code,
            streams::errc::bad_request);
  create(config("orders"));
  EXPECT_EQ(store_->create_stream(config("orders")).err().code, streams::errc::already_exists);
  const record r = make_record(1);
  EXPECT_EQ(store_->append("nope", std::span(&r, 1)).err().code, streams::errc::not_found);
  EXPECT_EQ(store_->read("nope", 1, 10, 1000).err().code, streams::errc::not_found);
  EXPECT_EQ(store_->info("nope").err().code, streams::errc::not_found);
  ASSERT_TRUE(store_->delete_stream("orders").ok());
  EXPECT_EQ(store_->info("orders").err().code, streams::errc::not_found);
  EXPECT_EQ(store_->delete_stream("orders").err().code, streams::errc::not_found);
  EXPECT_FALSE(fs::exists(dir_ + "/orders"));
  open();
  EXPECT_TRUE(store_->list_streams().empty());
}

TEST_F(stream_store_test, appends_are_readable_only_after_flush) {
  open();
  create(config("orders"));
  const record r = make_record(1);
  auto res = store_->append("orders", std::span(&r, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->at(0).seq, 1u);
  EXPECT_TRUE(read_all("orders").empty());
  EXPECT_EQ(info("orders").last_seq, 0u);
  ASSERT_TRUE(store_->flush().ok());
  expect_records("orders", 1, 1);
}

TEST_F(stream_store_test, read_honours_its_limits_across_segments) {
  segment_max_bytes_ = 4096;
  open();
  create(config("orders"));
  append_range("orders", 1, 300);
  EXPECT_GT(segment_files("orders").size(), 3u);
  open();
  expect_records("orders", 1, 300);
  auto some = store_->read("orders", 10, 5, 1 << 20);
  ASSERT_TRUE(some.ok());
  ASSERT_EQ(some->size(), 5u);
  EXPECT_EQ(some->front().seq, 10u);
  EXPECT_EQ(some->back().seq, 14u);
  // The byte limit stops before the record that would pass it, but never returns nothing.
  auto one = store_->read("orders", 7, 100, 1);
  ASSERT_TRUE(one.ok());
  ASSERT_EQ(one->size(), 1u);
  EXPECT_EQ(one->front().seq, 7u);
  const std::size_t two_frames =
      streams::format::frame_size(make_record(20)) + streams::format::frame_size(make_record(21));
  auto two = store_->read("orders", 20, 100, two_frames);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->size(), 2u);
  auto past = store_->read("orders", 301, 100, 1 << 20);
  ASSERT_TRUE(past.ok());
  EXPECT_TRUE(past->empty());
}

TEST_F(stream_store_test, a_torn_last_record_is_cut_off_and_counted) {
  open();
  create(config("orders"));
  append_range("orders", 1, 10);
  store_.reset();
  const std::string seg = segment_files("orders").back();
  fs::resize_file(seg, fs::file_size(seg) - 7);  // into the middle of record 10
  open();
  EXPECT_EQ(store_->stats().torn_records, 1u);
  EXPECT_GT(store_->stats().torn_bytes, 0u);
  EXPECT_EQ(info("orders").last_seq, 9u);
  expect_records("orders", 1, 9);
  // The sequence of the lost record was never readable; it is handed out again.
  EXPECT_EQ(append_range("orders", 10, 11), (std::vector<sequence>{10, 11}));
  open();
  EXPECT_EQ(store_->stats().torn_records, 0u);
  expect_records("orders", 1, 11);
}

TEST_F(stream_store_test, zeros_or_a_half_written_last_frame_are_a_torn_tail) {
  open();
  create(config("orders"));
  append_range("orders", 1, 4);
  store_.reset();
  const std::string seg = segment_files("orders").back();
  const auto whole = fs::file_size(seg);
  {
    // What a power loss can leave: the file extended with zeros.
    std::ofstream f(seg, std::ios::binary | std::ios::app);
    f << std::string(300, '\0');
  }
  open();
  EXPECT_EQ(store_->stats().torn_bytes, 300u);
  EXPECT_EQ(fs::file_size(seg), whole);
  expect_records("orders", 1, 4);
  store_.reset();
  {
    // The last frame complete in length but not in content.
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(whole - 3));
    f.put('\x55');
  }
  open();
  EXPECT_EQ(store_->stats().torn_records, 1u);
  expect_records("orders", 1, 3);
}

TEST_F(stream_store_test, a_damaged_record_in_the_middle_is_reported_not_skipped) {
  open();
  create(config("orders"));
  create(config("audit"));
  append_range("orders", 1, 10);
  append_range("audit", 1, 2);
  store_.reset();
  const std::string seg = segment_files("orders").back();
  std::uint64_t offset = streams::format::k_segment_header_size;
  for (std::uint64_t n = 1; n < 5; ++n) offset += streams::format::frame_size(make_record(n));
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(offset + 40));  // inside record 5's body
    f.put('\x7f');
  }
  open();
  for (const auto& err :
       {store_->info("orders").err(), store_->read("orders", 1, 10, 1000).err()}) {
    EXPECT_EQ(err.code, streams::errc::storage_corrupt);
    EXPECT_NE(err.message.find(seg), std::string::npos) << err.message;
    EXPECT_NE(err.message.find("offset " + std::to_string(offset)), std::string::npos)
        << err.message;
    EXPECT_NE(err.message.find("checksum"), std::string::npos) << err.message;
  }
  const record r = make_record(11);
  EXPECT_EQ(store_->append("orders", std::span(&r, 1)).err().code, streams::errc::storage_corrupt);
  EXPECT_EQ(store_->stats().torn_records, 0u);
  // The other streams are served, and the damaged one can be deleted.
  expect_records("audit", 1, 2);
  EXPECT_TRUE(store_->delete_stream("orders").ok());
}

TEST_F(stream_store_test, a_damaged_length_in_the_middle_is_not_taken_for_a_torn_tail) {
  open();
  create(config("orders"));
  append_range("orders", 1, 10);
  store_.reset();
  const std::string seg = segment_files("orders").back();
  std::uint64_t offset = streams::format::k_segment_header_size;
  for (std::uint64_t n = 1; n < 6; ++n) offset += streams::format::frame_size(make_record(n));
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(offset + 2));  // record 6's length: now far past the end
    f.put('\x40');
  }
  open();
  const auto err = store_->info("orders").err();
  EXPECT_EQ(err.code, streams::errc::storage_corrupt);
  EXPECT_NE(err.message.find("offset " + std::to_string(offset)), std::string::npos) << err.message;
  EXPECT_EQ(fs::file_size(seg) > offset, true);  // nothing was cut
}

TEST_F(stream_store_test, damage_after_open_is_reported_by_read) {
  open();
  create(config("orders"));
  append_range("orders", 1, 3);
  const std::string seg = segment_files("orders").back();
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(streams::format::k_segment_header_size + 50));
    f.put('\x01');
  }
  const auto err = store_->read("orders", 1, 10, 1 << 20).err();
  EXPECT_EQ(err.code, streams::errc::storage_corrupt);
  EXPECT_NE(err.message.find(seg + " offset 16"), std::string::npos) << err.message;
}

TEST_F(stream_store_test, a_missing_or_truncated_segment_file_is_reported) {
  segment_max_bytes_ = 4096;
  open();
  create(config("orders"));
  create(config("audit"));
  append_range("orders", 1, 200);
  append_range("audit", 1, 200);
  store_.reset();
  auto files = segment_files("orders");
  ASSERT_GE(files.size(), 3u);
  fs::remove(files[1]);
  auto audit = segment_files("audit");
  ASSERT_GE(audit.size(), 3u);
  fs::resize_file(audit[0], fs::file_size(audit[0]) - 3);
  open();
  const auto missing = store_->info("orders").err();
  EXPECT_EQ(missing.code, streams::errc::storage_corrupt);
  EXPECT_NE(missing.message.find("missing"), std::string::npos) << missing.message;
  EXPECT_NE(missing.message.find(files[2]), std::string::npos) << missing.message;
  const auto cut = store_->info("audit").err();
  EXPECT_EQ(cut.code, streams::errc::storage_corrupt);
  EXPECT_NE(cut.message.find(audit[0]), std::string::npos) << cut.message;
  EXPECT_EQ(store_->stats().torn_records, 0u);
}

// A child appends with sync::os and reports each flushed (acknowledgeable) sequence on a pipe
// until it is killed; every reported sequence must be there afterwards, whole, with no gap.
// Every 64th record is 1 MiB, so that the kill often lands inside a write (a torn tail).
std::size_t sigkill_record_size(std::uint64_t n) {
  return n % 64 == 0 ? std::size_t{1} << 20 : 1 + (n * 37) % 3000;
}

TEST_F(stream_store_test, every_acknowledged_record_survives_sigkill) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    auto opened = streams::open_file_store(dir_, {});
    if (!opened || !(*opened)->create_stream(config("orders"))) ::_exit(2);
    auto& store = *opened;
    for (std::uint64_t n = 1;; ++n) {
      const record r = make_record(n, sigkill_record_size(n));
      auto res = store->append("orders", std::span(&r, 1));
      if (!res || res->at(0).seq != n || !store->flush()) ::_exit(3);
      const std::string line = std::to_string(n) + "\n";
      if (::write(fds[1], line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
        ::_exit(4);
      }
    }
  }
  ::close(fds[1]);
  std::uint64_t acked = 0;
  std::string buf;
  auto read_acks = [&](int timeout_ms) {
    char chunk[4096];
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return false;
    const auto n = ::read(fds[0], chunk, sizeof chunk);
    if (n <= 0) return false;
    buf.append(chunk, static_cast<std::size_t>(n));
    for (auto nl = buf.find('\n'); nl != std::string::npos; nl = buf.find('\n')) {
      acked = std::stoull(buf.substr(0, nl));
      buf.erase(0, nl + 1);
    }
    return true;
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (acked < 3000 && std::chrono::steady_clock::now() < deadline) read_acks(1000);
  ::kill(pid, SIGKILL);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "the child exited on its own: " << WEXITSTATUS(wstatus);
  while (read_acks(0)) {
  }
  ::close(fds[0]);
  ASSERT_GE(acked, 3000u) << "the child did not get far enough before the deadline";

  open();
  const auto recs = read_all("orders");
  ASSERT_GE(recs.size(), acked);
  for (std::size_t i = 0; i < recs.size(); ++i) {
    ASSERT_EQ(recs[i].seq, i + 1);
    ASSERT_TRUE(same_content(recs[i], make_record(i + 1, sigkill_record_size(i + 1))))
        << "seq " << i + 1;
  }
  EXPECT_EQ(info("orders").last_seq, recs.size());
  std::printf("acknowledged %llu, recovered %zu, torn bytes cut %llu\n",
              static_cast<unsigned long long>(acked), recs.size(),
              static_cast<unsigned long long>(store_->stats().torn_bytes));
}

TEST_F(stream_store_test, a_full_disk_refuses_the_append_and_keeps_what_was_stored) {
  open();
  create(config("orders"));
  create(config("audit"));
  append_range("orders", 1, 5);
  append_range("audit", 1, 5);
  const auto before = info("orders");
  const auto orders_file = segment_files("orders").back();
  const auto audit_file = segment_files("audit").back();
  const auto orders_size = fs::file_size(orders_file);
  const auto audit_size = fs::file_size(audit_file);

  // A plain failure, then a partial write before the failure, then a failure on the second
  // stream of a flush after the first was written: every time, nothing of the batch is stored.
  for (int scenario = 0; scenario < 3; ++scenario) {
    writer_->armed = true;
    writer_->writes_before_failure = scenario == 2 ? 1 : 0;
    writer_->partial = scenario == 1 ? 10 : 0;
    for (std::uint64_t n = 6; n <= 8; ++n) {
      const record r = make_record(n);
      auto res = store_->append("orders", std::span(&r, 1));
      ASSERT_TRUE(res.ok());
      EXPECT_EQ(res->at(0).seq, n);
      auto res2 = store_->append("audit", std::span(&r, 1));
      ASSERT_TRUE(res2.ok());
    }
    const auto st = store_->flush();
    ASSERT_FALSE(st.ok()) << "scenario " << scenario;
    EXPECT_EQ(st.err().code, streams::errc::storage_full);
    EXPECT_NE(st.err().message.find(".seg"), std::string::npos) << st.err().message;
    writer_->armed = false;
    EXPECT_EQ(info("orders").last_seq, before.last_seq);
    EXPECT_EQ(info("orders").bytes, before.bytes);
    EXPECT_EQ(info("audit").last_seq, 5u);
    EXPECT_EQ(fs::file_size(orders_file), orders_size) << "scenario " << scenario;
    EXPECT_EQ(fs::file_size(audit_file), audit_size) << "scenario " << scenario;
    expect_records("orders", 1, 5);
    expect_records("audit", 1, 5);
  }
  EXPECT_EQ(store_->stats().flush_failures, 3u);

  // Space is back: the same sequences are handed out (nothing was ever stored under them).
  EXPECT_EQ(append_range("orders", 6, 8), (std::vector<sequence>{6, 7, 8}));
  expect_records("orders", 1, 8);
  open();
  expect_records("orders", 1, 8);
  expect_records("audit", 1, 5);
}

TEST_F(stream_store_test, a_failed_fdatasync_or_segment_roll_stores_nothing) {
  policy_ = streams::sync::always;
  segment_max_bytes_ = 4096;
  open();
  create(config("orders"));
  append_range("orders", 1, 3);
  const auto syncs = store_->stats().syncs;
  EXPECT_GT(syncs, 0u);

  writer_->fail_sync = true;
  writer_->fail_errno = EIO;
  const record r = make_record(4);
  ASSERT_TRUE(store_->append("orders", std::span(&r, 1)).ok());
  auto st = store_->flush();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.err().code, streams::errc::storage_failed);
  writer_->fail_sync = false;
  writer_->fail_errno = ENOSPC;
  expect_records("orders", 1, 3);

  // Enough records to roll to new segment files, failing at the third write (a new segment's
  // header or its records): the new files go with the batch.
  const auto files = segment_files("orders");
  writer_->armed = true;
  writer_->writes_before_failure = 2;
  for (std::uint64_t n = 4; n <= 150; ++n) {
    const record rec = make_record(n);
    ASSERT_TRUE(store_->append("orders", std::span(&rec, 1)).ok());
  }
  st = store_->flush();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.err().code, streams::errc::storage_full);
  writer_->armed = false;
  EXPECT_EQ(segment_files("orders"), files);
  expect_records("orders", 1, 3);
  append_range("orders", 4, 150);
  open();
  expect_records("orders", 1, 150);
}

TEST_F(stream_store_test, a_full_tmpfs_refuses_appends_until_space_returns) {
  const std::string mnt = dir_ + "/small";
  fs::create_directory(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount a 1 MiB tmpfs here (" << std::strerror(errno)
                 << "); the injected-ENOSPC test covers storage_full";
  }
  struct unmount {
    std::string path;
    ~unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount_at_end{mnt};
  {
    // A file that takes space, to give back later.
    std::ofstream filler(mnt + "/filler", std::ios::binary);
    filler << std::string(256 * 1024, 'x');
  }
  auto opened = streams::open_file_store(mnt + "/store", options());
  ASSERT_TRUE(opened.ok()) << opened.err().to_string();
  auto& store = *opened;
  ASSERT_TRUE(store->create_stream(config("orders")).ok());
  std::uint64_t stored = 0;
  std::optional<ensemble::common::error> failure;
  for (std::uint64_t n = 1; n <= 1000 && !failure; ++n) {
    const record r = make_record(n, 4000);
    auto res = store->append("orders", std::span(&r, 1));
    ASSERT_TRUE(res.ok());
    if (auto st = store->flush(); st) {
      stored = n;
    } else {
      failure = st.err();
    }
  }
  ASSERT_TRUE(failure.has_value()) << "1000 records of 4 KB fit in a 1 MiB tmpfs";
  EXPECT_EQ(failure->code, streams::errc::storage_full) << failure->message;
  auto check = [&](std::uint64_t last) {
    auto recs = store->read("orders", 1, 100000, std::size_t{1} << 30);
    ASSERT_TRUE(recs.ok());
    ASSERT_EQ(recs->size(), last);
    for (std::uint64_t n = 1; n <= last; ++n) {
      EXPECT_TRUE(same_content((*recs)[n - 1], make_record(n, 4000)));
    }
  };
  check(stored);
  fs::remove(mnt + "/filler");
  const record next = make_record(stored + 1, 4000);
  auto res = store->append("orders", std::span(&next, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->at(0).seq, stored + 1);
  auto st = store->flush();
  ASSERT_TRUE(st.ok()) << st.err().to_string();
  check(stored + 1);
  store.reset();
  auto reopened = streams::open_file_store(mnt + "/store", options());
  ASSERT_TRUE(reopened.ok());
  auto recs = (*reopened)->read("orders", 1, 100000, std::size_t{1} << 30);
  ASSERT_TRUE(recs.ok());
  EXPECT_EQ(recs->size(), stored + 1);
}

TEST_F(stream_store_test, duplicates_return_the_original_sequence_also_after_reopen) {
  open();
  stream_config c = config("orders");
  c.duplicate_window = std::chrono::seconds(60);
  create(c);
  const std::vector<record> batch{make_record(1, 0, "a"), make_record(2, 0, "b"),
                                  make_record(3, 0, "a")};
  auto res = store_->append("orders", batch);
  ASSERT_TRUE(res.ok());
  ASSERT_EQ(res->size(), 3u);
  EXPECT_EQ(res->at(0).seq, 1u);
  EXPECT_FALSE(res->at(0).duplicate);
  EXPECT_EQ(res->at(1).seq, 2u);
  EXPECT_EQ(res->at(2).seq, 1u);
  EXPECT_TRUE(res->at(2).duplicate);
  ASSERT_TRUE(store_->flush().ok());

  now_ += 30'000;
  open();
  const record again = make_record(9, 0, "b");
  res = store_->append("orders", std::span(&again, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->at(0).seq, 2u);
  EXPECT_TRUE(res->at(0).duplicate);
  ASSERT_TRUE(store_->flush().ok());
  EXPECT_EQ(info("orders").last_seq, 2u);

  // Past the window the same id is a new event.
  now_ += 31'000;
  res = store_->append("orders", std::span(&again, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->at(0).seq, 3u);
  EXPECT_FALSE(res->at(0).duplicate);
  ASSERT_TRUE(store_->flush().ok());
  now_ += 61'000;
  open();  // the window rebuilt at open is also measured from now
  res = store_->append("orders", std::span(&again, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->at(0).seq, 4u);
}

TEST_F(stream_store_test, the_ids_remembered_for_de_duplication_are_capped) {
  open();
  stream_config c = config("orders");
  c.duplicate_window = std::chrono::minutes(10);
  c.duplicate_ids_max = 100;
  create(c);
  for (int i = 1; i <= 1000; ++i) {
    const record r = make_record(static_cast<std::uint64_t>(i), 0, "id-" + std::to_string(i));
    ASSERT_TRUE(store_->append("orders", std::span(&r, 1)).ok());
    ASSERT_TRUE(store_->flush().ok());
  }
  EXPECT_EQ(store_->stats().dedup_evicted, 900u);
  // The last 100 ids are still recognised; an older one is stored again, as documented.
  const record recent = make_record(2000, 0, "id-950");
  auto res = store_->append("orders", std::span(&recent, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_TRUE(res->at(0).duplicate);
  EXPECT_EQ(res->at(0).seq, 950u);
  const record old = make_record(2001, 0, "id-5");
  res = store_->append("orders", std::span(&old, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_FALSE(res->at(0).duplicate);
  ASSERT_TRUE(store_->flush().ok());
  // Also after reopening: the rebuilt window holds at most the cap.
  open();
  EXPECT_EQ(info("orders").config.duplicate_ids_max, 100u);
  res = store_->append("orders", std::span(&recent, 1));
  ASSERT_TRUE(res.ok());
  EXPECT_TRUE(res->at(0).duplicate);
  EXPECT_LE(store_->stats().dedup_evicted, 1001u - 100u);
}

TEST_F(stream_store_test, retention_by_event_count_is_exact_and_deletes_whole_segments) {
  segment_max_bytes_ = 4096;
  open();
  stream_config c = config("orders");
  c.max_events = 50;
  create(c);
  append_range("orders", 1, 100);
  append_range("orders", 101, 300);
  auto i = info("orders");
  EXPECT_EQ(i.first_seq, 251u);
  EXPECT_EQ(i.last_seq, 300u);
  EXPECT_EQ(i.count, 50u);
  const auto files = segment_files("orders");
  EXPECT_LE(files.size(), 3u);
  EXPECT_LE(streams::format::parse_segment_file_name(fs::path(files[0]).filename().string()), 251u);
  expect_records("orders", 251, 300);
  auto from_start = store_->read("orders", 1, 1, 1 << 20);
  ASSERT_TRUE(from_start.ok());
  EXPECT_EQ(from_start->front().seq, 251u);
  open();
  i = info("orders");
  EXPECT_EQ(i.first_seq, 251u);
  EXPECT_EQ(i.count, 50u);
  expect_records("orders", 251, 300);
}

TEST_F(stream_store_test, retention_by_bytes_keeps_the_newest_that_fit) {
  open();
  stream_config c = config("orders");
  const std::size_t frame = streams::format::frame_size(make_record(10, 100));
  c.max_bytes = 5 * frame;
  create(c);
  append_range("orders", 10, 21, 100);  // same-size frames: stored as seq 1..12
  auto i = info("orders");
  EXPECT_EQ(i.first_seq, 8u);
  EXPECT_EQ(i.count, 5u);
  EXPECT_EQ(i.bytes, 5 * frame);
  const record big = make_record(13, 6 * frame);
  EXPECT_EQ(store_->append("orders", std::span(&big, 1)).err().code, streams::errc::bad_request);
  open();
  EXPECT_EQ(info("orders").first_seq, 8u);
}

TEST_F(stream_store_test, retention_by_age_on_append_and_expire_never_reuses_sequences) {
  segment_max_bytes_ = 4096;
  open();
  stream_config c = config("orders");
  c.max_age = std::chrono::seconds(1);
  create(c);
  const std::int64_t t0 = now_;
  append_range("orders", 1, 5);
  now_ += 500;
  append_range("orders", 6, 10);
  auto removed = store_->expire(t0 + 1200);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 5u);
  EXPECT_EQ(info("orders").first_seq, 6u);
  // On append, too: at t0+1600 the second group has aged out.
  now_ = t0 + 1600;
  append_range("orders", 11, 11);
  EXPECT_EQ(info("orders").first_seq, 11u);
  removed = store_->expire(t0 + 5000);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 1u);
  auto i = info("orders");
  EXPECT_EQ(i.count, 0u);
  EXPECT_EQ(i.first_seq, 12u);
  EXPECT_EQ(i.last_seq, 11u);
  now_ = t0 + 5000;
  open();
  i = info("orders");
  EXPECT_EQ(i.count, 0u);
  EXPECT_EQ(i.last_seq, 11u);
  EXPECT_EQ(append_range("orders", 12, 12), (std::vector<sequence>{12}));
}

TEST_F(stream_store_test, seq_at_time_finds_the_first_record_at_or_after) {
  open();
  create(config("orders"));
  const std::int64_t t0 = now_;
  append_range("orders", 1, 2);  // t0
  now_ = t0 + 10;
  append_range("orders", 3, 3);
  now_ = t0 + 20;
  append_range("orders", 4, 5);
  const auto at = [&](std::int64_t ts) {
    auto s = store_->seq_at_time("orders", ts);
    EXPECT_TRUE(s.ok());
    return s.ok() ? *s : 0;
  };
  EXPECT_EQ(at(0), 1u);
  EXPECT_EQ(at(t0), 1u);
  EXPECT_EQ(at(t0 + 1), 3u);
  EXPECT_EQ(at(t0 + 10), 3u);
  EXPECT_EQ(at(t0 + 20), 4u);
  EXPECT_EQ(at(t0 + 21), 6u);  // nothing yet: where a consumer starting then begins
  // A publisher's earlier timestamp never makes time go backwards in the log.
  record old = make_record(6);
  old.ts_ms = t0 - 1000;
  ASSERT_TRUE(store_->append("orders", std::span(&old, 1)).ok());
  ASSERT_TRUE(store_->flush().ok());
  EXPECT_EQ(read_all("orders").back().ts_ms, t0 + 20);
}

TEST_F(stream_store_test, consumer_states_round_trip_and_go_with_the_stream) {
  policy_ = streams::sync::always;
  open();
  create(config("orders"));
  ASSERT_TRUE(store_->save_consumer_state("orders", "billing", "floor=3").ok());
  ASSERT_TRUE(store_->save_consumer_state("orders", "audit", std::string("\0\1\2", 3)).ok());
  ASSERT_TRUE(store_->save_consumer_state("orders", "billing", "floor=7").ok());
  EXPECT_EQ(store_->save_consumer_state("orders", "../x", "").err().code,
            streams::errc::bad_request);
  EXPECT_EQ(store_->save_consumer_state("nope", "a", "").err().code, streams::errc::not_found);
  open();
  auto states = store_->load_consumer_states("orders");
  ASSERT_TRUE(states.ok()) << states.err().to_string();
  EXPECT_EQ(*states, (std::map<std::string, std::string>{{"audit", std::string("\0\1\2", 3)},
                                                         {"billing", "floor=7"}}));
  ASSERT_TRUE(store_->delete_consumer_state("orders", "audit").ok());
  EXPECT_EQ(store_->delete_consumer_state("orders", "audit").err().code, streams::errc::not_found);
  EXPECT_EQ(store_->load_consumer_states("orders")->size(), 1u);

  {
    std::fstream f(dir_ + "/orders/consumers/billing.state",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(9);
    f.put('X');
  }
  const auto err = store_->load_consumer_states("orders").err();
  EXPECT_EQ(err.code, streams::errc::storage_corrupt);
  EXPECT_NE(err.message.find("billing.state"), std::string::npos) << err.message;

  ASSERT_TRUE(store_->delete_stream("orders").ok());
  create(config("orders"));
  EXPECT_TRUE(store_->load_consumer_states("orders")->empty());
}

TEST_F(stream_store_test, a_store_directory_has_one_owner) {
  open();
  auto second = streams::open_file_store(dir_, options());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.err().code, streams::errc::storage_failed);
  EXPECT_NE(second.err().message.find(dir_), std::string::npos);
}

}  // namespace
