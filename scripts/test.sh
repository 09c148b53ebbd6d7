#!/bin/bash
# The whole test suite: installs what is missing, builds, runs every test
# under ctest (C unit tests, busted specs, luacheck, scenarios), then
# builds again with ASan and UBSan and runs the suite once more.
#   scripts/test.sh           both builds
#   scripts/test.sh --quick   the normal build only
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
jobs=$(nproc)

cmake -B build -S . -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"
if [ "${1:-}" != "--quick" ]; then
  ctest --test-dir build --output-on-failure -j"$jobs"
  cmake -B build-asan -S . -DNETRA_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-asan -j"$jobs"
  ctest --test-dir build-asan --output-on-failure -j"$jobs"
else
  ctest --test-dir build --output-on-failure -j"$jobs"
fi
