#pragma once
// CURVE key pairs and the files that hold them (docs/protocol.md section 12, "Security").
//
// Keys are the 40-character Z85 text form of libzmq (zmq_curve_keypair). Files use ZeroMQ's
// certificate format (the ZPL text of CZMQ's zcert), so other languages' ZeroMQ tools read
// them: `NAME.key` holds the public key and may be shared; `NAME.key_secret` holds both keys
// and is written with mode 0600. Reading a secret file that others may read is refused, like
// ssh does with a private key.
//
// Start-up code only: every function throws common::config_error naming the file (and the
// option it came from) and what is wrong.

#include <string>
#include <string_view>

namespace ensemble::common {

struct curve_keys {
  std::string public_key;  // 40 Z85 characters
  std::string secret_key;  // 40 Z85 characters; empty when only the public key is known
  std::string name;        // the certificate's `metadata.name`, if any
};

struct curve_key_files {
  std::string public_file;  // DIR/NAME.key
  std::string secret_file;  // DIR/NAME.key_secret
};

// Whether this libzmq was built with CURVE.
bool curve_available();

// A fresh key pair. Throws if libzmq has no CURVE.
curve_keys generate_curve_keys();

// 40 characters of the Z85 alphabet that decode to 32 bytes.
bool is_z85_key(std::string_view text);

// The public key of a secret key (zmq_curve_public).
std::string curve_public_of(const std::string& secret_key);

// Writes DIR/NAME.key and DIR/NAME.key_secret (creating DIR). Refuses to replace existing
// files unless `overwrite`.
curve_key_files write_curve_key_files(const std::string& dir, const std::string& name,
                                      const curve_keys& keys, bool overwrite = false);

// Reads a certificate file. `what` names where the path came from (an option, a file and
// path) for the error message. With `need_secret`, the file must hold a secret key, match its
// public key (when one is written) and not be readable by group or others.
curve_keys read_curve_key_file(const std::string& path, const std::string& what, bool need_secret);

// A public key given either as 40 Z85 characters or as the path of a certificate file (public
// or secret) holding one. Relative paths are taken from `base_dir` when it is not empty.
std::string read_public_key(const std::string& key_or_file, const std::string& what,
                            const std::string& base_dir = {});

}  // namespace ensemble::common
