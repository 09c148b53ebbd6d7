#!/bin/bash
# Starts and stops a private ClickHouse server, on loopback only, with its
# data under DIR (for `netra run` scenarios: netra.scenario). Usage:
#   clickhouse.sh start DIR [PORT]  start (a free port unless PORT is given);
#                                   DIR/address then holds 127.0.0.1:PORT
#   clickhouse.sh stop DIR          stop it and wait until it is gone
#   clickhouse.sh kill DIR          kill -9, as a crash would
#   clickhouse.sh restart DIR       stop, then start on the same port
# The server has the default user (no password) and the user netra_test
# with the password in DIR/password.
set -euo pipefail
# A sanitized test run preloads ASan into its children; not into ClickHouse.
unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS

cmd=${1:?usage: clickhouse.sh start|stop|kill|restart DIR [PORT]}
dir=${2:?usage: clickhouse.sh start|stop|kill|restart DIR [PORT]}
server=$(command -v clickhouse-server || echo /usr/sbin/clickhouse-server)

port_free() {
  ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null
}

pick_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p" && port_free $((p + 1)) && port_free $((p + 2)); then
      echo "$p"
      return 0
    fi
  done
  echo "clickhouse.sh: no free loopback port found" >&2
  return 1
}

write_config() {
  local port=$1
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/log"
  sed -e "s#<path>/var/lib/clickhouse/</path>#<path>$dir/data/</path>#" \
      -e "s#<tmp_path>.*</tmp_path>#<tmp_path>$dir/tmp/</tmp_path>#" \
      -e "s#<user_files_path>.*</user_files_path>#<user_files_path>$dir/user_files/</user_files_path>#" \
      -e "s#<format_schema_path>.*</format_schema_path>#<format_schema_path>$dir/format_schemas/</format_schema_path>#" \
      -e "s#<log>.*</log>#<log>$dir/log/server.log</log>#" \
      -e "s#<errorlog>.*</errorlog>#<errorlog>$dir/log/server.err.log</errorlog>#" \
      -e "s#<http_port>.*</http_port>#<http_port>$port</http_port>#" \
      -e "s#<tcp_port>.*</tcp_port>#<tcp_port>$((port + 1))</tcp_port>#" \
      -e "s#<interserver_http_port>.*</interserver_http_port>#<interserver_http_port>$((port + 2))</interserver_http_port>#" \
      -e "s#<listen_host>::1</listen_host>##" \
      /etc/clickhouse-server/config.xml > "$dir/config.xml"
  [ -f "$dir/password" ] || echo "netra-t3st-pw" > "$dir/password"
  local pw
  pw=$(cat "$dir/password")
  sed -e "s#<users>#<users><netra_test><password>$pw</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></netra_test>#" \
      /etc/clickhouse-server/users.xml > "$dir/users.xml"
  echo "$port" > "$dir/port"
}

wait_ping() {
  local port=$1
  for _ in $(seq 1 600); do
    if [ "$(curl -s --max-time 1 "http://127.0.0.1:$port/ping" || true)" = "Ok." ]; then
      return 0
    fi
    if [ -f "$dir/pid" ] && ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "clickhouse.sh: server exited; see $dir/log/server.err.log" >&2
      tail -20 "$dir/log/server.err.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  echo "clickhouse.sh: no answer on 127.0.0.1:$port after 60 s" >&2
  return 1
}

start() {
  local port=${1:-}
  if [ -z "$port" ]; then port=$(pick_port); fi
  write_config "$port"
  (cd "$dir" && exec "$server" --config-file="$dir/config.xml" \
       >"$dir/log/stdout.log" 2>&1) &
  echo $! > "$dir/pid"
  wait_ping "$port"
  echo "127.0.0.1:$port" > "$dir/address"
  echo "clickhouse.sh: ClickHouse ready on 127.0.0.1:$port ($dir)"
}

stop() {
  local sig=${1:-TERM}
  [ -f "$dir/pid" ] || return 0
  local pid
  pid=$(cat "$dir/pid")
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
case "$cmd" in
  start) stop; start "${3:-}" ;;
  stop) stop TERM; echo "clickhouse.sh: stopped ($dir)" ;;
  kill) stop KILL ;;
  restart) port=$(cat "$dir/port"); stop TERM; start "$port" ;;
  *) echo "usage: clickhouse.sh start|stop|kill|restart DIR [PORT]" >&2; exit 2 ;;
esac
