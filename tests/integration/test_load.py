#!/usr/bin/env python3
"""Load and failure: 1,000 concurrent clients, an upstream killed mid-run, slow upstreams."""

import asyncio
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

CLIENTS = 1000
REQUESTS_PER_CLIENT = 3

# The test process holds CLIENTS sockets and the gateway (which inherits the limit) twice
# as many; raise the limit before any process starts.
harness.raise_nofile(8 * CLIENTS)


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d{3})", head)
    status = int(m.group(1)) if m else None
    cl = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    body = await reader.readexactly(int(cl.group(1))) if cl else b""
    return status, head, body


async def one_client(port, i, opened, go, results):
    """Connects, waits until every client is connected, then makes its requests."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 20 * harness.SLOW)
    except Exception as e:  # noqa: BLE001
        results.append(("connect", repr(e)))
        opened.set_one()
        return
    opened.set_one()
    await go.wait()
    try:
        for k in range(REQUESTS_PER_CLIENT):
            target = "/load/echo/c%d?k=%d" % (i, k)
            writer.write(b"GET %s HTTP/1.1\r\nHost: load\r\n\r\n" % target.encode())
            await writer.drain()
            status, head, body = await asyncio.wait_for(read_response(reader),
                                                        60 * harness.SLOW)
            if status != 200:
                results.append(("status", status, head[:200]))
            elif b'"target":"/echo/c%d?k=%d"' % (i, k) not in body:
                results.append(("body", body[:200]))
            else:
                results.append(("ok",))
    except Exception as e:  # noqa: BLE001
        results.append(("error", repr(e)))
    finally:
        writer.close()


class Counter:
    def __init__(self, n):
        self.n = n
        self.event = asyncio.Event()

    def set_one(self):
        self.n -= 1
        if self.n <= 0:
            self.event.set()


async def run_clients(port, n):
    opened = Counter(n)
    go = asyncio.Event()
    results = []
    tasks = [asyncio.ensure_future(one_client(port, i, opened, go, results)) for i in range(n)]
    await asyncio.wait_for(opened.event.wait(), 60 * harness.SLOW)
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120 * harness.SLOW)
    return results


class LoadTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.a = cls.upstream("la", threads=2)
        cls.b = cls.upstream("lb", threads=2)
        cls.slow = cls.upstream("lslow")
        cls.gw = cls.gateway([
            route("load", "/load", [cls.a, cls.b], strip=True),
            route("fast", "/fast", [cls.a], strip=True, timeout_ms=5000),
            route("slow", "/slow", [cls.slow], strip=True, timeout_ms=10000),
        ], node={"max_connections": 4 * CLIENTS})

    def test_1000_concurrent_clients(self):
        t0 = time.monotonic()
        results = asyncio.run(run_clients(self.gw.port, CLIENTS))
        took = time.monotonic() - t0
        bad = [r for r in results if r[0] != "ok"]
        self.assertEqual(bad[:10], [], "%d of %d failed" % (len(bad), len(results)))
        self.assertEqual(len(results), CLIENTS * REQUESTS_PER_CLIENT)
        print("1000 clients x %d requests in %.2f s" % (REQUESTS_PER_CLIENT, took),
              file=sys.stderr)
        self.assertTrue(self.gw.proc.alive())

    def test_slow_upstream_does_not_block_fast_routes(self):
        done = []

        def slow_client():
            try:
                done.append(self.gw.get("/slow/delay/2000", timeout=20).status)
            except OSError as e:
                done.append(repr(e))
        ts = [threading.Thread(target=slow_client) for _ in range(50)]
        for t in ts:
            t.start()
        time.sleep(0.3)
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            r = self.gw.get("/fast/bench")
            worst = max(worst, time.monotonic() - t0)
            self.assertEqual(r.status, 200)
        for t in ts:
            t.join(30)
        self.assertEqual(done, [200] * 50)
        self.assertLess(worst, 0.5 * harness.SLOW, "a fast request waited behind slow ones")

    def test_slow_clients_do_not_block_others(self):
        # 100 clients that send half a request and stall, plus a body trickled byte by byte.
        stalled = []
        try:
            for _ in range(100):
                s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=5)
                s.sendall(b"GET /fast/bench HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                stalled.append(s)
            trickle = socket.create_connection(("127.0.0.1", self.gw.port), timeout=5)
            stalled.append(trickle)
            trickle.sendall(b"POST /fast/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
            worst = 0.0
            for i in range(20):
                trickle.sendall(b"z")
                t0 = time.monotonic()
                r = self.gw.get("/fast/bench")
                worst = max(worst, time.monotonic() - t0)
                self.assertEqual(r.status, 200)
            self.assertLess(worst, 0.5 * harness.SLOW)
            head = trickle.recv(65536)
            self.assertIn(b" 200 ", head[:20])
        finally:
            for s in stalled:
                s.close()

    def test_many_slow_requests_complete_concurrently(self):
        results = []

        def client():
            try:
                results.append(self.gw.get("/slow/delay/1000", timeout=20).status)
            except OSError as e:
                results.append(repr(e))
        t0 = time.monotonic()
        ts = [threading.Thread(target=client) for _ in range(100)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        took = time.monotonic() - t0
        self.assertEqual(results, [200] * 100)
        self.assertLess(took, 4.0 * harness.SLOW, "slow requests were serialised")


class UpstreamKilledTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.up = cls.upstream("victim")
        cls.gw = cls.gateway([route("v", "/v", [cls.up], strip=True, connect_timeout_ms=500,
                                    timeout_ms=2000)])

    def test_upstream_killed_in_the_middle_of_a_run(self):
        stop = threading.Event()
        results = []  # (start, end, status, error code)
        lock = threading.Lock()

        def client():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = self.gw.get("/v/bench", timeout=10)
                    st = r.status
                    code = None
                    if st >= 400 and r.body.startswith(b"{"):
                        code = r.json().get("error", {}).get("code")
                except (OSError, ValueError) as e:
                    st, code = "error", repr(e)
                with lock:
                    results.append((t0, time.monotonic(), st, code))
                time.sleep(0.01)
        ts = [threading.Thread(target=client) for _ in range(8)]
        for t in ts:
            t.start()
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            self.up.kill()
            time.sleep(1.5)
            restart_at = time.monotonic()
            self.up.start()
            back_at = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.set()
            for t in ts:
                t.join(20)

        before = [r for r in results if r[1] < killed_at]
        down = [r for r in results if r[0] > killed_at + 0.05 and r[1] < restart_at]
        back = [r for r in results if r[0] > back_at + 0.5]
        self.assertTrue(before and down and back, results[:20])
        self.assertEqual({r[2] for r in before}, {200}, before[:10])
        # While down: quick 502 upstream_unavailable answers, no hangs, no other errors.
        self.assertTrue(all(r[2] == 502 for r in down), [r for r in down if r[2] != 502][:10])
        self.assertTrue(all(r[3] == "upstream_unavailable" for r in down), down[:5])
        self.assertLess(max(r[1] - r[0] for r in down), 1.0 * harness.SLOW,
                        "502s were not quick")
        # After the restart the gateway serves again.
        self.assertTrue(all(r[2] == 200 for r in back),
                        [r for r in back if r[2] != 200][:10])
        self.assertTrue(self.gw.proc.alive())


if __name__ == "__main__":
    harness.main()
