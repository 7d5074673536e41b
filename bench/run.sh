#!/usr/bin/env bash
# Proxy benchmark: the gateway against nginx as a reverse proxy in front of the same upstream
# (gw-upstream), with wrk at 64 and 512 connections, and the upstream alone as the ceiling.
# Then 10,000 idle keep-alive connections to the gateway and its memory per connection.
#
# Usage: bench/run.sh <builddir>
# Environment: BENCH_DURATION (wrk seconds, default 10), BENCH_CONNS (default "64 512"),
#              BENCH_IDLE (idle connections, default 10000; 0 skips), BENCH_THREADS (wrk, 2).
# Everything runs on loopback and stops by itself; temp files are removed at the end.
set -u

root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
gateway="$build/gateway/gateway"
upstream="$build/tests/upstream/gw-upstream"
duration="${BENCH_DURATION:-10}"
conns="${BENCH_CONNS:-64 512}"
idle="${BENCH_IDLE:-10000}"
wrk_threads="${BENCH_THREADS:-2}"

die() { echo "bench: $*" >&2; exit 1; }
[ -x "$gateway" ] || die "$gateway is missing (make build)"
[ -x "$upstream" ] || die "$upstream is missing (make build)"
command -v wrk >/dev/null || die "wrk is missing (make bench installs it)"
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$nginx_bin" ] || die "nginx is missing (make bench installs nginx-light)"
command -v python3 >/dev/null || die "python3 is missing"

# Idle connections need descriptors in this shell (inherited by every process it starts).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

tmp="$(mktemp -d "${TMPDIR:-/tmp}/gw-bench.XXXXXX")"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL: true once URL answers 200 (10 s at most).
wait_http() {
  python3 - "$1" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(1)
EOF
}

up_port="$(free_port)"
gw_port="$(free_port)"
gw_api="$(free_port)"
ng_port="$(free_port)"

start_upstream() {
  "$upstream" --listen "127.0.0.1:$up_port" --name bench --threads 2 2>"$tmp/upstream.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$up_port/bench" || die "gw-upstream did not start: $(cat "$tmp/upstream.log")"
}

write_gateway_config() {
  cat >"$tmp/gateway.json" <<EOF
{
  "node": { "id": "bench", "listen": "127.0.0.1:$gw_port", "api_listen": "127.0.0.1:$gw_api",
            "data_dir": "$tmp/data", "workers": 2, "max_connections": 30000,
            "shutdown_grace_ms": 2000 },
  "routes": [ { "name": "all", "match": { "path_prefix": "/" },
                "upstream": { "targets": ["http://127.0.0.1:$up_port"],
                              "timeout_ms": 10000, "connect_timeout_ms": 1000 } } ]
}
EOF
}

gw_pid=""
start_gateway() {
  "$gateway" -c "$tmp/gateway.json" 2>"$tmp/gateway.log" &
  gw_pid=$!
  pids+=("$gw_pid")
  wait_http "http://127.0.0.1:$gw_api/healthz" || die "the gateway did not start: $(tail -5 "$tmp/gateway.log")"
  wait_http "http://127.0.0.1:$gw_port/bench" || die "the gateway does not proxy /bench: $(tail -5 "$tmp/gateway.log")"
}

stop_pid() {
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}

start_nginx() {
  mkdir -p "$tmp/nginx"
  local user_line=""
  [ "$(id -u)" -eq 0 ] && user_line="user $(id -un);"
  cat >"$tmp/nginx/nginx.conf" <<EOF
$user_line
worker_processes 2;
worker_rlimit_nofile 40000;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  upstream bench_upstream {
    server 127.0.0.1:$up_port;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$ng_port;
    location / {
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  "$nginx_bin" -p "$tmp/nginx" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf" \
    -g 'daemon off;' 2>>"$tmp/nginx/error.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$ng_port/bench" || die "nginx did not start: $(cat "$tmp/nginx/error.log")"
}

# run_wrk NAME PORT CONNS: runs wrk and records "rps p50_ms p99_ms errors" in $tmp/NAME-CONNS.
run_wrk() {
  local name="$1" port="$2" c="$3" out="$tmp/wrk-$1-$3.txt"
  wrk -t"$wrk_threads" -c"$c" -d"${duration}s" --latency "http://127.0.0.1:$port/bench" >"$out" 2>&1
  python3 - "$out" >"$tmp/$name-$c" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        return float("nan")
    x, u = float(m.group(1)), m.group(2)
    return x / 1000 if u == "us" else x * 1000 if u == "s" else x * 60000 if u == "m" else x
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
errs = 0
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
if m:
    errs += int(m.group(1))
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
if m:
    errs += sum(int(g) for g in m.groups())
print("%s %s %s %d" % (rps.group(1) if rps else "nan", ms(p50.group(1)) if p50 else "nan",
                       ms(p99.group(1)) if p99 else "nan", errs))
EOF
  read -r rps p50 p99 errs <"$tmp/$name-$c"
  printf '  %-9s c=%-4s %10.0f req/s   p50 %7.2f ms   p99 %7.2f ms   errors %s\n' \
    "$name" "$c" "$rps" "$p50" "$p99" "$errs"
}

echo "bench: $(nproc) cores, $(uname -sr), wrk ${duration}s -t$wrk_threads, path /bench"
echo "bench: load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every number)"
echo "bench: $("$gateway" --version 2>&1 | head -1); $("$nginx_bin" -v 2>&1)"
start_upstream
write_gateway_config
start_gateway
start_nginx

echo "bench: running wrk (each run ${duration} s)"
for c in $conns; do
  run_wrk upstream "$up_port" "$c"
  run_wrk gateway "$gw_port" "$c"
  run_wrk nginx "$ng_port" "$c"
done

echo
echo "Proxy throughput and latency (gw-upstream behind each proxy; 'upstream' is the ceiling)"
printf '%-6s | %-10s %9s %9s | %-10s %9s %9s | %-10s %9s %9s | %s\n' \
  conns "gw req/s" "p50 ms" "p99 ms" "ngx req/s" "p50 ms" "p99 ms" "up req/s" "p50 ms" "p99 ms" "gw/nginx"
for c in $conns; do
  read -r g_rps g_p50 g_p99 g_err <"$tmp/gateway-$c"
  read -r n_rps n_p50 n_p99 n_err <"$tmp/nginx-$c"
  read -r u_rps u_p50 u_p99 u_err <"$tmp/upstream-$c"
  ratio="$(python3 -c "import sys; g,n=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (g/n) if n else 'n/a')" "$g_rps" "$n_rps")"
  printf '%-6s | %10.0f %9.2f %9.2f | %10.0f %9.2f %9.2f | %10.0f %9.2f %9.2f | %s\n' \
    "$c" "$g_rps" "$g_p50" "$g_p99" "$n_rps" "$n_p50" "$n_p99" "$u_rps" "$u_p50" "$u_p99" "$ratio"
  if [ "$g_err" != 0 ] || [ "$n_err" != 0 ]; then
    echo "       errors: gateway $g_err, nginx $n_err (see wrk output in the log above)"
  fi
done

if [ "$idle" -gt 0 ]; then
  echo
  echo "bench: $idle idle keep-alive connections to a fresh gateway (RLIMIT_NOFILE $(ulimit -n))"
  stop_pid "$gw_pid"
  start_gateway
  python3 "$root/bench/proxy_idle.py" --port "$gw_port" --pid "$gw_pid" --count "$idle" \
    --path /bench --hold 3 >"$tmp/idle.txt" 2>&1
  idle_rc=$?
  cat "$tmp/idle.txt"
  per="$(sed -n 's/.*per_conn_kib=\([0-9.-]*\).*/\1/p' "$tmp/idle.txt")"
  if [ -n "$per" ]; then
    echo "Gateway memory per idle keep-alive connection: $per KiB (VmRSS growth / connections)"
  fi
  [ "$idle_rc" -eq 0 ] || echo "bench: not every idle connection could be established"
fi
