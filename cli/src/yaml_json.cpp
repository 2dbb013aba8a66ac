#include "yaml_json.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cstdint>

#include "ensemble/common/result.hpp"

namespace ensemble::cli {
namespace {

using json = nlohmann::json;

constexpr std::size_t k_max_yaml_depth = 64;

json typed_scalar(const YAML::Node& node) {
  const std::string& text = node.Scalar();
  const std::string& tag = node.Tag();
  if (tag == "!" || tag == "tag:yaml.org,2002:str") return text;  // quoted or !!str
  if (text.empty() || text == "~" || text == "null" || text == "Null" || text == "NULL") {
    return nullptr;
  }
  if (text == "true" || text == "True" || text == "TRUE") return true;
  if (text == "false" || text == "False" || text == "FALSE") return false;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  const char* digits = begin + ((text[0] == '-' || text[0] == '+') ? 1 : 0);
  if (digits < end && std::all_of(digits, end, [](char c) { return c >= '0' && c <= '9'; })) {
    const char* from = text[0] == '+' ? begin + 1 : begin;
    std::int64_t i = 0;
    if (auto [p, ec] = std::from_chars(from, end, i); ec == std::errc() && p == end) return i;
    std::uint64_t u = 0;
    if (auto [p, ec] = std::from_chars(from, end, u); ec == std::errc() && p == end) return u;
    return text;
  }
  // Floats: digits with a '.' and/or an exponent, nothing else.
  const bool float_chars = std::all_of(digits, end, [](char c) {
    return (c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+';
  });
  if (digits < end && float_chars && ((*digits >= '0' && *digits <= '9') || *digits == '.')) {
    double d = 0;
    const char* from = text[0] == '+' ? begin + 1 : begin;
    if (auto [p, ec] = std::from_chars(from, end, d); ec == std::errc() && p == end) return d;
  }
  return text;
}

class converter {
 public:
  converter(common::config_reader& r, yaml_scalars scalars) : r_(r), scalars_(scalars) {}

  json convert(const YAML::Node& node, const std::string& path, std::size_t depth) {
    if (node.Mark().line >= 0) r_.locate(path, {node.Mark().line + 1, node.Mark().column + 1});
    if (depth > k_max_yaml_depth) {
      r_.report(path, "nested too deeply");
      return nullptr;
    }
    switch (node.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        return nullptr;
      case YAML::NodeType::Scalar:
        if (scalars_ == yaml_scalars::strings) {
          // A plain empty scalar or ~ is null, as in the core schema.
          const std::string& text = node.Scalar();
          if (node.Tag() != "!" && (text.empty() || text == "~" || text == "null")) return nullptr;
          return text;
        }
        return typed_scalar(node);
      case YAML::NodeType::Sequence: {
        json out = json::array();
        std::size_t i = 0;
        for (const auto& item : node) out.push_back(convert(item, r_.child(path, i++), depth + 1));
        return out;
      }
      case YAML::NodeType::Map: {
        json out = json::object();
        for (const auto& kv : node) {
          if (!kv.first.IsScalar()) {
            r_.report(path, "keys must be plain names, not lists or mappings");
            continue;
          }
          const std::string key = kv.first.Scalar();
          const std::string key_path = r_.child(path, key);
          if (out.contains(key)) {
            r_.report(key_path, "duplicate key \"" + key + "\"");
            continue;
          }
          if (kv.first.Mark().line >= 0) {
            // A member is where its key is, as in a JSON file.
            const auto at = kv.first.Mark();
            out[key] = convert(kv.second, key_path, depth + 1);
            r_.locate(key_path, {at.line + 1, at.column + 1});
          } else {
            out[key] = convert(kv.second, key_path, depth + 1);
          }
        }
        return out;
      }
    }
    return nullptr;
  }

 private:
  common::config_reader& r_;
  yaml_scalars scalars_;
};

}  // namespace

json yaml_to_json(std::string_view text, common::config_reader& r, yaml_scalars scalars) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    if (e.mark.line >= 0) {
      throw common::config_error(r.file(), "invalid YAML at line " +
                                               std::to_string(e.mark.line + 1) + ", column " +
                                               std::to_string(e.mark.column + 1) + ": " + e.msg);
    }
    throw common::config_error(r.file(), "invalid YAML: " + e.msg);
  }
  try {
    return converter(r, scalars).convert(root, "", 0);
  } catch (const YAML::Exception& e) {
    throw common::config_error(r.file(), std::string("invalid YAML: ") + e.what());
  }
}

}  // namespace ensemble::cli
