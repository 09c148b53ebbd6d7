#!/bin/bash
# Installs what netra needs to build, run and test on Debian 12, skipping
# what is already there. Run as root (or with sudo).
set -euo pipefail

packages=(
  build-essential cmake pkg-config git curl ca-certificates clang
  liblua5.4-dev lua5.4 libwebsockets-dev libcurl4-openssl-dev libcjson-dev
  libssl-dev libpcre2-dev libedit-dev libcmocka-dev
  lua-busted lua-check lua-socket tmux
  clickhouse-server clickhouse-client
)
if [ "${1:-}" = "--bench" ]; then
  packages+=(wrk nginx-light libnginx-mod-http-lua)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: run as root (or with sudo) to install packages" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Debian's packages start no services in a container without systemd;
  # ClickHouse for tests is started by the suite on its own port.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Real WebSocket and MCP clients for the tests, pinned by the lockfile.
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$root/spec/node/node_modules" ] ||
   [ "$root/spec/node/package-lock.json" -nt "$root/spec/node/node_modules" ]; then
  if ! command -v npm >/dev/null; then
    echo "deps: npm not found - install Node.js 20 and npm" >&2
    exit 1
  fi
  (cd "$root/spec/node" && npm ci --no-audit --no-fund --loglevel=error)
  touch "$root/spec/node/node_modules"
fi
