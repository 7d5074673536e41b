#!/usr/bin/env bash
# Runs the demo: gw-upstream on 127.0.0.1:18080 and the gateway with etc/gateway.json
# (proxy on 127.0.0.1:8080, control plane on 127.0.0.1:9090) until Ctrl-C, then stops both.
# Usage: tests/upstream/demo.sh <builddir>
set -u

root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac

gateway="$build/gateway/gateway"
upstream="$build/tests/upstream/gw-upstream"
config="$root/etc/gateway.json"

for bin in "$gateway" "$upstream"; do
  if [ ! -x "$bin" ]; then
    echo "demo: $bin is missing; build first (make build)" >&2
    exit 1
  fi
done

logdir="$(mktemp -d "${TMPDIR:-/tmp}/gw-demo.XXXXXX")"
up_pid=""
gw_pid=""

stop() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  for pid in $gw_pid $up_pid; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in $gw_pid $up_pid; do
    # Each process gets up to 12 s (the gateway drains in-flight requests first).
    for _ in $(seq 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  echo "demo: logs kept in $logdir"
  exit 0
}
trap stop INT TERM EXIT

# wait_http URL SECONDS: true once URL answers with any HTTP status.
wait_http() {
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    if curl -s -o /dev/null -m 1 "$1"; then return 0; fi
    sleep 0.1
  done
  return 1
}

# Each in its own session: Ctrl-C reaches only this script, which then stops both in order.
setsid "$upstream" --listen 127.0.0.1:18080 --name demo 2>"$logdir/upstream.log" &
up_pid=$!
setsid "$gateway" -c "$config" 2>"$logdir/gateway.log" &
gw_pid=$!

if ! wait_http http://127.0.0.1:18080/bench 10; then
  echo "demo: gw-upstream did not start; see $logdir/upstream.log" >&2
  cat "$logdir/upstream.log" >&2
  exit 1
fi
if ! wait_http http://127.0.0.1:9090/healthz 10; then
  echo "demo: the gateway did not start; see $logdir/gateway.log" >&2
  tail -n 20 "$logdir/gateway.log" >&2
  exit 1
fi

cat <<EOF
The gateway is up (config $config).
  proxy:         http://127.0.0.1:8080
  control plane: http://127.0.0.1:9090
  upstream:      http://127.0.0.1:18080 (gw-upstream, name "demo")

Try:
  curl -i http://127.0.0.1:9090/healthz
  curl -i 'http://127.0.0.1:8080/api/echo/hello?a=1&b=2'
  curl -i -X POST -H 'Content-Type: application/json' -d '{"id": 7}' http://127.0.0.1:8080/api/orders/7
  curl -i http://127.0.0.1:8080/api/orders/status/503
  curl -i http://127.0.0.1:8080/api/slow/delay/2000        # 504 upstream_timeout after 1 s
  curl -i http://127.0.0.1:8080/nowhere                    # 404 route_not_found

Policies:
  for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/api/limited/bench; done; echo
      # token bucket: 5 pass, then 429 rate_limited with Retry-After and RateLimit headers
  curl -i -X POST -H 'Idempotency-Key: k1' -d '{"id": 8}' http://127.0.0.1:8080/api/orders/8
      # run it twice: the second answer is replayed (Idempotent-Replayed: true)
  curl -s -X POST -d '{"count": 2, "status": 503}' http://127.0.0.1:18080/__control/fail
  curl -i http://127.0.0.1:8080/api/flaky/bench
      # two 503s from the upstream, retried: the client sees 200
  curl -s -X POST -d '{"count": 1000, "status": 500}' http://127.0.0.1:18080/__control/fail
  for i in 1 2 3 4 5 6 7; do curl -s http://127.0.0.1:8080/api/flaky/bench; echo; done
      # once 5 calls are in its window and half failed the breaker opens: fallback + Gateway-Degraded
  curl -s -X POST http://127.0.0.1:18080/__control/reset
  curl -s http://127.0.0.1:18080/__control/stats

Logs: $logdir/gateway.log (access log, one JSON object a line), $logdir/upstream.log
Press Ctrl-C to stop.
EOF

# Serve until Ctrl-C or until either process exits.
while kill -0 "$gw_pid" 2>/dev/null && kill -0 "$up_pid" 2>/dev/null; do
  sleep 0.5 &
  wait $! 2>/dev/null # returns at once when a signal arrives, so the trap runs
done
echo "demo: a process exited unexpectedly; last gateway log lines:" >&2
tail -n 20 "$logdir/gateway.log" >&2
stop
