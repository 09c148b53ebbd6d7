#!/bin/bash
# Benchmark: the WebSocket bridge.
#
# 1. tools/call on echo over CONNECTIONS connections (each its own user
#    with an HS256 token) in a closed loop for SECONDS: calls/s, p50 and
#    p99 latency, against netra and, in the same run, against a Node.js
#    peer on the ws package doing the same work per call (token check at
#    the handshake, text must be a string, tool_executing and
#    tool_completed notifications, then the result). Prints both and
#    netra's ratio.
# 2. Resident memory per idle connection: IDLE connections opened in
#    batches to a fresh netra (and to the peer); VmRSS before and after,
#    divided by IDLE.
#
#   spec/bench/bridge.sh [SECONDS] [CONNECTIONS] [IDLE]
#
# Needs: build/netra, node with spec/node's packages (scripts/deps.sh).
# Everything listens on 127.0.0.1 only and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
conns=${2:-64}
idle=${3:-10000}
# Raise RLIMIT_NOFILE for the servers and the clients started below; a
# sandbox may cap the hard limit lower, which is enough while it exceeds
# IDLE.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((idle + 256)) ]; then
  echo "RLIMIT_NOFILE is $(ulimit -n): too low for $idle idle connections" >&2
  exit 1
fi
bench=spec/bench
secret=bench-secret-$(date +%s%N)
work=$(mktemp -d /tmp/netra-bench-bridge.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts netra in staging on a free port; sets netra_pid and port.
start_netra() {
  port=$(free_port)
  NETRA_JWT_SECRET=$secret NETRA_LOG_LEVEL=warn NETRA_HOME=$PWD \
    build/netra serve --env staging --listen "127.0.0.1:$port" 2>"$work/netra.log" &
  netra_pid=$!
  pids+=("$netra_pid")
  for _ in $(seq 200); do
    curl -sf "127.0.0.1:$port/health/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "netra did not start:" >&2
  cat "$work/netra.log" >&2
  exit 1
}

# A free loopback port for the peer.
free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Starts the Node.js peer; sets peer_pid and pport.
start_peer() {
  pport=$(free_port)
  node $bench/bridge_peer.mjs "$pport" "$secret" 2>"$work/peer.log" &
  peer_pid=$!
  pids+=("$peer_pid")
  for _ in $(seq 100); do
    grep -q listening "$work/peer.log" && return 0
    sleep 0.1
  done
  echo "the peer did not start:" >&2
  cat "$work/peer.log" >&2
  exit 1
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

field() { node -e 'const o=JSON.parse(process.argv[1]);console.log(Number(o[process.argv[2]]).toFixed(process.argv[3]||0))' "$1" "$2" "${3:-0}"; }

# Opens $idle idle connections to URL; prints the growth of PID's VmRSS
# per connection in bytes.
idle_cost() {
  local url=$1 pid=$2
  # Warm up: one connection open and closed.
  timeout 60 node $bench/bridge_idle.mjs "$url" "$secret" 1 1 0 </dev/null >/dev/null
  sleep 1
  local before after
  before=$(rss_kb "$pid")
  rm -f "$work/hold"
  mkfifo "$work/hold"
  timeout 300 node $bench/bridge_idle.mjs "$url" "$secret" "$idle" 200 240 \
    <"$work/hold" >"$work/idle.out" 2>&1 &
  local idle_pid=$!
  exec 3>"$work/hold"
  for _ in $(seq 2400); do
    grep -q '^open' "$work/idle.out" && break
    sleep 0.1
  done
  sleep 2
  after=$(rss_kb "$pid")
  local opened
  opened=$(awk '/^open/ {print $2}' "$work/idle.out")
  echo "    $(cat "$work/idle.out"); VmRSS ${before} kB -> ${after} kB" >&2
  exec 3>&-
  wait "$idle_pid" 2>/dev/null || true
  if [ -z "$opened" ] || [ "$opened" -eq 0 ]; then echo "n/a"; return; fi
  echo $(( (after - before) * 1024 / opened ))
}

echo "bridge benchmark: tools/call echo, $conns connections, ${secs}s each; idle memory at $idle connections"
echo "(loopback; 2 cores shared by server and load generator)"

start_netra
netra_out=$(node $bench/bridge_load.mjs "ws://127.0.0.1:$port/ws" "$secret" "$secs" "$conns")
stop_pid "$netra_pid"
start_peer
peer_out=$(node $bench/bridge_load.mjs "ws://127.0.0.1:$pport/ws" "$secret" "$secs" "$conns")

printf '%-22s %12s %10s %10s %9s\n' server 'calls/s' 'p50 ms' 'p99 ms' failures
printf '%-22s %12s %10s %10s %9s\n' netra "$(field "$netra_out" rps)" "$(field "$netra_out" p50_ms 2)" \
  "$(field "$netra_out" p99_ms 2)" "$(field "$netra_out" failures)"
printf '%-22s %12s %10s %10s %9s\n' "node ws peer" "$(field "$peer_out" rps)" "$(field "$peer_out" p50_ms 2)" \
  "$(field "$peer_out" p99_ms 2)" "$(field "$peer_out" failures)"
ratio=$(node -e 'const a=JSON.parse(process.argv[1]),b=JSON.parse(process.argv[2]);console.log((a.rps/b.rps).toFixed(2))' "$netra_out" "$peer_out")
echo "netra / peer calls/s: ${ratio}x"

echo "idle connections:"
peer_cost=$(idle_cost "ws://127.0.0.1:$pport/ws" "$peer_pid")
stop_pid "$peer_pid"
start_netra
netra_cost=$(idle_cost "ws://127.0.0.1:$port/ws" "$netra_pid")
stop_pid "$netra_pid"
echo "resident memory per idle connection: netra ${netra_cost} bytes, node ws peer ${peer_cost} bytes"
