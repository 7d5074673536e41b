#!/usr/bin/env python3
"""Opens N keep-alive connections to a proxy, makes one request on each, holds them idle and
reports the proxy's resident memory growth per connection (VmRSS from /proc/PID/status).

Usage: proxy_idle.py --port PORT --pid PID [--count 10000] [--path /bench] [--hold 3]
Prints one line "idle_connections=N established=M rss_before_kib=A rss_after_kib=B
per_conn_kib=X" on stdout; exits 1 if fewer than N connections could be established.
"""

import argparse
import resource
import socket
import sys
import time


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            return False
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            return False
        rest += chunk
    return head.startswith(b"HTTP/1.1 200")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--path", default="/bench")
    ap.add_argument("--hold", type=float, default=3.0)
    a = ap.parse_args()

    limit = raise_nofile(a.count + 256)
    if limit < a.count + 64:
        print("proxy_idle: RLIMIT_NOFILE %d is too low for %d connections" % (limit, a.count),
              file=sys.stderr)
    req = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % a.path.encode()

    # Settle, then measure the baseline.
    time.sleep(1.0)
    before = vm_rss_kib(a.pid)
    socks = []
    failed = 0
    t0 = time.monotonic()
    for _ in range(a.count):
        try:
            s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            s.sendall(req)
            if read_response(s):
                socks.append(s)
            else:
                failed += 1
                s.close()
        except OSError:
            failed += 1
            if len(socks) + failed >= limit - 32:
                break
    opened_s = time.monotonic() - t0
    time.sleep(a.hold)
    # Are they still open? A sample is checked with a second request.
    alive = 0
    sample = socks[:: max(1, len(socks) // 100)]
    for s in sample:
        try:
            s.sendall(req)
            alive += 1 if read_response(s) else 0
        except OSError:
            pass
    time.sleep(0.5)
    after = vm_rss_kib(a.pid)
    n = len(socks)
    per = (after - before) / n if n else 0.0
    print("idle_connections=%d established=%d failed=%d open_seconds=%.1f sample_alive=%d/%d "
          "rss_before_kib=%d rss_after_kib=%d per_conn_kib=%.2f"
          % (a.count, n, failed, opened_s, alive, len(sample), before, after, per))
    for s in socks:
        s.close()
    return 0 if n == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
