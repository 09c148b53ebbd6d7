#!/bin/bash
# Ingest benchmark: 1,000,000 five-column event rows into a MergeTree table
# on a private ClickHouse, through netra's client (TSV over HTTP, batches),
# through clickhouse-client (native protocol, TSV input) and through curl
# (HTTP, TSV: one request, and netra's batches on one connection). Prints
# the median rows/s of RUNS runs each and netra's ratio to each. The TSV
# file for the others is made before timing; netra's times include building
# the rows with its row builder (the values themselves are made before).
# Usage: spec/bench/clickhouse_insert.sh [ROWS] [BATCH] [RUNS]
# Needs a built tree (cmake --build build) for build/libnetra_core.a.
set -euo pipefail

rows=${1:-1000000}
batch=${2:-10000}
runs=${3:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${NETRA_BUILD:-$root/build}
work=$(mktemp -d /tmp/netra-bench-ch.XXXXXX)
trap '"$root/spec/support/clickhouse.sh" stop "$work/ch" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

[ -f "$build/libnetra_core.a" ] || { echo "build first: cmake --build build" >&2; exit 1; }
cc -O2 -I"$root/src" "$root/spec/bench/bench_ch_insert.c" \
   "$build/libnetra_core.a" $(pkg-config --libs libcurl libcjson libwebsockets libcrypto libpcre2-8) \
   -lpthread -lm -o "$work/bench_ch_insert"

"$root/spec/support/clickhouse.sh" start "$work/ch" >/dev/null
addr=$(cat "$work/ch/address")
host=${addr%:*}
port=${addr#*:}
tcp=$((port + 1))

q() { curl -sS --fail-with-body "http://$addr/" --data-binary "$1"; }
q "DROP TABLE IF EXISTS bench_events" >/dev/null
q "CREATE TABLE bench_events (event_id String, ts DateTime, user_id String,
   tool String, duration_ms UInt32) ENGINE = MergeTree ORDER BY (ts, event_id)" >/dev/null
"$work/bench_ch_insert" "$host" "$port" "$rows" "$rows" --tsv "$work/rows.tsv"
insert="INSERT INTO bench_events (event_id, ts, user_id, tool, duration_ms) FORMAT TabSeparated"

now() { date +%s.%N; }
check() {
  local n
  n=$(q "SELECT count() FROM bench_events")
  [ "$n" = "$rows" ] || { echo "expected $rows rows, found $n" >&2; exit 1; }
  q "TRUNCATE TABLE bench_events" >/dev/null
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

run_netra() { "$work/bench_ch_insert" "$host" "$port" "$rows" "$batch"; }
run_native() {
  local t0 t1
  t0=$(now)
  clickhouse-client --host "$host" --port "$tcp" --query "$insert" < "$work/rows.tsv"
  t1=$(now)
  echo "$rows / ($t1 - $t0)" | bc -l
}
run_curl() {
  local t0 t1
  t0=$(now)
  curl -sS --fail-with-body -H 'Expect:' --data-binary @"$work/rows.tsv" \
    --url-query "query=$insert" "http://$addr/" >/dev/null
  t1=$(now)
  echo "$rows / ($t1 - $t0)" | bc -l
}

# the same batches as netra's, one curl process, one kept-alive connection
(cd "$work" && split -l "$batch" -d -a 4 rows.tsv part.)
batch_args=()
for f in "$work"/part.*; do
  batch_args+=(--data-binary @"$f" -H 'Expect:' --url-query "query=$insert"
               "http://$addr/" --next)
done
unset 'batch_args[${#batch_args[@]}-1]'
run_curl_batches() {
  local t0 t1
  t0=$(now)
  curl -sS --fail-with-body "${batch_args[@]}" >/dev/null
  t1=$(now)
  echo "$rows / ($t1 - $t0)" | bc -l
}

declare -A result
for way in netra native curl curl_batches; do
  : > "$work/$way.txt"
  for _ in $(seq 1 "$runs"); do
    "run_$way" >> "$work/$way.txt"
    check
  done
  result[$way]=$(median < "$work/$way.txt")
done

printf 'rows=%s batch=%s runs=%s (medians), ClickHouse %s on %s\n' \
  "$rows" "$batch" "$runs" "$(q 'SELECT version()')" "$addr"
printf '%-34s %12.0f rows/s\n' "netra client (HTTP TSV, batches)" "${result[netra]}"
printf '%-34s %12.0f rows/s\n' "clickhouse-client (native, TSV)" "${result[native]}"
printf '%-34s %12.0f rows/s\n' "curl (HTTP TSV, one request)" "${result[curl]}"
printf '%-34s %12.0f rows/s\n' "curl (HTTP TSV, same batches)" "${result[curl_batches]}"
printf 'netra / clickhouse-client: %.2f\n' "$(echo "${result[netra]} / ${result[native]}" | bc -l)"
printf 'netra / curl one request:  %.2f\n' "$(echo "${result[netra]} / ${result[curl]}" | bc -l)"
printf 'netra / curl same batches: %.2f\n' "$(echo "${result[netra]} / ${result[curl_batches]}" | bc -l)"
