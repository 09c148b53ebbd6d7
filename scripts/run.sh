#!/bin/bash
# Quick start: installs what is missing, builds, and serves in the
# development environment on 127.0.0.1:8080 (override with --listen or
# NETRA_LISTEN). Extra arguments go to `netra serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cmake -B build -S . -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
exec build/netra serve --env "${ENVIRONMENT:-development}" "$@"
