#pragma once
// What the broker's YAML (and JSON) files share when they are read: errors that name the file,
// the path in it and the line (the --streams file, the --auth file).
#include <yaml-cpp/yaml.h>

#include <string>

#include "ensemble/common/result.hpp"

namespace ensemble::broker {

class yaml_file_reader {
 public:
  explicit yaml_file_reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const YAML::Node& node, const std::string& path,
                         const std::string& what) const {
    std::string message = what;
    const auto mark = node.Mark();
    if (mark.line >= 0) message += " (line " + std::to_string(mark.line + 1) + ")";
    throw common::config_error(path.empty() ? file_ : file_ + ": " + path, message);
  }

  // A scalar; `kind` names what was expected in the error ("a string", "a scalar").
  std::string scalar(const YAML::Node& node, const std::string& path,
                     const char* kind = "a scalar") const {
    if (!node.IsScalar()) fail(node, path, std::string("must be ") + kind);
    return node.Scalar();
  }

  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

}  // namespace ensemble::broker
