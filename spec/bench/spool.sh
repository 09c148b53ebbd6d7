#!/bin/bash
# Benchmark: spool appends (fdatasync per batch and none) and replay, on
# the disk under DIR (default: a fresh directory in /tmp). Builds
# spec/bench/bench_spool.c against build/libnetra_core.a (run cmake first)
# with -O2 and prints records/s and MB/s.
#
#   spec/bench/spool.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f build/libnetra_core.a ] || {
  echo "build/libnetra_core.a is missing: cmake -B build -S . && cmake --build build -j2" >&2
  exit 1
}
work=$(mktemp -d "${1:-/tmp}/netra-bench-spool.XXXXXX")
trap 'rm -rf "$work"' EXIT
cc -O2 -std=c11 -D_GNU_SOURCE -Isrc -o "$work/bench_spool" \
  spec/bench/bench_spool.c build/libnetra_core.a \
  $(pkg-config --libs libcjson) -lpthread
mkdir "$work/spool"
"$work/bench_spool" "$work/spool"
