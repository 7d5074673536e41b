#!/usr/bin/env python3
"""Per-route policies through the real gateway (API.md sections 2 and 3).

Token bucket and sliding window (admitted counts, 429 rate_limited, Retry-After and the IETF
RateLimit fields, keys), the circuit breaker (open, half-open, closed; count and time windows;
slow calls), retries (attempts seen by the upstream, idempotent methods, Retry-After, statuses,
per-try timeouts, the budget), degradation (fallbacks, shed, stale, slow) and idempotency
(replay fidelity, 409, 422, 400, what is stored and what is not, ttl).

Every test starts its own gw-upstream and gateway with a config written for it. Time-based
checks wait for the time to pass with wide margins; counts are exact where API.md says so.
"""

import http.client
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

SLOW = harness.SLOW
REQ_TIMEOUT = 15.0 * SLOW
# An upstream delay long enough to act while the request is still in flight.
HOLD_MS = int(1000 + 250 * (SLOW - 1))

RL_POLICY = re.compile(r'^"(?P<name>[^"]+)";q=(?P<q>\d+);w=(?P<w>\d+)$')
RL_STATE = re.compile(r'^"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')


# ---- helpers ------------------------------------------------------------------------------

def request_from(port, source_ip, method, target, headers=None, body=None,
                 timeout=REQ_TIMEOUT):
    """One request on a fresh connection whose local address is source_ip (a loopback IP)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source_ip, 0))
    try:
        return harness.request_on(conn, method, target, headers, body)
    finally:
        conn.close()


def in_parallel(n, fn):
    """Runs fn(i) on n threads released together; returns the results in index order.

    An exception in a thread is returned in its slot (the caller asserts on it)."""
    barrier = threading.Barrier(n)
    out = [None] * n

    def run(i):
        try:
            barrier.wait(timeout=30)
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[i] = e
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60 * SLOW)
    return out


class Background:
    """A request running on its own thread; .result() joins and returns the Response."""

    def __init__(self, fn):
        self._out = None
        self._err = None
        self._t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._t.start()

    def _run(self, fn):
        try:
            self._out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised by result()
            self._err = e

    def result(self, timeout=30.0):
        self._t.join(timeout * SLOW)
        if self._t.is_alive():
            raise AssertionError("background request did not finish")
        if self._err is not None:
            raise self._err
        return self._out


def sleep_until(deadline):
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


def statuses(rs):
    return [r.status if isinstance(r, harness.Response) else r for r in rs]


class PolicyCase(harness.Case):
    """Each test gets fresh processes; env() starts an upstream and a one-route gateway."""

    def env(self, policies, route_name="r", upstream_name=None, node=None, **route_kw):
        tag = upstream_name or self._testMethodName
        up = self.upstream(tag, threads=4)
        self.addCleanup(up.stop)
        gw = self.start_gateway([route(route_name, "/", [up], policies=policies, **route_kw)],
                                node=node, subdir=tag)
        return up, gw

    def start_gateway(self, routes, node=None, subdir=None):
        gw = self.gateway(routes, node=node, subdir=subdir or self._testMethodName)
        self.addCleanup(gw.stop)
        return gw

    def received(self, up):
        return up.stats()["received"]

    def wait_received(self, up, n, timeout=10.0):
        """Waits until the upstream has received at least n requests; returns the count."""
        got = harness.wait_until(lambda: self.received(up) >= n, timeout * SLOW, 0.02)
        self.assertTrue(got, "the upstream did not receive %d requests" % n)
        return self.received(up)

    def rl_fields(self, r, route_name):
        """Checks both RateLimit fields are present and well formed; returns (q, w, r, t)."""
        pol = r.header("RateLimit-Policy")
        st = r.header("RateLimit")
        self.assertIsNotNone(pol, "RateLimit-Policy missing: %r" % r)
        self.assertIsNotNone(st, "RateLimit missing: %r" % r)
        mp = RL_POLICY.match(pol)
        ms = RL_STATE.match(st)
        self.assertTrue(mp, "bad RateLimit-Policy %r" % pol)
        self.assertTrue(ms, "bad RateLimit %r" % st)
        self.assertEqual(mp.group("name"), route_name)
        self.assertEqual(ms.group("name"), route_name)
        return int(mp.group("q")), int(mp.group("w")), int(ms.group("r")), int(ms.group("t"))

    def assertRateLimited(self, r, route_name, q, w, max_retry_after):
        self.assertErrorBody(r, 429, "rate_limited")
        ra = r.header("Retry-After")
        self.assertIsNotNone(ra, r)
        self.assertRegex(ra, r"^\d+$")
        self.assertGreaterEqual(int(ra), 1, "Retry-After is rounded up: %r" % r)
        self.assertLessEqual(int(ra), max_retry_after, r)
        got_q, got_w, rem, t = self.rl_fields(r, route_name)
        self.assertEqual(got_q, q, r)
        if w is None:
            self.assertGreaterEqual(got_w, 1, r)  # a token bucket's window is not fixed
        else:
            self.assertEqual(got_w, w, r)
        self.assertEqual(rem, 0, r)
        return int(ra)

    def assertCircuitOpen(self, r, max_retry_after, min_retry_after=1):
        """503 circuit_open; Retry-After is the rest of open_ms in whole seconds, rounded up."""
        self.assertErrorBody(r, 503, "circuit_open")
        ra = r.header("Retry-After")
        self.assertIsNotNone(ra, r)
        self.assertRegex(ra, r"^\d+$")
        self.assertGreaterEqual(int(ra), min_retry_after, r)
        self.assertLessEqual(int(ra), max_retry_after, r)

    def burst(self, gw, n, target="/x", headers=None):
        """n sequential GETs on one keep-alive connection; returns (responses, seconds)."""
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=REQ_TIMEOUT)
        t0 = time.monotonic()
        try:
            rs = [harness.request_on(conn, "GET", target, headers) for _ in range(n)]
        finally:
            conn.close()
        return rs, time.monotonic() - t0

    def assertAdmittedCount(self, rs, took, expected, refill_per_sec=0):
        """Exactly `expected` admitted first, then only 429s; a burst slower than one token's
        refill may be allowed the tokens that arrived meanwhile (never more)."""
        codes = statuses(rs)
        admitted = codes.count(200)
        self.assertEqual(admitted + codes.count(429), len(codes), codes)
        extra = int(took * refill_per_sec)
        self.assertGreaterEqual(admitted, expected, codes)
        self.assertLessEqual(admitted, expected + extra, (codes, took))
        if extra == 0:
            self.assertEqual(codes, [200] * expected + [429] * (len(codes) - expected))
        return admitted


# ---- token bucket -------------------------------------------------------------------------

class TokenBucketTest(PolicyCase):
    def test_burst_admits_exactly_capacity(self):
        up, gw = self.env({"token_bucket": {"capacity": 5, "refill_per_sec": 1}},
                          route_name="tb")
        rs, took = self.burst(gw, 9)
        admitted = self.assertAdmittedCount(rs, took, 5, refill_per_sec=1)
        self.assertEqual(self.received(up), admitted)
        if admitted == 5:
            # Admitted answers carry both fields, remaining counting down to 0.
            self.assertEqual([self.rl_fields(r, "tb")[2] for r in rs[:5]], [4, 3, 2, 1, 0])
        for r in rs[:admitted]:
            q, w, _, t = self.rl_fields(r, "tb")
            self.assertEqual(q, 5, r)
            self.assertGreaterEqual(w, 1, r)
            self.assertIsNone(r.header("Retry-After"), r)
        for r in rs[admitted:]:
            # The next token is at most 1 s away at 1 token/s: the ceiling is exactly 1.
            self.assertEqual(self.assertRateLimited(r, "tb", 5, None, 1), 1)

    def test_refill_keeps_fractions(self):
        up, gw = self.env({"token_bucket": {"capacity": 1, "refill_per_sec": 1}},
                          route_name="tb")
        r = gw.get("/a")
        t_taken = time.monotonic()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.rl_fields(r, "tb")[2], 0)
        r = gw.get("/a")
        self.assertRateLimited(r, "tb", 1, None, 1)
        # 0.5 s later: half a token, still refused; that half must not be lost.
        sleep_until(t_taken + 0.5)
        r = gw.get("/a")
        t_probe = time.monotonic()
        if t_probe - t_taken < 0.95:
            self.assertRateLimited(r, "tb", 1, None, 1)
            # 0.6 s after the refused probe: 1.1 tokens with fractions kept, 0.6 if dropped.
            sleep_until(max(t_taken + 1.1, t_probe + 0.6))
            r = gw.get("/a")
            self.assertEqual(r.status, 200, r)
        sleep_until(time.monotonic() + 1.1)
        r = gw.get("/a")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 3)

    def test_refill_after_waiting(self):
        up, gw = self.env({"token_bucket": {"capacity": 3, "refill_per_sec": 2}},
                          route_name="tb")
        rs, took = self.burst(gw, 5)
        self.assertAdmittedCount(rs, took, 3, refill_per_sec=2)
        # 2 tokens/s: after 2 s the bucket is full again (capped at capacity).
        time.sleep(2.0)
        rs, took = self.burst(gw, 5)
        self.assertAdmittedCount(rs, took, 3, refill_per_sec=2)
        for r in rs:
            if r.status == 429:
                self.assertRateLimited(r, "tb", 3, None, 1)

    def test_header_key_separates_buckets(self):
        up, gw = self.env({"token_bucket": {"capacity": 2, "refill_per_sec": 1,
                                            "key": "header:Tenant"}}, route_name="tb")
        t0 = time.monotonic()
        for tenant in ("alpha", "beta", None):
            with self.subTest(tenant=tenant):
                hdrs = [("Tenant", tenant)] if tenant else None
                rs, took = self.burst(gw, 4, headers=hdrs)
                self.assertAdmittedCount(rs, took, 2, refill_per_sec=1)
        # Requests without the header share one bucket: another header-less client is refused,
        # alpha's bucket is still empty, and a new tenant has a bucket of its own.
        codes = [gw.get("/x").status,
                 gw.get("/x", headers=[("Tenant", "alpha")]).status,
                 gw.get("/x", headers=[("Tenant", "gamma")]).status]
        if time.monotonic() - t0 < 0.95:
            self.assertEqual(codes, [429, 429, 200])
        self.assertEqual(codes[2], 200)

    def test_client_ip_key(self):
        up, gw = self.env({"token_bucket": {"capacity": 2, "refill_per_sec": 1,
                                            "key": "client_ip"}}, route_name="tb")
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            with self.subTest(ip=ip):
                t0 = time.monotonic()
                rs = [request_from(gw.port, ip, "GET", "/x") for _ in range(4)]
                # A request header does not select another bucket.
                rs.append(request_from(gw.port, ip, "GET", "/x", headers=[("Tenant", ip)]))
                self.assertAdmittedCount(rs, time.monotonic() - t0, 2, refill_per_sec=1)

    def test_concurrent_burst(self):
        up, gw = self.env({"token_bucket": {"capacity": 10, "refill_per_sec": 1}},
                          route_name="tb")
        t0 = time.monotonic()
        rs = in_parallel(30, lambda i: gw.get("/c/%d" % i, timeout=REQ_TIMEOUT))
        took = time.monotonic() - t0
        codes = statuses(rs)
        self.assertEqual(codes.count(200) + codes.count(429), 30, codes)
        self.assertGreaterEqual(codes.count(200), 10, codes)
        self.assertLessEqual(codes.count(200), 10 + int(took), (codes, took))
        self.assertEqual(self.received(up), codes.count(200))


# ---- sliding window -----------------------------------------------------------------------

class SlidingWindowTest(PolicyCase):
    def test_exact_limit_then_admitted_after_the_window(self):
        up, gw = self.env({"sliding_window": {"limit": 4, "window_ms": 1500}},
                          route_name="sw")
        t0 = time.monotonic()
        rs, took = self.burst(gw, 7)
        t_end = time.monotonic()
        if took < 1.4:
            self.assertEqual(statuses(rs), [200] * 4 + [429] * 3)
            self.assertEqual([self.rl_fields(r, "sw")[2] for r in rs[:4]], [3, 2, 1, 0])
        self.assertEqual(self.received(up), statuses(rs).count(200))
        for r in rs:
            if r.status == 200:
                q, w, _, t = self.rl_fields(r, "sw")
                self.assertEqual((q, w), (4, 2), r)  # w = 1.5 s rounded up
                self.assertLessEqual(t, 2, r)
                continue
            ra = self.assertRateLimited(r, "sw", 4, 2, 2)
            # Retry-After: when the oldest admission leaves the window, rounded up.
            lo = 1.5 - (time.monotonic() - t0)
            self.assertGreaterEqual(ra, max(1, math.ceil(lo)), r)
        # Every admission leaves the window 1.5 s after it was made.
        sleep_until(t_end + 1.7)
        rs2, took2 = self.burst(gw, 6)
        if took2 < 1.4:
            self.assertEqual(statuses(rs2), [200] * 4 + [429] * 2)
        self.assertEqual(self.received(up), statuses(rs).count(200) + statuses(rs2).count(200))

    def test_window_slides(self):
        # limit 2 in 2 s: A at 0, B at 0.9; at 2.2 only A has left, so exactly one is admitted.
        up, gw = self.env({"sliding_window": {"limit": 2, "window_ms": 2000}},
                          route_name="sw")
        ta0 = time.monotonic()
        self.assertEqual(gw.get("/a").status, 200)
        ta1 = time.monotonic()
        sleep_until(ta0 + 0.9)
        tb0 = time.monotonic()
        self.assertEqual(gw.get("/b").status, 200)
        r = gw.get("/c")
        self.assertRateLimited(r, "sw", 2, 2, 2)
        sleep_until(ta1 + 2.2)
        r1 = gw.get("/d")
        r2 = gw.get("/e")
        t_probe = time.monotonic()
        self.assertEqual(r1.status, 200, r1)
        if t_probe < tb0 + 2.0:  # B is still inside the window
            self.assertRateLimited(r2, "sw", 2, 2, 2)
            self.assertEqual(self.rl_fields(r1, "sw")[2], 0)
        self.assertEqual(self.received(up), 3 + (r2.status == 200))

    def test_concurrent_burst_admits_exactly_limit(self):
        up, gw = self.env({"sliding_window": {"limit": 10, "window_ms": 60000}},
                          route_name="sw")
        rs = in_parallel(40, lambda i: gw.get("/c/%d" % i, timeout=REQ_TIMEOUT))
        codes = statuses(rs)
        self.assertEqual(codes.count(200), 10, codes)
        self.assertEqual(codes.count(429), 30, codes)
        self.assertEqual(self.received(up), 10)
        remaining = sorted(self.rl_fields(r, "sw")[2] for r in rs if r.status == 200)
        self.assertEqual(remaining, list(range(10)))

    def test_header_key(self):
        up, gw = self.env({"sliding_window": {"limit": 2, "window_ms": 60000,
                                              "key": "header:Api-Key"}}, route_name="sw")
        for key in ("k1", "k2", None):
            with self.subTest(key=key):
                hdrs = [("Api-Key", key)] if key else None
                rs, _ = self.burst(gw, 3, headers=hdrs)
                self.assertEqual(statuses(rs), [200, 200, 429])
        self.assertEqual(self.received(up), 6)

    def test_client_ip_key(self):
        up, gw = self.env({"sliding_window": {"limit": 3, "window_ms": 60000,
                                              "key": "client_ip"}}, route_name="sw")
        for ip in ("127.0.0.1", "127.0.0.2"):
            with self.subTest(ip=ip):
                rs = [request_from(gw.port, ip, "GET", "/x") for _ in range(4)]
                self.assertEqual(statuses(rs), [200, 200, 200, 429])
                # The first admission leaves the 60 s window in just under 60 s.
                self.assertGreaterEqual(self.assertRateLimited(rs[-1], "sw", 3, 60, 60), 55)
        self.assertEqual(self.received(up), 6)


# ---- circuit breaker ----------------------------------------------------------------------

class CircuitBreakerTest(PolicyCase):
    BREAKER = {"window": "count", "window_size": 10, "min_calls": 4, "failure_rate": 0.5,
               "open_ms": 1500, "half_open_calls": 2}

    def open_breaker(self, up, gw, failures):
        """Scripts `failures` 500s and sends them; returns the time the breaker opened by."""
        up.fail(count=failures, status=500)
        for i in range(failures):
            r = gw.get("/fail/%d" % i)
            self.assertEqual(r.status, 500, r)
            self.assertEqual(r.json(), {"upstream": up.name, "status": 500})
        return time.monotonic()

    def test_open_half_open_closed(self):
        up, gw = self.env({"circuit_breaker": self.BREAKER})
        # Three failures are below min_calls: still closed.
        up.fail(count=3, status=500)
        for i in range(3):
            self.assertEqual(gw.get("/f/%d" % i).status, 500)
        up.fail(count=1, status=500)
        r = gw.get("/f/3")
        t_open = time.monotonic()
        self.assertEqual(r.status, 500, r)
        self.assertEqual(self.received(up), 4)
        # Open: rejected without reaching the upstream.
        for _ in range(3):
            self.assertCircuitOpen(gw.get("/x"), 2)
        self.assertEqual(self.received(up), 4)
        # Still open well before open_ms.
        sleep_until(t_open + 0.7)
        if time.monotonic() < t_open + 1.3:
            self.assertCircuitOpen(gw.get("/x"), 1)
            self.assertEqual(self.received(up), 4)
        # Half-open after open_ms: exactly half_open_calls trials reach the upstream.
        sleep_until(t_open + 1.5 + 0.3)
        rs = in_parallel(5, lambda i: gw.get("/delay/%d" % HOLD_MS,
                                             timeout=REQ_TIMEOUT))
        codes = statuses(rs)
        self.assertEqual(codes.count(200), 2, codes)
        self.assertEqual(codes.count(503), 3, codes)
        for r in rs:
            if r.status == 503:
                self.assertErrorBody(r, 503, "circuit_open")
        self.assertEqual(self.received(up), 6)
        # Both trials succeeded: closed, everything goes through again.
        for i in range(6):
            self.assertEqual(gw.get("/ok/%d" % i).status, 200)
        self.assertEqual(self.received(up), 12)

    def test_rejects_while_trials_are_in_flight(self):
        up, gw = self.env({"circuit_breaker": dict(self.BREAKER, half_open_calls=1)})
        t_open = self.open_breaker(up, gw, 4)
        sleep_until(t_open + 1.5 + 0.3)
        trial = Background(lambda: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        self.wait_received(up, 5)
        for _ in range(3):
            self.assertCircuitOpen(gw.get("/x"), 2)
        self.assertEqual(trial.result().status, 200)
        self.assertEqual(self.received(up), 5)
        self.assertEqual(gw.get("/x").status, 200)
        self.assertEqual(self.received(up), 6)

    def test_failed_trial_reopens(self):
        up, gw = self.env({"circuit_breaker": dict(self.BREAKER, half_open_calls=1)})
        t_open = self.open_breaker(up, gw, 4)
        sleep_until(t_open + 1.5 + 0.3)
        up.fail(count=1, status=503)
        r = gw.get("/trial")
        t_reopen = time.monotonic()
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json(), {"upstream": up.name, "status": 503})
        self.assertEqual(self.received(up), 5)
        # Open again for a full open_ms.
        self.assertCircuitOpen(gw.get("/x"), 2)
        self.assertEqual(self.received(up), 5)
        sleep_until(t_reopen + 1.5 + 0.3)
        self.assertEqual(gw.get("/trial2").status, 200)
        self.assertEqual(gw.get("/after").status, 200)
        self.assertEqual(self.received(up), 7)

    def test_half_open_decides_on_all_trials(self):
        for rate, reopens in ((0.5, True), (0.75, False)):
            with self.subTest(failure_rate=rate):
                up, gw = self.env({"circuit_breaker": dict(self.BREAKER, failure_rate=rate)},
                                  upstream_name="%s_%d" % (self._testMethodName, rate * 100))
                t_open = self.open_breaker(up, gw, 4)
                self.assertCircuitOpen(gw.get("/x"), 2)
                sleep_until(t_open + 1.5 + 0.3)
                # Two trials: the first fails, the second still goes through.
                up.fail(count=1, status=500)
                self.assertEqual(gw.get("/t1").status, 500)
                self.assertEqual(gw.get("/t2").status, 200)
                self.assertEqual(self.received(up), 6)
                # 1 failure in 2 trials: 50% reaches 0.5 (open again), not 0.75 (closed).
                r = gw.get("/after")
                if reopens:
                    self.assertCircuitOpen(r, 2)
                    self.assertEqual(self.received(up), 6)
                else:
                    self.assertEqual(r.status, 200, r)
                    self.assertEqual(self.received(up), 7)

    def test_success_below_failure_rate_stays_closed(self):
        up, gw = self.env({"circuit_breaker": self.BREAKER})
        # 3 failures among 7 calls: 43% < 50%, never tripped.
        up.fail(count=1, status=502)
        self.assertEqual(gw.get("/a").status, 502)
        for i in range(4):
            self.assertEqual(gw.get("/ok/%d" % i).status, 200)
        up.fail(count=2, status=504)
        self.assertEqual(gw.get("/b").status, 504)
        self.assertEqual(gw.get("/c").status, 504)
        for i in range(3):
            self.assertEqual(gw.get("/more/%d" % i).status, 200)
        self.assertEqual(self.received(up), 10)

    def test_statuses_not_listed_are_not_failures(self):
        up, gw = self.env({"circuit_breaker": dict(self.BREAKER, failure_statuses=[503])})
        up.fail(count=6, status=500)
        for i in range(6):
            self.assertEqual(gw.get("/f/%d" % i).status, 500)
        self.assertEqual(gw.get("/x").status, 200)
        self.assertEqual(self.received(up), 7)

    def test_time_window(self):
        up, gw = self.env({"circuit_breaker": {"window": "time", "window_size": 2,
                                               "min_calls": 3, "failure_rate": 0.5,
                                               "open_ms": 5000, "half_open_calls": 1}})
        up.fail(count=2, status=500)
        self.assertEqual(gw.get("/f/1").status, 500)
        self.assertEqual(gw.get("/f/2").status, 500)
        # Those two leave the 2 s window; a count window would open on the next failure.
        time.sleep(2.3)
        up.fail(count=2, status=500)
        self.assertEqual(gw.get("/f/3").status, 500)
        self.assertEqual(gw.get("/f/4").status, 500)
        self.assertEqual(self.received(up), 4)
        # Third call in the window: 2 failures of 3 reach 50%, it opens after this one.
        self.assertEqual(gw.get("/ok").status, 200)
        self.assertEqual(self.received(up), 5)
        self.assertCircuitOpen(gw.get("/x"), 5, 4)
        self.assertEqual(self.received(up), 5)

    def test_slow_calls_open(self):
        up, gw = self.env({"circuit_breaker": {"window": "count", "window_size": 4,
                                               "min_calls": 2, "slow_call_ms": 200,
                                               "slow_call_rate": 1.0, "open_ms": 5000}})
        self.assertEqual(gw.get("/delay/400").status, 200)
        self.assertEqual(gw.get("/delay/400").status, 200)
        self.assertCircuitOpen(gw.get("/x"), 5, 4)
        self.assertEqual(self.received(up), 2)

    def test_connect_failures_open(self):
        dead = harness.free_port()
        gw = self.start_gateway([route("r", "/", ["http://127.0.0.1:%d" % dead],
                                       connect_timeout_ms=1000, timeout_ms=3000,
                                       policies={"circuit_breaker": {"min_calls": 2,
                                                                     "window_size": 2,
                                                                     "open_ms": 5000}})])
        self.assertErrorBody(gw.get("/a"), 502, "upstream_unavailable")
        self.assertErrorBody(gw.get("/b"), 502, "upstream_unavailable")
        self.assertCircuitOpen(gw.get("/c"), 5, 4)


# ---- retry --------------------------------------------------------------------------------

RETRY = {"max_attempts": 3, "base_ms": 10, "max_backoff_ms": 100}


class RetryTest(PolicyCase):
    def test_get_recovers_after_two_failures(self):
        up, gw = self.env({"retry": RETRY})
        up.fail(count=2, status=503)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["path"], "/items")
        self.assertEqual(self.received(up), 3)
        self.assertEqual(up.stats()["by_path"].get("/items"), 3)

    def test_gives_up_after_max_attempts(self):
        up, gw = self.env({"retry": RETRY})
        up.fail(count=10, status=503)
        r = gw.get("/items")
        # The last failure is returned as the upstream sent it.
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json(), {"upstream": up.name, "status": 503})
        self.assertEqual(self.received(up), 3)
        self.assertEqual(up.stats()["script_remaining"], 7)

    def test_other_idempotent_methods_are_retried(self):
        up, gw = self.env({"retry": RETRY})
        for m, body in (("PUT", b"{}"), ("DELETE", None), ("HEAD", None)):
            with self.subTest(method=m):
                up.reset()
                up.fail(count=2, status=502)
                r = gw.req(m, "/items/1", body=body)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(self.received(up), 3)

    def test_post_without_key_is_not_retried(self):
        up, gw = self.env({"retry": RETRY, "idempotency": {}})
        up.fail(count=10, status=503)
        r = gw.req("POST", "/orders", body=b'{"n":1}')
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(up), 1)
        up.reset()
        up.fail(count=10, status=503)
        r = gw.req("PATCH", "/orders/1", body=b'{"n":1}')
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(up), 1)

    def test_post_with_key_is_retried(self):
        up, gw = self.env({"retry": RETRY, "idempotency": {}})
        up.fail(count=2, status=503)
        r = gw.req("POST", "/orders", headers=[("Idempotency-Key", "order-1")],
                   body=b'{"n":1}')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["body"], '{"n":1}')
        self.assertEqual(self.received(up), 3)
        # The stored answer is the final one, replayed without another execution.
        r2 = gw.req("POST", "/orders", headers=[("Idempotency-Key", "order-1")],
                    body=b'{"n":1}')
        self.assertEqual(r2.status, 200, r2)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.body, r.body)
        self.assertEqual(self.received(up), 3)

    def test_post_with_key_without_idempotency_policy_is_not_retried(self):
        up, gw = self.env({"retry": RETRY})
        up.fail(count=10, status=503)
        r = gw.req("POST", "/orders", headers=[("Idempotency-Key", "k")], body=b"{}")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(up), 1)

    def test_retry_after_longer_than_max_backoff_is_not_retried(self):
        up, gw = self.env({"retry": RETRY})
        up.fail(count=10, status=503, retry_after=5)
        t0 = time.monotonic()
        r = gw.get("/items")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header("Retry-After"), "5")
        self.assertEqual(self.received(up), 1)
        self.assertLess(time.monotonic() - t0, 4.0)

    def test_retry_after_is_honoured(self):
        up, gw = self.env({"retry": {"max_attempts": 3, "base_ms": 10, "max_backoff_ms": 1500}})
        up.fail(count=1, status=503, retry_after=1)
        t0 = time.monotonic()
        r = gw.get("/items")
        took = time.monotonic() - t0
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 2)
        self.assertGreaterEqual(took, 0.95, "the retry came before Retry-After: 1")

    def test_statuses_not_listed_are_not_retried(self):
        up, gw = self.env({"retry": dict(RETRY, statuses=[503])})
        for st in (500, 502, 429):
            with self.subTest(status=st):
                up.reset()
                up.fail(count=5, status=st)
                r = gw.get("/items")
                self.assertEqual(r.status, st, r)
                self.assertEqual(self.received(up), 1)
        up.reset()
        up.fail(count=2, status=503)
        self.assertEqual(gw.get("/items").status, 200)
        self.assertEqual(self.received(up), 3)

    def test_status_retries_off(self):
        up, gw = self.env({"retry": dict(RETRY, on=["connect_failure", "timeout"])})
        up.fail(count=5, status=503)
        self.assertEqual(gw.get("/items").status, 503)
        self.assertEqual(self.received(up), 1)

    def test_per_try_timeout_bounds_each_try(self):
        up, gw = self.env({"retry": dict(RETRY, per_try_timeout_ms=300)}, timeout_ms=8000)
        t0 = time.monotonic()
        r = gw.get("/delay/3000")
        took = time.monotonic() - t0
        self.assertErrorBody(r, 504, "upstream_timeout")
        self.assertEqual(self.received(up), 3)
        self.assertGreaterEqual(took, 0.85)
        self.assertLess(took, 6.0)

    def test_per_try_timeout_then_success(self):
        up, gw = self.env({"retry": dict(RETRY, per_try_timeout_ms=400)}, timeout_ms=8000)
        up.fail(count=1, status=200, delay_ms=3000)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["path"], "/items")
        self.assertEqual(self.received(up), 2)

    def test_route_timeout_bounds_all_tries(self):
        up, gw = self.env({"retry": RETRY}, timeout_ms=800)
        t0 = time.monotonic()
        r = gw.get("/delay/3000")
        took = time.monotonic() - t0
        self.assertErrorBody(r, 504, "upstream_timeout")
        self.assertEqual(self.received(up), 1)
        self.assertGreaterEqual(took, 0.75)
        self.assertLess(took, 2.9)

    def test_zero_budget_means_no_retries(self):
        up, gw = self.env({"retry": dict(RETRY, budget_percent=0, budget_min_per_sec=0)})
        up.fail(count=50, status=503)
        for i in range(5):
            self.assertEqual(gw.get("/items/%d" % i).status, 503)
        self.assertEqual(self.received(up), 5)

    def test_budget_limits_retries(self):
        # 0% of requests plus 1 retry/s over the 10 s window: at most 10 retries in all.
        up, gw = self.env({"retry": dict(RETRY, budget_percent=0, budget_min_per_sec=1)})
        up.fail(count=1000, status=503)
        for i in range(12):
            self.assertEqual(gw.get("/items/%d" % i).status, 503)
        retries = self.received(up) - 12
        self.assertGreaterEqual(retries, 1)
        self.assertLessEqual(retries, 10)
        # Once spent, a request gets a single try.
        before = self.received(up)
        self.assertEqual(gw.get("/last").status, 503)
        self.assertEqual(self.received(up), before + 1)

    def test_degradation_after_the_last_try(self):
        up, gw = self.env({"retry": RETRY,
                           "degradation": {"fallback": FALLBACK, "on": ["upstream_error"]}})
        up.fail(count=2, status=503)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertEqual(self.received(up), 3)
        up.reset()
        up.fail(count=10, status=503)
        r = gw.get("/items")
        self.assertEqual(r.header("Gateway-Degraded"), "upstream_error", r)
        self.assertEqual(r.json(), FALLBACK["body"])
        self.assertEqual(self.received(up), 3)

    def test_budget_percent(self):
        # 50% of the requests in the window, no minimum: 10 failing GETs get at most 5 retries.
        up, gw = self.env({"retry": dict(RETRY, max_attempts=2, budget_percent=50,
                                         budget_min_per_sec=0)})
        up.fail(count=1000, status=503)
        for i in range(10):
            self.assertEqual(gw.get("/items/%d" % i).status, 503)
        retries = self.received(up) - 10
        self.assertGreaterEqual(retries, 1)
        self.assertLessEqual(retries, 5)

    def test_backoff_is_capped_by_max_backoff_ms(self):
        # No jitter, base 400 = max 400: three retries wait 1.2 s in all (2.8 s uncapped).
        up, gw = self.env({"retry": {"max_attempts": 4, "base_ms": 400, "max_backoff_ms": 400,
                                     "jitter": "none"}}, timeout_ms=10000)
        up.fail(count=3, status=503)
        t0 = time.monotonic()
        r = gw.get("/items")
        took = time.monotonic() - t0
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 4)
        self.assertGreaterEqual(took, 1.15)
        self.assertLess(took, 2.6)

    def test_connect_failure_is_retried_until_the_upstream_is_back(self):
        port = harness.free_port()
        gw = self.start_gateway([route("r", "/", ["http://127.0.0.1:%d" % port],
                                       connect_timeout_ms=500, timeout_ms=3000,
                                       policies={"retry": RETRY})])
        r = gw.get("/x")
        self.assertErrorBody(r, 502, "upstream_unavailable")
        up = self.upstream(self._testMethodName, port=port)
        self.addCleanup(up.stop)
        self.assertEqual(gw.get("/x").status, 200)
        self.assertEqual(self.received(up), 1)


# ---- degradation --------------------------------------------------------------------------

FALLBACK = {"status": 200,
            "headers": {"Content-Type": "application/json", "Fallback-Source": "static"},
            "body": {"items": [], "degraded": True}}


class DegradationTest(PolicyCase):
    def assertFallback(self, r, reason, fallback=FALLBACK):
        self.assertEqual(r.status, fallback["status"], r)
        self.assertEqual(r.header("Gateway-Degraded"), reason, r)
        for k, v in fallback.get("headers", {}).items():
            self.assertEqual(r.header(k), v, r)
        body = fallback.get("body")
        if isinstance(body, str):
            self.assertEqual(r.body, body.encode(), r)
        else:
            self.assertEqual(r.json(), body, r)
        self.assertIsNone(r.header("Upstream-Name"), r)

    def test_fallback_on_circuit_open(self):
        up, gw = self.env({"circuit_breaker": {"min_calls": 2, "window_size": 2,
                                               "open_ms": 30000},
                           "degradation": {"fallback": FALLBACK, "on": ["circuit_open"]}})
        up.fail(count=2, status=500)
        # upstream_error is not listed: the failures pass through unchanged.
        for i in range(2):
            r = gw.get("/f/%d" % i)
            self.assertEqual(r.status, 500, r)
            self.assertIsNone(r.header("Gateway-Degraded"))
        for i in range(3):
            self.assertFallback(gw.get("/x/%d" % i), "circuit_open")
        self.assertFallback(gw.req("POST", "/x", body=b"{}"), "circuit_open")
        self.assertEqual(self.received(up), 2)

    def test_fallback_on_upstream_error(self):
        fb = {"status": 503, "headers": {"Content-Type": "text/plain", "Cache-Control": "no-store"},
              "body": "try later"}
        up, gw = self.env({"degradation": {"fallback": fb, "on": ["upstream_error"]}})
        r = gw.get("/fine")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        for st in (500, 502, 503):
            with self.subTest(status=st):
                up.fail(count=1, status=st)
                self.assertFallback(gw.get("/items"), "upstream_error", fb)
        # A client error from the upstream is not an upstream error.
        r = gw.get("/status/404")
        self.assertEqual(r.status, 404, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertEqual(self.received(up), 5)

    def test_fallback_on_connect_failure_and_timeout(self):
        dead = harness.free_port()
        up = self.upstream(self._testMethodName)
        self.addCleanup(up.stop)
        deg = {"degradation": {"fallback": FALLBACK, "on": ["upstream_error"]}}
        gw = self.start_gateway([
            route("dead", "/dead", ["http://127.0.0.1:%d" % dead], connect_timeout_ms=500,
                  timeout_ms=2000, policies=deg),
            route("slow", "/slow", [up], strip=True, timeout_ms=300, policies=deg)])
        self.assertFallback(gw.get("/dead/x"), "upstream_error")
        self.assertFallback(gw.get("/slow/delay/2000"), "upstream_error")

    def test_shed_with_fallback(self):
        up, gw = self.env({"degradation": {"fallback": FALLBACK, "on": ["shed"],
                                           "max_concurrent": 1}})
        slow = Background(lambda: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        for i in range(3):
            self.assertFallback(gw.get("/x/%d" % i), "shed")
        self.assertEqual(self.received(up), 1)
        r = slow.result()
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        # The slot is free again.
        r = gw.get("/after")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertEqual(self.received(up), 2)

    def test_shed_without_fallback_is_overloaded(self):
        up, gw = self.env({"degradation": {"max_concurrent": 1}})
        slow = Background(lambda: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        r = gw.get("/x")
        self.assertErrorBody(r, 503, "overloaded")
        self.assertEqual(self.received(up), 1)
        self.assertEqual(slow.result().status, 200)
        self.assertEqual(gw.get("/x").status, 200)

    def test_concurrency_limit_is_exact(self):
        up, gw = self.env({"degradation": {"max_concurrent": 3}})
        hold = HOLD_MS / 1000.0
        t0 = time.monotonic()

        def one(i):
            r = gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT)
            return r, time.monotonic()
        out = in_parallel(12, one)
        for o in out:
            self.assertIsInstance(o, tuple, o)
        rs = [r for r, _ in out]
        codes = statuses(rs)
        self.assertEqual(codes.count(503), len(codes) - codes.count(200), codes)
        self.assertEqual(self.received(up), codes.count(200))
        for r in rs:
            if r.status == 503:
                self.assertErrorBody(r, 503, "overloaded")
        # A request admitted after the first wave would end at least 2 holds after the start:
        # when none did, exactly max_concurrent were admitted.
        last_ok = max(t for r, t in out if r.status == 200)
        self.assertGreaterEqual(codes.count(200), 3, codes)
        if last_ok < t0 + 2 * hold:
            self.assertEqual(codes.count(200), 3, codes)

    def test_stale_within_stale_if_error_ms(self):
        up, gw = self.env({"degradation": {"fallback": FALLBACK, "on": ["upstream_error"],
                                           "stale_if_error_ms": 2000}})
        good = gw.get("/items?page=1")
        t_stored = time.monotonic()
        self.assertEqual(good.status, 200, good)
        up.fail(count=1000, status=500)
        r = gw.get("/items?page=1")
        self.assertLess(time.monotonic(), t_stored + 1.8, "too slow to check staleness")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, good.body)
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        self.assertEqual(r.header("Content-Type"), good.header("Content-Type"))
        self.assertEqual(r.header("Upstream-Name"), good.header("Upstream-Name"))
        # Another target has no good response: the fallback.
        self.assertFallback(gw.get("/items?page=2"), "upstream_error")
        # Not for other methods.
        self.assertFallback(gw.req("POST", "/items?page=1", body=b"{}"), "upstream_error")
        # Expired: the fallback again.
        sleep_until(t_stored + 2.0 + 0.4)
        self.assertFallback(gw.get("/items?page=1"), "upstream_error")

    def test_stale_without_fallback_then_the_error(self):
        up, gw = self.env({"degradation": {"on": ["upstream_error"],
                                           "stale_if_error_ms": 1500}})
        good = gw.get("/items")
        t_stored = time.monotonic()
        self.assertEqual(good.status, 200, good)
        up.fail(count=1000, status=503)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, good.body)
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        sleep_until(t_stored + 1.5 + 0.4)
        r = gw.get("/items")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json(), {"upstream": up.name, "status": 503})
        self.assertIsNone(r.header("Gateway-Degraded"))

    def test_stale_refreshes_with_each_good_response(self):
        up, gw = self.env({"degradation": {"on": ["upstream_error"],
                                           "stale_if_error_ms": 60000}})
        first = gw.get("/items")
        second = gw.get("/items")
        self.assertNotEqual(first.body, second.body)  # each echo carries its own request id
        up.fail(count=1, status=502)
        r = gw.get("/items")
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        self.assertEqual(r.body, second.body)

    def test_stale_when_the_upstream_closes_without_reply(self):
        up, gw = self.env({"degradation": {"on": ["upstream_error"],
                                           "stale_if_error_ms": 60000}})
        good = gw.get("/items?v=1")
        self.assertEqual(good.status, 200, good)
        up.fail(count=1000, status=0)
        r = gw.get("/items?v=1")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        self.assertEqual(r.body, good.body)

    def test_stale_when_shed(self):
        up, gw = self.env({"degradation": {"on": ["shed"], "max_concurrent": 1,
                                           "stale_if_error_ms": 60000}})
        good = gw.get("/items")
        self.assertEqual(good.status, 200, good)
        slow = Background(lambda: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        self.wait_received(up, 2)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        self.assertEqual(r.body, good.body)
        # Nothing stored for this one: overloaded.
        self.assertErrorBody(gw.get("/other"), 503, "overloaded")
        self.assertEqual(slow.result().status, 200)
        self.assertEqual(self.received(up), 2)

    def test_circuit_open_without_fallback(self):
        up, gw = self.env({"circuit_breaker": {"min_calls": 1, "window_size": 1,
                                               "open_ms": 5000},
                           "degradation": {"on": ["circuit_open", "upstream_error"]}})
        up.fail(count=1, status=500)
        r = gw.get("/f")
        self.assertEqual(r.status, 500, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertCircuitOpen(gw.get("/x"), 5, 4)
        self.assertEqual(self.received(up), 1)

    def test_stale_on_circuit_open(self):
        up, gw = self.env({"circuit_breaker": {"min_calls": 2, "window_size": 2,
                                               "failure_rate": 1.0, "open_ms": 30000},
                           "degradation": {"fallback": FALLBACK,
                                           "on": ["circuit_open"],
                                           "stale_if_error_ms": 60000}})
        good = gw.get("/items")
        self.assertEqual(good.status, 200)
        up.fail(count=2, status=500)
        self.assertEqual(gw.get("/f1").status, 500)
        self.assertEqual(gw.get("/f2").status, 500)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, good.body)
        self.assertEqual(r.header("Gateway-Degraded"), "stale")
        self.assertFallback(gw.get("/other"), "circuit_open")
        self.assertEqual(self.received(up), 3)

    def test_slow(self):
        up, gw = self.env({"degradation": {"fallback": FALLBACK, "on": ["slow"],
                                           "slow_ms": 200, "slow_window_ms": 2500}})
        for i in range(3):
            r = gw.get("/fast/%d" % i)
            self.assertEqual(r.status, 200, r)
            self.assertIsNone(r.header("Gateway-Degraded"))
        # One 600 ms call among three fast ones: a mean near 150 ms, not slow.
        r = gw.get("/delay/600")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        r = gw.get("/fast/3")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertEqual(self.received(up), 5)
        # A 1000 ms call: the mean over the window goes near 270 ms, above slow_ms.
        r = gw.get("/delay/1000")
        t_slow = time.monotonic()
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertFallback(gw.get("/next"), "slow")
        self.assertFallback(gw.get("/next"), "slow")
        self.assertEqual(self.received(up), 6)
        # The slow calls leave the window: proxied again.
        sleep_until(t_slow + 2.5 + 0.5)
        r = gw.get("/later")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))
        self.assertEqual(self.received(up), 7)

    def test_not_slow_below_threshold(self):
        up, gw = self.env({"degradation": {"fallback": FALLBACK, "on": ["slow"],
                                           "slow_ms": 2000, "slow_window_ms": 10000}})
        for _ in range(3):
            self.assertEqual(gw.get("/delay/100").status, 200)
        r = gw.get("/next")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"))


# ---- idempotency --------------------------------------------------------------------------

def key_hdr(key, *more):
    return [("Idempotency-Key", key)] + list(more)


class IdempotencyTest(PolicyCase):
    def test_duplicate_is_replayed(self):
        up, gw = self.env({"idempotency": {}})
        target = "/headers?Order-Id=42&Location=%2Forders%2F42&Cache-Control=private"
        first = gw.req("POST", target, headers=key_hdr("k-1"), body=b'{"item":"book"}')
        self.assertEqual(first.status, 200, first)
        self.assertIsNone(first.header("Idempotent-Replayed"))
        self.assertEqual(first.header("Order-Id"), "42")
        for _ in range(3):
            r = gw.req("POST", target, headers=key_hdr("k-1"), body=b'{"item":"book"}')
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Idempotent-Replayed"), "true")
            self.assertEqual(r.body, first.body)
            for name in ("Order-Id", "Location", "Cache-Control", "Content-Type",
                         "Upstream-Name"):
                self.assertEqual(r.header(name), first.header(name), name)
        self.assertEqual(self.received(up), 1)

    def test_replay_fidelity_of_status_and_repeated_headers(self):
        up, gw = self.env({"idempotency": {}})
        first = gw.req("POST", "/cookies", headers=key_hdr("cookie-key"), body=b"")
        self.assertEqual(first.status, 200, first)
        self.assertEqual(first.header_all("Set-Cookie"), ["a=1", "b=2", "c=3"])
        r = gw.req("POST", "/cookies", headers=key_hdr("cookie-key"), body=b"")
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.header_all("Set-Cookie"), ["a=1", "b=2", "c=3"])
        self.assertEqual(r.header_all("X-Multi"), ["one", "two"])
        self.assertEqual(r.body, b"cookies\n")
        for st in (201, 202, 409):
            with self.subTest(status=st):
                k = "status-%d" % st
                a = gw.req("POST", "/status/%d" % st, headers=key_hdr(k), body=b"x")
                b = gw.req("POST", "/status/%d" % st, headers=key_hdr(k), body=b"x")
                self.assertEqual(a.status, st, a)
                self.assertEqual((b.status, b.body), (st, a.body), b)
                self.assertEqual(b.header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), 4)

    def test_stored_server_error_is_replayed(self):
        up, gw = self.env({"idempotency": {}})
        up.fail(count=1, status=500)
        first = gw.req("POST", "/pay", headers=key_hdr("pay-1"), body=b'{"cents":100}')
        self.assertEqual(first.status, 500, first)
        r = gw.req("POST", "/pay", headers=key_hdr("pay-1"), body=b'{"cents":100}')
        self.assertEqual(r.status, 500, r)
        self.assertEqual(r.body, first.body)
        self.assertEqual(r.json(), {"upstream": up.name, "status": 500})
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), 1)

    def test_keys_are_independent_and_methods_not_listed_pass(self):
        up, gw = self.env({"idempotency": {"methods": ["POST"]}})
        a = gw.req("POST", "/o", headers=key_hdr("a"), body=b"1")
        b = gw.req("POST", "/o", headers=key_hdr("b"), body=b"1")
        self.assertIsNone(b.header("Idempotent-Replayed"))
        self.assertNotEqual(a.body, b.body)
        # PATCH is not listed here: the key is ignored, each request executes.
        for _ in range(2):
            r = gw.req("PATCH", "/o", headers=key_hdr("a"), body=b"1")
            self.assertEqual(r.status, 200, r)
            self.assertIsNone(r.header("Idempotent-Replayed"))
        # Without the header (not required) every POST executes.
        gw.req("POST", "/o", body=b"1")
        gw.req("POST", "/o", body=b"1")
        self.assertEqual(self.received(up), 6)

    def test_mismatch(self):
        up, gw = self.env({"idempotency": {}})
        first = gw.req("POST", "/orders", headers=key_hdr("m-1"), body=b'{"n":1}')
        self.assertEqual(first.status, 200, first)
        for name, method, target, body in [("body", "POST", "/orders", b'{"n":2}'),
                                           ("path", "POST", "/orders/2", b'{"n":1}'),
                                           ("query", "POST", "/orders?x=1", b'{"n":1}'),
                                           ("method", "PATCH", "/orders", b'{"n":1}')]:
            with self.subTest(differs=name):
                r = gw.req(method, target, headers=key_hdr("m-1"), body=body)
                self.assertErrorBody(r, 422, "idempotency_key_mismatch")
                self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 1)
        # Other headers are not part of the fingerprint: a replay, not a mismatch.
        r = gw.req("POST", "/orders", headers=key_hdr("m-1", ("Accept", "text/plain"),
                                                      ("Trace", "abc")), body=b'{"n":1}')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        # The record is intact: the original request still replays.
        r = gw.req("POST", "/orders", headers=key_hdr("m-1"), body=b'{"n":1}')
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, first.body)

    def test_duplicate_in_flight(self):
        up, gw = self.env({"idempotency": {}})
        first = Background(lambda: gw.req("POST", "/delay/%d" % HOLD_MS,
                                          headers=key_hdr("slow-1"), body=b"{}",
                                          timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        r = gw.req("POST", "/delay/%d" % HOLD_MS, headers=key_hdr("slow-1"), body=b"{}")
        self.assertErrorBody(r, 409, "idempotency_in_flight")
        f = first.result()
        self.assertEqual(f.status, 200, f)
        r = gw.req("POST", "/delay/%d" % HOLD_MS, headers=key_hdr("slow-1"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, f.body)
        self.assertEqual(self.received(up), 1)

    def test_client_gone_mid_flight_still_stores(self):
        up, gw = self.env({"idempotency": {}})
        target = "/delay/%d" % HOLD_MS
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nIdempotency-Key: gone\r\n"
                  b"Content-Length: 2\r\n\r\n{}" % target.encode())
        self.wait_received(up, 1)
        s.close()
        r = gw.req("POST", target, headers=key_hdr("gone"), body=b"{}")
        self.assertErrorBody(r, 409, "idempotency_in_flight")
        # The upstream answered after the client left: that answer is what a retry gets.
        got = gw.req("POST", target, headers=key_hdr("gone"), body=b"{}")
        deadline = time.monotonic() + 10 * SLOW
        while got.status == 409 and time.monotonic() < deadline:
            time.sleep(0.1)
            got = gw.req("POST", target, headers=key_hdr("gone"), body=b"{}")
        self.assertEqual(got.status, 200, got)
        self.assertEqual(got.header("Idempotent-Replayed"), "true")
        self.assertEqual(got.json(), {"upstream": up.name, "status": 200})
        self.assertEqual(self.received(up), 1)

    def test_in_flight_claim_outlives_ttl(self):
        up, gw = self.env({"idempotency": {"ttl_ms": 1000}}, timeout_ms=10000)
        target = "/delay/2500"
        t0 = time.monotonic()
        first = Background(lambda: gw.req("POST", target, headers=key_hdr("long"), body=b"{}",
                                          timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        sleep_until(t0 + 1.5)
        in_flight = time.monotonic() < t0 + 2.3
        r = gw.req("POST", target, headers=key_hdr("long"), body=b"{}", timeout=REQ_TIMEOUT)
        self.assertEqual(first.result().status, 200)
        self.assertTrue(in_flight, "the duplicate came after the first had finished")
        self.assertErrorBody(r, 409, "idempotency_in_flight")
        self.assertEqual(self.received(up), 1)

    def test_fifty_concurrent_duplicates_execute_once(self):
        up, gw = self.env({"idempotency": {}})
        target = "/delay/%d" % (400 * SLOW)
        body = b'{"order":"fifty"}'
        rs = in_parallel(50, lambda i: gw.req("POST", target, headers=key_hdr("fifty"),
                                              body=body, timeout=REQ_TIMEOUT))
        for r in rs:
            self.assertIsInstance(r, harness.Response, r)
        self.assertEqual(self.received(up), 1)
        executed = [r for r in rs if r.status == 200 and r.header("Idempotent-Replayed") is None]
        replayed = [r for r in rs if r.status == 200 and r.header("Idempotent-Replayed") == "true"]
        in_flight = [r for r in rs if r.status == 409]
        self.assertEqual(len(executed), 1, statuses(rs))
        self.assertEqual(len(executed) + len(replayed) + len(in_flight), 50, statuses(rs))
        for r in in_flight:
            self.assertErrorBody(r, 409, "idempotency_in_flight")
        for r in replayed:
            self.assertEqual(r.body, executed[0].body)
        r = gw.req("POST", target, headers=key_hdr("fifty"), body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, executed[0].body)
        self.assertEqual(self.received(up), 1)

    def test_required_key_missing(self):
        up, gw = self.env({"idempotency": {"required": True}})
        r = gw.req("POST", "/orders", body=b"{}")
        self.assertErrorBody(r, 400, "idempotency_key_missing")
        # Methods not listed do not need it.
        self.assertEqual(gw.get("/orders").status, 200)
        r = gw.req("POST", "/orders", headers=key_hdr("present"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 2)

    def test_custom_header_name(self):
        up, gw = self.env({"idempotency": {"header": "Request-Key", "required": True}})
        r = gw.req("POST", "/o", headers=key_hdr("ignored"), body=b"{}")
        self.assertErrorBody(r, 400, "idempotency_key_missing")
        a = gw.req("POST", "/o", headers=[("Request-Key", "rk")], body=b"{}")
        b = gw.req("POST", "/o", headers=[("Request-Key", "rk")], body=b"{}")
        self.assertEqual(b.header("Idempotent-Replayed"), "true")
        self.assertEqual(a.body, b.body)
        self.assertEqual(self.received(up), 1)

    def test_invalid_keys(self):
        up, gw = self.env({"idempotency": {}})
        for name, key in [("256 bytes", "k" * 256), ("control byte", "ab\x01cd"),
                          ("escape", "ab\x1bcd"), ("delete", "ab\x7fcd")]:
            with self.subTest(key=name):
                r = gw.req("POST", "/o", headers=key_hdr(key), body=b"{}")
                self.assertErrorBody(r, 400, "idempotency_key_invalid")
        self.assertEqual(self.received(up), 0)
        # 255 printable bytes is the longest valid key.
        r = gw.req("POST", "/o", headers=key_hdr("k" * 255), body=b"{}")
        self.assertEqual(r.status, 200, r)
        r = gw.req("POST", "/o", headers=key_hdr("k" * 255), body=b"{}")
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), 1)

    def test_body_too_large_is_not_stored(self):
        up = self.upstream(self._testMethodName)
        self.addCleanup(up.stop)
        gw = self.start_gateway([route("r", "/", [up], policies={"idempotency": {}})],
                                node={"max_body_bytes": 1024})
        r = gw.req("POST", "/o", headers=key_hdr("big"), body=b"z" * 2048)
        self.assertErrorBody(r, 413, "body_too_large")
        r = gw.req("POST", "/o", headers=key_hdr("big"), body=b"small")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(r.json()["body"], "small")
        self.assertEqual(self.received(up), 1)

    def test_keys_are_per_route(self):
        up = self.upstream(self._testMethodName)
        self.addCleanup(up.stop)
        gw = self.start_gateway([
            route("a", "/a", [up], policies={"idempotency": {}}),
            route("b", "/b", [up], policies={"idempotency": {}})])
        ra = gw.req("POST", "/a/o", headers=key_hdr("shared"), body=b"{}")
        rb = gw.req("POST", "/b/o", headers=key_hdr("shared"), body=b"{}")
        self.assertEqual((ra.status, rb.status), (200, 200))
        self.assertIsNone(rb.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 2)
        self.assertEqual(gw.req("POST", "/a/o", headers=key_hdr("shared"), body=b"{}")
                         .header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), 2)

    def test_replays_come_before_rate_limits(self):
        up, gw = self.env({"idempotency": {},
                           "token_bucket": {"capacity": 2, "refill_per_sec": 1}},
                          route_name="idem")
        t0 = time.monotonic()
        first = gw.req("POST", "/o", headers=key_hdr("r1"), body=b"{}")
        self.assertEqual(first.status, 200, first)
        for _ in range(5):
            r = gw.req("POST", "/o", headers=key_hdr("r1"), body=b"{}")
            self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
        r = gw.req("POST", "/o", headers=key_hdr("r1"), body=b'{"other":1}')
        self.assertErrorBody(r, 422, "idempotency_key_mismatch")
        # Replays and the mismatch took no token: the second token is still there.
        r = gw.req("POST", "/o", headers=key_hdr("r2"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        if time.monotonic() - t0 < 0.9:
            r = gw.req("POST", "/o", headers=key_hdr("r3"), body=b"{}")
            self.assertErrorBody(r, 429, "rate_limited")
        self.assertEqual(self.received(up), 2)

    def test_overloaded_is_not_stored(self):
        up, gw = self.env({"idempotency": {}, "degradation": {"max_concurrent": 1}})
        slow = Background(lambda: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        r = gw.req("POST", "/o", headers=key_hdr("shed"), body=b"{}")
        self.assertErrorBody(r, 503, "overloaded")
        self.assertEqual(slow.result().status, 200)
        r = gw.req("POST", "/o", headers=key_hdr("shed"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 2)

    def reload(self, gw, routes, n):
        """Rewrites the config with routes plus a probe route, sends SIGHUP and waits until
        the probe route exists (its dead target answers 502 instead of 404)."""
        probe = route("probe%d" % n, "/__probe/%d" % n,
                      ["http://127.0.0.1:%d" % self.dead_port], connect_timeout_ms=500)
        gw.write_config(dict(gw.config, routes=routes + [probe]))
        gw.proc.signal(signal.SIGHUP)
        ok = harness.wait_until(lambda: gw.get("/__probe/%d" % n).status == 502,
                                10 * SLOW, 0.05)
        self.assertTrue(ok, "the reload was not applied: %s" % gw.log()[-2000:])

    def reload_case(self, tb_after):
        self.dead_port = harness.free_port()
        up = self.upstream(self._testMethodName)
        self.addCleanup(up.stop)

        def routes(capacity):
            return [route("r", "/o", [up], policies={
                "idempotency": {}, "token_bucket": {"capacity": capacity,
                                                    "refill_per_sec": 10}})]
        gw = self.start_gateway(routes(100))
        first = gw.req("POST", "/o", headers=key_hdr("reload"), body=b"{}")
        self.assertEqual(first.status, 200, first)
        self.reload(gw, routes(tb_after), 1)
        r = gw.req("POST", "/o", headers=key_hdr("reload"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
        self.assertEqual(r.body, first.body)
        self.assertEqual(self.received(up), 1)

    def test_records_survive_a_reload(self):
        self.reload_case(tb_after=100)

    def test_records_survive_a_reload_that_changes_another_policy(self):
        self.reload_case(tb_after=50)

    def test_rate_limited_is_not_stored(self):
        up, gw = self.env({"idempotency": {},
                           "token_bucket": {"capacity": 1, "refill_per_sec": 1}},
                          route_name="idem")
        t_drained = time.monotonic()
        self.assertEqual(gw.req("POST", "/o", body=b"drain").status, 200)
        r = gw.req("POST", "/o", headers=key_hdr("limited"), body=b"{}")
        self.assertErrorBody(r, 429, "rate_limited")
        self.assertEqual(self.received(up), 1)
        sleep_until(t_drained + 1.3)
        r = gw.req("POST", "/o", headers=key_hdr("limited"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 2)
        # Now it is stored: replayed even though the bucket is empty again.
        r2 = gw.req("POST", "/o", headers=key_hdr("limited"), body=b"{}")
        self.assertEqual(r2.status, 200, r2)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.body, r.body)
        self.assertEqual(self.received(up), 2)

    def test_connect_failure_is_not_stored(self):
        port = harness.free_port()
        gw = self.start_gateway([route("r", "/", ["http://127.0.0.1:%d" % port],
                                       connect_timeout_ms=500, timeout_ms=3000,
                                       policies={"idempotency": {}})])
        r = gw.req("POST", "/o", headers=key_hdr("conn"), body=b"{}")
        self.assertErrorBody(r, 502, "upstream_unavailable")
        up = self.upstream(self._testMethodName, port=port)
        self.addCleanup(up.stop)
        r = gw.req("POST", "/o", headers=key_hdr("conn"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 1)

    def test_replay_while_the_circuit_is_open(self):
        up, gw = self.env({"idempotency": {},
                           "circuit_breaker": {"min_calls": 1, "window_size": 1,
                                               "open_ms": 30000}})
        first = gw.req("POST", "/o", headers=key_hdr("before"), body=b"{}")
        self.assertEqual(first.status, 200, first)
        up.fail(count=1, status=500)
        self.assertEqual(gw.get("/f").status, 500)
        self.assertCircuitOpen(gw.get("/x"), 30, 29)
        # Replays come before the breaker: still served, from the store.
        r = gw.req("POST", "/o", headers=key_hdr("before"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, first.body)
        self.assertEqual(self.received(up), 2)

    def test_circuit_open_is_not_stored(self):
        up, gw = self.env({"idempotency": {},
                           "circuit_breaker": {"min_calls": 1, "window_size": 1,
                                               "open_ms": 1000, "half_open_calls": 1}})
        up.fail(count=1, status=500)
        self.assertEqual(gw.get("/f").status, 500)
        t_open = time.monotonic()
        r = gw.req("POST", "/o", headers=key_hdr("cb"), body=b"{}")
        self.assertErrorBody(r, 503, "circuit_open")
        sleep_until(t_open + 1.0 + 0.3)
        r = gw.req("POST", "/o", headers=key_hdr("cb"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(up), 2)

    def test_upstream_timeout_is_stored(self):
        up, gw = self.env({"idempotency": {}}, timeout_ms=300)
        r = gw.req("POST", "/delay/1500", headers=key_hdr("t-1"), body=b"{}")
        self.assertErrorBody(r, 504, "upstream_timeout")
        r2 = gw.req("POST", "/delay/1500", headers=key_hdr("t-1"), body=b"{}")
        self.assertEqual(r2.status, 504, r2)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.body, r.body)
        self.assertEqual(self.received(up), 1)

    def test_ttl_expiry_executes_again(self):
        up, gw = self.env({"idempotency": {"ttl_ms": 1000}})
        first = gw.req("POST", "/o", headers=key_hdr("ttl"), body=b"{}")
        t_stored = time.monotonic()
        self.assertEqual(first.status, 200, first)
        r = gw.req("POST", "/o", headers=key_hdr("ttl"), body=b"{}")
        if time.monotonic() < t_stored + 0.8:
            self.assertEqual(r.header("Idempotent-Replayed"), "true")
            self.assertEqual(self.received(up), 1)
        sleep_until(t_stored + 1.0 + 0.4)
        r = gw.req("POST", "/o", headers=key_hdr("ttl"), body=b'{"new":true}')
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(r.json()["body"], '{"new":true}')
        n = self.received(up)
        self.assertIn(n, (2, 3))
        r2 = gw.req("POST", "/o", headers=key_hdr("ttl"), body=b'{"new":true}')
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), n)


if __name__ == "__main__":
    harness.main()
