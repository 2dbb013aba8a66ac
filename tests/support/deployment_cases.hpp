#pragma once
// Deployment files that must be refused: each case's YAML, where the error must point
// ("d.yaml: agents[0].replica") and a phrase its message must hold.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ensemble/cli/deployment.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::test {

struct refused_deployment {
  std::string yaml, where, what;
};

inline void expect_each_refused(const std::vector<refused_deployment>& cases) {
  for (const auto& c : cases) {
    try {
      (void)cli::parse_deployment(c.yaml, "d.yaml");
      ADD_FAILURE() << "accepted:\n" << c.yaml;
    } catch (const common::config_error& e) {
      EXPECT_EQ(e.where(), c.where) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.what), std::string::npos) << e.what();
    }
  }
}

}  // namespace ensemble::test
