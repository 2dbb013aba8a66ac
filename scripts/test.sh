#!/usr/bin/env bash
# The README's test command: configure, build everything, run the whole suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DENSEMBLE_WERROR=ON > /dev/null
cmake --build build -j "$(nproc)"
cd build
ctest --output-on-failure -j 2 --timeout 300
