#!/usr/bin/env bash
# A PNG screenshot of /admin/ui for a person to look at.
#
#   tests/integration/admin_screenshot.sh <builddir> [out.png]
#
# Starts gw-upstream and a gateway with a small demo config (three routes: one whose circuit
# breaker gets tripped by scripted upstream failures, one with a token bucket that has served a
# few requests, one with degradation forced through the admin API) on free loopback ports in a
# temp dir, takes the screenshot with headless Chromium (Debian package chromium), prints the
# PNG's path and stops everything. The demo has no admin token, so the page needs no prompt.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 <builddir> [out.png]" >&2
  exit 2
fi
build=$(cd "$1" && pwd)
gw="$build/gateway/gateway"
up="$build/tests/upstream/gw-upstream"
for b in "$gw" "$up"; do
  [ -x "$b" ] || { echo "missing $b: build first (make build)" >&2; exit 2; }
done
chromium=""
for c in "${GW_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$c" ] && [ -x "$c" ]; then chromium=$c; break; fi
done
[ -n "$chromium" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl not found: apt-get install -y curl" >&2; exit 2; }

work=$(mktemp -d /tmp/gw-admin-shot-XXXXXX)
out=${2:-$work/admin-ui.png}
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work/profile" "$work/data"
  case "$out" in "$work"/*) ;; *) [ -s "$out" ] && rm -rf "$work" ;; esac
}
trap cleanup EXIT

# Four free loopback ports, below the ephemeral range.
read -r p_up p_gw p_api p_spare < <(python3 - <<'EOF'
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
while len(ports) < 4:
    p = random.randrange(10000, max(10001, lo - 1))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    if p not in ports:
        ports.append(p)
print(*ports)
EOF
)

cat > "$work/gateway.json" <<EOF
{
  "node": { "id": "demo", "listen": "127.0.0.1:$p_gw", "api_listen": "127.0.0.1:$p_api",
            "data_dir": "$work/data", "shutdown_grace_ms": 2000 },
  "routes": [
    { "name": "orders", "match": { "path_prefix": "/api/orders", "methods": ["GET", "POST"] },
      "upstream": { "targets": ["http://127.0.0.1:$p_up"], "strip_prefix": true },
      "policies": {
        "circuit_breaker": { "window": "count", "window_size": 10, "min_calls": 4,
                             "failure_rate": 0.5, "open_ms": 600000, "half_open_calls": 2 },
        "retry": { "max_attempts": 2, "statuses": [503] } } },
    { "name": "catalog", "match": { "path_prefix": "/api/catalog" },
      "upstream": { "targets": ["http://127.0.0.1:$p_up"] },
      "policies": {
        "token_bucket": { "capacity": 50, "refill_per_sec": 1 },
        "sliding_window": { "limit": 1000, "window_ms": 60000, "key": "client_ip" },
        "circuit_breaker": { "min_calls": 10 } } },
    { "name": "search", "match": { "path_prefix": "/api/search" },
      "upstream": { "targets": ["http://127.0.0.1:$p_up"] },
      "policies": {
        "degradation": { "fallback": { "status": 200, "body": { "results": [] } },
                         "on": ["circuit_open", "upstream_error", "shed"] } } }
  ]
}
EOF

"$up" --listen "127.0.0.1:$p_up" --name demo-upstream >"$work/upstream.log" 2>&1 &
pids+=($!)
"$gw" -c "$work/gateway.json" >"$work/gateway.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$p_api"
for _ in $(seq 100); do
  if curl -sf "$api/healthz" >/dev/null && curl -sf "http://127.0.0.1:$p_up/__control/stats" >/dev/null; then
    break
  fi
  sleep 0.1
done
curl -sf "$api/healthz" >/dev/null || { echo "gateway did not start:" >&2; cat "$work/gateway.log" >&2; exit 1; }

# Traffic: catalog serves a few requests; orders fails until its breaker opens; search is forced
# into degradation.
for i in $(seq 7); do curl -s -o /dev/null "http://127.0.0.1:$p_gw/api/catalog/item/$i"; done
curl -sf -X POST -d '{"count": 5, "status": 500}' "http://127.0.0.1:$p_up/__control/fail" >/dev/null
for i in $(seq 5); do curl -s -o /dev/null "http://127.0.0.1:$p_gw/api/orders/$i"; done
curl -sf -X POST -d '{"mode": "forced"}' "$api/admin/routes/search/degrade" >/dev/null
state=$(curl -sf "$api/admin/routes/orders/state")
case "$state" in
  *'"state":"open"'*) ;;
  *) echo "the orders breaker did not open: $state" >&2; exit 1 ;;
esac

mkdir -p "$work/profile"
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$work/profile" \
  --window-size=1280,900 --virtual-time-budget=3000 --screenshot="$out" \
  "$api/admin/ui" >"$work/chromium.log" 2>&1 || true
if [ ! -s "$out" ]; then
  echo "no screenshot taken; chromium said:" >&2
  tail -20 "$work/chromium.log" >&2
  exit 1
fi
echo "$out"
