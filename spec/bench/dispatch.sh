#!/bin/bash
# Dispatcher benchmark: in-process tools/call throughput (context,
# argument validation against the schema, a trivial Lua handler, the
# tool_executing/tool_completed events, result mapping) with 1 and N
# workers, budgets on (count hook), by timer, and off, beside a bare
# lua_pcall of the same handler as the floor. Prints calls/s.
# Usage: spec/bench/dispatch.sh [CALLS] [WORKERS]
# Needs a built tree (cmake --build build) for build/libnetra_core.a.
set -euo pipefail

calls=${1:-200000}
workers=${2:-$(nproc)}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${NETRA_BUILD:-$root/build}
work=$(mktemp -d /tmp/netra-bench-disp.XXXXXX)
trap 'rm -rf "$work"' EXIT

[ -f "$build/libnetra_core.a" ] || { echo "build first: cmake --build build" >&2; exit 1; }
cc -O2 -I"$root/src" $(pkg-config --cflags lua5.4 libcjson) \
   "$root/spec/bench/bench_dispatch.c" "$build/libnetra_core.a" \
   $(pkg-config --libs lua5.4 libcurl libcjson libwebsockets libcrypto libpcre2-8) \
   -lpthread -lm -o "$work/bench_dispatch"

mkdir -p "$work/lua/netra/tools"
cp "$root/lua/netra/tools/echo.lua" "$work/lua/netra/tools/"
echo "calls: $calls per run, cores: $(nproc), handler: lua/netra/tools/echo.lua"
"$work/bench_dispatch" "$work/lua" "$calls" "$workers"
