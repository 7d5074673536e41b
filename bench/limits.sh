#!/usr/bin/env bash
# Cluster-scope rate limits under overload: does a limit shared by three gateways ever admit more
# than its budget, how much of the budget does it admit, and what does the shared decision add
# to a request's latency? For each backend that can hold a cluster-scope limiter (redis: three
# gateways sharing one redis-server started here; raft: a 3-node Raft group),
# these routes are loaded one after the other at LIM_RATE requests/s (several times the limit),
# spread over the three gateways by LIM_CONNS connections:
#   sw-cluster  sliding_window {limit L, window_ms W, scope cluster}
#   sw-local3   the same with scope local and limit L/3 per node (the same total and the same mix
#               of admitted and refused requests: the reference for the latency difference)
#   tb-cluster  token_bucket {capacity C, refill_per_sec R, scope cluster}
#   tb-local3   the same, local, C/3 and R/3 per node
# then two paired runs, where the requests alternate between a cluster route and its local3 twin
# so that both see the same machine at the same instants:
#   pair        two sliding windows (L per W) together at LIM_RATE in all (2x each limit)
#   light       three sliding windows together, each at half its limit (L/2 per W): the cluster
#               route, its local3 twin and a second local3 twin whose difference from the first
#               is the noise floor of the comparison (an A/A test); nothing should be refused,
#               every request is proxied and only the decision differs
# A single gateway (backend memory) with the local limits L and (C, R), under the same load,
# and light at L/(2W) per second, is the baseline.
#
# gw-bench-limits keeps every admitted request as its [send, receive] interval, so an
# over-admission is proven only by requests whose whole interval fits one window (see
# bench/limits_load.c); it also reads gw-upstream's received count at each window boundary.
# The decision latency is the difference between the latency distributions of the cluster-scope
# route and the local one: 429 answers under overload (no upstream in the path) and 2xx answers
# under light load. A summary table closes the output; bench/limits.md has the method and figures.
#
# Usage: bench/limits.sh <builddir>
# Needs: redis-server, python3, curl; gateway, gw-upstream and gw-bench-limits in <builddir>.
# Environment: LIM_LIMIT (L, default 2000), LIM_WINDOW_MS (W, 1000), LIM_TB_CAPACITY (C, 200),
#   LIM_TB_REFILL (R, L per window in requests/s), LIM_RATE (offered requests/s, 4 L/W),
#   LIM_CONNS (64), LIM_SECONDS (per overload run, 6), LIM_LIGHT_SECONDS (4),
#   LIM_BACKENDS ("redis raft"), LIM_TMP (parent of the data dirs, /var/tmp),
#   LIM_DEADLINE (seconds, 230).
# Everything runs on loopback, stops by itself within the deadline and removes its files.
set -u

root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
gateway="$build/gateway/gateway"
upstream="$build/tests/upstream/gw-upstream"
gen="$build/bench/gw-bench-limits"

limit="${LIM_LIMIT:-2000}"
window_ms="${LIM_WINDOW_MS:-1000}"
tb_cap="${LIM_TB_CAPACITY:-200}"
tb_refill="${LIM_TB_REFILL:-$(( limit * 1000 / window_ms ))}"
rate="${LIM_RATE:-$(( 4 * limit * 1000 / window_ms ))}"
conns="${LIM_CONNS:-64}"
seconds="${LIM_SECONDS:-6}"
light_seconds="${LIM_LIGHT_SECONDS:-4}"
light_rate=$(( limit * 1000 / window_ms / 2 ))
backends="${LIM_BACKENDS:-redis raft}"
deadline="${LIM_DEADLINE:-230}"

die() { echo "limits-bench: $*" >&2; exit 1; }
[ -x "$gateway" ] || die "$gateway is missing (make build)"
[ -x "$upstream" ] || die "$upstream is missing (make build)"
[ -x "$gen" ] || die "$gen is missing (make build)"
command -v python3 >/dev/null || die "python3 is missing"
command -v curl >/dev/null || die "curl is missing"
redis_bin="$(command -v redis-server || echo /usr/bin/redis-server)"

tmp="$(mktemp -d "${LIM_TMP:-/var/tmp}/gw-limits.XXXXXX")" || die "cannot create a temp dir"
pids=()
watchdog=""
stop_pids() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
}
cleanup() {
  trap - EXIT INT TERM
  [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
  stop_pids "${pids[@]}"
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "limits-bench: stopped" >&2; exit 130' INT TERM
# (the sleep gets no copy of the output, so a pipe reading this script closes when it ends)
( sleep "$deadline" >/dev/null 2>&1 </dev/null
  echo "limits-bench: deadline of ${deadline}s reached" >&2; kill -TERM $$ ) &
watchdog=$!

t_begin=$(date +%s)
say() { echo "limits-bench: [$(( $(date +%s) - t_begin ))s] $*"; }

# 22 distinct free ports below the ephemeral range.
ports=($(python3 - <<'EOF'
import random, socket
lo, hi = 20000, 32000
try:
    hi = min(hi, int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0]) - 1)
except Exception:
    pass
got, socks = [], []
while len(got) < 22:
    p = random.randint(lo, hi)
    if p in got:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    socks.append(s)
    got.append(p)
for s in socks:
    s.close()
print(" ".join(map(str, got)))
EOF
))
[ "${#ports[@]}" -eq 22 ] || die "could not find free ports"
up_port="${ports[0]}"
redis_port="${ports[1]}"
single_port="${ports[2]}"
single_api="${ports[3]}"
# per backend b (0 redis, 1 raft), node i (1-3): data plane, control plane, raft
node_port() { echo "${ports[$(( 4 + $1 * 9 + ($2 - 1) * 3 ))]}"; }
node_api() { echo "${ports[$(( 5 + $1 * 9 + ($2 - 1) * 3 ))]}"; }
node_raft() { echo "${ports[$(( 6 + $1 * 9 + ($2 - 1) * 3 ))]}"; }

# write_config FILE SETUP NODE BACKEND_INDEX: SETUP is single, redis or raft.
write_config() {
  python3 - "$@" "$tmp" "$up_port" "$redis_port" "$single_port" "$single_api" \
    "$limit" "$window_ms" "$tb_cap" "$tb_refill" "${ports[*]}" <<'EOF'
import json, sys
(path, setup, node, bi, tmp, up, rport, sport, sapi, limit, window_ms, cap, refill,
 ports) = sys.argv[1:]
node, bi, limit, window_ms = int(node), int(bi), int(limit), int(window_ms)
cap, refill = int(cap), int(refill)
ports = [int(p) for p in ports.split()]
def port(kind, b, i):
    return ports[4 + kind + b * 9 + (i - 1) * 3]

def route(name, policy):
    return {"name": name, "match": {"path_prefix": "/lim/" + name},
            "upstream": {"targets": ["http://127.0.0.1:%s" % up], "strip_prefix": True,
                         "timeout_ms": 5000},
            "policies": policy}

def sw(lim, scope):
    return {"sliding_window": {"limit": lim, "window_ms": window_ms, "key": "route", "scope": scope}}

def tb(c, r, scope):
    return {"token_bucket": {"capacity": c, "refill_per_sec": r, "key": "route", "scope": scope}}

third = lambda v: max(1, (int(v) + 1) // 3)
if setup == "single":
    routes = [route("sw-local", sw(limit, "local")), route("tb-local", tb(cap, refill, "local")),
              route("light-local", sw(limit, "local"))]
    cfg = {"node": {"id": "s1", "listen": "127.0.0.1:%s" % sport, "api_listen": "127.0.0.1:%s" % sapi,
                    "data_dir": "%s/single" % tmp, "shutdown_grace_ms": 2000},
           "backend": {"type": "memory"}, "routes": routes}
else:
    routes = [route("sw-cluster", sw(limit, "cluster")), route("sw-local3", sw(third(limit), "local")),
              route("tb-cluster", tb(cap, refill, "cluster")),
              route("tb-local3", tb(third(cap), third(refill), "local")),
              route("pair-cluster", sw(limit, "cluster")),
              route("pair-local3", sw(third(limit), "local")),
              route("light-cluster", sw(limit, "cluster")),
              route("light-local3", sw(third(limit), "local")),
              route("light-local3b", sw(third(limit), "local"))]
    cfg = {"node": {"id": "n%d" % node, "listen": "127.0.0.1:%d" % port(0, bi, node),
                    "api_listen": "127.0.0.1:%d" % port(1, bi, node),
                    "data_dir": "%s/%s/n%d" % (tmp, setup, node), "shutdown_grace_ms": 2000},
           "routes": routes}
    if setup == "redis":
        cfg["backend"] = {"type": "redis",
                          "redis": {"url": "redis://127.0.0.1:%s/0" % rport, "timeout_ms": 1000}}
    else:
        cfg["backend"] = {"type": "raft"}
        cfg["cluster"] = {"raft_listen": "127.0.0.1:%d" % port(2, bi, node),
                          "peers": [{"id": "n%d" % k, "raft": "127.0.0.1:%d" % port(2, bi, k),
                                     "api": "127.0.0.1:%d" % port(1, bi, k)} for k in (1, 2, 3)],
                          "election_timeout_ms": 1000, "heartbeat_ms": 100,
                          "snapshot_every": 10000}
json.dump(cfg, open(path, "w"), indent=2)
EOF
}

http_code() { curl -s -m 1 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null; }

# wait_ready SECONDS API_PORT...: every control plane answers /readyz 200.
wait_ready() {
  local end=$(( $(date +%s) + $1 )) ok p
  shift
  while [ "$(date +%s)" -lt "$end" ]; do
    ok=0
    for p in "$@"; do [ "$(http_code "http://127.0.0.1:$p/readyz")" = 200 ] && ok=$((ok + 1)); done
    [ $ok -eq $# ] && return 0
    sleep 0.1
  done
  return 1
}

# store_errors ROUTE API_PORT...: the sum of gateway_store_errors_total for ROUTE.
store_errors() {
  local route="$1" p sum=0 v
  shift
  for p in "$@"; do
    v="$(curl -s -m 2 "http://127.0.0.1:$p/metrics" 2>/dev/null |
      sed -n "s/^gateway_store_errors_total{route=\"$route\"} \([0-9]*\).*/\1/p" | head -1)"
    sum=$(( sum + ${v:-0} ))
  done
  echo "$sum"
}

# route_args ROUTE: the generator's target options for /lim/ROUTE. The bound checked is what the
# route enforces in all: a local3 route against three times its per-node limit (their sum).
route_args() {
  local r="$1" a
  case "$r" in
    tb-local3) a="--tb $(( 3 * ((tb_cap + 1) / 3) )) --refill $(( 3 * ((tb_refill + 1) / 3) ))" ;;
    tb-*) a="--tb $tb_cap --refill $tb_refill" ;;
    *-local3|*-local3b) a="--sw $(( 3 * ((limit + 1) / 3) ))" ;;
    *) a="--sw $limit" ;;
  esac
  echo "-p /lim/$r/bench --label $setup_name/$r $a"
}

# commit_index API_PORT...: the highest gateway_raft_commit_index among the nodes (0 without raft).
commit_index() {
  local p v max=0
  for p in "$@"; do
    v="$(curl -s -m 2 "http://127.0.0.1:$p/metrics" 2>/dev/null |
      sed -n 's/^gateway_raft_commit_index \([0-9]*\).*/\1/p' | head -1)"
    [ "${v:-0}" -gt "$max" ] && max="$v"
  done
  echo "$max"
}

# phase SETUP PHASE ADDRS RATE SECONDS ROUTE...: one gw-bench-limits run; with several routes the
# requests alternate between them (a paired run). Control planes to read metrics from: $apis.
phase() {
  local setup="$1" ph="$2" addrs="$3" r="$4" secs="$5" args="" out err route se0 se1 line
  shift 5
  setup_name="$setup"
  for route in "$@"; do args="$args $(route_args "$route")"; done
  out="$tmp/phase-$setup-$ph.txt"
  err="$tmp/phase-$setup-$ph.err"
  declare -A se
  for route in "$@"; do se[$route]="$(store_errors "$route" "${apis[@]}")"; done
  local ci0 ci1
  ci0="$(commit_index "${apis[@]}")"
  # shellcheck disable=SC2086
  timeout -k 2 $(( secs + 20 )) "$gen" -a "$addrs" -c "$conns" -r "$r" -d "$secs" \
    --window-ms "$window_ms" --stats "127.0.0.1:$up_port" $args >"$out" 2>"$err"
  ci1="$(commit_index "${apis[@]}")"
  grep -v '^RESULT\|^WINDOWS' "$out" | sed 's/^/  /'
  head -5 "$err" | sed 's/^/  /'
  [ "$setup" = raft ] && echo "  raft log: $(( ci1 - ci0 )) entries committed during the run"
  for route in "$@"; do
    se1="$(store_errors "$route" "${apis[@]}")"
    se0="$(( se1 - ${se[$route]} ))"
    line="$(grep "^RESULT label=$setup/$route " "$out")"
    if [ -n "$line" ]; then
      [ "$setup" = raft ] && line="$line raft_entries=$(( ci1 - ci0 ))"
      echo "$line setup=$setup route=$route phase=$ph store_errors=$se0" >>"$tmp/results.txt"
    else
      echo "RESULT label=$setup/$route setup=$setup route=$route phase=$ph failed=1" >>"$tmp/results.txt"
    fi
    [ "$se0" -gt 0 ] && echo "  $route: $se0 store errors during the run (the limiter failed open or closed)"
  done
}

echo "limits-bench: $(nproc) cores, $(uname -sr), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "limits-bench: $("$gateway" --version 2>&1 | head -1)"
echo "limits-bench: sliding window $limit per $window_ms ms, token bucket $tb_cap + $tb_refill/s;" \
  "offered ${rate}/s over $conns connections for ${seconds}s; light ${light_rate}/s for ${light_seconds}s"
: >"$tmp/results.txt"
: >"$tmp/notes.txt"

"$upstream" --listen "127.0.0.1:$up_port" --name limits 2>"$tmp/upstream.log" &
pids+=($!)
for _ in $(seq 50); do [ "$(http_code "http://127.0.0.1:$up_port/__control/stats")" = 200 ] && break; sleep 0.1; done

# ---- baseline: one gateway, local limits -----------------------------------------------------
say "baseline: one gateway (backend memory), local limits"
write_config "$tmp/single.json" single 1 0
"$gateway" -c "$tmp/single.json" 2>"$tmp/single.log" &
single_pid=$!
pids+=("$single_pid")
if wait_ready 15 "$single_api"; then
  a="127.0.0.1:$single_port"
  apis=("$single_api")
  phase single sw "$a" "$rate" "$seconds" sw-local
  phase single tb "$a" "$rate" "$seconds" tb-local
  phase single light "$a" "$light_rate" "$light_seconds" light-local
else
  echo "single: the gateway did not become ready: $(tail -3 "$tmp/single.log")" | tee -a "$tmp/notes.txt"
fi
stop_pids "$single_pid"

# ---- the clusters ---------------------------------------------------------------------------
for backend in $backends; do
  case "$backend" in redis) bi=0 ;; raft) bi=1 ;; *) echo "unknown backend $backend"; continue ;; esac
  for i in 1 2 3; do write_config "$tmp/$backend-n$i.json" "$backend" "$i" "$bi"; done
  if ! check="$("$gateway" --check-config -c "$tmp/$backend-n1.json" 2>&1)"; then
    say "$backend: the config was refused"
    printf '%s\n' "$check" | head -5 | sed 's/^/  /'
    echo "$backend: config refused: $(printf '%s' "$check" | head -1)" >>"$tmp/notes.txt"
    continue
  fi
  node_pids=()
  if [ "$backend" = redis ]; then
    [ -x "$redis_bin" ] || { echo "redis: redis-server is missing" | tee -a "$tmp/notes.txt"; continue; }
    mkdir -p "$tmp/redis"
    "$redis_bin" --bind 127.0.0.1 --port "$redis_port" --dir "$tmp/redis" --save '' \
      --appendonly no --maxmemory-policy noeviction --protected-mode no --daemonize no \
      --logfile "$tmp/redis.log" &
    node_pids+=($!)
    pids+=($!)
    for _ in $(seq 50); do
      python3 -c 'import socket,sys
s=socket.create_connection(("127.0.0.1",int(sys.argv[1])),timeout=1); s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)' "$redis_port" 2>/dev/null && break
      sleep 0.1
    done
  fi
  say "$backend: starting 3 gateways"
  apis=()
  addrs=""
  for i in 1 2 3; do
    "$gateway" -c "$tmp/$backend-n$i.json" 2>"$tmp/$backend-n$i.log" &
    node_pids+=($!)
    pids+=($!)
    apis+=("$(node_api "$bi" "$i")")
    addrs="$addrs${addrs:+,}127.0.0.1:$(node_port "$bi" "$i")"
  done
  if ! wait_ready 30 "${apis[@]}"; then
    echo "$backend: the cluster did not become ready: $(tail -2 "$tmp/$backend-n1.log")" | tee -a "$tmp/notes.txt"
    stop_pids "${node_pids[@]}"
    continue
  fi
  say "$backend: ready"
  phase "$backend" sw-local3 "$addrs" "$rate" "$seconds" sw-local3
  phase "$backend" sw-cluster "$addrs" "$rate" "$seconds" sw-cluster
  phase "$backend" tb-local3 "$addrs" "$rate" "$seconds" tb-local3
  phase "$backend" tb-cluster "$addrs" "$rate" "$seconds" tb-cluster
  # Paired: the cluster and the local route side by side, request by request.
  phase "$backend" pair "$addrs" "$rate" "$seconds" pair-cluster pair-local3
  # light-local3b is light-local3 again: the A/A difference is the noise of the comparison.
  phase "$backend" light "$addrs" "$(( 3 * light_rate ))" "$light_seconds" light-cluster light-local3 light-local3b
  stop_pids "${node_pids[@]}"
done
echo "limits-bench: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- summary --------------------------------------------------------------------------------
python3 - "$tmp/results.txt" "$tmp/notes.txt" "$backends" <<'EOF'
import re, sys
rows = []
for line in open(sys.argv[1]):
    rows.append(dict(re.findall(r"(\w+)=(\S+)", line)))
notes = [l.strip() for l in open(sys.argv[2]) if l.strip()]
backends = sys.argv[3].split()
by = {(r.get("setup"), r.get("route")): r for r in rows}

def f(r, k):
    try:
        return float(r.get(k, "nan")) if r else float("nan")
    except ValueError:
        return float("nan")

def s(v, spec=".0f"):
    return "n/a" if v != v else format(v, spec)

print()
print("Admission (strict: the most admitted requests whose whole [send, answer] interval fits one")
print("trailing window, against the limit; token bucket: the largest excess over C + R t)")
hdr = "%-6s %-13s %8s %9s %9s %10s %5s %7s %8s %8s %7s" % (
    "setup", "route", "offered", "admitted", "upstream", "strict", "over", "util", "low win",
    "refused", "st.err")
print(hdr)
print("-" * len(hdr))
over_runs = []
for r in rows:
    if r.get("failed"):
        print("%-6s %-13s run failed" % (r.get("setup"), r.get("route")))
        continue
    strict = "%s/%s" % (r.get("strict_max"), s(f(r, "limit"))) if r.get("kind") == "sw" else \
        "%+.1f" % f(r, "excess")
    over = f(r, "over")
    if over == over and over > 0:
        over_runs.append("%s/%s" % (r.get("setup"), r.get("route")))
    up = r.get("upstream") if r.get("targets") == "1" else "(pair)"
    print("%-6s %-13s %8s %9s %9s %10s %5s %6s%% %7s%% %8s %7s" % (
        r.get("setup"), r.get("route"), s(f(r, "rps")), r.get("admitted"), up, strict, s(over),
        s(f(r, "util") * 100, ".1f"), s(f(r, "util_min") * 100, ".1f"), r.get("refused"),
        r.get("store_errors", "0")))
print("(util: admitted / budget over windows 2..n, low win: the lowest of those windows; local3")
print(" routes are checked against 3x their per-node limit; pair-* are offered 2x their limit,")
print(" light-* half of it; upstream: gw-upstream's own count over the run)")
for b in backends:
    ent = [(r.get("route"), f(r, "raft_entries"), f(r, "seconds")) for r in rows
           if r.get("setup") == b and f(r, "raft_entries") > 0 and r.get("route", "").endswith("cluster")]
    if ent:
        print("%s log entries committed per second (quota refills and returns): %s" % (b, ", ".join(
            "%s %.0f" % (n, e / sec) for n, e, sec in ent)))

print()
print("Latency seen by the client, microseconds (429: refused before any upstream)")
hdr = "%-6s %-13s %9s %9s %9s %9s" % ("setup", "route", "2xx p50", "2xx p99", "429 p50", "429 p99")
print(hdr)
print("-" * len(hdr))
for r in rows:
    if not r.get("failed"):
        print("%-6s %-13s %9s %9s %9s %9s" % (r.get("setup"), r.get("route"), r.get("p50_2xx_us"),
              r.get("p99_2xx_us"), r.get("p50_429_us"), r.get("p99_429_us")))

print()
print("Limiter decision latency, microseconds: the cluster-scope route minus its local-scope twin on")
print("the same three gateways (paired: the same run, request by request), and minus the single")
print("gateway's local limit; target: within 50")
hdr = "%-6s %-24s %14s %14s %14s %14s" % ("setup", "measure", "cluster p50/99", "local3 p50/99",
                                         "diff p50/99", "vs single")
print(hdr)
print("-" * len(hdr))
for b in backends:
    for label, cl, lo, single, q in (
            ("2xx light, paired", "light-cluster", "light-local3", "light-local", "2xx"),
            ("2xx light, A/A noise", "light-local3b", "light-local3", "light-local", "2xx"),
            ("429 overload sw, paired", "pair-cluster", "pair-local3", "sw-local", "429"),
            ("429 overload sw, solo", "sw-cluster", "sw-local3", "sw-local", "429"),
            ("429 overload tb, solo", "tb-cluster", "tb-local3", "tb-local", "429")):
        c, l, sg = by.get((b, cl)), by.get((b, lo)), by.get(("single", single))
        if not c or c.get("failed"):
            continue
        k50, k99 = "p50_%s_us" % q, "p99_%s_us" % q
        print("%-6s %-24s %14s %14s %14s %14s" % (
            b, label, "%s/%s" % (s(f(c, k50)), s(f(c, k99))),
            "%s/%s" % (s(f(l, k50)), s(f(l, k99))),
            "%s/%s" % (s(f(c, k50) - f(l, k50), "+.0f"), s(f(c, k99) - f(l, k99), "+.0f")),
            "%s/%s" % (s(f(c, k50) - f(sg, k50), "+.0f"), s(f(c, k99) - f(sg, k99), "+.0f"))))
print()
for b in backends:
    if not any(r.get("setup") == b for r in rows):
        why = [n for n in notes if n.startswith(b + ":")]
        print("%s: %s" % (b, why[0].split(":", 1)[1].strip() if why else "not run"))
for n in notes:
    if not any(n.startswith(b + ":") for b in backends):
        print(n)
if over_runs:
    print("OVER-ADMISSION in %s: see the OVER-ADMISSION lines above" % ", ".join(over_runs))
else:
    print("over-admission: 0 in every run")
EOF
say "done"
