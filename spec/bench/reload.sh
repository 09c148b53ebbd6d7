#!/bin/bash
# Benchmark: memory across repeated hot reloads. Starts `netra serve --env
# test` on 127.0.0.1, sends SIGHUP N times (default 1000), waiting for
# each reload's outcome line in the log before the next, and prints the
# server's resident memory (VmRSS) after a warm-up and at checkpoints,
# the growth over the run, and the reload rate.
#
#   spec/bench/reload.sh [RELOADS] [BINARY]
#
# Needs a built binary (default build/netra). Everything stays on
# 127.0.0.1; the server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
reloads=${1:-1000}
bin=${2:-build/netra}
warmup=20
work=$(mktemp -d /tmp/netra-bench-reload.XXXXXX)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

NETRA_HOME=$PWD NETRA_STATE_DIR=$work NETRA_LOG_FORMAT=text "$bin" serve --env test \
  --listen 127.0.0.1:0 2>"$work/netra.log" &
pid=$!
port=
for _ in $(seq 200); do
  port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' \
         "$work/netra.log")
  [ -n "$port" ] && curl -sf "127.0.0.1:$port/health/ready" >/dev/null && break
  sleep 0.1
done
[ -n "$port" ] || { echo "netra did not start:"; cat "$work/netra.log"; exit 1; }

rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
outcomes() { grep -c 'reload \(done\|failed\)' "$work/netra.log" || true; }

# Sends one SIGHUP and waits (up to 30 s) for its outcome line.
reload_once() {
  local before now
  before=$(outcomes)
  kill -HUP "$pid"
  for _ in $(seq 3000); do
    now=$(outcomes)
    [ "$now" -gt "$before" ] && return 0
    sleep 0.01
  done
  echo "reload $((before + 1)) gave no outcome in 30 s"; tail "$work/netra.log"
  exit 1
}

for _ in $(seq $warmup); do reload_once; done
sleep 0.5
start_rss=$(rss)
echo "after $warmup warm-up reloads: VmRSS ${start_rss} kB"
t0=$(date +%s.%N)
for i in $(seq "$reloads"); do
  reload_once
  if [ $((i % (reloads / 4 > 0 ? reloads / 4 : 1))) -eq 0 ]; then
    echo "after $i reloads: VmRSS $(rss) kB"
  fi
done
t1=$(date +%s.%N)
sleep 0.5
end_rss=$(rss)
failed=$(grep -c 'reload failed' "$work/netra.log" || true)
curl -sf "127.0.0.1:$port/health/ready" >/dev/null && ready=yes || ready=no
echo "reloads: $reloads (failed: $failed), ready afterwards: $ready"
echo "VmRSS before: ${start_rss} kB, after: ${end_rss} kB, growth:" \
     "$((end_rss - start_rss)) kB"
awk -v n="$reloads" -v a="$t0" -v b="$t1" \
  'BEGIN { printf "time: %.1f s, %.1f ms per reload\n", b - a, (b - a) * 1000 / n }'
grep 'VmHWM' "/proc/$pid/status"
kill -TERM "$pid"
wait "$pid" || true
