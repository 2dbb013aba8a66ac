#include "ensemble/common/curve_keys.hpp"

#include <sys/stat.h>
#include <zmq.h>

#include <array>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ensemble/common/result.hpp"

namespace ensemble::common {

namespace {

constexpr std::size_t k_key_text = 40;

std::string trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\r");
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(" \t\r");
  return std::string(s.substr(first, last - first + 1));
}

// `name = "value"` or `name = value` (ZPL); false when the line is not a property.
bool property(const std::string& line, std::string& name, std::string& value) {
  const auto eq = line.find('=');
  if (eq == std::string::npos) return false;
  name = trim(std::string_view(line).substr(0, eq));
  value = trim(std::string_view(line).substr(eq + 1));
  if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') &&
      value.back() == value.front()) {
    value = value.substr(1, value.size() - 2);
  }
  return true;
}

std::string today() {
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  std::array<char, 16> buf{};
  std::strftime(buf.data(), buf.size(), "%Y-%m-%d", &tm);
  return buf.data();
}

void write_file(const std::filesystem::path& path, const std::string& text, bool secret,
                bool overwrite) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!overwrite && fs::exists(path, ec)) {
    throw config_error(path.string(), "exists already; remove it or choose another name");
  }
  const auto tmp = fs::path(path.string() + ".tmp");
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) throw config_error(tmp.string(), "cannot be written");
    if (secret) fs::permissions(tmp, fs::perms::owner_read | fs::perms::owner_write, ec);
    out << text;
    out.flush();
    if (!out) throw config_error(tmp.string(), "cannot be written");
  }
  fs::permissions(tmp,
                  secret ? fs::perms::owner_read | fs::perms::owner_write
                         : fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                               fs::perms::others_read,
                  ec);
  if (ec) throw config_error(tmp.string(), "cannot set its mode: " + ec.message());
  fs::rename(tmp, path, ec);
  if (ec) throw config_error(path.string(), "cannot be written: " + ec.message());
}

std::string certificate_text(const curve_keys& keys, const std::string& name, bool secret) {
  std::ostringstream out;
  out << "#   ****  Generated on " << today() << " by ensemble keygen  ****\n";
  if (secret) {
    out << "#   ZeroMQ CURVE **Secret** Certificate\n"
        << "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n";
  } else {
    out << "#   ZeroMQ CURVE Public Certificate\n"
        << "#   Exchange securely, or use a secure mechanism to verify the contents\n"
        << "#   of this file after exchange. Store public certificates in your home\n"
        << "#   directory, in the .curve subdirectory.\n";
  }
  out << "\nmetadata\n    name = \"" << name << "\"\ncurve\n    public-key = \"" << keys.public_key
      << "\"\n";
  if (secret) out << "    secret-key = \"" << keys.secret_key << "\"\n";
  return out.str();
}

}  // namespace

bool curve_available() {
  return zmq_has("curve") != 0;
}

curve_keys generate_curve_keys() {
  if (!curve_available()) throw config_error("CURVE", "this libzmq was built without CURVE");
  std::array<char, k_key_text + 1> pub{};
  std::array<char, k_key_text + 1> sec{};
  if (zmq_curve_keypair(pub.data(), sec.data()) != 0) {
    throw config_error("CURVE",
                       std::string("cannot generate a key pair: ") + zmq_strerror(zmq_errno()));
  }
  return curve_keys{.public_key = pub.data(), .secret_key = sec.data(), .name = {}};
}

bool is_z85_key(std::string_view text) {
  if (text.size() != k_key_text) return false;
  std::array<std::uint8_t, 32> raw{};
  const std::string copy(text);
  return zmq_z85_decode(raw.data(), copy.c_str()) != nullptr;
}

std::string curve_public_of(const std::string& secret_key) {
  std::array<char, k_key_text + 1> pub{};
  if (!is_z85_key(secret_key) || zmq_curve_public(pub.data(), secret_key.c_str()) != 0) {
    throw config_error("CURVE", "not a CURVE secret key (40 Z85 characters)");
  }
  return pub.data();
}

curve_key_files write_curve_key_files(const std::string& dir, const std::string& name,
                                      const curve_keys& keys, bool overwrite) {
  namespace fs = std::filesystem;
  if (name.empty() || name.find('/') != std::string::npos || name.front() == '.') {
    throw config_error("key name '" + name + "'",
                       "must be a file name: not empty, no '/', not starting with '.'");
  }
  std::error_code ec;
  if (!dir.empty()) fs::create_directories(dir, ec);
  if (ec) throw config_error(dir, "cannot create the directory: " + ec.message());
  const fs::path base = dir.empty() ? fs::path(".") : fs::path(dir);
  curve_key_files files{.public_file = (base / (name + ".key")).string(),
                        .secret_file = (base / (name + ".key_secret")).string()};
  write_file(files.secret_file, certificate_text(keys, name, true), true, overwrite);
  write_file(files.public_file, certificate_text(keys, name, false), false, overwrite);
  return files;
}

curve_keys read_curve_key_file(const std::string& path, const std::string& what, bool need_secret) {
  const std::string where = what.empty() ? path : what + " '" + path + "'";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw config_error(where, "no such file");
  std::ifstream in(path);
  if (!in) throw config_error(where, "cannot be read");
  curve_keys keys;
  std::string section;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    const auto text = trim(line);
    if (text.empty() || text.front() == '#') continue;
    const bool indented = line.front() == ' ' || line.front() == '\t';
    if (!indented) {
      section = text;
      continue;
    }
    std::string name;
    std::string value;
    if (!property(text, name, value)) continue;
    const auto at = where + ": line " + std::to_string(number);
    if (section == "curve" && (name == "public-key" || name == "secret-key")) {
      if (!is_z85_key(value)) {
        throw config_error(at, name + " is not a CURVE key (40 Z85 characters), got " +
                                   std::to_string(value.size()) + " characters");
      }
      (name == "public-key" ? keys.public_key : keys.secret_key) = value;
    } else if (section == "metadata" && name == "name") {
      keys.name = value;
    }
  }
  if (need_secret) {
    if (keys.secret_key.empty()) {
      throw config_error(where, "holds no secret-key (a public certificate? use NAME.key_secret)");
    }
    if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
      std::ostringstream mode;
      mode << std::oct << (st.st_mode & 0777);
      throw config_error(where, "holds a secret key but its mode is 0" + mode.str() +
                                    ": others may read it; chmod 600 it");
    }
    const auto derived = curve_public_of(keys.secret_key);
    if (!keys.public_key.empty() && keys.public_key != derived) {
      throw config_error(where, "its public-key does not belong to its secret-key");
    }
    keys.public_key = derived;
  } else if (keys.public_key.empty()) {
    if (keys.secret_key.empty()) throw config_error(where, "holds no curve public-key");
    keys.public_key = curve_public_of(keys.secret_key);
  }
  return keys;
}

std::string read_public_key(const std::string& key_or_file, const std::string& what,
                            const std::string& base_dir) {
  if (is_z85_key(key_or_file)) return key_or_file;
  std::filesystem::path path(key_or_file);
  if (path.is_relative() && !base_dir.empty()) path = std::filesystem::path(base_dir) / path;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw config_error(what, "'" + key_or_file +
                                 "' is neither a CURVE public key (40 Z85 characters) nor a "
                                 "key file");
  }
  return read_curve_key_file(path.string(), what, false).public_key;
}

}  // namespace ensemble::common
