"""The embedded Raft cluster with real processes on loopback (API.md section 4).

A 3-node cluster elects a leader; every /v1 endpoint works through every node; kill -9 of the
leader (and of random nodes, repeatedly) during a stream of idempotent increments and lock
cycles loses no acknowledged write, keeps increments in real-time order and never shows two
holders of a lock at once; a frozen old leader serves nothing stale; a minority answers 503
no_leader; leases survive a failover and are not stretched by it; a follower that missed many
entries catches up by snapshot; a torn WAL tail is repaired while corruption in the middle of
the log is refused; a node whose disk is full refuses writes with 507 and loses nothing; a
single-node raft backend keeps its writes across restarts.

Run by hand: GW_BIN=build/gateway/gateway GW_UPSTREAM=build/tests/upstream/gw-upstream
python3 tests/integration/test_cluster.py [TestClass[.test_name]]. The full-disk tests mount a
tmpfs and are skipped when that is not permitted (not root).
"""

import errno
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from cluster_harness import (Cluster, RetryingClient, SLOW, slow,  # noqa: E402
                             wait_until)


# ---- helpers ----

def error_of(r):
    try:
        e = r.json().get("error")
        return e if isinstance(e, dict) else {}
    except Exception:
        return {}


def raft_index(r):
    v = r.header("Raft-Index")
    return int(v) if v is not None and v.isdigit() else None


class ClusterTest(unittest.TestCase):

    def new_cluster(self, **kw):
        c = Cluster(prefix="gw-it-%s-" % self._testMethodName, **kw)
        self.addCleanup(c.close)
        return c

    def assertError(self, r, status, code, field=None):
        """A gateway error: status, JSON body {"error": {"code", "message", ...}}, Raft-Index."""
        self.assertEqual(r.status, status, r)
        ctype = (r.header("Content-Type") or "").split(";")[0].strip().lower()
        self.assertEqual(ctype, "application/json", r)
        err = error_of(r)
        self.assertEqual(err.get("code"), code, r)
        self.assertIsInstance(err.get("message"), str, r)
        self.assertTrue(err["message"], r)
        if field is not None:
            named = err.get("field") == field or field in err["message"]
            self.assertTrue(named, "error does not name field %r: %r" % (field, r))
        return err

    def assertRaftIndex(self, r):
        self.assertIsNotNone(raft_index(r), "no numeric Raft-Index header: %r" % (r,))
        return raft_index(r)

    def ok(self, r, status=200):
        self.assertEqual(r.status, status, r)
        self.assertRaftIndex(r)
        return r.json() if r.body else None


# ---- a shared 3-node cluster for the endpoint checks ----

class TestEndpoints(ClusterTest):
    """Every endpoint, through every node, on one 3-node cluster."""

    @classmethod
    def setUpClass(cls):
        cls.c = Cluster(prefix="gw-it-endpoints-")
        try:
            cls.c.start()
            cls.c.wait_ready()
            cls.leader = cls.c.leader()
            if cls.leader is None:
                raise AssertionError("no leader elected")
        except Exception:
            cls.c.close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.c.close()

    def test_01_one_leader(self):
        nodes = self.c.nodes
        self.assertTrue(all(n.ready() for n in nodes))
        leaders = [n for n in nodes if n.is_leader()]
        self.assertEqual(len(leaders), 1, leaders)
        # Followers do not answer a request that must not be forwarded; the leader does.
        for n in nodes:
            r = n.req("GET", "/v1/counters/probe", headers=[("Gateway-Forwarded-By", "t")])
            if n is leaders[0]:
                self.ok(r)
            else:
                self.assertError(r, 503, "no_leader")

    def test_leases_every_node(self):
        nodes = self.c.nodes
        for i, n in enumerate(nodes):
            other = nodes[(i + 1) % len(nodes)]
            with self.subTest(node=n.id):
                t0 = time.monotonic()
                b = self.ok(n.req("POST", "/v1/leases", {"ttl_ms": 5000}), 201)
                self.assertIsInstance(b["id"], str)
                self.assertTrue(b["id"].isdigit(), b)
                self.assertEqual(b["ttl_ms"], 5000)
                lid = b["id"]
                g = self.ok(other.req("GET", "/v1/leases/" + lid))
                self.assertEqual(g["id"], lid)
                self.assertEqual(g["ttl_ms"], 5000)
                self.assertEqual(g["locks"], [])
                elapsed = int((time.monotonic() - t0) * 1000)
                self.assertLessEqual(g["remaining_ms"], 5000)
                self.assertGreaterEqual(g["remaining_ms"], 5000 - elapsed - 50, g)
                k = self.ok(n.req("POST", "/v1/leases/%s/keepalive" % lid))
                self.assertEqual((k["id"], k["ttl_ms"]), (lid, 5000))
                r = other.req("DELETE", "/v1/leases/" + lid)
                self.assertEqual(r.status, 204, r)
                self.assertRaftIndex(r)
                for m in nodes:
                    self.assertError(m.req("GET", "/v1/leases/" + lid), 404, "lease_not_found")
                self.assertError(n.req("POST", "/v1/leases/%s/keepalive" % lid), 404,
                                 "lease_not_found")
                self.assertError(n.req("GET", "/v1/leases/987654321987"), 404, "lease_not_found")
                for bad in (999, 3600001, "abc", -5, None):
                    body = {"ttl_ms": bad} if bad is not None else {}
                    self.assertError(n.req("POST", "/v1/leases", body), 400, "invalid_field",
                                     "ttl_ms")
                b = self.ok(n.req("POST", "/v1/leases", {"ttl_ms": 1000}), 201)
                self.assertEqual(b["ttl_ms"], 1000)
                b = self.ok(n.req("POST", "/v1/leases", {"ttl_ms": 3600000}), 201)
                self.assertEqual(b["ttl_ms"], 3600000)
                self.assertEqual(n.req("DELETE", "/v1/leases/" + b["id"]).status, 204)

    def test_locks_every_node(self):
        nodes = self.c.nodes
        last_token = {}
        for i, n in enumerate(nodes):
            other = nodes[(i + 1) % len(nodes)]
            third = nodes[(i + 2) % len(nodes)]
            for name in ("lk-shared", "lk-%s" % n.id):
                with self.subTest(node=n.id, lock=name):
                    # ttl_ms variant: a lease is created for the holder.
                    a = self.ok(n.req("POST", "/v1/locks/" + name,
                                      {"owner": "alice", "ttl_ms": 5000}))
                    self.assertEqual((a["name"], a["owner"], a["ttl_ms"]), (name, "alice", 5000))
                    self.assertIsInstance(a["token"], int)
                    self.assertGreater(a["token"], last_token.get(name, 0))
                    last_token[name] = a["token"]
                    lid = a["lease_id"]
                    self.assertTrue(isinstance(lid, str) and lid.isdigit(), a)
                    # Re-entrant: same owner and lease, same token (through another node).
                    again = self.ok(other.req("POST", "/v1/locks/" + name,
                                              {"owner": "alice", "lease_id": lid}))
                    self.assertEqual(again["token"], a["token"])
                    g = self.ok(third.req("GET", "/v1/locks/" + name))
                    self.assertEqual((g["name"], g["owner"], g["token"], g["lease_id"],
                                      g["waiters"]), (name, "alice", a["token"], lid, 0))
                    lg = self.ok(other.req("GET", "/v1/leases/" + lid))
                    self.assertIn(name, lg["locks"])
                    # Another owner, no wait: 409 lock_held naming the holder.
                    e = self.assertError(other.req("POST", "/v1/locks/" + name,
                                                   {"owner": "bob", "ttl_ms": 5000, "wait_ms": 0}),
                                         409, "lock_held")
                    self.assertEqual((e.get("holder"), e.get("token")), ("alice", a["token"]), e)
                    # The same owner under another lease is another holder.
                    self.assertError(third.req("POST", "/v1/locks/" + name,
                                               {"owner": "alice", "ttl_ms": 5000}),
                                     409, "lock_held")
                    # Release: wrong token 409, right token 204, then 404.
                    self.assertError(third.req("DELETE", "/v1/locks/%s?token=%d"
                                               % (name, a["token"] + 1000)), 409, "lock_not_held")
                    self.assertError(third.req("DELETE", "/v1/locks/%s?token=%d"
                                               % (name, a["token"] - 1)), 409, "lock_not_held")
                    r = n.req("DELETE", "/v1/locks/%s?token=%d" % (name, a["token"]))
                    self.assertEqual(r.status, 204, r)
                    self.assertRaftIndex(r)
                    self.assertError(other.req("DELETE", "/v1/locks/%s?token=%d"
                                               % (name, a["token"])), 404, "lock_not_found")
                    for m in nodes:
                        self.assertLockFree(m, name)
                    # lease_id variant, lease granted through another node.
                    lease = self.ok(other.req("POST", "/v1/leases", {"ttl_ms": 5000}), 201)
                    b = self.ok(third.req("POST", "/v1/locks/" + name,
                                          {"owner": "bob", "lease_id": lease["id"]}))
                    self.assertEqual((b["owner"], b["lease_id"]), ("bob", lease["id"]))
                    self.assertGreater(b["token"], last_token[name])
                    last_token[name] = b["token"]
                    # Revoking the lease releases its locks.
                    self.assertEqual(n.req("DELETE", "/v1/leases/" + lease["id"]).status, 204)
                    r = other.req("GET", "/v1/locks/" + name)
                    self.assertEqual(r.status, 404, r)
                    self.assertError(n.req("POST", "/v1/locks/" + name,
                                           {"owner": "bob", "lease_id": lease["id"]}),
                                     404, "lease_not_found")
                    # Old lease of alice is still alive: release it.
                    self.assertEqual(n.req("DELETE", "/v1/leases/" + lid).status, 204)

    def assertLockFree(self, node, name):
        r = node.req("GET", "/v1/locks/" + name)
        self.assertEqual(r.status, 404, r)
        self.assertRaftIndex(r)
        self.assertIn(error_of(r).get("code"), ("lock_not_found", "not_found"), r)

    def test_lock_free_get_is_404(self):
        for n in self.c.nodes:
            self.assertLockFree(n, "never-taken-%s" % n.id)

    def test_fifo_waiters(self):
        nodes = self.c.nodes
        name = "fifo"
        h = self.ok(nodes[0].req("POST", "/v1/locks/" + name, {"owner": "holder",
                                                                "ttl_ms": 10000}))
        results = {}
        done_order = []
        order_lock = threading.Lock()

        def waiter(who, node):
            try:
                r = node.req("POST", "/v1/locks/" + name,
                             {"owner": who, "ttl_ms": 10000, "wait_ms": 20000},
                             timeout=slow(30.0))
            except Exception as e:  # reported below
                r = e
            with order_lock:
                results[who] = (r, time.monotonic())
                done_order.append(who)

        def waiters_now():
            r = nodes[2].req("GET", "/v1/locks/" + name)
            return r.json().get("waiters") if r.status == 200 else None

        ta = threading.Thread(target=waiter, args=("first", nodes[1]))
        ta.start()
        self.assertTrue(wait_until(lambda: waiters_now() == 1, slow(5.0)),
                        "first waiter not queued: %r" % waiters_now())
        tb = threading.Thread(target=waiter, args=("second", nodes[2]))
        tb.start()
        try:
            self.assertTrue(wait_until(lambda: waiters_now() == 2, slow(5.0)),
                            "second waiter not queued: %r" % waiters_now())
            self.assertEqual(results, {})
            r = nodes[1].req("DELETE", "/v1/locks/%s?token=%d" % (name, h["token"]))
            self.assertEqual(r.status, 204, r)
            ta.join(slow(10.0))
            self.assertIn("first", results, "first waiter not granted after the release")
            ra = results["first"][0]
            self.assertEqual(getattr(ra, "status", None), 200, ra)
            a = ra.json()
            self.assertEqual(a["owner"], "first")
            self.assertGreater(a["token"], h["token"])
            time.sleep(0.2)
            self.assertNotIn("second", results, "second waiter granted while first holds")
            g = self.ok(nodes[0].req("GET", "/v1/locks/" + name))
            self.assertEqual((g["owner"], g["token"], g["waiters"]), ("first", a["token"], 1))
            r = nodes[2].req("DELETE", "/v1/locks/%s?token=%d" % (name, a["token"]))
            self.assertEqual(r.status, 204, r)
            tb.join(slow(10.0))
            self.assertIn("second", results)
            rb = results["second"][0]
            self.assertEqual(getattr(rb, "status", None), 200, rb)
            b = rb.json()
            self.assertEqual(b["owner"], "second")
            self.assertGreater(b["token"], a["token"])
            self.assertEqual(done_order, ["first", "second"])
            self.assertEqual(nodes[0].req("DELETE", "/v1/locks/%s?token=%d"
                                          % (name, b["token"])).status, 204)
        finally:
            ta.join(slow(25.0))
            tb.join(slow(25.0))

    def test_expired_holder_is_superseded(self):
        n = self.c.nodes
        # A waiter whose own lease runs out while it waits (before the holder's) is dropped
        # with lease_not_found.
        short = self.ok(n[2].req("POST", "/v1/leases", {"ttl_ms": 1000}), 201)["id"]
        t0 = time.monotonic()
        h = self.ok(n[0].req("POST", "/v1/locks/sup", {"owner": "h", "ttl_ms": 1600}))
        out = {}

        def doomed():
            out["doomed"] = n[2].req("POST", "/v1/locks/sup",
                                     {"owner": "d", "lease_id": short, "wait_ms": 20000},
                                     timeout=slow(30.0))
            out["doomed_at"] = time.monotonic()
        td = threading.Thread(target=doomed)
        td.start()
        self.assertTrue(wait_until(lambda: "doomed" in out or n[0].req(
            "GET", "/v1/locks/sup").json().get("waiters") == 1, slow(5.0)))
        # The holder never renews: once its ttl has passed the next live waiter gets the lock.
        r = n[1].req("POST", "/v1/locks/sup", {"owner": "w", "ttl_ms": 10000, "wait_ms": 20000},
                     timeout=slow(30.0))
        dt = time.monotonic() - t0
        w = self.ok(r)
        self.assertEqual(w["owner"], "w")
        self.assertGreater(w["token"], h["token"])
        t_granted = time.monotonic()
        self.assertGreaterEqual(dt, 1.6, "granted before the holder's lease could expire")
        self.assertLess(dt, slow(6.0))
        td.join(slow(30.0))
        self.assertError(out["doomed"], 404, "lease_not_found")
        self.assertLess(out["doomed_at"], t_granted)
        # The superseded holder cannot release what it no longer holds.
        self.assertError(n[0].req("DELETE", "/v1/locks/sup?token=%d" % h["token"]), 409,
                         "lock_not_held")
        self.assertError(n[0].req("POST", "/v1/leases/%s/keepalive" % h["lease_id"]), 404,
                         "lease_not_found")
        g = self.ok(n[2].req("GET", "/v1/locks/sup"))
        self.assertEqual((g["owner"], g["token"], g["waiters"]), ("w", w["token"], 0))
        self.assertEqual(n[1].req("DELETE", "/v1/locks/sup?token=%d" % w["token"]).status, 204)

    def test_wait_times_out_with_lock_held(self):
        n = self.c.nodes
        h = self.ok(n[0].req("POST", "/v1/locks/wt", {"owner": "h", "ttl_ms": 10000}))
        t0 = time.monotonic()
        r = n[1].req("POST", "/v1/locks/wt", {"owner": "w", "ttl_ms": 10000, "wait_ms": 500})
        dt = time.monotonic() - t0
        e = self.assertError(r, 409, "lock_held")
        self.assertEqual((e.get("holder"), e.get("token")), ("h", h["token"]))
        self.assertGreaterEqual(dt, 0.45, "answered before wait_ms passed")
        self.assertLess(dt, slow(5.0))
        self.assertEqual(n[2].req("DELETE", "/v1/locks/wt?token=%d" % h["token"]).status, 204)

    # A follower forwards a waiting acquire for as long as its wait_ms, beyond any fixed
    # forwarding timeout: the waiter is never told it failed while it stays queued.
    def test_long_wait_through_a_follower(self):
        leader = self.c.leader()
        self.assertIsNotNone(leader)
        f = self.c.followers(leader)[0]
        name = "long-wait"
        h = self.ok(leader.req("POST", "/v1/locks/" + name, {"owner": "h", "ttl_ms": 60000}))
        out = []

        def waiter():
            try:
                out.append(f.req("POST", "/v1/locks/" + name,
                                 {"owner": "w", "ttl_ms": 60000, "wait_ms": 30000},
                                 timeout=60.0))
            except Exception as e:  # reported below
                out.append(e)
        t = threading.Thread(target=waiter)
        t0 = time.monotonic()
        t.start()
        try:
            wait_until(lambda: out, 21.0, 0.1)
            early = list(out)
            self.assertEqual(leader.req("DELETE", "/v1/locks/%s?token=%d"
                                        % (name, h["token"])).status, 204)
            t.join(slow(10.0))
            self.assertEqual(early, [], "the waiter was answered after %.1f s, before the lock "
                             "was released or its wait_ms ran out: %r"
                             % (time.monotonic() - t0, early))
            self.assertTrue(out, "no answer for the waiter after the release")
            r = out[0]
            self.assertEqual(getattr(r, "status", None), 200, r)
            self.assertEqual(r.json()["owner"], "w")
            self.assertGreater(r.json()["token"], h["token"])
        finally:
            t.join(40.0)
            g = leader.req("GET", "/v1/locks/" + name)
            if g.status == 200:
                leader.req("DELETE", "/v1/locks/%s?token=%d" % (name, g.json()["token"]))

    def test_counters_every_node(self):
        nodes = self.c.nodes
        for i, n in enumerate(nodes):
            other = nodes[(i + 1) % len(nodes)]
            name = "ctr-%s" % n.id
            with self.subTest(node=n.id):
                self.assertEqual(self.ok(n.req("GET", "/v1/counters/" + name)),
                                 {"name": name, "value": 0})
                self.assertEqual(self.ok(n.req("POST", "/v1/counters/" + name, {"add": 5})),
                                 {"name": name, "value": 5})
                self.assertEqual(self.ok(other.req("POST", "/v1/counters/" + name,
                                                   {"add": -2}))["value"], 3)
                for m in nodes:
                    self.assertEqual(self.ok(m.req("GET", "/v1/counters/" + name))["value"], 3)
                self.assertEqual(self.ok(other.req("PUT", "/v1/counters/" + name,
                                                   {"value": 10, "expect": 3}))["value"], 10)
                e = self.assertError(n.req("PUT", "/v1/counters/" + name,
                                           {"value": 11, "expect": 3}), 409, "cas_failed")
                self.assertEqual(e.get("value"), 10, e)
                self.assertEqual(self.ok(n.req("PUT", "/v1/counters/" + name,
                                               {"value": -7}))["value"], -7)
                self.assertEqual(self.ok(other.req("GET", "/v1/counters/" + name))["value"], -7)

    def test_idempotent_writes(self):
        nodes = self.c.nodes
        key = "idem-%d" % random.randrange(1 << 30)
        first = self.ok(nodes[0].req("POST", "/v1/counters/idem", {"add": 3},
                                     headers=[("Idempotency-Key", key)]))
        for n in nodes:
            again = self.ok(n.req("POST", "/v1/counters/idem", {"add": 3},
                                  headers=[("Idempotency-Key", key)]))
            self.assertEqual(again, first)
        self.assertEqual(self.ok(nodes[2].req("GET", "/v1/counters/idem"))["value"],
                         first["value"])
        self.assertEqual(first["value"], 3)
        r = nodes[1].req("POST", "/v1/counters/idem", {"add": 4},
                         headers=[("Idempotency-Key", key)])
        self.assertError(r, 422, "idempotency_key_mismatch")
        # A lease grant replayed is the same lease.
        lk = "idem-lease-%d" % random.randrange(1 << 30)
        l1 = self.ok(nodes[1].req("POST", "/v1/leases", {"ttl_ms": 5000},
                                  headers=[("Idempotency-Key", lk)]), 201)
        r = nodes[2].req("POST", "/v1/leases", {"ttl_ms": 5000},
                         headers=[("Idempotency-Key", lk)])
        self.assertIn(r.status, (200, 201), r)
        self.assertEqual(r.json()["id"], l1["id"])
        self.assertEqual(self.ok(nodes[0].req("GET", "/v1/counters/idem"))["value"], 3)

    def test_bad_inputs(self):
        long_ok = "n" * 200
        for n in self.c.nodes:
            with self.subTest(node=n.id):
                for body in (b"{", b"[1]", b"", b"nope", b'"x"'):
                    self.assertRaftIndex(n.req("POST", "/v1/counters/bad", body))
                    self.assertError(n.req("POST", "/v1/counters/bad", body), 400, "invalid_json")
                    self.assertError(n.req("POST", "/v1/locks/bad", body), 400, "invalid_json")
                    self.assertError(n.req("POST", "/v1/leases", body), 400, "invalid_json")
                cases = [
                    ("POST", "/v1/counters/bad", {"add": "1"}, "add"),
                    ("POST", "/v1/counters/bad", {"add": 1.5}, "add"),
                    ("POST", "/v1/counters/bad", {}, "add"),
                    ("PUT", "/v1/counters/bad", {"expect": 1}, "value"),
                    ("PUT", "/v1/counters/bad", {"value": 1, "expect": "x"}, "expect"),
                    ("POST", "/v1/locks/bad", {"ttl_ms": 5000}, "owner"),
                    ("POST", "/v1/locks/bad", {"owner": 5, "ttl_ms": 5000}, "owner"),
                    ("POST", "/v1/locks/bad", {"owner": "a"}, "ttl_ms"),
                    ("POST", "/v1/locks/bad", {"owner": "a", "ttl_ms": 5000, "wait_ms": 60001},
                     "wait_ms"),
                    ("POST", "/v1/locks/bad", {"owner": "a", "ttl_ms": 5000, "wait_ms": "x"},
                     "wait_ms"),
                    ("POST", "/v1/locks/bad", {"owner": "a", "lease_id": "abc"}, "lease_id"),
                    ("POST", "/v1/leases", {"ttl_ms": "5000x"}, "ttl_ms"),
                    ("DELETE", "/v1/locks/bad", None, "token"),
                    ("DELETE", "/v1/locks/bad?token=x", None, "token"),
                ]
                for method, path, body, field in cases:
                    r = n.req(method, path, body)
                    self.assertError(r, 400, "invalid_field", field)
                    self.assertRaftIndex(r)
                for name in ("bad*name", "n" * 201, "sp%20ace", "a,b"):
                    for method, kind, body in (("GET", "counters", None),
                                               ("POST", "counters", {"add": 1}),
                                               ("POST", "locks", {"owner": "a", "ttl_ms": 5000}),
                                               ("GET", "locks", None)):
                        r = n.req(method, "/v1/%s/%s" % (kind, name), body)
                        self.assertError(r, 400, "invalid_name")
                        self.assertRaftIndex(r)
                # 200 bytes of the allowed alphabet is a valid name.
                self.assertEqual(self.ok(n.req("GET", "/v1/counters/" + long_ok))["value"], 0)
                self.ok(n.req("GET", "/v1/counters/A-z.0_9:x"))

    def test_raft_index_non_decreasing(self):
        nodes = self.c.nodes
        last_write = 0
        last_seen = {n.id: 0 for n in nodes}
        for i in range(24):
            n = nodes[i % 3]
            w = n.req("POST", "/v1/counters/ri", {"add": 1})
            self.assertEqual(w.status, 200, w)
            wi = self.assertRaftIndex(w)
            self.assertGreater(wi, last_write, "a write's Raft-Index did not advance")
            last_write = wi
            rd = nodes[(i + 1) % 3]
            r = rd.req("GET", "/v1/counters/ri")
            ri = self.assertRaftIndex(r)
            self.assertGreaterEqual(ri, wi, "a linearizable read behind an acknowledged write")
            self.assertEqual(r.json()["value"], i + 1)
            for m in nodes:
                s = m.req("GET", "/v1/counters/ri?consistency=stale")
                si = self.assertRaftIndex(s)
                self.assertGreaterEqual(si, last_seen[m.id], "stale Raft-Index went down on %s"
                                        % m.id)
                last_seen[m.id] = si

    def test_stale_reads(self):
        nodes = self.c.nodes
        leader = self.c.leader()
        self.assertIsNotNone(leader)
        v = self.ok(leader.req("PUT", "/v1/counters/stale", {"value": 4242}))["value"]
        hdr = [("Gateway-Forwarded-By", "t")]
        for n in nodes:
            # Answered by the node itself: a stale read is never forwarded.
            def fresh(n=n):
                r = n.req("GET", "/v1/counters/stale?consistency=stale", headers=hdr)
                return r.status == 200 and r.json()["value"] == v
            self.assertTrue(wait_until(fresh, slow(5.0)), "stale read on %s never saw %d"
                            % (n.id, v))
            r = n.req("GET", "/v1/counters/stale?consistency=stale", headers=hdr)
            self.assertRaftIndex(r)
            lease = self.ok(n.req("POST", "/v1/leases", {"ttl_ms": 5000}), 201)["id"]

            def lease_seen(n=n):
                r = n.req("GET", "/v1/leases/%s?consistency=stale" % lease, headers=hdr)
                return r.status == 200
            self.assertTrue(wait_until(lease_seen, slow(5.0)))
            self.assertEqual(n.req("DELETE", "/v1/leases/" + lease).status, 204)


# ---- kill -9 of the leader under load ----

class Load:
    """Client threads against every node of a cluster: increments of one counter, each with
    its own Idempotency-Key, and acquire/hold/release cycles on one lock (a lease per hold,
    revoked after). Every write is retried with its key on 503 and transport errors."""

    def __init__(self, cluster, counter, lock, incrementers=4, lockers=3):
        self.c = cluster
        self.counter = counter
        self.lock = lock
        self.stop_ev = threading.Event()
        self.mu = threading.Lock()
        self.incs = []      # (t_send, t_ack, value, attempts)
        self.holds = []     # dicts: owner, token, send, acq_ack, rel_sent, rel
        self.problems = []
        self.client = RetryingClient(cluster.nodes, slow(25.0))
        self.threads = [threading.Thread(target=self.incrementer, args=(i,))
                        for i in range(incrementers)]
        self.threads += [threading.Thread(target=self.locker, args=(i,)) for i in range(lockers)]

    def start(self):
        for t in self.threads:
            t.daemon = True
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(slow(30.0))
        return not any(t.is_alive() for t in self.threads)

    def count(self, pred=lambda x: True):
        with self.mu:
            return sum(1 for x in self.incs if pred(x))

    def n_holds(self):
        with self.mu:
            return len(self.holds)

    def problem(self, text):
        with self.mu:
            self.problems.append(text)

    def incrementer(self, tid):
        seq = 0
        while not self.stop_ev.is_set():
            key = "%s-%d-%d" % (self.counter, tid, seq)
            t_send = time.monotonic()
            try:
                r, att = self.client.call("POST", "/v1/counters/" + self.counter, {"add": 1},
                                          key=key, start=tid + seq)
            except TimeoutError as e:
                self.problem("increment %s: %s" % (key, e))
                return
            t_ack = time.monotonic()
            seq += 1
            if r.status != 200:
                self.problem("increment %s: %r" % (key, r))
                continue
            with self.mu:
                self.incs.append((t_send, t_ack, r.json()["value"], att, raft_index(r), tid))

    def locker(self, tid):
        seq = 0
        owner = "w%d" % tid
        path = "/v1/locks/" + self.lock
        while not self.stop_ev.is_set():
            seq += 1
            t_send = time.monotonic()
            try:
                r, _ = self.client.call("POST", path,
                                        {"owner": owner, "ttl_ms": 30000, "wait_ms": 1500},
                                        key="acq-%s-%d" % (owner, seq), start=tid + seq)
            except TimeoutError as e:
                self.problem("acquire %s/%d: %s" % (owner, seq, e))
                return
            t_ack = time.monotonic()
            if r.status == 409 and error_of(r).get("code") == "lock_held":
                continue
            if r.status != 200:
                self.problem("acquire %s/%d: %r" % (owner, seq, r))
                return
            b = r.json()
            time.sleep(random.uniform(0.005, 0.03))
            t_rel = time.monotonic()
            try:
                rr, _ = self.client.call("DELETE", "%s?token=%d" % (path, b["token"]),
                                         key="rel-%s-%d" % (owner, seq), start=tid + seq + 1)
            except TimeoutError as e:
                self.problem("release %s/%d: %s" % (owner, seq, e))
                return
            with self.mu:
                self.holds.append({"owner": owner, "token": b["token"], "send": t_send,
                                   "acq_ack": t_ack, "rel_sent": t_rel, "rel": rr.status})
            if rr.status != 204:
                self.problem("release %s/%d token %d: %r" % (owner, seq, b["token"], rr))
            # The hold's lease is revoked (not retried; a leftover only lingers until its ttl).
            try:
                self.c.nodes[seq % len(self.c.nodes)].req(
                    "DELETE", "/v1/leases/" + b["lease_id"], timeout=slow(3.0))
            except OSError:
                pass

    def check(self, test):
        """After stop(): exactly-once increments and a lock history without overlaps."""
        test.assertEqual(self.problems, [])
        # The counter is the number of acknowledged increments, each of which saw its own value.
        n_acked = len(self.incs)
        test.assertGreater(n_acked, 0)
        values = sorted(x[2] for x in self.incs)
        test.assertEqual(len(set(values)), n_acked, "two acknowledged increments saw one value")
        test.assertEqual(values[-1], n_acked, "the counter went past the acknowledged writes")
        # Linearizable: an increment acknowledged before another was sent saw a smaller value,
        # and one client's successive writes carry increasing Raft-Index values.
        by_ack = sorted(self.incs, key=lambda x: x[1])
        k = 0
        seen_max = 0
        for x in sorted(self.incs, key=lambda x: x[0]):
            while k < len(by_ack) and by_ack[k][1] < x[0]:
                seen_max = max(seen_max, by_ack[k][2])
                k += 1
            test.assertGreater(x[2], seen_max, "increment sent at %.3f saw %d after %d was "
                               "acknowledged" % (x[0], x[2], seen_max))
        last_index = {}
        for x in sorted(self.incs, key=lambda x: x[1]):
            test.assertIsNotNone(x[4], "no Raft-Index on an acknowledged write")
            test.assertGreater(x[4], last_index.get(x[5], 0), "Raft-Index went down for one "
                               "client")
            last_index[x[5]] = x[4]
        for n in self.c.running():
            r = n.req("GET", "/v1/counters/" + self.counter)
            test.assertEqual(r.status, 200, r)
            test.assertGreaterEqual(raft_index(r) or 0, max(last_index.values()))
            test.assertEqual(r.json()["value"], n_acked,
                             "counter through %s differs from the acknowledged increments" % n.id)
        # Every node converges on it in its own state (a stale read is never forwarded).
        for n in self.c.running():
            def conv(n=n):
                r = n.req("GET", "/v1/counters/%s?consistency=stale" % self.counter,
                          headers=[("Gateway-Forwarded-By", "t")])
                return r.status == 200 and r.json()["value"] == n_acked
            test.assertTrue(wait_until(conv, slow(10.0)), "%s did not converge" % n.id)
        # Locks: tokens strictly increase from holder to holder, and ordered by token the
        # holding intervals [acquire acknowledged, release sent] never overlap.
        by_token = sorted(self.holds, key=lambda h: h["token"])
        tokens = [h["token"] for h in by_token]
        test.assertEqual(len(set(tokens)), len(tokens), "one token granted twice: %r" % tokens)
        by_ack = sorted(self.holds, key=lambda h: h["acq_ack"])
        for a, b in zip(by_ack, by_ack[1:]):
            test.assertLess(a["token"], b["token"], "token went down between holders: %r %r"
                            % (a, b))
        for a, b in zip(by_token, by_token[1:]):
            test.assertLessEqual(a["rel_sent"], b["acq_ack"],
                                 "two holders of %s at once: %r and %r" % (self.lock, a, b))
        # Fencing goes on after everything.
        r, _ = self.client.call("POST", "/v1/locks/" + self.lock,
                                {"owner": "final", "ttl_ms": 5000, "wait_ms": 5000},
                                key="final-%d" % time.monotonic_ns())
        test.assertEqual(r.status, 200, r)
        test.assertGreater(r.json()["token"], tokens[-1] if tokens else 0)
        return n_acked


class TestFailover(ClusterTest):

    def test_kill_leader_under_load(self):
        c = self.new_cluster(election_timeout_ms=600, heartbeat_ms=60)
        c.start()
        c.wait_ready()
        load = Load(c, "fo", "fo-lock")
        load.start()
        try:
            self.assertTrue(wait_until(lambda: load.count() >= 40 and load.n_holds() >= 5,
                                       slow(10.0)), "no progress before the kill: %d incs, %d "
                            "holds, problems %r" % (load.count(), load.n_holds(), load.problems))
            leader = c.leader()
            self.assertIsNotNone(leader)
            t_kill = time.monotonic()
            leader.kill9()
            new = c.leader(timeout=slow(15.0))
            t_elected = time.monotonic()
            self.assertIsNotNone(new, "no new leader after the kill")
            self.assertIsNot(new, leader)
            self.assertTrue(wait_until(lambda: load.count(lambda x: x[0] > t_kill) >= 40,
                                       slow(15.0)), "writes did not resume after the kill")
            holds_at_restart = load.n_holds()
            leader.start()
            c.wait_ready(timeout=slow(15.0))
            self.assertTrue(wait_until(lambda: load.n_holds() >= holds_at_restart + 5,
                                       slow(10.0)), "lock cycles did not go on after the restart")
            time.sleep(0.5)
        finally:
            stopped = load.stop()
        self.assertTrue(stopped, "client threads hang")
        after = sorted(x[1] - t_kill for x in load.incs if x[0] > t_kill)
        recovery = after[0] if after else None
        print("\nfailover: leader %s killed; new leader %s seen after %.3f s; first write sent "
              "after the kill acknowledged after %.3f s; %d increments, %d lock holds, max "
              "attempts for one write %d" % (leader.id, new.id, t_elected - t_kill, recovery,
                                             len(load.incs), len(load.holds),
                                             max(x[3] for x in load.incs)), file=sys.stderr)
        self.assertLess(recovery, slow(10.0))
        load.check(self)
        self.assertGreater(sum(1 for h in load.holds if h["send"] > t_kill), 0)

    def test_repeated_kill9_of_random_nodes(self):
        """kill -9 of a random node (leader or not) and its restart, again and again."""
        c = self.new_cluster(election_timeout_ms=600, heartbeat_ms=60, snapshot_every=200)
        c.start()
        c.wait_ready()
        load = Load(c, "chaos", "chaos-lock")
        rng = random.Random()
        victims = []
        load.start()
        try:
            for _ in range(6):
                time.sleep(0.8)
                v = rng.choice(c.nodes)
                victims.append(v.id + ("*" if v.is_leader() else ""))
                v.kill9()
                time.sleep(0.5)
                v.start()
            c.wait_ready(timeout=slow(15.0))
            before = load.count()
            self.assertTrue(wait_until(lambda: load.count() >= before + 20, slow(15.0)),
                            "writes did not go on after the last restart")
        finally:
            stopped = load.stop()
        self.assertTrue(stopped, "client threads hang")
        n = load.check(self)
        print("\nkill -9 of %s (* = leader): %d increments, %d lock holds, none lost"
              % (" ".join(victims), n, len(load.holds)), file=sys.stderr)


class TestPausedLeader(ClusterTest):

    def test_resumed_old_leader_serves_nothing_stale(self):
        """A leader frozen (SIGSTOP) past an election resumes believing it leads: it must not
        answer a linearizable read with the old value nor acknowledge a write on its own."""
        c = self.new_cluster(election_timeout_ms=600, heartbeat_ms=60)
        c.start()
        c.wait_ready()
        old = c.leader()
        self.assertIsNotNone(old)
        self.assertEqual(old.req("PUT", "/v1/counters/paused", {"value": 1}).status, 200)
        os.kill(old.proc.pid, signal.SIGSTOP)
        try:
            new = c.leader(timeout=slow(10.0), exclude=(old,))
            self.assertIsNotNone(new, "no leader while the old one is frozen")
            r = new.req("PUT", "/v1/counters/paused", {"value": 2})
            self.assertEqual(r.status, 200, r)
            out = []
            mu = threading.Lock()
            hdr = [("Gateway-Forwarded-By", "t")]

            def read():
                try:
                    r = harness.request(old.api_port, "GET", "/v1/counters/paused", headers=hdr,
                                        timeout=slow(15.0))
                except OSError as e:
                    r = e
                with mu:
                    out.append(("read", r))

            def write():
                try:
                    r = harness.request(old.api_port, "POST", "/v1/counters/paused",
                                        headers=hdr + [("Content-Type", "application/json")],
                                        body=b'{"add": 100}', timeout=slow(15.0))
                except OSError as e:
                    r = e
                with mu:
                    out.append(("write", r))
            ts = [threading.Thread(target=read) for _ in range(4)]
            ts += [threading.Thread(target=write) for _ in range(2)]
            for t in ts:
                t.start()
            time.sleep(0.3)  # the requests wait in the frozen process's socket queue
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
        for t in ts:
            t.join(slow(20.0))
        self.assertEqual(len(out), 6, out)
        applied = 0
        for kind, r in out:
            self.assertIsInstance(r, harness.Response, (kind, r))
            if r.status == 200:
                if kind == "read":
                    self.assertEqual(r.json()["value"], 2, "stale read from a deposed leader")
                else:
                    applied += 1
            else:
                self.assertEqual(r.status, 503, (kind, r))
        final = 2 + 100 * applied
        for n in c.nodes:
            r = n.req("GET", "/v1/counters/paused")
            self.assertEqual((r.status, r.json()["value"]), (200, final), n.id)


# ---- leases across a leader change ----

class TestLeaseFailover(ClusterTest):
    ET_MS = 600
    TTL = 5.0

    def poll_expiry(self, c, lid, not_before, deadline):
        """Polls GET lease through the running nodes until 404; returns the time of the first
        404 (None if none by deadline). A 404 before not_before fails the test. A read that
        does not answer within a second is abandoned for the next node: what is measured is
        when the lease expired, not how long one read may wait during a leader change."""
        while time.monotonic() < deadline:
            for n in c.running():
                try:
                    r = n.req("GET", "/v1/leases/" + lid, timeout=1.0)
                except OSError as e:
                    print("\nlease poll: %s did not answer (%s)" % (n.id, e), file=sys.stderr)
                    continue
                t_resp = time.monotonic()
                if r.status == 404:
                    self.assertEqual(error_of(r).get("code"), "lease_not_found", r)
                    self.assertGreaterEqual(t_resp, not_before,
                                            "lease gone %.3f s before its ttl ran out"
                                            % (not_before - t_resp))
                    return t_resp
                self.assertIn(r.status, (200, 503), r)
            time.sleep(0.05)
        return None

    def test_lease_survives_failover(self):
        et = self.ET_MS / 1000.0
        ttl = self.TTL
        c = self.new_cluster(election_timeout_ms=self.ET_MS, heartbeat_ms=60)
        c.start()
        c.wait_ready()
        leader = c.leader()
        self.assertIsNotNone(leader)
        follower = c.followers(leader)[0]
        t_grant = time.monotonic()
        b = follower.req("POST", "/v1/leases", {"ttl_ms": 5000})
        self.assertEqual(b.status, 201, b)
        lid = b.json()["id"]
        leader.kill9()
        new = c.leader(timeout=slow(10.0), exclude=(leader,))
        self.assertIsNotNone(new, "no new leader")
        self.assertLess(time.monotonic() - t_grant, ttl - 0.5,
                        "the election took too long to check the lease before its ttl")
        for n in c.running():
            r = n.req("GET", "/v1/leases/" + lid)
            if time.monotonic() < t_grant + ttl:
                self.assertEqual(r.status, 200, "lease lost in the failover: %r" % (r,))
                self.assertLessEqual(r.json()["remaining_ms"], 5000)
        t_keep = time.monotonic()
        k = new.req("POST", "/v1/leases/%s/keepalive" % lid)
        t_keep_ack = time.monotonic()
        self.assertEqual(k.status, 200, "keepalive after the failover: %r" % (k,))
        self.assertEqual(k.json(), {"id": lid, "ttl_ms": 5000})
        # A second leader change after the keepalive does not shorten the lease.
        leader.start()
        c.wait_ready(timeout=slow(10.0))
        t_kill2 = time.monotonic()
        new.kill9()
        self.assertIsNotNone(c.leader(timeout=slow(10.0)), "no leader after the second kill")
        # Without keepalives it expires, never before ttl after the keepalive, and the leader
        # change keeps it alive at most one election timeout longer.
        limit = t_keep_ack + ttl + et + 0.5 * SLOW
        first_404 = self.poll_expiry(c, lid, t_keep + ttl, limit + slow(3.0))
        self.assertIsNotNone(first_404, "lease still alive %.1f s after its last keepalive"
                             % (time.monotonic() - t_keep))
        self.assertLessEqual(first_404, limit, "a leader change kept the lease alive %.3f s "
                             "past ttl + one election timeout" % (first_404 - limit + 0.5 * SLOW))
        print("\nlease: expired %.3f s after the keepalive (ttl 5 s, second leader change "
              "%.3f s after it)" % (first_404 - t_keep, t_kill2 - t_keep), file=sys.stderr)
        self.assertError(leader.req("POST", "/v1/leases/%s/keepalive" % lid), 404,
                         "lease_not_found")
        new.start()
        c.wait_ready(timeout=slow(10.0))
        for n in c.nodes:
            self.assertError(n.req("GET", "/v1/leases/" + lid), 404, "lease_not_found")

    # The new leader's clock must continue from the last command plus the time since, not
    # from the last timestamp in the log: an idle spell before a leader change must not be
    # added to every lease.
    def test_expiry_bound_after_idle_failover(self):
        et = self.ET_MS / 1000.0
        ttl = self.TTL
        idle = 2.0
        c = self.new_cluster(election_timeout_ms=self.ET_MS, heartbeat_ms=60)
        c.start()
        c.wait_ready()
        leader = c.leader()
        self.assertIsNotNone(leader)
        t_send = time.monotonic()
        b = leader.req("POST", "/v1/leases", {"ttl_ms": 5000})
        t_ack = time.monotonic()
        self.assertEqual(b.status, 201, b)
        lid = b.json()["id"]
        time.sleep(idle)  # nothing is written meanwhile
        leader.kill9()
        self.assertIsNotNone(c.leader(timeout=slow(10.0), exclude=(leader,)))
        limit = t_ack + ttl + et + 0.5 * SLOW
        first_404 = self.poll_expiry(c, lid, t_send + ttl, limit + idle + 2 * et + slow(3.0))
        self.assertIsNotNone(first_404, "lease never expired")
        print("\nlease: after %.1f s idle and a leader change, expired %.3f s after its grant "
              "(ttl %.1f s, election timeout %.1f s)" % (idle, first_404 - t_ack, ttl, et),
              file=sys.stderr)
        self.assertLessEqual(first_404, limit,
                             "a leader change kept the lease alive %.3f s past ttl + one election "
                             "timeout" % (first_404 - limit + 0.5 * SLOW))


# ---- no quorum ----

class TestQuorumLoss(ClusterTest):

    def test_minority_answers_no_leader_then_recovers(self):
        c = self.new_cluster(election_timeout_ms=600, heartbeat_ms=60)
        c.start()
        c.wait_ready()
        for i in range(5):
            self.assertEqual(c.nodes[i % 3].req("POST", "/v1/counters/q", {"add": 1}).status, 200)
        last = c.nodes[2]

        def has_all():
            r = last.req("GET", "/v1/counters/q?consistency=stale")
            return r.status == 200 and r.json()["value"] == 5
        self.assertTrue(wait_until(has_all, slow(5.0)), "the survivor never applied all writes")
        for n in c.nodes[:2]:
            self.assertEqual(n.stop(), 0)
        # The survivor forgets any leader (a leader without a quorum steps down).
        self.assertTrue(wait_until(lambda: not last.ready(), slow(10.0)),
                        "/readyz stays 200 without a quorum")
        t0 = time.monotonic()
        r = last.req("POST", "/v1/counters/q", {"add": 1},
                     headers=[("Idempotency-Key", "q-1")], timeout=slow(20.0))
        dt = time.monotonic() - t0
        self.assertEqual(r.status, 503, r)
        code = self.assertError(r, 503, error_of(r).get("code"))["code"]
        self.assertEqual(code, "no_leader", r)
        self.assertTrue((r.header("Retry-After") or "").isdigit(), r)
        self.assertRaftIndex(r)
        self.assertLess(dt, slow(5.0) + 2.0, "no_leader took %.1f s" % dt)
        r = last.req("GET", "/v1/counters/q", timeout=slow(20.0))
        self.assertError(r, 503, "no_leader")
        self.assertTrue((r.header("Retry-After") or "").isdigit(), r)
        # A stale read is still served from the node's own state.
        r = last.req("GET", "/v1/counters/q?consistency=stale")
        self.assertEqual((r.status, r.json()["value"]), (200, 5))
        c.start(c.nodes[:2])
        c.wait_ready(timeout=slow(15.0))
        # The write that was refused is retried with its key: applied exactly once.
        r = last.req("POST", "/v1/counters/q", {"add": 1}, headers=[("Idempotency-Key", "q-1")])
        self.assertEqual((r.status, r.json()["value"]), (200, 6))
        r = c.nodes[0].req("POST", "/v1/counters/q", {"add": 1},
                           headers=[("Idempotency-Key", "q-1")])
        self.assertEqual((r.status, r.json()["value"]), (200, 6))
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/q").json()["value"], 6)


# ---- snapshots ----

def parse_segment(path):
    """Record boundaries of a WAL segment: [(offset, total length, kind, body)], reading the
    header fields only (the file is assumed well formed up to the first all-zero header)."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    if data[:8] != b"GWRAFTWL":
        raise AssertionError("%s: bad segment magic" % path)
    off = 32
    while off + 16 <= len(data):
        crc, blen, kind = struct.unpack_from("<IIB", data, off)
        if crc == 0 and blen == 0 and kind == 0:
            break
        total = 16 + blen
        total += (-total) % 8
        if off + total > len(data) or kind not in (1, 2, 3, 4):
            break
        out.append((off, total, kind, data[off + 16:off + 16 + blen]))
        off += total
    return out


def last_entry_index(node):
    last = 0
    for seg in node.segments():
        for _off, _total, kind, body in parse_segment(seg):
            if kind == 1:
                last = struct.unpack_from("<QQ", body)[1]
    return last


def snap_index(path):
    return int(os.path.basename(path).split("-")[0], 16)


class TestSnapshotCatchUp(ClusterTest):

    def test_restarted_follower_catches_up_by_snapshot(self):
        c = self.new_cluster(snapshot_every=50)
        c.start()
        c.wait_ready()
        leader = c.leader()
        self.assertIsNotNone(leader)
        f = c.followers(leader)[0]
        live = [n for n in c.nodes if n is not f]
        first = leader.req("POST", "/v1/counters/snap", {"add": 1},
                           headers=[("Idempotency-Key", "snap-first")])
        self.assertEqual(first.status, 200, first)
        for i in range(9):
            self.assertEqual(live[i % 2].req("POST", "/v1/counters/snap", {"add": 1}).status, 200)
        held = leader.req("POST", "/v1/locks/snap-lock", {"owner": "keeper", "ttl_ms": 3600000})
        self.assertEqual(held.status, 200, held)
        held = held.json()
        freed = leader.req("POST", "/v1/locks/snap-free", {"owner": "gone", "ttl_ms": 5000})
        self.assertEqual(freed.status, 200, freed)
        freed = freed.json()
        self.assertEqual(leader.req("DELETE", "/v1/locks/snap-free?token=%d"
                                    % freed["token"]).status, 204)
        self.assertEqual(f.stop(), 0, "SIGTERM exit code")
        f_last = last_entry_index(f)
        self.assertGreater(f_last, 0)
        n_writes = 400
        errors = []

        def writer(k):
            conn_nodes = live
            for i in range(k, n_writes, 4):
                r = conn_nodes[i % 2].req("POST", "/v1/counters/snap", {"add": 1},
                                          headers=[("Idempotency-Key", "s-%d" % i)])
                if r.status != 200:
                    errors.append(r)
        ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(slow(60.0))
        self.assertEqual(errors, [])
        final = 10 + n_writes
        self.assertEqual(leader.req("GET", "/v1/counters/snap").json()["value"], final)
        snaps = leader.snapshots()
        self.assertTrue(snaps, "no snapshot file in the leader's data dir: %s"
                        % os.listdir(leader.data_dir))
        # The leader's snapshot lies far beyond what the follower holds, so the entries it
        # misses are compacted away and only a snapshot can bring it up to date.
        self.assertGreater(snap_index(snaps[-1]), f_last + 100)
        t0 = time.monotonic()
        f.start()

        def caught_up():
            r = f.req("GET", "/v1/counters/snap?consistency=stale",
                      headers=[("Gateway-Forwarded-By", "t")])
            return r.status == 200 and r.json()["value"] == final
        self.assertTrue(wait_until(caught_up, slow(8.0)), "restarted follower did not catch up")
        print("\nsnapshot catch-up: %.3f s after the restart" % (time.monotonic() - t0),
              file=sys.stderr)
        self.assertTrue(wait_until(lambda: f.snapshots(), slow(5.0)),
                        "no snapshot file on the follower")
        self.assertGreater(snap_index(f.snapshots()[-1]), f_last)
        # Caught up by the snapshot, not entry by entry: the entries right after the ones it
        # had were never written to its log.
        have = set()
        for seg in f.segments():
            for _off, _total, kind, body in parse_segment(seg):
                if kind == 1:
                    have.add(struct.unpack_from("<QQ", body)[1])
        self.assertFalse(have & set(range(f_last + 1, f_last + 50)),
                         "the follower replayed entries after %d one by one" % f_last)
        # It works as a member again: writes through it, reads through it.
        self.assertEqual(f.req("POST", "/v1/counters/snap", {"add": 1}).json()["value"],
                         final + 1)
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/snap").json()["value"], final + 1)
        # After a restart of the whole cluster, the state comes back from snapshot + log.
        for n in c.nodes:
            self.assertEqual(n.stop(), 0)
        c.start()
        c.wait_ready()
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/snap").json()["value"], final + 1)
            # The idempotency record, the lock and its lease come back from the snapshot.
            again = n.req("POST", "/v1/counters/snap", {"add": 1},
                          headers=[("Idempotency-Key", "snap-first")])
            self.assertEqual((again.status, again.json()), (200, first.json()))
            g = n.req("GET", "/v1/locks/snap-lock")
            self.assertEqual(g.status, 200, g)
            self.assertEqual((g.json()["owner"], g.json()["token"]), ("keeper", held["token"]))
            self.assertEqual(n.req("GET", "/v1/leases/" + held["lease_id"]).status, 200)
        self.assertEqual(f.req("GET", "/v1/counters/snap").json()["value"], final + 1)
        self.assertEqual(f.req("DELETE", "/v1/locks/snap-lock?token=%d"
                               % held["token"]).status, 204)
        nxt = f.req("POST", "/v1/locks/snap-lock", {"owner": "next", "ttl_ms": 5000})
        self.assertEqual(nxt.status, 200, nxt)
        self.assertGreater(nxt.json()["token"], held["token"])
        # A lock that was free when the snapshot was taken keeps its fencing sequence too.
        nxt = f.req("POST", "/v1/locks/snap-free", {"owner": "next", "ttl_ms": 5000})
        self.assertEqual(nxt.status, 200, nxt)
        self.assertGreater(nxt.json()["token"], freed["token"])


# ---- the write-ahead log on disk ----

class TestWalRecovery(ClusterTest):

    def converge(self, c, node, name, value):
        def ok():
            try:
                r = node.req("GET", "/v1/counters/%s?consistency=stale" % name,
                             headers=[("Gateway-Forwarded-By", "t")])
            except OSError:
                return False
            return r.status == 200 and r.json()["value"] == value
        return wait_until(ok, slow(8.0))

    def restart_repaired(self, c, f):
        """Starts f after a damaged tail; it must say that it cut the tail and rejoin."""
        before = len(f.log())
        f.start()
        c.wait_ready(timeout=slow(10.0))
        self.assertRegex(f.log()[before:], r"(?i)torn", "no note of the repaired tail")

    def write_some(self, c, name, k):
        v = None
        nodes = c.running()
        client = RetryingClient(nodes, slow(20.0))
        for i in range(k):
            key = "%s-%d-%d" % (name, time.monotonic_ns(), i)
            r, _ = client.call("POST", "/v1/counters/" + name, {"add": 1}, key=key, start=i)
            self.assertEqual(r.status, 200, r)
            v = r.json()["value"]
        return v

    def test_torn_tail_recovers_and_middle_corruption_refuses(self):
        c = self.new_cluster()
        c.start()
        c.wait_ready()
        leader = c.leader()
        self.assertIsNotNone(leader)
        f = c.followers(leader)[0]
        v = self.write_some(c, "wal", 30)
        self.assertTrue(self.converge(c, f, "wal", v))

        # 1. The last record cut in the middle (file truncated a few bytes into it).
        self.assertEqual(f.stop(), 0)
        seg = f.segments()[-1]
        recs = parse_segment(seg)
        self.assertGreater(len(recs), 5)
        off, total, _kind, _body = recs[-1]
        cut = off + max(1, total // 2)
        with open(seg, "r+b") as fh:
            fh.truncate(cut)
        self.restart_repaired(c, f)
        v = self.write_some(c, "wal", 10)
        self.assertTrue(self.converge(c, f, "wal", v), "node with a torn tail did not rejoin")
        self.assertEqual(f.req("GET", "/v1/counters/wal").json()["value"], v)

        # 2. Garbage appended after the last record.
        self.assertEqual(f.stop(), 0)
        seg = f.segments()[-1]
        recs = parse_segment(seg)
        end = recs[-1][0] + recs[-1][1]
        with open(seg, "r+b") as fh:
            fh.seek(end)
            fh.write(b"\xde\xad\xbe\xef\x01\x02\x03\x04\x05\x06\x07")
        self.restart_repaired(c, f)
        v = self.write_some(c, "wal", 10)
        self.assertTrue(self.converge(c, f, "wal", v), "node with a garbage tail did not rejoin")

        # 3. The last record's last bytes overwritten (a torn write inside the record).
        self.assertEqual(f.stop(), 0)
        seg = f.segments()[-1]
        recs = parse_segment(seg)
        off, total, _kind, _body = recs[-1]
        with open(seg, "r+b") as fh:
            fh.seek(off + total - 3)
            fh.write(b"\x55\xaa\x55")
        self.restart_repaired(c, f)
        v = self.write_some(c, "wal", 10)
        self.assertTrue(self.converge(c, f, "wal", v))

        # 4. A flipped byte in an older record, valid records after it: refuse to start.
        self.assertEqual(f.stop(), 0)
        seg = f.segments()[-1]
        recs = parse_segment(seg)
        entries = [r for r in recs if r[2] == 1]
        self.assertGreater(len(entries), 10)
        off, total, _kind, body = entries[len(entries) // 2]
        pos = off + 16 + 16 + max(0, (len(body) - 16) // 2)  # inside the payload
        with open(seg, "r+b") as fh:
            fh.seek(pos)
            orig = fh.read(1)
            fh.seek(pos)
            fh.write(bytes([orig[0] ^ 0x40]))
        size_before = os.path.getsize(seg)
        rc, out = f.run_to_exit(timeout=slow(15.0))
        self.assertIsNotNone(rc, "node with a corrupt log did not exit")
        self.assertNotEqual(rc, 0, "node with a corrupt log exited 0")
        self.assertIn(os.path.basename(seg), out, "message does not name the file: %s" % out)
        self.assertRegex(out, r"(?i)corrupt", "no clear message: %s" % out)
        self.assertEqual(os.path.getsize(seg), size_before, "refusal changed the segment")
        # The refusal left the disk alone: with the byte restored, the node starts and rejoins.
        with open(seg, "r+b") as fh:
            fh.seek(pos)
            fh.write(orig)
        f.start()
        c.wait_ready(timeout=slow(10.0))
        v = self.write_some(c, "wal", 5)
        self.assertTrue(self.converge(c, f, "wal", v))
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/wal").json()["value"], v)


# ---- a full disk ----

SEGMENT_BYTES = 64 << 20  # the log's preallocated segment size (raft/storage/README.md)


def try_mount_tmpfs(path, size):
    """Mounts a tmpfs of `size` at path; returns None or the reason it cannot."""
    if os.geteuid() != 0:
        return "not root"
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", path],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "mount failed: %s" % e
    if p.returncode != 0:
        return "mount not permitted: %s" % p.stderr.decode(errors="replace").strip()
    return None


def umount(path):
    for _ in range(20):
        p = subprocess.run(["umount", path], capture_output=True, timeout=10)
        if p.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=10)


def fill(path):
    """Writes a file until the file system is full; returns its path."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 20
        while size >= 1:
            try:
                os.write(fd, b"\xff" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return filler


class TestFullDisk(ClusterTest):

    def mount_for(self, c, node, size):
        os.makedirs(node.data_dir, exist_ok=True)
        why = try_mount_tmpfs(node.data_dir, size)
        if why:
            self.skipTest("cannot mount a tmpfs for the data dir (%s)" % why)
        # Unmounted after the cluster's processes are gone.
        c.on_close(lambda: umount(node.data_dir))

    def test_disk_too_small_for_the_log(self):
        """A 2 MiB disk cannot hold one preallocated segment: the node either refuses to start
        with a clear message or runs and refuses writes with 507; it never acknowledges one."""
        c = self.new_cluster(n=1, clustered=False)
        n = c.nodes[0]
        self.mount_for(c, n, 2 << 20)
        n.start(wait=False)

        def settled():
            return (not n.alive()) or n.healthy()
        try:
            wait_until(settled, slow(15.0))
        except RuntimeError:
            pass  # exited meanwhile
        if not n.alive():
            rc = n.stop()
            self.assertNotEqual(rc, 0, "exited 0 without a usable log")
            self.assertRegex(n.log(), r"(?i)no space left|disk.?full", n.tail())
            return
        r = n.req("POST", "/v1/counters/tiny", {"add": 1}, timeout=slow(15.0))
        self.assertNotEqual(r.status, 200, "a write was acknowledged without a log: %r" % (r,))
        if r.status == 507:
            self.assertError(r, 507, "disk_full")
        else:
            self.assertError(r, 503, "no_leader")

    def test_full_disk_refuses_writes_and_loses_nothing(self):
        c = self.new_cluster(snapshot_every=50)
        n3 = c.nodes[2]
        # Room for one preallocated segment and a little more.
        self.mount_for(c, n3, SEGMENT_BYTES + (2 << 20))
        c.start()
        c.wait_ready()
        acked = 0
        refused = 0
        key_seq = [0]

        def inc(node):
            """One increment through node: 'ok', 'full' (507), or fails the test."""
            nonlocal acked, refused
            key_seq[0] += 1
            # A 503 (no leader yet, outcome unknown) is retried with the same key.
            r, _ = RetryingClient([node], slow(20.0)).call(
                "POST", "/v1/counters/disk", {"add": 1}, key="d-%d" % key_seq[0])
            if r.status == 200:
                acked += 1
                self.assertEqual(r.json()["value"], acked, "counter skipped or lost a write")
                return "ok"
            if r.status == 507:
                err = self.assertError(r, 507, "disk_full")
                self.assertRegex(err["message"], r"(?i)disk")
                refused += 1
                return "full"
            self.fail("unexpected answer through %s: %r" % (node.id, r))

        for i in range(20):
            self.assertEqual(inc(c.nodes[i % 3]), "ok")
        filler = fill(n3.data_dir)

        # Phase 1: the disk is full while the node runs. Through the other nodes writes go on
        # while the node on the full disk follows; if it leads, it refuses them with 507.
        leader = c.leader()
        self.assertIsNotNone(leader)
        outcomes = [inc(c.nodes[i % 3]) for i in range(60)]
        if leader is not n3:
            self.assertEqual(outcomes[0::3], ["ok"] * 20)
            self.assertEqual(outcomes[1::3], ["ok"] * 20)

        # Phase 2: the node misses enough entries that it can only catch up by a snapshot,
        # which it has no room to write: it must refuse writes rather than acknowledge them.
        self.assertEqual(n3.stop(), 0)
        self.assertIsNotNone(c.leader(timeout=slow(10.0)), "no leader without the full node")
        for i in range(150):
            self.assertEqual(inc(c.nodes[i % 2]), "ok")
        n3.start()
        self.assertTrue(wait_until(lambda: inc(n3) == "full", slow(10.0), 0.1),
                        "a node that cannot write its snapshot never answered 507: %s"
                        % n3.tail())
        for i in range(10):
            self.assertEqual(inc(c.nodes[i % 2]), "ok", "the other nodes stopped working")

        # Space comes back: the node works again, and nothing was lost.
        os.unlink(filler)

        def works():
            return inc(n3) == "ok"
        self.assertTrue(wait_until(works, slow(10.0), 0.2),
                        "node did not recover after space was freed: %s" % n3.tail())
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/disk").json()["value"], acked)

        def conv():
            r = n3.req("GET", "/v1/counters/disk?consistency=stale",
                       headers=[("Gateway-Forwarded-By", "t")])
            return r.status == 200 and r.json()["value"] == acked
        self.assertTrue(wait_until(conv, slow(10.0)))
        self.assertGreater(refused, 0)
        # A restart of the whole cluster keeps every acknowledged increment.
        for n in c.nodes:
            n.stop()
        c.start()
        c.wait_ready()
        for n in c.nodes:
            self.assertEqual(n.req("GET", "/v1/counters/disk").json()["value"], acked)
        print("\nfull disk: %d writes acknowledged, %d refused with 507" % (acked, refused),
              file=sys.stderr)


# ---- a single-node raft backend ----

class TestSingleNode(ClusterTest):

    def test_writes_survive_restarts(self):
        c = self.new_cluster(n=1, clustered=False)
        n = c.nodes[0]
        c.start()
        c.wait_ready()
        self.assertTrue(n.is_leader())
        for i in range(25):
            r = n.req("POST", "/v1/counters/single", {"add": 2})
            self.assertEqual(r.status, 200, r)
        lease = n.req("POST", "/v1/leases", {"ttl_ms": 600000}).json()["id"]
        lk = n.req("POST", "/v1/locks/single", {"owner": "o", "lease_id": lease}).json()
        self.assertEqual(n.req("PUT", "/v1/counters/single2", {"value": 77}).status, 200)
        self.assertEqual(n.stop(), 0)
        self.assertTrue(n.segments(), "no WAL segment in %s" % n.data_dir)
        n.start()
        c.wait_ready()
        self.assertEqual(n.req("GET", "/v1/counters/single").json()["value"], 50)
        self.assertEqual(n.req("GET", "/v1/counters/single2").json()["value"], 77)
        g = n.req("GET", "/v1/locks/single")
        self.assertEqual(g.status, 200, g)
        self.assertEqual((g.json()["owner"], g.json()["token"]), ("o", lk["token"]))
        self.assertEqual(n.req("GET", "/v1/leases/" + lease).status, 200)
        # kill -9 keeps every acknowledged write too.
        for i in range(10):
            self.assertEqual(n.req("POST", "/v1/counters/single", {"add": 1}).status, 200)
        n.kill9()
        n.start()
        c.wait_ready()
        self.assertEqual(n.req("GET", "/v1/counters/single").json()["value"], 60)
        # Fencing tokens keep increasing across restarts.
        self.assertEqual(n.req("DELETE", "/v1/locks/single?token=%d" % lk["token"]).status, 204)
        lk2 = n.req("POST", "/v1/locks/single", {"owner": "p", "ttl_ms": 5000}).json()
        self.assertGreater(lk2["token"], lk["token"])


if __name__ == "__main__":
    harness.main()
