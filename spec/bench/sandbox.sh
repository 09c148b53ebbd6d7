#!/bin/sh
# Builds and runs the sandbox benchmark against build/libnetra_core.a.
# Usage: spec/bench/sandbox.sh  (from the repo root, after a normal build)
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/build/bench_sandbox"
cc -O2 -std=c11 -D_GNU_SOURCE -I"$root/src" $(pkg-config --cflags lua5.4 libcjson) \
   "$root/spec/bench/bench_sandbox.c" "$root/build/libnetra_core.a" \
   $(pkg-config --libs lua5.4 libcjson) -lm -lpthread -o "$out"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$out" "$dir"
