#!/usr/bin/env bash
# Coordination benchmark: a 3-node gateway cluster (backend raft, fsync on every log batch)
# side by side with a 3-node etcd 3.4 cluster (through its v3 JSON gateway) and one Redis
# (appendonly yes, appendfsync everysec), all on loopback. gw-bench-coord runs each workload at
# 16 and 64 closed-loop clients: counter increments (gateway /v1/counters, etcd /v3/kv/put,
# Redis INCR) and lock cycles (gateway /v1/locks acquire + release, etcd /v3/lock/lock + unlock
# under a per-client lease, Redis SET NX PX + DEL). Gateway and etcd clients are spread over the
# three nodes, so follower forwarding is included. Then failover: a client writes continuously
# to a follower, the leader is killed with SIGKILL, and the time to the first acknowledged write
# sent after the kill is measured (3 times per system, the killed node restarted in between).
# A summary table closes the output; see bench/cluster.md for the method and the figures.
#
# Usage: bench/cluster.sh <builddir>
# Needs (Debian packages): etcd-server, redis-server, python3, curl; the gateway and
#   gw-bench-coord built in <builddir>.
# Environment: COORD_DURATION (seconds per run, default 6), COORD_WARMUP (default 1),
#   COORD_CLIENTS (default "16 64"), COORD_TRIALS (failover trials, default 3),
#   COORD_TMP (parent of the data dirs, default /var/tmp: must be a real disk for fsync to count),
#   COORD_PERF (a file name: perf record -g on the gateway leader during gw-counter at the
#   highest client count, report written there), COORD_DEADLINE (seconds, default 290).
# Everything runs on loopback, stops by itself and removes its files.
set -u

root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
gateway="$build/gateway/gateway"
coord="$build/bench/gw-bench-coord"
duration="${COORD_DURATION:-6}"
warmup="${COORD_WARMUP:-1}"
clients="${COORD_CLIENTS:-16 64}"
trials="${COORD_TRIALS:-3}"
deadline="${COORD_DEADLINE:-290}"
perf_out="${COORD_PERF:-}"

die() { echo "cluster-bench: $*" >&2; exit 1; }
[ -x "$gateway" ] || die "$gateway is missing (make build)"
[ -x "$coord" ] || die "$coord is missing (make build)"
etcd_bin="$(command -v etcd || echo /usr/bin/etcd)"
[ -x "$etcd_bin" ] || die "etcd is missing (apt-get install etcd-server)"
redis_bin="$(command -v redis-server || echo /usr/bin/redis-server)"
[ -x "$redis_bin" ] || die "redis-server is missing (apt-get install redis-server)"
command -v python3 >/dev/null || die "python3 is missing"
command -v curl >/dev/null || die "curl is missing"

tmp="$(mktemp -d "${COORD_TMP:-/var/tmp}/gw-coord.XXXXXX")" || die "cannot create a temp dir"
fstype="$(stat -f -c %T "$tmp")"
pids=()
watchdog=""
cleanup() {
  trap - EXIT INT TERM
  [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "cluster-bench: stopped" >&2; exit 130' INT TERM
# The whole run is bounded: past the deadline the script stops itself (and cleans up).
( sleep "$deadline"; echo "cluster-bench: deadline of ${deadline}s reached" >&2; kill -TERM $$ ) &
watchdog=$!

# The failover probe keeps up to 2048 connections open while writes hang.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

t_begin=$(date +%s)
say() { echo "cluster-bench: [$(( $(date +%s) - t_begin ))s] $*"; }

# 16 distinct free ports below the ephemeral range, so that client sockets cannot take them.
ports=($(python3 - <<'EOF'
import random, socket
lo, hi = 20000, 32000
try:
    lo_e = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    hi = min(hi, lo_e - 1)
except Exception:
    pass
got, socks = [], []
while len(got) < 16:
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
[ "${#ports[@]}" -eq 16 ] || die "could not find free ports"
# gateway node i: data plane, control plane, raft; etcd member i: client, peer; redis
gw_port=(0 "${ports[0]}" "${ports[1]}" "${ports[2]}")
gw_api=(0 "${ports[3]}" "${ports[4]}" "${ports[5]}")
gw_raft=(0 "${ports[6]}" "${ports[7]}" "${ports[8]}")
et_client=(0 "${ports[9]}" "${ports[10]}" "${ports[11]}")
et_peer=(0 "${ports[12]}" "${ports[13]}" "${ports[14]}")
redis_port="${ports[15]}"

gw_pid=(0 0 0 0)
et_pid=(0 0 0 0)

# http_ok URL [METHOD BODY]: true when URL answers 200 within 1 s.
http_ok() {
  local code
  if [ $# -gt 1 ]; then
    code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' -X "$2" -d "$3" "$1" 2>/dev/null)"
  else
    code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)"
  fi
  [ "$code" = 200 ]
}

# ---- gateway cluster ------------------------------------------------------------------------
write_gateway_configs() {
  python3 - "$root" "$tmp" "${gw_port[*]}" "${gw_api[*]}" "${gw_raft[*]}" <<'EOF'
import json, sys
root, tmp = sys.argv[1], sys.argv[2]
port, api, raft = ([int(x) for x in a.split()] for a in sys.argv[3:6])
for i in (1, 2, 3):
    cfg = json.load(open("%s/etc/cluster/n%d.json" % (root, i)))
    cfg["node"]["listen"] = "127.0.0.1:%d" % port[i]
    cfg["node"]["api_listen"] = "127.0.0.1:%d" % api[i]
    cfg["node"]["data_dir"] = "%s/gw/n%d" % (tmp, i)
    cfg["backend"] = {"type": "raft"}
    cl = cfg["cluster"]
    cl["raft_listen"] = "127.0.0.1:%d" % raft[i]
    cl["peers"] = [{"id": "n%d" % k, "raft": "127.0.0.1:%d" % raft[k], "api": "127.0.0.1:%d" % api[k]}
                   for k in (1, 2, 3)]
    json.dump(cfg, open("%s/n%d.json" % (tmp, i), "w"), indent=2)
EOF
  mkdir -p "$tmp/gw"
}

start_gw() {
  local i="$1"
  "$gateway" -c "$tmp/n$i.json" 2>>"$tmp/gw-n$i.log" &
  gw_pid[$i]=$!
  pids+=("${gw_pid[$i]}")
}

# gw_leader: prints the leader's node number (1-3), or nothing.
gw_leader() {
  local i
  for i in 1 2 3; do
    local l
    l="$(curl -s -m 1 "http://127.0.0.1:${gw_api[$i]}/admin/cluster" 2>/dev/null |
      python3 -c 'import json,sys
try:
    print(json.load(sys.stdin).get("leader") or "")
except Exception:
    pass' 2>/dev/null)"
    case "$l" in n1|n2|n3) echo "${l#n}"; return 0 ;; esac
  done
  return 1
}

# wait_gw_ready SECONDS: every node answers /readyz (leader known) and a write goes through.
wait_gw_ready() {
  local end=$(( $(date +%s) + $1 )) i ok
  while [ "$(date +%s)" -lt "$end" ]; do
    ok=0
    for i in 1 2 3; do http_ok "http://127.0.0.1:${gw_api[$i]}/readyz" && ok=$((ok + 1)); done
    if [ $ok -eq 3 ] && http_ok "http://127.0.0.1:${gw_api[1]}/v1/counters/ready" POST '{"add":1}'; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# ---- etcd cluster ---------------------------------------------------------------------------
etcd_initial_cluster() {
  echo "e1=http://127.0.0.1:${et_peer[1]},e2=http://127.0.0.1:${et_peer[2]},e3=http://127.0.0.1:${et_peer[3]}"
}

start_etcd() {
  local i="$1"
  "$etcd_bin" --name "e$i" --data-dir "$tmp/etcd/e$i" \
    --listen-client-urls "http://127.0.0.1:${et_client[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${et_client[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${et_peer[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${et_peer[$i]}" \
    --initial-cluster "$(etcd_initial_cluster)" --initial-cluster-state new \
    --initial-cluster-token "gw-bench-$$" \
    --heartbeat-interval 100 --election-timeout 1000 \
    --logger zap --log-outputs stderr --log-level warn \
    2>>"$tmp/etcd-e$i.log" &
  et_pid[$i]=$!
  pids+=("${et_pid[$i]}")
}

# etcd_leader: prints the leader's member number (1-3), or nothing.
etcd_leader() {
  local i
  for i in 1 2 3; do
    local r
    r="$(curl -s -m 1 -X POST -d '{}' "http://127.0.0.1:${et_client[$i]}/v3/maintenance/status" 2>/dev/null |
      python3 -c 'import json,sys
try:
    d = json.load(sys.stdin)
    print("yes" if d["header"]["member_id"] == d["leader"] else "no")
except Exception:
    print("?")' 2>/dev/null)"
    [ "$r" = yes ] && { echo "$i"; return 0; }
  done
  return 1
}

wait_etcd_ready() {
  local end=$(( $(date +%s) + $1 )) i ok
  while [ "$(date +%s)" -lt "$end" ]; do
    ok=0
    for i in 1 2 3; do http_ok "http://127.0.0.1:${et_client[$i]}/health" && ok=$((ok + 1)); done
    if [ $ok -eq 3 ] && etcd_leader >/dev/null &&
      http_ok "http://127.0.0.1:${et_client[1]}/v3/kv/put" POST '{"key":"cmVhZHk=","value":"MQ=="}'; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# ---- runs -----------------------------------------------------------------------------------
gw_addrs="127.0.0.1:${gw_api[1]},127.0.0.1:${gw_api[2]},127.0.0.1:${gw_api[3]}"
et_addrs="127.0.0.1:${et_client[1]},127.0.0.1:${et_client[2]},127.0.0.1:${et_client[3]}"

# leader_metrics KIND: "fsyncs fsync_seconds proposals" from the current leader's /metrics.
leader_metrics() {
  local url l
  if [ "$1" = gw ]; then
    l="$(gw_leader)" || { echo "nan nan nan"; return; }
    url="http://127.0.0.1:${gw_api[$l]}/metrics"
  else
    l="$(etcd_leader)" || { echo "nan nan nan"; return; }
    url="http://127.0.0.1:${et_client[$l]}/metrics"
  fi
  curl -s -m 2 "$url" 2>/dev/null | python3 -c '
import sys
want = {"gw": ("gateway_raft_fsync_seconds_count", "gateway_raft_fsync_seconds_sum",
               "gateway_raft_proposals_total"),
        "etcd": ("etcd_disk_wal_fsync_duration_seconds_count",
                 "etcd_disk_wal_fsync_duration_seconds_sum",
                 "etcd_server_proposals_committed_total")}[sys.argv[1]]
got = {}
for line in sys.stdin:
    parts = line.split()
    if len(parts) == 2 and parts[0] in want:
        got[parts[0]] = parts[1]
print(" ".join(got.get(k, "nan") for k in want))' "$1"
}

# run WORKLOAD ADDRS CLIENTS [LABEL]: one gw-bench-coord run; its RESULT line goes to
# $tmp/res-LABEL-CLIENTS (LABEL defaults to WORKLOAD), with the leader's fsync and proposal
# counts over the run added.
run() {
  local wl="$1" addrs="$2" c="$3" label="${4:-$1}" kind="" m0="" m1=""
  local out="$tmp/out-$label-$c.txt"
  case "$wl" in gw-*) kind=gw ;; etcd-*) kind=etcd ;; esac
  [ -n "$kind" ] && m0="$(leader_metrics "$kind")"
  timeout -k 2 $(( duration + warmup + 30 )) "$coord" -w "$wl" -a "$addrs" -c "$c" \
    -d "$duration" --warmup "$warmup" --prefix "b$$-$c" >"$out" 2>"$tmp/err-$wl-$c.txt"
  [ -n "$kind" ] && m1="$(leader_metrics "$kind")"
  grep -v '^RESULT' "$out" | sed "s/^/  /; s/^  $wl  */  $(printf '%-11s' "$label") /"
  sed -n 's/^  *gw-bench-coord/  gw-bench-coord/p' "$tmp/err-$wl-$c.txt" | head -3
  grep '^RESULT' "$out" >"$tmp/res-$label-$c" || echo "RESULT workload=$wl clients=$c rps=nan p50_ms=nan p99_ms=nan errors=nan" >"$tmp/res-$label-$c"
  if [ -n "$kind" ]; then
    python3 - "$m0" "$m1" "$(( duration + warmup ))" >>"$tmp/res-$label-$c" <<'EOF'
import sys
try:
    a = [float(x) for x in sys.argv[1].split()]
    b = [float(x) for x in sys.argv[2].split()]
    secs = float(sys.argv[3])
    f, fs, p = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    line = "LEADER fsyncs_per_s=%.0f fsync_mean_ms=%.2f proposals_per_s=%.0f proposals_per_fsync=%.1f" % (
        f / secs, fs / f * 1000 if f else float("nan"), p / secs, p / f if f else float("nan"))
except Exception:
    line = "LEADER fsyncs_per_s=nan"
print(line)
print("    leader: " + line[7:].replace("=", " "), file=sys.stderr)
EOF
  fi
}

# field FILE KEY: the value of KEY=... in a RESULT/FAILOVER line.
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" "$1" | head -1; }

echo "cluster-bench: $(nproc) cores, $(uname -sr), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "cluster-bench: $("$gateway" --version 2>&1 | head -1); $("$etcd_bin" --version 2>&1 | head -1); $("$redis_bin" --version | cut -d' ' -f1-3)"
echo "cluster-bench: data under $tmp ($fstype)$( [ "$fstype" = tmpfs ] && echo ' -- tmpfs: fsync costs nothing here, set COORD_TMP to a disk')"
echo "cluster-bench: ${duration}s per run after ${warmup}s warm-up; clients: $clients"

say "generator self-test against a trivial in-process HTTP server"
for c in $clients; do
  timeout -k 2 30 "$coord" --selftest -c "$c" -d 2 --warmup 0.5 >"$tmp/self-$c.txt" 2>&1
  grep -v '^RESULT' "$tmp/self-$c.txt" | sed 's/^/  /'
  grep '^RESULT' "$tmp/self-$c.txt" >"$tmp/res-self-$c"
done

say "starting 3 gateway nodes, 3 etcd members, redis"
write_gateway_configs
for i in 1 2 3; do start_gw "$i"; done
mkdir -p "$tmp/etcd" "$tmp/redis"
for i in 1 2 3; do start_etcd "$i"; done
"$redis_bin" --bind 127.0.0.1 --port "$redis_port" --dir "$tmp/redis" --appendonly yes \
  --appendfsync everysec --save '' --protected-mode no --daemonize no \
  --logfile "$tmp/redis.log" &
pids+=($!)
wait_gw_ready 30 || die "the gateway cluster did not become ready: $(tail -3 "$tmp"/gw-n*.log)"
wait_etcd_ready 30 || die "the etcd cluster did not become ready: $(tail -3 "$tmp"/etcd-e*.log)"
for _ in $(seq 50); do
  [ "$(printf 'PING\r\n' | timeout 1 python3 -c '
import socket,sys
s=socket.create_connection(("127.0.0.1",int(sys.argv[1])),timeout=1); s.sendall(b"PING\r\n"); print(s.recv(16).decode().strip())' "$redis_port" 2>/dev/null)" = "+PONG" ] && break
  sleep 0.1
done
say "ready (gateway leader n$(gw_leader), etcd leader e$(etcd_leader))"

max_c=0
for c in $clients; do [ "$c" -gt "$max_c" ] && max_c=$c; done
for c in $clients; do
  for wl in gw-counter etcd-put redis-incr gw-lock etcd-lock redis-lock; do
    case "$wl" in
      gw-*) addrs="$gw_addrs" ;;
      etcd-*) addrs="$et_addrs" ;;
      redis-*) addrs="127.0.0.1:$redis_port" ;;
    esac
    run "$wl" "$addrs" "$c"
  done
done

# Diagnostics, not in the comparison: every client on the leader (no follower hop), which
# shows what forwarding costs in each system.
say "diagnostic: counter writes with all $max_c clients on the leader"
l="$(gw_leader)" && run gw-counter "127.0.0.1:${gw_api[$l]}" "$max_c" gw-leader
l="$(etcd_leader)" && run etcd-put "127.0.0.1:${et_client[$l]}" "$max_c" etcd-leader

if [ -n "$perf_out" ] && command -v perf >/dev/null; then
  l="$(gw_leader)"
  say "profile: perf record -g on gateway leader n$l during an extra gw-counter run (c=$max_c)"
  perf record -q -g -o "$tmp/perf.data" -p "${gw_pid[$l]}" -- sleep $(( duration + warmup )) \
    >/dev/null 2>&1 &
  perf_pid=$!
  run gw-counter "$gw_addrs" "$max_c" gw-perf
  wait "$perf_pid"
  {
    echo "# by thread"
    perf report -i "$tmp/perf.data" --stdio --no-children -g none --sort comm 2>/dev/null | grep -v '^#' | grep .
    echo "# by thread and symbol (>= 0.5%)"
    perf report -i "$tmp/perf.data" --stdio --no-children -g none --sort comm,dso,sym \
      --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep .
    echo "# call graphs (kernel stacks are complete; user stacks need frame pointers)"
    perf report -i "$tmp/perf.data" --stdio --no-children --percent-limit 2 2>/dev/null
  } >"$perf_out"
  say "perf report written to $perf_out"
fi

# ---- failover -------------------------------------------------------------------------------
# failover_trial KIND N: writes continuously to a follower, kills the leader, restarts it.
failover_trial() {
  local kind="$1" n="$2" l f addr pid wl
  if [ "$kind" = gateway ]; then l="$(gw_leader)"; else l="$(etcd_leader)"; fi
  [ -n "$l" ] || { echo "FAILOVER ack_ms=none reason=no_leader" >"$tmp/fo-$kind-$n"; return; }
  f=$(( l % 3 + 1 ))
  if [ "$kind" = gateway ]; then
    addr="127.0.0.1:${gw_api[$f]}"; pid="${gw_pid[$l]}"; wl=gw-counter
  else
    addr="127.0.0.1:${et_client[$f]}"; pid="${et_pid[$l]}"; wl=etcd-put
  fi
  timeout -k 2 40 "$coord" --probe -w "$wl" -a "$addr" --kill-pid "$pid" --kill-after-ms 1500 \
    --interval-ms 10 --pool 2048 --max-wait-ms 20000 --timeout-ms 20000 --prefix "fo$$" -q \
    >"$tmp/fo-$kind-$n" 2>&1
  { wait "$pid"; } 2>/dev/null
  printf '  %-7s trial %d: killed leader %s%d (writing to %s%d): %s ms to the next acknowledged write\n' \
    "$kind" "$n" "$( [ "$kind" = gateway ] && echo n || echo e)" "$l" \
    "$( [ "$kind" = gateway ] && echo n || echo e)" "$f" "$(field "$tmp/fo-$kind-$n" ack_ms)"
  sed -n 's/^FAILOVER /            /p' "$tmp/fo-$kind-$n"
  if [ "$kind" = gateway ]; then
    start_gw "$l"
    wait_gw_ready 30 || echo "  gateway: node n$l did not come back in 30 s"
  else
    start_etcd "$l"
    wait_etcd_ready 30 || echo "  etcd: member e$l did not come back in 30 s"
  fi
  sleep 1 # let the restarted node catch up before the next trial
}

say "failover: kill -9 the leader while a client writes to a follower ($trials trials each)"
# (the shell's own "Killed" notices for the killed leaders go to a log, not the output)
{
  for n in $(seq "$trials"); do failover_trial gateway "$n"; done
  for n in $(seq "$trials"); do failover_trial etcd "$n"; done
} 2>>"$tmp/shell.log"

# ---- summary --------------------------------------------------------------------------------
python3 - "$tmp" "$clients" "$trials" "$max_c" <<'EOF'
import math, os, re, statistics, sys
tmp, clients, trials, maxc = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), sys.argv[4]

def kv(path):
    try:
        text = open(path).read()
    except Exception:
        return {}
    return dict(re.findall(r"(\w+)=(\S+)", text))

def num(d, k):
    try:
        return float(d.get(k, "nan"))
    except ValueError:
        return float("nan")

def fmt(v, spec):
    return "n/a" if v != v else format(v, spec)

print()
print("Coordination throughput and latency (closed loop; ops/s, p50/p99 in ms; errors counted)")
print("%-8s %-4s | %-28s | %-28s | %-28s | %s" % ("op", "c", "gateway (3 nodes, raft)", "etcd 3.4 (3 nodes)",
                                                 "redis (1 node)", "gw/etcd"))
for kind, (g, e, r) in (("counter", ("gw-counter", "etcd-put", "redis-incr")),
                        ("lock", ("gw-lock", "etcd-lock", "redis-lock"))):
    for c in clients:
        cells = []
        vals = []
        for w in (g, e, r):
            d = kv("%s/res-%s-%s" % (tmp, w, c))
            rps, p50, p99 = num(d, "rps"), num(d, "p50_ms"), num(d, "p99_ms")
            errs = int(num(d, "errors") + num(d, "timeouts") + num(d, "conn_errors")) \
                if not math.isnan(num(d, "errors")) else -1
            cells.append("%8s %6s %6s %s" % (fmt(rps, ".0f"), fmt(p50, ".2f"), fmt(p99, ".2f"),
                                             ("e%d" % errs) if errs else "  "))
            vals.append(rps)
        ratio = vals[0] / vals[1] if vals[1] and vals[1] == vals[1] and vals[0] == vals[0] else float("nan")
        print("%-8s %-4s | %-28s | %-28s | %-28s | %s" % (kind, c, cells[0], cells[1], cells[2],
                                                           fmt(ratio, ".2f") + "x"))
print()
for w, label in (("gw-leader", "gateway counter, all clients on the leader"),
                 ("etcd-leader", "etcd put, all clients on the leader")):
    c = maxc
    d = kv("%s/res-%s-%s" % (tmp, w, c))
    print("diagnostic: %-45s c=%s: %s ops/s, p50 %s ms, p99 %s ms" % (label, c, fmt(num(d, "rps"), ".0f"),
          fmt(num(d, "p50_ms"), ".2f"), fmt(num(d, "p99_ms"), ".2f")))
print()
print("Leader log writes during each run (from each leader's /metrics)")
print("%-11s %-4s | %10s %14s %13s %18s" % ("workload", "c", "fsyncs/s", "fsync mean ms", "proposals/s",
                                          "proposals/fsync"))
for w, cs in (("gw-counter", clients), ("etcd-put", clients), ("gw-lock", clients),
              ("etcd-lock", clients), ("gw-leader", [maxc]), ("etcd-leader", [maxc])):
    for c in cs:
        d = kv("%s/res-%s-%s" % (tmp, w, c))
        print("%-11s %-4s | %10s %14s %13s %18s" % (w, c, fmt(num(d, "fsyncs_per_s"), ".0f"),
              fmt(num(d, "fsync_mean_ms"), ".2f"), fmt(num(d, "proposals_per_s"), ".0f"),
              fmt(num(d, "proposals_per_fsync"), ".1f")))
print()
for c in clients:
    d = kv("%s/res-self-%s" % (tmp, c))
    print("generator ceiling (trivial HTTP server in-process), c=%s: %s ops/s" % (c, fmt(num(d, "rps"), ".0f")))

print()
print("Failover: SIGKILL to the leader -> first acknowledged write sent after the kill, to a follower (ms)")
print("(election timeout 1000 ms in both systems; target: under 2x = 2000 ms)")
for kind in ("gateway", "etcd"):
    vals = []
    for n in range(1, trials + 1):
        d = kv("%s/fo-%s-%d" % (tmp, kind, n))
        vals.append(num(d, "ack_ms"))
    ok = [v for v in vals if v == v]
    med = statistics.median(ok) if ok else float("nan")
    print("%-8s trials: %-30s median %s" % (kind, ", ".join(fmt(v, ".0f") for v in vals), fmt(med, ".0f")))
EOF
say "done"
