#pragma once
// YAML files (deployments, scriptable agent specs) are read as JSON: the YAML document is
// converted once, and then validated with common::config_reader like a workflow definition.
// The conversion records where each value is, so that every problem names its line and column.

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "ensemble/common/config_reader.hpp"

namespace ensemble::cli {

enum class yaml_scalars {
  typed,    // YAML 1.2 core schema: null, booleans, integers, floats, else strings
  strings,  // every scalar but null is a string, as written (deployment files: args, env)
};

// Parses `text` (syntax errors throw common::config_error naming `r.file()`, the line and the
// column) and converts it. Records the position of every value in `r` and reports there what
// JSON cannot hold: keys that are not scalars, duplicate keys, nesting deeper than 64.
nlohmann::json yaml_to_json(std::string_view text, common::config_reader& r, yaml_scalars scalars);

}  // namespace ensemble::cli
