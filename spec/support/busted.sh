#!/bin/bash
# Runs one busted spec file with netra's Lua paths: lua/ and spec/ for Lua
# modules, the build directory for the `netra` C module. Under a sanitized
# build (NETRA_SANITIZE=1) the ASan and UBSan runtimes are preloaded, since
# Debian's lua5.4 is not built with them.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${NETRA_BUILD_DIR:?NETRA_BUILD_DIR is not set - run the specs through ctest}
export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;$root/spec/?.lua;;"
export LUA_CPATH="$build/?.so;;"
if [ "${NETRA_SANITIZE:-0}" = 1 ]; then
  export LD_PRELOAD="$(${CC:-cc} -print-file-name=libasan.so):$(${CC:-cc} -print-file-name=libubsan.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
fi
cd "$root"
exec lua5.4 /usr/bin/busted --no-auto-insulate -o utfTerminal "$@"
