#!/usr/bin/env python3
"""Route policies end to end (API.md section 3): rate limits, retries, circuit breaker,
degradation and idempotency, against a scripted upstream."""

import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

FALLBACK = {"status": 200, "headers": {"Content-Type": "application/json", "Fallback": "yes"},
            "body": {"items": [], "degraded": True}}


class PoliciesTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.up = cls.upstream("pol")
        cls.dead = "http://127.0.0.1:%d" % harness.free_port()
        up = cls.up
        cls.gw = cls.gateway([
            route("tb", "/tb", [up], strip=True, policies={
                "token_bucket": {"capacity": 3, "refill_per_sec": 1, "key": "route"}}),
            route("tbh", "/tbh", [up], strip=True, policies={
                "token_bucket": {"capacity": 2, "refill_per_sec": 1,
                                 "key": "header:X-Tenant"}}),
            route("sw", "/sw", [up], strip=True, policies={
                "sliding_window": {"limit": 3, "window_ms": 1000, "key": "client_ip"}}),
            route("retry", "/retry", [up], strip=True, timeout_ms=5000, policies={
                "retry": {"max_attempts": 3, "base_ms": 10, "max_backoff_ms": 100,
                          "jitter": "full", "on": ["connect_failure", "timeout", "status"],
                          "statuses": [502, 503, 504],
                          "budget_percent": 100, "budget_min_per_sec": 100}}),
            route("retryidem", "/retryidem", [up], strip=True, timeout_ms=5000, policies={
                "retry": {"max_attempts": 3, "base_ms": 10, "max_backoff_ms": 100,
                          "on": ["status"], "statuses": [503],
                          "budget_percent": 100, "budget_min_per_sec": 100},
                "idempotency": {"header": "Idempotency-Key", "methods": ["POST"],
                                "ttl_ms": 60000}}),
            route("cb", "/cb", [up], strip=True, policies={
                "circuit_breaker": {"window": "count", "window_size": 4, "min_calls": 4,
                                    "failure_rate": 0.5, "open_ms": 1000,
                                    "half_open_calls": 1, "failure_statuses": [500]}}),
            route("cbfb", "/cbfb", [up], strip=True, policies={
                "circuit_breaker": {"window": "count", "window_size": 4, "min_calls": 4,
                                    "failure_rate": 0.5, "open_ms": 30000,
                                    "half_open_calls": 1, "failure_statuses": [500]},
                "degradation": {"fallback": FALLBACK, "on": ["circuit_open"]}}),
            route("deadfb", "/deadfb", [cls.dead], connect_timeout_ms=300, policies={
                "degradation": {"fallback": FALLBACK, "on": ["upstream_error"]}}),
            route("shed", "/shed", [up], strip=True, policies={
                "degradation": {"on": ["shed"], "max_concurrent": 2}}),
            route("stale", "/stale", [up], strip=True, policies={
                "degradation": {"on": ["upstream_error"], "stale_if_error_ms": 60000}}),
            route("idem", "/idem", [up], strip=True, policies={
                "idempotency": {"header": "Idempotency-Key", "methods": ["POST", "PATCH"],
                                "ttl_ms": 60000}}),
            route("idemreq", "/idemreq", [up], strip=True, policies={
                "idempotency": {"header": "Idempotency-Key", "methods": ["POST"],
                                "ttl_ms": 60000, "required": True}}),
        ], node={"max_body_bytes": 1024})

    def setUp(self):
        self.up.reset()

    def received(self):
        return self.up.stats()["received"]

    # --- rate limits -----------------------------------------------------------------------

    def assertRateLimitFields(self, r, name, limit):
        pol = r.header("RateLimit-Policy")
        self.assertIsNotNone(pol, r)
        m = re.fullmatch(r'"%s";q=(\d+);w=(\d+)' % re.escape(name), pol.strip())
        self.assertIsNotNone(m, pol)
        self.assertEqual(int(m.group(1)), limit, pol)
        rl = r.header("RateLimit")
        self.assertIsNotNone(rl, r)
        m = re.fullmatch(r'"%s";r=(\d+);t=(\d+)' % re.escape(name), rl.strip())
        self.assertIsNotNone(m, rl)
        return int(m.group(1)), int(m.group(2))

    def test_token_bucket_limits_and_headers(self):
        remaining = []
        for _ in range(3):
            r = self.gw.get("/tb/bench")
            self.assertEqual(r.status, 200, r)
            remaining.append(self.assertRateLimitFields(r, "tb", 3)[0])
        self.assertEqual(remaining, [2, 1, 0])
        before = self.received()
        r = self.gw.get("/tb/bench")
        self.assertErrorBody(r, 429, "rate_limited")
        ra = r.header("Retry-After")
        self.assertIsNotNone(ra, r)
        self.assertRegex(ra, r"^\d+$")
        self.assertGreaterEqual(int(ra), 1)
        self.assertEqual(self.assertRateLimitFields(r, "tb", 3)[0], 0)
        self.assertEqual(self.received(), before, "a refused request reached the upstream")
        # One token per second comes back.
        time.sleep(1.1)
        self.assertEqual(self.gw.get("/tb/bench").status, 200)

    def test_token_bucket_keyed_by_header(self):
        for tenant in ("a", "b"):
            for _ in range(2):
                self.assertEqual(self.gw.get("/tbh/bench", headers=[("X-Tenant", tenant)])
                                 .status, 200)
            self.assertEqual(self.gw.get("/tbh/bench", headers=[("X-Tenant", tenant)]).status,
                             429)
        # Requests without the header share one bucket of their own.
        self.assertEqual(self.gw.get("/tbh/bench").status, 200)
        self.assertEqual(self.gw.get("/tbh/bench").status, 200)
        self.assertEqual(self.gw.get("/tbh/bench").status, 429)

    def test_sliding_window(self):
        for _ in range(3):
            r = self.gw.get("/sw/bench")
            self.assertEqual(r.status, 200, r)
        r = self.gw.get("/sw/bench")
        self.assertErrorBody(r, 429, "rate_limited")
        self.assertRegex(r.header("Retry-After") or "", r"^\d+$")
        self.assertRateLimitFields(r, "sw", 3)
        time.sleep(1.1)
        self.assertEqual(self.gw.get("/sw/bench").status, 200)

    # --- retries ---------------------------------------------------------------------------

    def test_retry_recovers_from_failed_attempts(self):
        self.up.fail(count=2, status=503)
        r = self.gw.get("/retry/bench")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(), 3)

    def test_retry_gives_up_after_max_attempts(self):
        self.up.fail(count=10, status=503)
        r = self.gw.get("/retry/bench")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(), 3)

    def test_retry_only_for_listed_statuses(self):
        self.up.fail(count=1, status=500)
        r = self.gw.get("/retry/bench")
        self.assertEqual(r.status, 500, r)
        self.assertEqual(self.received(), 1)

    def test_post_is_not_retried(self):
        self.up.fail(count=1, status=503)
        r = self.gw.req("POST", "/retry/echo", body=b"once")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(), 1)

    def test_post_with_idempotency_key_is_retried(self):
        self.up.fail(count=1, status=503)
        r = self.gw.req("POST", "/retryidem/echo", body=b"twice",
                        headers=[("Idempotency-Key", "retry-%d" % time.monotonic_ns())])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(), 2)

    def test_upstream_retry_after_above_max_backoff_stops_retries(self):
        self.up.fail(count=5, status=503, retry_after=10)
        r = self.gw.get("/retry/bench")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(), 1)

    def test_retry_on_timeout_within_the_route_timeout(self):
        self.up.fail(count=1, status=200, delay_ms=3000)
        t0 = time.monotonic()
        r = self.gw.get("/retry/bench")
        took = time.monotonic() - t0
        # Without per_try_timeout_ms the first try may use the whole route timeout: then it
        # is a 504; either way the answer comes within timeout_ms.
        self.assertIn(r.status, (200, 504), r)
        self.assertLess(took, 5.0 + 1.0 * harness.SLOW)

    # --- circuit breaker -------------------------------------------------------------------

    def test_breaker_opens_then_half_opens_and_closes(self):
        self.up.fail(count=4, status=500)
        for _ in range(4):
            self.assertEqual(self.gw.get("/cb/bench").status, 500)
        before = self.received()
        r = self.gw.get("/cb/bench")
        self.assertErrorBody(r, 503, "circuit_open")
        self.assertRegex(r.header("Retry-After") or "", r"^\d+$")
        self.assertEqual(self.received(), before, "an open breaker let a call through")
        time.sleep(1.2)
        # Half-open: the trial succeeds, so the breaker closes.
        self.assertEqual(self.gw.get("/cb/bench").status, 200)
        for _ in range(3):
            self.assertEqual(self.gw.get("/cb/bench").status, 200)

    def test_breaker_open_serves_the_fallback(self):
        self.up.fail(count=4, status=500)
        for _ in range(4):
            self.gw.get("/cbfb/bench")
        r = self.gw.get("/cbfb/bench")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Gateway-Degraded"), "circuit_open", r)
        self.assertEqual(r.header("Fallback"), "yes", r)
        self.assertEqual(r.json(), FALLBACK["body"])

    # --- degradation -----------------------------------------------------------------------

    def test_upstream_error_serves_the_fallback(self):
        r = self.gw.get("/deadfb/x")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Gateway-Degraded"), "upstream_error", r)
        self.assertEqual(r.json(), FALLBACK["body"])

    def test_shed_without_fallback_is_overloaded(self):
        results = []
        lock = threading.Lock()

        def client():
            r = self.gw.get("/shed/delay/600", timeout=10)
            with lock:
                results.append(r)
        ts = [threading.Thread(target=client) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        ok = [r for r in results if r.status == 200]
        shed = [r for r in results if r.status == 503]
        self.assertEqual(len(ok) + len(shed), 6, results)
        self.assertGreaterEqual(len(ok), 2, results)
        self.assertGreaterEqual(len(shed), 1, results)
        for r in shed:
            self.assertErrorBody(r, 503, "overloaded")

    def test_stale_response_on_upstream_error(self):
        good = self.gw.get("/stale/echo/item?v=1")
        self.assertEqual(good.status, 200, good)
        self.up.fail(count=5, status=0)
        r = self.gw.get("/stale/echo/item?v=1")
        self.up.reset()
        self.assertEqual(r.status, 200, r)
        self.assertIn(r.header("Gateway-Degraded"), ("stale", "upstream_error"), r)
        self.assertEqual(r.json()["target"], good.json()["target"])

    # --- idempotency -----------------------------------------------------------------------

    def key(self):
        return "k-%d" % time.monotonic_ns()

    def test_duplicate_is_replayed(self):
        k = self.key()
        first = self.gw.req("POST", "/idem/echo", body=b'{"a":1}', headers=[("Idempotency-Key", k)])
        self.assertEqual(first.status, 200, first)
        self.assertIsNone(first.header("Idempotent-Replayed"))
        second = self.gw.req("POST", "/idem/echo", body=b'{"a":1}',
                             headers=[("Idempotency-Key", k)])
        self.assertEqual(second.status, 200, second)
        self.assertEqual(second.header("Idempotent-Replayed"), "true", second)
        self.assertEqual(second.body, first.body)
        self.assertEqual(self.received(), 1)

    def test_stored_whatever_the_status(self):
        k = self.key()
        self.up.fail(count=1, status=500)
        first = self.gw.req("POST", "/idem/echo", body=b"x", headers=[("Idempotency-Key", k)])
        self.assertEqual(first.status, 500)
        second = self.gw.req("POST", "/idem/echo", body=b"x", headers=[("Idempotency-Key", k)])
        self.assertEqual(second.status, 500, second)
        self.assertEqual(second.header("Idempotent-Replayed"), "true", second)
        self.assertEqual(self.received(), 1)

    def test_mismatch(self):
        k = self.key()
        self.gw.req("POST", "/idem/echo", body=b"one", headers=[("Idempotency-Key", k)])
        r = self.gw.req("POST", "/idem/echo", body=b"two", headers=[("Idempotency-Key", k)])
        self.assertErrorBody(r, 422, "idempotency_key_mismatch")
        r = self.gw.req("POST", "/idem/echo/other", body=b"one", headers=[("Idempotency-Key", k)])
        self.assertErrorBody(r, 422, "idempotency_key_mismatch")
        self.assertEqual(self.received(), 1)

    def test_in_flight_duplicate(self):
        k = self.key()
        res = {}

        def first():
            res["first"] = self.gw.req("POST", "/idem/delay/800", body=b"",
                                       headers=[("Idempotency-Key", k)])
        t = threading.Thread(target=first)
        t.start()
        time.sleep(0.3)
        r = self.gw.req("POST", "/idem/delay/800", body=b"", headers=[("Idempotency-Key", k)])
        t.join(10)
        self.assertErrorBody(r, 409, "idempotency_in_flight")
        self.assertEqual(res["first"].status, 200)

    def test_methods_not_listed_are_not_deduplicated(self):
        k = self.key()
        self.gw.req("PUT", "/idem/echo", body=b"p", headers=[("Idempotency-Key", k)])
        r = self.gw.req("PUT", "/idem/echo", body=b"p", headers=[("Idempotency-Key", k)])
        self.assertEqual(r.status, 200)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(self.received(), 2)

    def test_rejections_before_the_upstream_are_not_stored(self):
        k = self.key()
        r = self.gw.req("POST", "/idem/echo", body=b"z" * 2048, headers=[("Idempotency-Key", k)])
        self.assertErrorBody(r, 413, "body_too_large")
        r = self.gw.req("POST", "/idem/echo", body=b"small", headers=[("Idempotency-Key", k)])
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))
        self.assertEqual(json.loads(r.body)["body"], "small")

    def test_required_key_missing(self):
        r = self.gw.req("POST", "/idemreq/echo", body=b"x")
        self.assertErrorBody(r, 400, "idempotency_key_missing")
        self.assertEqual(self.received(), 0)

    def test_invalid_keys(self):
        for k in ["k" * 256, "bad\x01key"]:
            with self.subTest(key_len=len(k)):
                r = harness.raw_exchange(self.gw.port, (
                    "POST /idem/echo HTTP/1.1\r\nHost: x\r\nIdempotency-Key: %s\r\n"
                    "Content-Length: 1\r\n\r\nx" % k).encode("latin-1"), timeout=5)[0]
                self.assertEqual(harness.status_of(r), 400, r[:300])
                self.assertIn(b"idempotency_key_invalid", r)
        self.assertEqual(self.gw.req("POST", "/idem/echo", body=b"x",
                                     headers=[("Idempotency-Key", "k" * 255)]).status, 200)


if __name__ == "__main__":
    harness.main()
