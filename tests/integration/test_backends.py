#!/usr/bin/env python3
"""The policies on every backend, and cluster-wide limits and idempotency on a shared store.

1. A core policy suite (token bucket and sliding window exact counts with the RateLimit fields,
   idempotency execute / 409 / 422 / replay / ttl, breaker and retry basics, the admin state of
   a limited route) runs once per entry of backend_harness.BACKENDS: memory (scope local),
   redis (scope cluster for the limiters, idempotency records in Redis) and a single-node raft
   backend (scope local).
2. Cluster suite, once per entry of backend_harness.CLUSTER_BACKENDS (now: redis): three
   gateways in front of one gw-upstream share one budget. Many client threads spread over every
   node at several times the limit are admitted exactly the limit per window in total, and the
   upstream agrees; RateLimit remaining counts the whole cluster; killing a gateway mid-run
   keeps the limit; a duplicate idempotent POST sent to two gateways at the same moment
   executes once, and a third gateway replays it.
3. Redis outages: Redis killed or frozen, limiters fail open (or refuse with on_store_error
   deny), idempotent requests get 503 store_unavailable, all answered within the store's
   timeout plus slack; after Redis returns everything works again.

Each test starts its own processes (a private redis-server on a free loopback port for the
redis backend). Waits are bounded and scaled by GW_TEST_SLOW; counts are exact where the
contract is exact.
"""

import http.client
import os
import shutil
import signal
import sys
import tempfile
import math
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import backend_harness as bh  # noqa: E402
import test_policies as tp  # noqa: E402
from test_admin import parse_exposition, sample  # noqa: E402
from harness import route  # noqa: E402

SLOW = harness.SLOW
REQ_TIMEOUT = 15.0 * SLOW
HOLD_MS = tp.HOLD_MS
RETRY = {"max_attempts": 3, "base_ms": 10, "max_backoff_ms": 100}
BREAKER = {"window": "count", "window_size": 10, "min_calls": 4, "failure_rate": 0.5,
           "open_ms": 1000, "half_open_calls": 2}

statuses = tp.statuses
in_parallel = tp.in_parallel
sleep_until = tp.sleep_until
Background = tp.Background


def key_hdr(key, *more):
    return [("Idempotency-Key", key)] + list(more)


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


# ---- 1. the core policy suite, once per backend --------------------------------------------

class BackendPolicyCase(bh.BackendCase, tp.PolicyCase):
    """PolicyCase's helpers with gateways on self.BACKEND."""

    def tb(self, **kw):
        d = {"scope": self.scope()}
        d.update(kw)
        return d

    sw = tb

    def assertStoredInBackend(self, route_name, kind):
        """With backend redis the policy's state is in Redis (gw:{route}:<kind>...)."""
        if self.BACKEND.type != "redis":
            return
        keys = self.redis.keys("gw:{%s}:%s*" % (route_name, kind))
        self.assertTrue(keys, "no %s key for route %s in Redis: %r" % (
            kind, route_name, self.redis.keys()))


class CorePolicies:
    """Mixed into one TestCase per backend by bh.parametrize()."""

    # ---- token bucket ----

    def test_token_bucket_exact_count_and_fields(self):
        up, gw = self.env({"token_bucket": self.tb(capacity=5, refill_per_sec=1)},
                          route_name="tb")
        rs, took = self.burst(gw, 9)
        admitted = self.assertAdmittedCount(rs, took, 5, refill_per_sec=1)
        self.assertEqual(self.received(up), admitted)
        if admitted == 5:
            self.assertEqual([self.rl_fields(r, "tb")[2] for r in rs[:5]], [4, 3, 2, 1, 0])
        for r in rs[:admitted]:
            q, w, _, _ = self.rl_fields(r, "tb")
            self.assertEqual(q, 5, r)
            self.assertGreaterEqual(w, 1, r)
            self.assertIsNone(r.header("Retry-After"), r)
        # The next token: 1 s at 1/s (leased: up to a lease later, see tb_lease_s).
        max_ra = 1 + math.ceil(self.BACKEND.tb_lease_s(5, 1))
        for r in rs[admitted:]:
            self.assertLessEqual(self.assertRateLimited(r, "tb", 5, None, max_ra), max_ra)
        self.assertStoredInBackend("tb", "tb")

    def test_token_bucket_refills(self):
        up, gw = self.env({"token_bucket": self.tb(capacity=3, refill_per_sec=2)},
                          route_name="tb")
        rs, took = self.burst(gw, 5)
        a1 = self.assertAdmittedCount(rs, took, 3, refill_per_sec=2)
        # 3 tokens at 2/s: full again after 1.5 s (leased: a lease later)
        time.sleep(1.6 + self.BACKEND.tb_lease_s(3, 2))
        rs, took = self.burst(gw, 5)
        a2 = self.assertAdmittedCount(rs, took, 3, refill_per_sec=2)
        self.assertEqual(self.received(up), a1 + a2)

    def test_token_bucket_concurrent_burst(self):
        up, gw = self.env({"token_bucket": self.tb(capacity=10, refill_per_sec=1)},
                          route_name="tb")
        t0 = time.monotonic()
        rs = in_parallel(30, lambda i: gw.get("/c/%d" % i, timeout=REQ_TIMEOUT))
        took = time.monotonic() - t0
        codes = statuses(rs)
        self.assertEqual(codes.count(200) + codes.count(429), 30, codes)
        self.assertGreaterEqual(codes.count(200), 10, codes)
        self.assertLessEqual(codes.count(200), 10 + int(took), (codes, took))
        self.assertEqual(self.received(up), codes.count(200))

    # ---- sliding window ----

    def test_sliding_window_exact_count_then_next_window(self):
        up, gw = self.env({"sliding_window": self.sw(limit=4, window_ms=1500)},
                          route_name="sw")
        rs, took = self.burst(gw, 7)
        t_end = time.monotonic()
        if took < 1.4:
            self.assertEqual(statuses(rs), [200] * 4 + [429] * 3)
            self.assertEqual([self.rl_fields(r, "sw")[2] for r in rs[:4]], [3, 2, 1, 0])
        for r in rs:
            if r.status == 200:
                self.assertEqual(self.rl_fields(r, "sw")[:2], (4, 2), r)
            else:
                self.assertRateLimited(r, "sw", 4, 2, 2)
        self.assertStoredInBackend("sw", "sw")
        sleep_until(t_end + 1.7)
        rs2, took2 = self.burst(gw, 6)
        if took2 < 1.4:
            self.assertEqual(statuses(rs2), [200] * 4 + [429] * 2,
                             (statuses(rs), took, [(r.header("RateLimit"), r.header("Retry-After"))
                                                   for r in rs + rs2], gw.log()[-2000:]))
        self.assertEqual(self.received(up),
                         statuses(rs).count(200) + statuses(rs2).count(200))

    def test_sliding_window_concurrent_exact(self):
        up, gw = self.env({"sliding_window": self.sw(limit=10, window_ms=60000)},
                          route_name="sw")
        rs = in_parallel(40, lambda i: gw.get("/c/%d" % i, timeout=REQ_TIMEOUT))
        codes = statuses(rs)
        self.assertEqual(codes.count(200), 10, codes)
        self.assertEqual(codes.count(429), 30, codes)
        self.assertEqual(self.received(up), 10)
        remaining = sorted(self.rl_fields(r, "sw")[2] for r in rs if r.status == 200)
        self.assertEqual(remaining, list(range(10)))

    def test_header_key_separates_windows(self):
        up, gw = self.env({"sliding_window": self.sw(limit=2, window_ms=60000,
                                                     key="header:Api-Key")},
                          route_name="sw")
        for key in ("k1", "k2", None):
            with self.subTest(key=key):
                rs, _ = self.burst(gw, 3, headers=[("Api-Key", key)] if key else None)
                self.assertEqual(statuses(rs), [200, 200, 429])
        self.assertEqual(self.received(up), 6)

    # ---- idempotency ----

    def test_idempotency_execute_then_replay(self):
        up, gw = self.env({"idempotency": {}})
        target = "/headers?Order-Id=42&Location=%2Forders%2F42"
        first = gw.req("POST", target, headers=key_hdr("k-1"), body=b'{"item":"book"}')
        self.assertEqual(first.status, 200, first)
        self.assertIsNone(first.header("Idempotent-Replayed"))
        for _ in range(2):
            r = gw.req("POST", target, headers=key_hdr("k-1"), body=b'{"item":"book"}')
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Idempotent-Replayed"), "true")
            self.assertEqual(r.body, first.body)
            for name in ("Order-Id", "Location", "Content-Type", "Upstream-Name"):
                self.assertEqual(r.header(name), first.header(name), name)
        # A stored non-2xx answer replays as it was.
        a = gw.req("POST", "/status/201", headers=key_hdr("k-201"), body=b"x")
        b = gw.req("POST", "/status/201", headers=key_hdr("k-201"), body=b"x")
        self.assertEqual((a.status, b.status), (201, 201))
        self.assertEqual(b.body, a.body)
        self.assertEqual(b.header("Idempotent-Replayed"), "true")
        self.assertEqual(self.received(up), 2)
        self.assertStoredInBackend("r", "idem")

    def test_idempotency_in_flight_409(self):
        up, gw = self.env({"idempotency": {}})
        target = "/delay/%d" % HOLD_MS
        first = Background(lambda: gw.req("POST", target, headers=key_hdr("slow-1"),
                                          body=b"{}", timeout=REQ_TIMEOUT))
        self.wait_received(up, 1)
        r = gw.req("POST", target, headers=key_hdr("slow-1"), body=b"{}")
        self.assertErrorBody(r, 409, "idempotency_in_flight")
        f = first.result()
        self.assertEqual(f.status, 200, f)
        r = gw.req("POST", target, headers=key_hdr("slow-1"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, f.body)
        self.assertEqual(self.received(up), 1)

    def test_idempotency_mismatch_422(self):
        up, gw = self.env({"idempotency": {}})
        first = gw.req("POST", "/orders", headers=key_hdr("m-1"), body=b'{"n":1}')
        self.assertEqual(first.status, 200, first)
        for name, method, target, body in [("body", "POST", "/orders", b'{"n":2}'),
                                           ("path", "POST", "/orders/2", b'{"n":1}'),
                                           ("method", "PATCH", "/orders", b'{"n":1}')]:
            with self.subTest(differs=name):
                r = gw.req(method, target, headers=key_hdr("m-1"), body=body)
                self.assertErrorBody(r, 422, "idempotency_key_mismatch")
        r = gw.req("POST", "/orders", headers=key_hdr("m-1"), body=b'{"n":1}')
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, first.body)
        self.assertEqual(self.received(up), 1)

    def test_idempotency_concurrent_duplicates_execute_once(self):
        up, gw = self.env({"idempotency": {}})
        target = "/delay/%d" % int(300 * SLOW)
        rs = in_parallel(20, lambda i: gw.req("POST", target, headers=key_hdr("twenty"),
                                              body=b'{"o":20}', timeout=REQ_TIMEOUT))
        for r in rs:
            self.assertIsInstance(r, harness.Response, r)
        executed = [r for r in rs if r.status == 200 and r.header("Idempotent-Replayed") is None]
        replayed = [r for r in rs if r.status == 200 and r.header("Idempotent-Replayed") == "true"]
        in_flight = [r for r in rs if r.status == 409]
        self.assertEqual(len(executed), 1, statuses(rs))
        self.assertEqual(len(executed) + len(replayed) + len(in_flight), 20, statuses(rs))
        for r in replayed:
            self.assertEqual(r.body, executed[0].body)
        self.assertEqual(self.received(up), 1)

    def test_idempotency_ttl_expiry_executes_again(self):
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

    def test_replay_comes_before_rate_limits(self):
        up, gw = self.env({"idempotency": {},
                           "sliding_window": self.sw(limit=1, window_ms=60000)})
        first = gw.req("POST", "/o", headers=key_hdr("rl"), body=b"{}")
        self.assertEqual(first.status, 200, first)
        r = gw.req("POST", "/o", headers=key_hdr("other"), body=b"{}")
        self.assertErrorBody(r, 429, "rate_limited")
        r = gw.req("POST", "/o", headers=key_hdr("rl"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        # A 429 is not stored: the same key executes once the limit allows it (it does not).
        r = gw.req("POST", "/o", headers=key_hdr("other"), body=b"{}")
        self.assertErrorBody(r, 429, "rate_limited")
        self.assertEqual(self.received(up), 1)

    # ---- breaker and retry ----

    def test_breaker_opens_and_closes(self):
        up, gw = self.env({"circuit_breaker": BREAKER})
        up.fail(count=4, status=500)
        for i in range(4):
            self.assertEqual(gw.get("/f/%d" % i).status, 500)
        t_open = time.monotonic()
        for _ in range(3):
            self.assertCircuitOpen(gw.get("/x"), 1)
        self.assertEqual(self.received(up), 4)
        sleep_until(t_open + 1.0 + 0.3)
        rs = in_parallel(4, lambda i: gw.get("/delay/%d" % HOLD_MS, timeout=REQ_TIMEOUT))
        codes = statuses(rs)
        self.assertEqual(sorted(codes), [200, 200, 503, 503], codes)
        for i in range(4):
            self.assertEqual(gw.get("/ok/%d" % i).status, 200)
        self.assertEqual(self.received(up), 10)

    def test_retry_basics(self):
        up, gw = self.env({"retry": RETRY, "idempotency": {}})
        up.fail(count=2, status=503)
        r = gw.get("/items")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 3)
        up.reset()
        up.fail(count=10, status=503)
        r = gw.req("POST", "/orders", body=b"{}")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.received(up), 1)
        up.reset()
        up.fail(count=2, status=503)
        r = gw.req("POST", "/orders", headers=key_hdr("retry-1"), body=b'{"n":1}')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.received(up), 3)
        r2 = gw.req("POST", "/orders", headers=key_hdr("retry-1"), body=b'{"n":1}')
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.body, r.body)
        self.assertEqual(self.received(up), 3)

    # ---- the control plane sees the limiters ----

    def test_admin_state_of_a_limited_route(self):
        up, gw = self.env({"token_bucket": self.tb(capacity=5, refill_per_sec=1),
                           "sliding_window": self.sw(limit=7, window_ms=60000)},
                          route_name="lim")
        for _ in range(3):
            self.assertEqual(gw.get("/x").status, 200)
        t0 = time.monotonic()
        try:
            r = harness.request(gw.api_port, "GET", "/admin/routes/lim/state",
                                timeout=5.0 * SLOW)
        except OSError as e:
            self.fail("GET /admin/routes/lim/state gave no answer in %.1fs (%r)" % (
                time.monotonic() - t0, e))
        self.assertEqual(r.status, 200, r)
        st = r.json()
        self.assertEqual(st["token_bucket"]["limit"], 5, st)
        self.assertEqual(st["sliding_window"]["limit"], 7, st)
        self.assertEqual(st["sliding_window"]["remaining"], 4, st)
        self.assertLessEqual(st["token_bucket"]["remaining"], 5, st)
        # The control plane still serves afterwards.
        self.assertEqual(harness.request(gw.api_port, "GET", "/healthz", timeout=5).status, 200)


bh.parametrize(CorePolicies, BackendPolicyCase, globals(), prefix="Core")


# ---- 2. several gateways sharing one backend ------------------------------------------------

class Client:
    """Requests spread over nodes by many threads, with per-thread keep-alive connections.

    A transport error (a node killed) is recorded as an exception for that request."""

    def __init__(self, nodes):
        self.nodes = nodes

    def run(self, threads, per_thread, target, on_progress=None):
        """Each thread sends per_thread GETs, request j of thread i to node (i + j) mod N;
        on_progress(count so far) after each. Returns a list of (node, Response or exception)."""
        results = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads)

        def worker(i):
            conns = {}
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            for j in range(per_thread):
                n = self.nodes[(i + j) % len(self.nodes)]
                conn = conns.get(n.id)
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", n.port, timeout=REQ_TIMEOUT)
                    conns[n.id] = conn
                try:
                    r = harness.request_on(conn, "GET", "%s/%d/%d" % (target, i, j))
                    out = r
                except Exception as e:  # noqa: BLE001 - counted by the caller
                    out = e
                    conn.close()
                    conns.pop(n.id, None)
                with lock:
                    results.append((n, out))
                    done = len(results)
                if on_progress is not None:
                    on_progress(done)
            for c in conns.values():
                c.close()
        ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120 * SLOW)
        if any(t.is_alive() for t in ts):
            raise AssertionError("client threads did not finish")
        return results


def count_status(results, status):
    return sum(1 for _, r in results if isinstance(r, harness.Response) and r.status == status)


class ClusterCase(unittest.TestCase):
    """Starts BACKEND's GatewayCluster of three gateways and one upstream per test."""

    BACKEND = None

    def setUp(self):
        self.up = None
        self.cluster = None

    def start(self, policies, n=3, route_name="shared"):
        wd = tempfile.mkdtemp(prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(shutil.rmtree, wd, True)
        self.up = harness.Upstream(wd, "up", threads=4)
        self.addCleanup(self.up.stop)
        c = bh.GatewayCluster(self.BACKEND,
                              [route(route_name, "/", [self.up], policies=policies)], n=n,
                              prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(c.close)
        c.start()
        self.cluster = c
        return c

    def received(self):
        return self.up.stats()["received"]

    def rl(self, r, route_name="shared"):
        st = r.header("RateLimit")
        m = tp.RL_STATE.match(st or "")
        self.assertTrue(m, "bad RateLimit field on %r" % (r,))
        self.assertEqual(m.group("name"), route_name)
        return int(m.group("r"))

    def await_replay(self, node, method, target, headers, body, first):
        """A duplicate of a request already answered: the stored answer. A 409 for a short,
        bounded moment is tolerated here; test_replay_on_another_node_right_after_the_answer
        is the one that insists on the replay at once."""
        deadline = time.monotonic() + 2.0 * SLOW
        while True:
            r = node.req(method, target, headers=headers, body=body)
            if r.status != 409 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.assertEqual(r.status, first.status, (node.id, r))
        self.assertEqual(r.header("Idempotent-Replayed"), "true", (node.id, r))
        self.assertEqual(r.body, first.body)
        return r

    def assertErrorBody(self, r, status, code):
        self.assertIsInstance(r, harness.Response, r)
        self.assertEqual(r.status, status, r)
        ctype = (r.header("Content-Type") or "").split(";")[0].strip().lower()
        self.assertEqual(ctype, "application/json", r)
        self.assertEqual(error_code(r), code, r)


class ClusterLimits:
    """Mixed into one TestCase per entry of bh.CLUSTER_BACKENDS with cluster_limits."""

    def test_sliding_window_exact_across_nodes(self):
        limit = 40
        c = self.start({"sliding_window": {"limit": limit, "window_ms": 60000,
                                           "scope": "cluster"}})
        res = Client(c.nodes).run(threads=12, per_thread=20, target="/sw")
        errors = [r for _, r in res if not isinstance(r, harness.Response)]
        self.assertEqual(errors, [])
        self.assertEqual(count_status(res, 200), limit, statuses(r for _, r in res))
        self.assertEqual(count_status(res, 429), 240 - limit)
        self.assertEqual(self.received(), limit)
        # Every node took part in both admitting and refusing.
        for n in c.nodes:
            mine = [r.status for m, r in res if m is n]
            self.assertEqual(len(mine), 80, n)
        remaining = sorted(self.rl(r) for _, r in res if r.status == 200)
        if self.BACKEND.leased:
            # Each node reports from its own allotment: within the limit, never one count.
            self.assertTrue(all(0 <= x < limit for x in remaining), remaining)
        else:
            # Remaining is the cluster's: each admission saw a distinct count, limit-1 to 0.
            self.assertEqual(remaining, list(range(limit)))
        for _, r in res:
            if r.status == 429:
                self.assertEqual(self.rl(r), 0, r)
                self.assertEqual(error_code(r), "rate_limited", r)
        if self.BACKEND.leased:
            # Each node leased part of the budget, and says so in /metrics: the grants add up to
            # at least what was admitted.
            granted = 0
            for n in c.nodes:
                m = n.admin("GET", "/metrics")
                self.assertEqual(m.status, 200, m)
                fams = parse_exposition(m.body.decode())
                self.assertGreaterEqual(sample(fams, "gateway_quota_acquires_total"), 1, n.id)
                sample(fams, "gateway_quota_acquire_failures_total")  # the family is there
                granted += sample(fams, "gateway_quota_units_granted_total")
            self.assertGreaterEqual(granted, limit)

    def test_sliding_window_per_window_across_nodes(self):
        limit, window_ms = 15, int(2500 * SLOW)
        c = self.start({"sliding_window": {"limit": limit, "window_ms": window_ms,
                                           "scope": "cluster"}})
        admitted = []
        for rnd in range(2):
            t0 = time.monotonic()
            res = Client(c.nodes).run(threads=9, per_thread=8, target="/w%d" % rnd)
            took = time.monotonic() - t0
            ok = count_status(res, 200)
            admitted.append(ok)
            self.assertEqual(ok + count_status(res, 429), 72, statuses(r for _, r in res))
            if took < window_ms / 1000.0:
                self.assertEqual(ok, limit, (rnd, took))
            else:
                self.assertGreaterEqual(ok, limit)
                self.assertLessEqual(ok, limit * (1 + int(took * 1000 / window_ms)))
            if rnd == 0:
                # Let every admission of this round leave the window (a leased slot is held
                # for its lease too: window / 20, and rounded up by window / 200).
                time.sleep(window_ms * 1.06 / 1000.0 + 0.3)
        self.assertEqual(self.received(), sum(admitted))

    def test_token_bucket_exact_across_nodes(self):
        cap = 30
        c = self.start({"token_bucket": {"capacity": cap, "refill_per_sec": 1,
                                         "scope": "cluster"}})
        t0 = time.monotonic()
        res = Client(c.nodes).run(threads=12, per_thread=12, target="/tb")
        took = time.monotonic() - t0
        ok = count_status(res, 200)
        self.assertEqual(ok + count_status(res, 429), 144, statuses(r for _, r in res))
        # Full at the first request, then 1 token/s: never more than cap + the refill.
        self.assertGreaterEqual(ok, cap)
        self.assertLessEqual(ok, cap + int(took), took)
        self.assertEqual(self.received(), ok)
        if took < 1.0 and not self.BACKEND.leased:
            remaining = sorted(self.rl(r) for _, r in res if r.status == 200)
            self.assertEqual(remaining, list(range(cap)))

    def test_remaining_counts_the_whole_cluster(self):
        c = self.start({"sliding_window": {"limit": 6, "window_ms": 60000, "scope": "cluster"},
                        "token_bucket": {"capacity": 100, "refill_per_sec": 1,
                                         "scope": "cluster"}})
        seen = []
        for i in range(8):
            n = c.nodes[i % 3]
            r = n.req("GET", "/seq/%d" % i)
            seen.append((n.id, r.status, r.header("RateLimit")))
        codes = [st for _, st, _ in seen]
        fields = [tp.RL_STATE.match(f or "") for _, _, f in seen]
        self.assertTrue(all(fields), seen)
        got = [int(m.group("r")) for m in fields]
        if self.BACKEND.leased:
            # Exactly six admitted; which node's request is refused depends on which node holds
            # the last units (a node fetches one ahead of its next request). Each node reports its
            # own view of the window (the tightest limit): within it, 0 when refused.
            self.assertEqual(sorted(codes), [200] * 6 + [429] * 2, seen)
            for code, x in zip(codes, got):
                self.assertTrue(0 <= x <= 5 if code == 200 else x == 0, seen)
        else:
            self.assertEqual(codes, [200] * 6 + [429] * 2, seen)
            # The tightest limit is reported: the window's 5, 4, ... 0 whatever node answers.
            self.assertEqual(got, [5, 4, 3, 2, 1, 0, 0, 0], seen)
        for m in fields:
            # Seconds to the window's reset (a leased slot may hold its place a lease longer).
            self.assertIn(int(m.group("t")), (59, 60, 61) if self.BACKEND.leased else (59, 60),
                          seen)
        self.assertEqual(self.received(), 6)

    def test_killing_a_gateway_keeps_the_limit(self):
        limit = 60
        c = self.start({"sliding_window": {"limit": limit, "window_ms": 60000,
                                           "scope": "cluster"}})
        victim = c.nodes[1]
        killed = threading.Event()

        def progress(done):
            # Mid-run: well before the limit is used up.
            if done >= limit // 3 and not killed.is_set():
                killed.set()
                threading.Thread(target=victim.kill9, daemon=True).start()

        res = Client(c.nodes).run(threads=12, per_thread=30, target="/k", on_progress=progress)
        self.assertTrue(killed.is_set())
        self.assertFalse(victim.alive())
        ok = count_status(res, 200)
        errors_victim = [r for n, r in res if not isinstance(r, harness.Response)]
        for n, r in res:
            if not isinstance(r, harness.Response):
                self.assertIs(n, victim, "transport error from a live node: %r" % (r,))
        # Never more than the limit, whichever node admitted it.
        self.assertLessEqual(ok, limit)
        got = self.received()
        self.assertLessEqual(got, limit)
        self.assertGreaterEqual(got, ok)
        # Only requests cut off on the killed node (at most one per client thread) can be
        # admitted without a 200 reaching the client; the survivors used the rest of the budget,
        # but for what the victim held unspent (leased: its allotment of at most two batches
        # and what its waiting requests asked for, lost until its lease ends).
        lost = 12 + (2 * max(1, limit // 8) + 12 if self.BACKEND.leased else 0)
        self.assertGreaterEqual(ok, limit - lost, (ok, len(errors_victim)))
        survivors = [n for n in c.nodes if n is not victim]
        for n in survivors:
            self.assertTrue(any(m is n and isinstance(r, harness.Response) and r.status == 200
                                for m, r in res), "node %s admitted nothing" % n.id)
        # After the run the budget is spent on every surviving node (leased: but for what a
        # node still holds; the cluster's total stays within the limit either way).
        after = 0
        for n in survivors:
            r = n.req("GET", "/after")
            if self.BACKEND.leased and r.status == 200:
                after += 1
                continue
            self.assertEqual(r.status, 429, r)
        self.assertEqual(self.received(), got + after)
        self.assertLessEqual(got + after, limit)
        self.assert_admissions_recorded(limit, got)

    def assert_admissions_recorded(self, limit, received):
        """With a Redis store, the window's sorted set holds exactly the admissions."""
        if self.cluster.redis is None:
            return
        n = self.cluster.redis.cmd("ZCARD", "gw:{shared}:sw:")
        self.assertEqual(n, limit, self.cluster.redis.keys())
        self.assertGreaterEqual(n, received)


bh.parametrize(ClusterLimits, ClusterCase, globals(),
               backends=[b for b in bh.CLUSTER_BACKENDS if b.cluster_limits],
               prefix="ClusterLimits")


class ClusterIdempotency:
    """Mixed into one TestCase per entry of bh.CLUSTER_BACKENDS with cluster_idempotency."""

    def test_duplicate_to_two_gateways_executes_once(self):
        c = self.start({"idempotency": {}})
        target = "/delay/%d" % int(300 * SLOW)
        pairs = [(0, 1), (1, 2), (2, 0), (0, 2), (1, 0), (2, 1)]
        for k, (a, b) in enumerate(pairs):
            key = "dup-%d" % k
            body = ('{"order":%d}' % k).encode()
            rs = in_parallel(2, lambda i: c.nodes[(a, b)[i]].req(
                "POST", target, headers=key_hdr(key), body=body, timeout=REQ_TIMEOUT))
            for r in rs:
                self.assertIsInstance(r, harness.Response, r)
            executed = [i for i, r in enumerate(rs)
                        if r.status == 200 and r.header("Idempotent-Replayed") is None]
            self.assertEqual(len(executed), 1, (key, rs))
            other = rs[1 - executed[0]]
            if other.status == 409:
                self.assertErrorBody(other, 409, "idempotency_in_flight")
            else:
                self.assertEqual(other.status, 200, other)
                self.assertEqual(other.header("Idempotent-Replayed"), "true", other)
                self.assertEqual(other.body, rs[executed[0]].body)
            self.assertEqual(self.received(), k + 1, key)
            # The third gateway, which saw neither request, replays it.
            third = c.nodes[3 - a - b]
            self.await_replay(third, "POST", target, key_hdr(key), body, rs[executed[0]])
            # A different request under the key is a mismatch on any node.
            r = c.nodes[b].req("POST", target, headers=key_hdr(key), body=b'{"other":1}')
            self.assertErrorBody(r, 422, "idempotency_key_mismatch")
        self.assertEqual(self.received(), len(pairs))

    def test_in_flight_on_one_node_is_409_on_the_others(self):
        c = self.start({"idempotency": {}})
        target = "/delay/%d" % HOLD_MS
        first = Background(lambda: c.nodes[0].req("POST", target, headers=key_hdr("fly"),
                                                  body=b"{}", timeout=REQ_TIMEOUT))
        ok = harness.wait_until(lambda: self.received() >= 1, 10 * SLOW, 0.02)
        self.assertTrue(ok, "the upstream did not receive the first request")
        for n in c.nodes[1:]:
            r = n.req("POST", target, headers=key_hdr("fly"), body=b"{}")
            self.assertErrorBody(r, 409, "idempotency_in_flight")
        f = first.result()
        self.assertEqual(f.status, 200, f)
        for n in c.nodes[1:]:
            self.await_replay(n, "POST", target, key_hdr("fly"), b"{}", f)
        self.assertEqual(self.received(), 1)

    def test_replay_on_another_node_right_after_the_answer(self):
        # A client that has its answer and sends the duplicate to another node gets the
        # stored answer: the record is kept before the answer is sent.
        c = self.start({"idempotency": {}})
        target = "/delay/30"
        late = []
        for k in range(45):
            a, b = c.nodes[k % 3], c.nodes[(k + 1) % 3]
            body = ('{"k":%d}' % k).encode()
            first = a.req("POST", target, headers=key_hdr("seq-%d" % k), body=body)
            self.assertEqual(first.status, 200, first)
            self.assertIsNone(first.header("Idempotent-Replayed"))
            r = b.req("POST", target, headers=key_hdr("seq-%d" % k), body=body)
            if r.status != 200 or r.header("Idempotent-Replayed") != "true" or \
                    r.body != first.body:
                late.append((k, a.id, b.id, r.status, error_code(r)))
        self.assertEqual(late, [], "duplicates sent after the answer were not replayed")
        self.assertEqual(self.received(), 45)

    def test_many_duplicates_over_all_nodes_execute_once(self):
        c = self.start({"idempotency": {}})
        target = "/delay/%d" % int(200 * SLOW)
        rs = in_parallel(30, lambda i: c.nodes[i % 3].req(
            "POST", target, headers=key_hdr("thirty"), body=b'{"n":30}', timeout=REQ_TIMEOUT))
        for r in rs:
            self.assertIsInstance(r, harness.Response, r)
        executed = [r for r in rs if r.status == 200 and r.header("Idempotent-Replayed") is None]
        self.assertEqual(len(executed), 1, statuses(rs))
        for r in rs:
            if r is executed[0]:
                continue
            if r.status == 409:
                self.assertErrorBody(r, 409, "idempotency_in_flight")
            else:
                self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
                self.assertEqual(r.body, executed[0].body)
        self.assertEqual(self.received(), 1)


bh.parametrize(ClusterIdempotency, ClusterCase, globals(),
               backends=[b for b in bh.CLUSTER_BACKENDS if b.cluster_idempotency],
               prefix="ClusterIdempotency")


# ---- 3. Redis outages -----------------------------------------------------------------------

REDIS_TIMEOUT_MS = 200
# How long any request may take while Redis is down or frozen: the store's timeout plus slack
# for a loaded machine (a connect attempt may take max(timeout_ms, 500 ms)).
OUTAGE_BOUND_S = (REDIS_TIMEOUT_MS + 500) / 1000.0 + 1.0 * SLOW


class RedisOutageTest(ClusterCase):
    BACKEND = bh.Backend("redis", "redis", "cluster", needs_redis=True,
                         redis_timeout_ms=REDIS_TIMEOUT_MS, cluster_limits=True,
                         cluster_idempotency=True)

    def setUp(self):
        super().setUp()
        reason = self.BACKEND.unavailable()
        if reason:
            self.skipTest(reason)

    def start_outage_cluster(self):
        """Three routes on each of two gateways: fail open limits, fail closed limits, and
        idempotency; limits are generous so only the store decides."""
        wd = tempfile.mkdtemp(prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(shutil.rmtree, wd, True)
        self.up = harness.Upstream(wd, "up", threads=4)
        self.addCleanup(self.up.stop)
        lim = {"limit": 100000, "window_ms": 60000, "scope": "cluster"}
        routes = [
            route("open", "/open", [self.up],
                  policies={"sliding_window": dict(lim),
                            "token_bucket": {"capacity": 100000, "refill_per_sec": 1000,
                                             "scope": "cluster"}}),
            route("closed", "/closed", [self.up],
                  policies={"sliding_window": dict(lim, on_store_error="deny")}),
            route("idem", "/idem", [self.up], policies={"idempotency": {}}),
        ]
        c = bh.GatewayCluster(self.BACKEND, routes, n=2,
                              prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(c.close)
        c.start()
        self.cluster = c
        return c

    def timed(self, node, method, target, headers=None, body=None):
        t0 = time.monotonic()
        try:
            r = node.req(method, target, headers=headers, body=body,
                         timeout=OUTAGE_BOUND_S + 5.0 * SLOW)
        except OSError as e:
            self.fail("%s %s on %s: no answer in %.2fs (%r)" % (
                method, target, node.id, time.monotonic() - t0, e))
        took = time.monotonic() - t0
        self.assertLessEqual(took, OUTAGE_BOUND_S,
                             "%s %s took %.2fs with Redis unavailable" % (method, target, took))
        return r

    def assert_degraded(self, c, tag):
        """Every kind of request on every node, each answered within the bound."""
        for n in c.nodes:
            for i in range(3):
                r = self.timed(n, "GET", "/open/%s/%d" % (tag, i))
                self.assertEqual(r.status, 200, r)
                r = self.timed(n, "GET", "/closed/%s/%d" % (tag, i))
                self.assertErrorBody(r, 429, "rate_limited")
                self.assertIsNotNone(r.header("Retry-After"), r)
                r = self.timed(n, "POST", "/idem/%s" % tag,
                               headers=key_hdr("%s-%s-%d" % (tag, n.id, i)), body=b"{}")
                self.assertErrorBody(r, 503, "store_unavailable")
        # Concurrent requests are bounded too.
        t0 = time.monotonic()
        rs = in_parallel(12, lambda i: c.nodes[i % 2].req(
            "POST", "/idem/%s/par" % tag, headers=key_hdr("%s-par-%d" % (tag, i)), body=b"{}",
            timeout=OUTAGE_BOUND_S + 5.0 * SLOW))
        self.assertLessEqual(time.monotonic() - t0, OUTAGE_BOUND_S + 1.0 * SLOW)
        for r in rs:
            self.assertErrorBody(r, 503, "store_unavailable")

    def assert_working(self, c, tag):
        """Waits (bounded) for both nodes to use Redis again, then checks each policy."""
        def recovered():
            try:
                return all(n.req("POST", "/idem/%s/probe" % tag,
                                 headers=key_hdr("%s-probe-%s" % (tag, n.id)),
                                 body=b"{}").status == 200 for n in c.nodes)
            except OSError:
                return False
        self.assertTrue(harness.wait_until(recovered, 10 * SLOW, 0.1),
                        "the gateways did not use Redis again")
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/closed/%s" % tag).status, 200)
            self.assertEqual(n.req("GET", "/open/%s" % tag).status, 200)
        # Idempotency across nodes works again: executed on one, replayed by the other.
        before = self.received()
        a = c.nodes[0].req("POST", "/idem/%s/x" % tag, headers=key_hdr(tag + "-x"), body=b"1")
        b = c.nodes[1].req("POST", "/idem/%s/x" % tag, headers=key_hdr(tag + "-x"), body=b"1")
        self.assertEqual(a.status, 200, a)
        self.assertIsNone(a.header("Idempotent-Replayed"))
        self.assertEqual(b.header("Idempotent-Replayed"), "true", b)
        self.assertEqual(self.received(), before + 1)
        # The limits are shared again.
        self.assertIn("gw:{closed}:sw:", c.redis.keys())

    def test_redis_killed_then_restarted(self):
        c = self.start_outage_cluster()
        self.assert_working(c, "before")
        received = self.received()
        c.redis.kill()
        self.assert_degraded(c, "down")
        # Fail open reached the upstream; fail closed and idempotency did not.
        self.assertEqual(self.received(), received + 2 * 3)
        c.redis.start()
        self.assert_working(c, "after")
        # A key refused during the outage was never claimed: it executes now.
        r = c.nodes[1].req("POST", "/idem/down", headers=key_hdr("down-n1-0"), body=b"{}")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Idempotent-Replayed"))

    def test_redis_frozen_then_thawed(self):
        c = self.start_outage_cluster()
        self.assert_working(c, "before")
        os.kill(c.redis.proc.pid, signal.SIGSTOP)
        thawed = []

        def thaw():
            if not thawed:
                thawed.append(True)
                try:
                    os.kill(c.redis.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.addCleanup(thaw)
        self.assert_degraded(c, "frozen")
        thaw()
        self.assert_working(c, "thawed")
        # Claims made while Redis did not answer were released: those keys execute now
        # (a 409 would mean a claim left behind); give the release a bounded moment.
        for n in c.nodes:
            key = "frozen-%s-0" % n.id

            def attempt():
                r = n.req("POST", "/idem/frozen", headers=key_hdr(key), body=b"{}")
                return r if r.status != 409 else None
            r = harness.wait_until(attempt, 5 * SLOW, 0.2)
            self.assertIsNotNone(r, "key %s stays claimed after Redis came back" % key)
            self.assertEqual(r.status, 200, r)
            self.assertIsNone(r.header("Idempotent-Replayed"))

    def test_slow_link_replay_right_after_the_answer(self):
        # n1 reaches Redis over a link that delivers its commands 300 ms late (well within the
        # store's timeout). Its answer to the client must still come after the record is kept,
        # so the client's next duplicate, sent to n2, is a replay.
        delay_s = 0.3 * SLOW
        backend = bh.Backend("redis", "redis", "cluster", needs_redis=True,
                             redis_timeout_ms=int(3000 * SLOW), cluster_idempotency=True)
        wd = tempfile.mkdtemp(prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(shutil.rmtree, wd, True)
        self.up = harness.Upstream(wd, "up", threads=2)
        self.addCleanup(self.up.stop)
        c = bh.GatewayCluster(backend, [route("idem", "/idem", [self.up],
                                              policies={"idempotency": {}})], n=2)
        self.addCleanup(c.close)
        c.redis = bh.RedisServer(c.workdir, "redis").start()
        proxy = bh.DelayProxy(c.redis.port, delay_s)
        self.addCleanup(proxy.close)
        c.nodes[0].redis_url = proxy.url
        for n in c.nodes:
            n.start()
        # Both nodes use Redis (n1's first answer also loads the scripts over the slow link).
        for n in c.nodes:
            ok = harness.wait_until(lambda: n.req("POST", "/idem/warm", headers=key_hdr(
                "warm-" + n.id), body=b"{}").status == 200, 10 * SLOW, 0.1)
            self.assertTrue(ok, "node %s does not use Redis" % n.id)
        received = self.received()
        for k in range(3):
            key = "slow-link-%d" % k
            first = c.nodes[0].req("POST", "/idem/o", headers=key_hdr(key), body=b"{}")
            t_answer = time.monotonic()
            self.assertEqual(first.status, 200, first)
            self.assertIsNone(first.header("Idempotent-Replayed"))
            r = c.nodes[1].req("POST", "/idem/o", headers=key_hdr(key), body=b"{}")
            quick = time.monotonic() - t_answer < delay_s
            self.assertEqual((r.status, error_code(r), r.header("Idempotent-Replayed")),
                             (200, None, "true"),
                             "duplicate on n2 %.0f ms after n1's answer%s: %r" % (
                                 (time.monotonic() - t_answer) * 1000,
                                 " (within the link delay)" if quick else "", r))
            self.assertEqual(r.body, first.body)
        self.assertEqual(self.received(), received + 3)

    def test_gateway_starts_while_redis_is_down(self):
        wd = tempfile.mkdtemp(prefix="gw-it-%s-" % self._testMethodName)
        self.addCleanup(shutil.rmtree, wd, True)
        self.up = harness.Upstream(wd, "up", threads=2)
        self.addCleanup(self.up.stop)
        c = bh.GatewayCluster(self.BACKEND, [
            route("idem", "/idem", [self.up], policies={"idempotency": {}}),
            route("closed", "/closed", [self.up], policies={"sliding_window": {
                "limit": 2, "window_ms": 60000, "scope": "cluster",
                "on_store_error": "deny"}})], n=1)
        self.addCleanup(c.close)
        c.redis = bh.RedisServer(c.workdir, "redis")
        # Not started: the gateway must come up anyway and refuse what needs the store.
        n = c.nodes[0]
        n.start()
        r = self.timed(n, "POST", "/idem/a", headers=key_hdr("early"), body=b"{}")
        self.assertErrorBody(r, 503, "store_unavailable")
        self.assertErrorBody(self.timed(n, "GET", "/closed/a"), 429, "rate_limited")
        c.redis.start()
        ok = harness.wait_until(lambda: n.req("POST", "/idem/a", headers=key_hdr("early"),
                                              body=b"{}").status == 200, 10 * SLOW, 0.1)
        self.assertTrue(ok, "the gateway did not connect to Redis once it was up")
        self.assertEqual([n.req("GET", "/closed/b").status for _ in range(3)], [200, 200, 429])


if __name__ == "__main__":
    harness.main()
