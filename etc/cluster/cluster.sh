#!/usr/bin/env bash
# Starts a 3-node cluster on loopback from etc/cluster/n{1,2,3}.json (control planes on
# 127.0.0.1:9091-9093, proxies on 8081-8083, Raft on 7001-7003, data in var/cluster/) with the
# demo upstream on 127.0.0.1:18080, prints what to try, and stops everything on Ctrl-C.
# Usage: etc/cluster/cluster.sh <builddir>
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
cd "$root"
logdir="$(mktemp -d "${TMPDIR:-/tmp}/gw-cluster.XXXXXX")"
pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "cluster: stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  echo "cluster: logs kept in $logdir (data in var/cluster/)"
  exit 0
}
trap stop INT TERM EXIT
"$build/tests/upstream/gw-upstream" --listen 127.0.0.1:18080 --name demo 2>"$logdir/upstream.log" &
pids+=($!)
for i in 1 2 3; do
  "$build/gateway/gateway" -c "etc/cluster/n$i.json" 2>"$logdir/n$i.log" &
  pids+=($!)
done
for _ in $(seq 100); do
  ok=0
  for i in 1 2 3; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:909$i/readyz")" = 200 ] && ok=$((ok + 1))
  done
  [ $ok -eq 3 ] && break
  sleep 0.1
done
cat <<MSG
A 3-node cluster is up (every node accepts every request; followers forward to the leader).
  control planes: http://127.0.0.1:9091  http://127.0.0.1:9092  http://127.0.0.1:9093
  proxies:        http://127.0.0.1:8081  http://127.0.0.1:8082  http://127.0.0.1:8083

Try:
  curl -s -X POST -d '{"add": 1}' http://127.0.0.1:9091/v1/counters/visits
  curl -s http://127.0.0.1:9093/v1/counters/visits
  curl -s -X POST -d '{"ttl_ms": 10000}' http://127.0.0.1:9092/v1/leases
  curl -s -X POST -d '{"owner": "worker-1", "ttl_ms": 10000}' http://127.0.0.1:9092/v1/locks/jobs
  curl -s http://127.0.0.1:9091/v1/locks/jobs
  one limit for the whole cluster (10 per 30 s), requests spread over the three proxies:
  for i in \$(seq 15); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:808\$((i % 3 + 1))/api/limited/x; done; echo
  kill one node (see the pids below) and keep writing through the others.
  pids: ${pids[*]:1}

Logs: $logdir    Press Ctrl-C to stop.
MSG
wait
