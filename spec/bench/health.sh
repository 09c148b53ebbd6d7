#!/bin/bash
# Benchmark: GET /health with wrk, netra against nginx + its Lua module
# serving a health+json document of the same size from a shared dict, in
# the same run. Prints requests/s and latency for both and netra's ratio.
#
#   spec/bench/health.sh [SECONDS] [CONNECTIONS]
#
# Needs: build/netra (scripts/run.sh or cmake), wrk, nginx-light,
# libnginx-mod-http-lua (scripts/deps.sh --bench installs them). Both
# servers listen on 127.0.0.1 only, with one worker thread each.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
conns=${2:-32}
scripts/deps.sh --bench >/dev/null
work=$(mktemp -d /tmp/netra-bench-health.XXXXXX)
trap 'kill $netra_pid $nginx_pid 2>/dev/null || true; rm -rf "$work"' EXIT

build/netra serve --env test --listen 127.0.0.1:0 2>"$work/netra.log" &
netra_pid=$!
for _ in $(seq 100); do
  port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/netra.log")
  [ -n "$port" ] && curl -sf "127.0.0.1:$port/health/ready" >/dev/null && break
  sleep 0.1
done
curl -s "127.0.0.1:$port/health" > "$work/doc.json"
size=$(wc -c < "$work/doc.json")

nport=$((port + 1))
mod=$(ls /usr/lib/nginx/modules/ndk_http_module.so 2>/dev/null || true)
cat > "$work/nginx.conf" <<CONF
${mod:+load_module $mod;}
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  lua_shared_dict health 1m;
  init_by_lua_block {
    local f = io.open("$work/doc.json")
    ngx.shared.health:set("doc", f:read("*a"))
    f:close()
  }
  server {
    listen 127.0.0.1:$nport;
    location = /health {
      default_type application/health+json;
      content_by_lua_block {
        ngx.header["Cache-Control"] = "no-store"
        ngx.print(ngx.shared.health:get("doc"))
      }
    }
  }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" &
nginx_pid=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$nport/health" >/dev/null && break; sleep 0.1; done
nsize=$(curl -s "127.0.0.1:$nport/health" | wc -c)

run() {
  wrk -t2 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$1/health" > "$work/$2.wrk"
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/$2.wrk")
  p50=$(awk '$1 == "50%" {print $2}' "$work/$2.wrk")
  p99=$(awk '$1 == "99%" {print $2}' "$work/$2.wrk")
  echo "$2: $rps req/s, p50 $p50, p99 $p99"
  eval "${2}_rps=$rps"
}
echo "GET /health, $conns connections, ${secs}s each; document $size bytes (nginx $nsize)"
run "$port" netra
run "$nport" nginx
awk -v a="$netra_rps" -v b="$nginx_rps" 'BEGIN { printf "netra/nginx ratio: %.2f\n", a / b }'
