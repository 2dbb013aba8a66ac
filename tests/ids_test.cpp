// Message ids and their numbers: the agent SDK keys the calls in flight by the number an id
// generator wrote into the id, so reading it back must be exact, and must refuse every id that
// this generator did not make.
#include "ensemble/common/ids.hpp"

#include <gtest/gtest.h>

namespace ec = ensemble::common;

TEST(ids, an_id_and_its_number_convert_both_ways) {
  ec::id_generator ids;
  const auto n = ids.next_number();
  const std::string id = ids.next();
  EXPECT_EQ(id, ids.format(n + 1));
  EXPECT_EQ(ids.format(0x2a), ids.prefix() + "-2a");
  EXPECT_EQ(ids.number_of(id), n + 1);
  for (const std::uint64_t v : {std::uint64_t{1}, std::uint64_t{0xabcdef}, ~std::uint64_t{0}}) {
    EXPECT_EQ(ids.number_of(ids.format(v)), v) << ids.format(v);
  }
}

TEST(ids, ids_this_generator_did_not_make_have_no_number) {
  ec::id_generator ids;
  ec::id_generator other;
  const std::string& p = ids.prefix();
  EXPECT_EQ(ids.number_of(other.next()), std::nullopt);
  for (const std::string& id :
       {std::string(), p, p + "-", p + "-0", p + "-01", p + "-1A", p + "-1g", p + "_1",
        p + "-10000000000000000" /* 17 digits */, std::string("order-1"), p.substr(1) + "-1"}) {
    EXPECT_EQ(ids.number_of(id), std::nullopt) << "'" << id << "'";
  }
}
