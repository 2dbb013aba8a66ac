// The per-topic seq counters: numbered without gaps while tracked, bounded memory however many
// distinct topics are published (docs/protocol.md section 7).
#include "topic_sequencer.hpp"

#include <gtest/gtest.h>

#include <string>

using ensemble::broker::topic_sequencer;

TEST(topic_sequencer_test, counts_each_topic_from_one_without_gaps) {
  topic_sequencer seq(100);
  EXPECT_EQ(seq.next("order.created"), 1u);
  EXPECT_EQ(seq.next("order.created"), 2u);
  EXPECT_EQ(seq.next("order.paid"), 1u);
  EXPECT_EQ(seq.next("order.created"), 3u);
  EXPECT_EQ(seq.tracked(), 2u);
}

TEST(topic_sequencer_test, a_million_distinct_topics_stay_within_the_cap) {
  topic_sequencer seq(1000);
  for (int i = 0; i < 1'000'000; ++i) {
    ASSERT_EQ(seq.next("t." + std::to_string(i)), 1u);
    ASSERT_LE(seq.tracked(), 1000u);
  }
  EXPECT_GT(seq.generations(), 1000u);
}

TEST(topic_sequencer_test, a_busy_topic_keeps_counting_across_generations) {
  topic_sequencer seq(10);  // generations of 5 topics
  std::uint64_t last = 0;
  for (int i = 0; i < 100; ++i) {
    last = seq.next("busy");
    ASSERT_EQ(last, static_cast<std::uint64_t>(i + 1)) << "after " << i << " other topics";
    seq.next("other." + std::to_string(i));  // one new topic between each
  }
  EXPECT_GT(seq.generations(), 10u);
}

TEST(topic_sequencer_test, an_idle_topic_restarts_at_one_once_its_generation_is_dropped) {
  topic_sequencer seq(4);  // generations of 2 topics
  EXPECT_EQ(seq.next("idle"), 1u);
  EXPECT_EQ(seq.next("idle"), 2u);
  seq.next("a");  // current: idle, a
  seq.next("b");  // full: idle, a -> previous; current: b
  EXPECT_EQ(seq.next("idle"), 3u) << "still in the previous generation";
  seq.next("c");
  seq.next("d");
  seq.next("e");
  seq.next("f");
  EXPECT_EQ(seq.next("idle"), 1u) << "dropped with its generation";
}
