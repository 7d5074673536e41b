#!/usr/bin/env python3
"""The admin API on a 3-node Raft cluster (backend raft, API.md section 5), real processes.

A route PUT or DELETE through a follower is replicated: every node shows the same route table
version and route, and every node's proxy serves (or stops serving) it. /admin/cluster and
/readyz on the leader and the followers. A fourth node (cluster.join) is added while client
threads write counters through the other nodes with Idempotency-Keys (retrying 503s): no
acknowledged write is lost or applied twice, the new member becomes a voter, serves reads and
the routes, takes the leadership by transfer, and is removed while it leads (it hands over
first) with the writes still succeeding.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import free_port, route, wait_until  # noqa: E402
from test_admin import parse_exposition, sample  # noqa: E402

SLOW = harness.SLOW
TOKEN = "cluster-admin-token-5Kp"
ELECTION_MS = 600 if SLOW <= 1 else 1500
HEARTBEAT_MS = ELECTION_MS // 10


def slow(s):
    return s * SLOW


def auth():
    return [("Authorization", "Bearer " + TOKEN)]


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


class Node:
    """One gateway process of the cluster, with its own ports, data dir and log."""

    def __init__(self, workdir, node_id):
        self.id = node_id
        self.port = free_port()
        self.api_port = free_port()
        self.raft_port = free_port()
        self.dir = os.path.join(workdir, node_id)
        os.makedirs(self.dir, exist_ok=True)
        self.config_path = os.path.join(self.dir, "gateway.json")
        self.log_path = os.path.join(self.dir, "gateway.log")
        self.proc = None

    def peer(self):
        return {"id": self.id, "raft": "127.0.0.1:%d" % self.raft_port,
                "api": "127.0.0.1:%d" % self.api_port}

    def write_config(self, peers, routes, join=False, snapshot_every=None):
        cluster = {"raft_listen": "127.0.0.1:%d" % self.raft_port, "peers": peers,
                   "election_timeout_ms": ELECTION_MS, "heartbeat_ms": HEARTBEAT_MS}
        if snapshot_every:
            cluster["snapshot_every"] = snapshot_every
        if join:
            cluster["join"] = True
        cfg = {"node": {"id": self.id, "listen": "127.0.0.1:%d" % self.port,
                        "api_listen": "127.0.0.1:%d" % self.api_port,
                        "data_dir": os.path.join(self.dir, "data"), "shutdown_grace_ms": 2000},
               "admin": {"token": TOKEN},
               "backend": {"type": "raft"},
               "cluster": cluster,
               "routes": routes}
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=2)

    def start(self):
        self.proc = harness.Proc([harness.GW_BIN, "-c", self.config_path], self.log_path)

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def healthy(self):
        if not self.alive():
            raise RuntimeError("node %s exited: %s" % (self.id, self.tail()))
        try:
            return harness.request(self.api_port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self):
        if self.proc:
            self.proc.stop(timeout=slow(10.0))
            self.proc.kill()

    def tail(self, n=3000):
        return self.proc.log()[-n:] if self.proc else ""

    def api(self, method, path, body=None, token=True, timeout=None, headers=None):
        hs = list(headers or [])
        if token:
            hs += auth()
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hs.append(("Content-Type", "application/json"))
        return harness.request(self.api_port, method, path, headers=hs, body=data,
                               timeout=timeout or slow(10.0))

    def proxy(self, path, timeout=None):
        return harness.request(self.port, "GET", path, timeout=timeout or slow(10.0))

    def status(self):
        r = self.api("GET", "/admin/cluster")
        assert r.status == 200, r
        return r.json()

    def ready(self):
        try:
            return self.alive() and \
                harness.request(self.api_port, "GET", "/readyz", timeout=1).status == 200
        except OSError:
            return False

    def __repr__(self):
        return "Node(%s)" % self.id


class ClusterCase(unittest.TestCase):
    """A 3-node cluster and one upstream, per test class."""

    SNAPSHOT_EVERY = None

    @classmethod
    def setUpClass(cls):
        harness.require_binaries()
        cls.workdir = tempfile.mkdtemp(prefix="gw-it-%s-" % cls.__name__)
        cls.nodes = []
        cls.extra = []
        cls.up = None
        try:
            cls.up = harness.Upstream(cls.workdir, "up", threads=4)
            cls.routes = [route("echo", "/echo", [cls.up])]
            cls.nodes = [Node(cls.workdir, "n%d" % i) for i in (1, 2, 3)]
            peers = [n.peer() for n in cls.nodes]
            for n in cls.nodes:
                n.write_config(peers, cls.routes, snapshot_every=cls.SNAPSHOT_EVERY)
                n.start()
            for n in cls.nodes:
                if not wait_until(n.healthy, harness.START_TIMEOUT_S):
                    raise RuntimeError("node %s not healthy: %s" % (n.id, n.tail()))
            if not wait_until(lambda: all(n.ready() for n in cls.nodes), slow(20.0), 0.05):
                raise RuntimeError("no leader: %s" % [n.tail(500) for n in cls.nodes])
        except Exception:
            cls.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.cleanup()

    @classmethod
    def cleanup(cls):
        for n in list(cls.extra) + list(cls.nodes):
            try:
                n.stop()
            except Exception:
                pass
        if cls.up:
            cls.up.stop()
        reports = []
        for n in list(cls.extra) + list(cls.nodes):
            text = n.proc.log() if n.proc else ""
            for marker in harness.SANITIZER_MARKERS:
                i = text.find(marker)
                if i >= 0:
                    reports.append("%s: %s" % (n.log_path, text[max(0, i - 200):i + 3000]))
                    break
        if os.environ.get("GW_KEEP_LOGS") or reports:
            print("logs kept in", cls.workdir, file=sys.stderr)
        else:
            shutil.rmtree(cls.workdir, ignore_errors=True)
        if reports:
            raise AssertionError("sanitizer report:\n" + "\n".join(reports))

    # -- helpers --

    def running(self):
        return [n for n in self.nodes + self.extra if n.alive()]

    def agreed_leader(self, nodes=None, timeout=None):
        """The leader id every given node reports, once they agree (else fails)."""
        nodes = nodes or self.running()
        seen = {}

        def agree():
            ids = set()
            for n in nodes:
                try:
                    ids.add(n.status().get("leader"))
                except (OSError, AssertionError):
                    return False
            seen["ids"] = ids
            return len(ids) == 1 and None not in ids
        ok = wait_until(agree, timeout or slow(15.0), 0.05)
        self.assertTrue(ok, "nodes do not agree on a leader: %s" % seen.get("ids"))
        return next(iter(seen["ids"]))

    def node(self, node_id):
        for n in self.nodes + self.extra:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def followers(self):
        leader = self.agreed_leader()
        return [n for n in self.running() if n.id != leader]

    def wait_routes(self, nodes, version, timeout=None):
        """Waits until every node's /admin/routes has this version; returns the documents."""
        docs = {}

        def check():
            for n in nodes:
                r = n.api("GET", "/admin/routes")
                if r.status != 200:
                    return False
                docs[n.id] = r.json()
            return all(d["version"] == version for d in docs.values())
        ok = wait_until(check, timeout or slow(10.0), 0.05)
        self.assertTrue(ok, "route table versions: %s (want %d)" %
                        ({k: v["version"] for k, v in docs.items()}, version))
        return docs

    def wait_proxy(self, node, path, pred, timeout=None):
        """Polls node's proxy until pred(response) (each node applies the table on its own
        schedule, and a worker takes up a new table on its next turn)."""
        last = {}

        def check():
            last["r"] = node.proxy(path)
            return pred(last["r"])
        ok = wait_until(check, timeout or slow(10.0), 0.05)
        self.assertTrue(ok, "%s %s: %r" % (node.id, path, last.get("r")))
        return last["r"]


class ReplicatedRoutesTest(ClusterCase):

    def test_cluster_status_everywhere(self):
        leader = self.agreed_leader()
        peers = {n.id: n.peer() for n in self.nodes}

        def caught_up():
            # a member can know the leader a moment before its first append lands
            ls = self.node(leader).status()
            return all(m["match_index"] >= 1 for m in ls["members"]) and \
                all(n.status()["commit_index"] >= 1 for n in self.nodes)
        self.assertTrue(wait_until(caught_up, slow(10.0)),
                        [n.status() for n in self.nodes])
        terms = set()
        for n in self.nodes:
            with self.subTest(node=n.id):
                st = n.status()
                self.assertEqual(st["node_id"], n.id)
                self.assertEqual(st["leader"], leader)
                for k in ("term", "commit_index", "applied_index"):
                    self.assertIsInstance(st[k], int, st)
                self.assertGreaterEqual(st["term"], 1)
                self.assertGreaterEqual(st["commit_index"], 1)
                terms.add(st["term"])
                ids = sorted(m["id"] for m in st["members"])
                self.assertEqual(ids, ["n1", "n2", "n3"], st)
                for m in st["members"]:
                    self.assertEqual((m["raft"], m["api"]),
                                     (peers[m["id"]]["raft"], peers[m["id"]]["api"]), st)
                    self.assertIsInstance(m["match_index"], int, st)
                    want = "leader" if m["id"] == leader else "follower"
                    self.assertEqual(m["role"], want, st)
                self.assertEqual(st.get("role"), "leader" if n.id == leader else "follower", st)
                self.assertEqual(harness.request(n.api_port, "GET", "/readyz").status, 200)
                r = n.api("GET", "/admin/cluster", token=False)
                self.assertEqual(r.status, 401, r)
                self.assertEqual(error_code(r), "unauthorized")
        self.assertEqual(len(terms), 1, terms)
        # the leader's view of the followers' progress
        ls = self.node(leader).status()
        for m in ls["members"]:
            self.assertGreaterEqual(m["match_index"], 1, ls)
        # a write is fsynced on the leader: the fsync and proposal histograms move
        ln = self.node(leader)

        def leader_metrics():
            r = harness.request(ln.api_port, "GET", "/metrics")
            self.assertEqual(r.status, 200)
            return parse_exposition(r.body.decode()), r.body
        m0, _ = leader_metrics()
        r = ln.api("POST", "/v1/counters/metrics-probe", body={"add": 1}, token=False)
        self.assertEqual(r.status, 200, r)
        m1, text = leader_metrics()
        self.assertGreater(sample(m1, "gateway_raft_fsync_seconds_count"),
                           sample(m0, "gateway_raft_fsync_seconds_count"))
        self.assertGreater(sample(m1, "gateway_raft_proposal_commit_seconds_count"),
                           sample(m0, "gateway_raft_proposal_commit_seconds_count"))
        self.assertGreater(sample(m1, "gateway_raft_proposals_total"),
                           sample(m0, "gateway_raft_proposals_total"))
        promtool = shutil.which("promtool")
        if promtool:
            p = subprocess.run([promtool, "check", "metrics"], input=text,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            self.assertEqual((p.returncode, p.stdout.decode().strip()), (0, ""))
        # metrics agree with the status
        for n in self.nodes:
            r = harness.request(n.api_port, "GET", "/metrics")
            self.assertEqual(r.status, 200)
            fams = parse_exposition(r.body.decode())
            self.assertEqual(sample(fams, "gateway_raft_is_leader"), 1 if n.id == leader else 0)
            self.assertEqual(sample(fams, "gateway_raft_leader", leader=leader), 1)
            self.assertIn(sample(fams, "gateway_raft_term"), terms)

    def test_route_put_and_delete_through_a_follower(self):
        f1, f2 = self.followers()[:2]
        v0 = f1.api("GET", "/admin/routes").json()["version"]
        obj = route("rep", "/rep", [self.up], strip=True, methods=["GET"])
        r = f1.api("PUT", "/admin/routes/rep", body=obj, timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["name"], "rep")
        self.assertGreater(body["version"], v0)
        docs = self.wait_routes(self.nodes, body["version"])
        for n in self.nodes:
            with self.subTest(node=n.id):
                got = n.api("GET", "/admin/routes/rep")
                self.assertEqual(got.status, 200, got)
                self.assertEqual(got.json(), obj)
                self.assertIn(obj, docs[n.id]["routes"])
                self.assertIn(self.routes[0], docs[n.id]["routes"])
                res = self.wait_proxy(n, "/rep/hello", lambda x: x.status == 200)
                self.assertEqual(res.header("Upstream-Name"), "up")
                self.assertEqual(res.json()["path"], "/hello")
        # a change through the other follower: strip_prefix off
        obj2 = dict(obj, upstream=dict(obj["upstream"], strip_prefix=False))
        r = f2.api("PUT", "/admin/routes/rep", body=obj2, timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)
        v2 = r.json()["version"]
        self.assertGreater(v2, body["version"])
        self.wait_routes(self.nodes, v2)
        for n in self.nodes:
            self.assertEqual(n.api("GET", "/admin/routes/rep").json(), obj2)
            self.wait_proxy(n, "/rep/hello",
                            lambda x: x.status == 200 and x.json()["path"] == "/rep/hello")
        # validation happens before anything is proposed
        bad = dict(obj2, upstream={"targets": ["nope"]})
        r = f1.api("PUT", "/admin/routes/rep", body=bad)
        self.assertEqual(r.status, 400, r)
        self.assertEqual(error_code(r), "invalid_config")
        self.assertEqual(r.json()["error"]["path"], "route.upstream.targets[0]")
        time.sleep(0.3)
        for n in self.nodes:
            d = n.api("GET", "/admin/routes").json()
            self.assertEqual(d["version"], v2)
        # the token is needed on a follower too, and nothing is forwarded without it
        r = f1.api("PUT", "/admin/routes/rep", body=obj, token=False)
        self.assertEqual(r.status, 401, r)
        # delete through a follower
        r = f2.api("DELETE", "/admin/routes/rep", timeout=slow(20.0))
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"")
        docs = self.wait_routes(self.nodes, v2 + 1)
        for n in self.nodes:
            with self.subTest(node=n.id):
                self.assertNotIn("rep", [x["name"] for x in docs[n.id]["routes"]])
                g = n.api("GET", "/admin/routes/rep")
                self.assertEqual((g.status, error_code(g)), (404, "route_not_found"), g)
                self.wait_proxy(n, "/rep/hello", lambda x: x.status == 404 and
                                error_code(x) == "route_not_found")
                self.assertEqual(n.proxy("/echo/still").status, 200)
        r = f1.api("DELETE", "/admin/routes/rep")
        self.assertEqual((r.status, error_code(r)), (404, "route_not_found"), r)

    def test_remove_member_with_a_long_id(self):
        f = self.followers()[0]
        r = f.api("DELETE", "/admin/cluster/members/" + "m" * 80, timeout=slow(20.0))
        self.assertIn(r.status, (400, 404), r)
        self.assertIn(error_code(r), ("invalid_field", "member_not_found"), r)

    def test_put_through_a_follower_reads_its_own_write(self):
        """After a PUT answered 200 {"version": v} by a follower, that follower's own
        /admin/routes shows version v or later."""
        f = self.followers()[0]
        behind = []
        for i in range(30):
            obj = route("ryw", "/ryw", [self.up], timeout_ms=1000 + i)
            r = f.api("PUT", "/admin/routes/ryw", body=obj, timeout=slow(20.0))
            self.assertEqual(r.status, 200, r)
            v = r.json()["version"]
            seen = f.api("GET", "/admin/routes").json()["version"]
            if seen < v:
                behind.append((v, seen))
            if i % 5 == 0:
                # a new route: its proxy serves it at once, and a delete stops it at once
                name = "new%d" % i
                r = f.api("PUT", "/admin/routes/" + name,
                          body=route(name, "/" + name, [self.up]), timeout=slow(20.0))
                self.assertEqual(r.status, 200, r)
                g = f.proxy("/%s/x" % name)
                if g.status != 200:
                    behind.append(("new route on the proxy", name, g.status))
                r = f.api("DELETE", "/admin/routes/" + name, timeout=slow(20.0))
                self.assertEqual(r.status, 204, r)
                g = f.proxy("/%s/x" % name)
                if g.status != 404:
                    behind.append(("deleted route on the proxy", name, g.status))
        self.assertEqual(self.nodes[0].api("DELETE", "/admin/routes/ryw",
                                           timeout=slow(20.0)).status, 204)
        self.assertEqual(behind, [], "(answered version, version the same node then showed)")

    def test_route_versions_increase_through_every_node(self):
        last = self.nodes[0].api("GET", "/admin/routes").json()["version"]
        for i, n in enumerate(self.nodes):
            obj = route("ver", "/ver", [self.up], timeout_ms=1000 + i)
            r = n.api("PUT", "/admin/routes/ver", body=obj, timeout=slow(20.0))
            self.assertEqual(r.status, 200, r)
            v = r.json()["version"]
            self.assertGreater(v, last)
            last = v
        docs = self.wait_routes(self.nodes, last)
        for n in self.nodes:
            self.assertIn(route("ver", "/ver", [self.up], timeout_ms=1002), docs[n.id]["routes"])
        self.assertEqual(self.nodes[0].api("DELETE", "/admin/routes/ver",
                                           timeout=slow(20.0)).status, 204)

    def test_membership_errors(self):
        f = self.followers()[0]
        for body, field in (({}, "id"), ({"id": "n9"}, "raft"),
                            ({"id": "n9", "raft": "127.0.0.1:1"}, "api"),
                            ({"id": 5, "raft": "x", "api": "y"}, "id")):
            with self.subTest(body=body):
                r = f.api("POST", "/admin/cluster/members", body=body)
                self.assertEqual((r.status, error_code(r)), (400, "invalid_field"), r)
                self.assertEqual(r.json()["error"].get("field"), field, r)
        r = f.api("POST", "/admin/cluster/members", body=b"{")
        self.assertEqual((r.status, error_code(r)), (400, "invalid_json"), r)
        r = f.api("DELETE", "/admin/cluster/members/n9", timeout=slow(20.0))
        self.assertEqual((r.status, error_code(r)), (404, "member_not_found"), r)
        r = f.api("POST", "/admin/cluster/transfer", body={"to": "n9"}, timeout=slow(20.0))
        self.assertEqual((r.status, error_code(r)), (404, "member_not_found"), r)
        r = f.api("POST", "/admin/cluster/transfer", body={})
        self.assertEqual((r.status, error_code(r)), (400, "invalid_field"), r)
        leader = self.agreed_leader()
        r = f.api("POST", "/admin/cluster/transfer", body={"to": leader}, timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"leader": leader})
        self.assertEqual(sorted(m["id"] for m in f.status()["members"]), ["n1", "n2", "n3"])

    def test_sighup_and_restart_keep_the_replicated_routes(self):
        f = self.followers()[0]
        obj = route("kept", "/kept", [self.up])
        r = f.api("PUT", "/admin/routes/kept", body=obj, timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)
        v = r.json()["version"]
        self.wait_routes(self.nodes, v)
        # the follower's file now has other routes; SIGHUP keeps the cluster's table
        with open(f.config_path) as fh:
            cfg = json.load(fh)
        orig = json.dumps(cfg, indent=2)
        cfg["routes"] = [route("fileonly", "/fileonly", [self.up])]
        with open(f.config_path, "w") as fh:
            json.dump(cfg, fh, indent=2)
        try:
            f.proc.signal(signal.SIGHUP)
            self.assertTrue(wait_until(lambda: "config reloaded" in f.proc.log(), slow(5.0)),
                            f.tail())
            doc = f.api("GET", "/admin/routes").json()
            self.assertEqual(doc["version"], v, doc)
            names = sorted(x["name"] for x in doc["routes"])
            self.assertIn("kept", names)
            self.assertNotIn("fileonly", names)
            self.wait_proxy(f, "/kept/x", lambda x: x.status == 200)
            self.assertEqual(f.proxy("/fileonly/x").status, 404)
            # a restart with that file: still the cluster's table
            f.stop()
            f.start()
            self.assertTrue(wait_until(f.healthy, harness.START_TIMEOUT_S), f.tail())
            self.assertTrue(wait_until(f.ready, slow(15.0)), f.tail())
            docs = self.wait_routes([f], v, timeout=slow(15.0))
            self.assertNotIn("fileonly", [x["name"] for x in docs[f.id]["routes"]])
            self.wait_proxy(f, "/kept/x", lambda x: x.status == 200)
        finally:
            with open(f.config_path, "w") as fh:
                fh.write(orig)
            if not f.alive():
                f.start()
                wait_until(f.healthy, harness.START_TIMEOUT_S)
        self.assertEqual(self.nodes[0].api("DELETE", "/admin/routes/kept",
                                           timeout=slow(20.0)).status, 204)
        self.assertTrue(wait_until(lambda: all(n.ready() for n in self.nodes), slow(15.0)))

    def test_transfer_between_the_three(self):
        leader = self.agreed_leader()
        target = next(n for n in self.nodes if n.id != leader)
        via = next(n for n in self.nodes if n.id not in (leader, target.id))
        r = via.api("POST", "/admin/cluster/transfer", body={"to": target.id},
                    timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"leader": target.id})
        self.assertEqual(self.agreed_leader(), target.id)
        self.assertTrue(wait_until(lambda: all(n.ready() for n in self.nodes), slow(10.0)))
        # writes work under the new leader
        r = via.api("POST", "/v1/counters/after-transfer", body={"add": 1}, token=False,
                    timeout=slow(20.0))
        self.assertEqual(r.status, 200, r)


class Writers:
    """Client threads that add 1 to their own counter through the given nodes, each write
    with its own Idempotency-Key, retrying the same key on 503 and transport errors."""

    RETRYABLE = ("no_leader", "outcome_unknown", "overloaded", "shutting_down")

    def __init__(self, nodes, threads=3, prefix="c", op_deadline_s=None):
        self.nodes = list(nodes)
        self.prefix = prefix
        self.op_deadline_s = op_deadline_s or slow(30.0)
        self.stop_ev = threading.Event()
        self.acked = [0] * threads
        self.failed = []  # (thread, key, last answer) of writes that never got a final answer
        self.wrong = []  # unexpected final answers
        self.retries = [0] * threads
        self.max_latency = [0.0] * threads
        self.lock = threading.Lock()
        self.ts = [threading.Thread(target=self.run, args=(i,), daemon=True)
                   for i in range(threads)]

    def start(self):
        for t in self.ts:
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.ts:
            t.join(self.op_deadline_s + slow(10.0))
        return not any(t.is_alive() for t in self.ts)

    def total(self):
        return sum(self.acked)

    def run(self, i):
        seq = 0
        k = i
        while not self.stop_ev.is_set():
            seq += 1
            key = "%s%d-%d" % (self.prefix, i, seq)
            t0 = time.monotonic()
            deadline = t0 + self.op_deadline_s
            last = None
            done = False
            while time.monotonic() < deadline:
                node = self.nodes[k % len(self.nodes)]
                k += 1
                try:
                    r = node.api("POST", "/v1/counters/%s%d" % (self.prefix, i), body={"add": 1},
                                 token=False,
                                 headers=[("Idempotency-Key", key)], timeout=slow(10.0))
                except OSError as e:
                    last = repr(e)
                    self.retries[i] += 1
                    time.sleep(0.02)
                    continue
                if r.status == 503 and error_code(r) in self.RETRYABLE:
                    last = r
                    self.retries[i] += 1
                    time.sleep(0.05)
                    continue
                if r.status == 200:
                    self.acked[i] += 1
                    v = r.json().get("value")
                    if v != self.acked[i]:
                        self.wrong.append((i, key, "value %r after %d acks" % (v, self.acked[i])))
                else:
                    self.wrong.append((i, key, repr(r)))
                done = True
                break
            self.max_latency[i] = max(self.max_latency[i], time.monotonic() - t0)
            if not done:
                self.failed.append((i, key, repr(last)))
                return
            time.sleep(0.005)


class MembershipTest(ClusterCase):
    # Small, so the log is compacted before the new member joins: it gets a snapshot, which
    # must carry the member table, the route table and the counters.
    SNAPSHOT_EVERY = 50

    def test_1_add_transfer_remove_while_writing(self):
        base = list(self.nodes)
        n4 = Node(self.workdir, "n4")
        self.extra.append(n4)
        # its file names a route of its own: the cluster's table must win
        n4.write_config([n.peer() for n in base] + [n4.peer()],
                        [route("n4only", "/n4only", [self.up])], join=True,
                        snapshot_every=self.SNAPSHOT_EVERY)
        writers = Writers(base, threads=3)
        writers.start()
        stopped = False
        try:
            # enough writes that every node has taken a snapshot and compacted its log
            def snapshotted():
                for n in base:
                    text = harness.request(n.api_port, "GET", "/metrics").body.decode()
                    if sample(parse_exposition(text), "gateway_raft_snapshots_total") < 1:
                        return False
                return True
            self.assertTrue(wait_until(snapshotted, slow(30.0), 0.2),
                            "no snapshots after %d writes" % writers.total())
            n4.start()
            self.assertTrue(wait_until(n4.healthy, harness.START_TIMEOUT_S), n4.tail())
            # before it is added it knows no leader
            r = harness.request(n4.api_port, "GET", "/readyz")
            self.assertEqual((r.status, error_code(r)), (503, "no_leader"), r)
            leader = self.agreed_leader(base)
            via = next(n for n in base if n.id != leader)
            before = writers.total()
            r = via.api("POST", "/admin/cluster/members", body=n4.peer(), timeout=slow(70.0))
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json(), {"id": "n4", "role": "voter"})
            self.assertGreater(writers.total(), before, "writes stalled while adding n4")
            # every node lists n4 as a voting member
            for n in base + [n4]:
                with self.subTest(node=n.id):
                    ok = wait_until(lambda: "n4" in [m["id"] for m in n.status()["members"]],
                                    slow(10.0))
                    self.assertTrue(ok, n.status())
                    st = n.status()
                    m4 = next(m for m in st["members"] if m["id"] == "n4")
                    self.assertEqual((m4["raft"], m4["api"]),
                                     (n4.peer()["raft"], n4.peer()["api"]), st)
                    self.assertIn(m4["role"], ("follower", "leader"), st)
            self.assertTrue(wait_until(n4.ready, slow(10.0)), "n4 never ready")
            self.assertEqual(self.agreed_leader(base + [n4]), leader)
            # it serves reads (linearizable) and the replicated routes
            for i in range(3):
                floor = writers.acked[i]
                r = n4.api("GET", "/v1/counters/c%d" % i, token=False)
                self.assertEqual(r.status, 200, r)
                self.assertGreaterEqual(r.json()["value"], floor, r)
            v = self.nodes[0].api("GET", "/admin/routes").json()["version"]
            docs = self.wait_routes([n4] + base, v)
            self.assertEqual(n4.api("GET", "/admin/routes/echo").json(), self.routes[0])
            for d in docs.values():
                self.assertNotIn("n4only", [x["name"] for x in d["routes"]], docs)
            self.wait_proxy(n4, "/echo/x", lambda x: x.status == 200)
            self.wait_proxy(n4, "/n4only/x", lambda x: x.status == 404)
            # a route change now reaches n4 too
            obj = route("late", "/late", [self.up])
            r = n4.api("PUT", "/admin/routes/late", body=obj, timeout=slow(20.0))
            self.assertEqual(r.status, 200, r)
            self.wait_routes(base + [n4], r.json()["version"])
            # leadership to n4, asked through another node
            r = via.api("POST", "/admin/cluster/transfer", body={"to": "n4"},
                        timeout=slow(20.0))
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json(), {"leader": "n4"})
            self.assertEqual(self.agreed_leader(base + [n4]), "n4")
            st4 = n4.status()
            self.assertEqual(st4.get("role"), "leader", st4)
            mark = writers.total()
            self.assertTrue(wait_until(lambda: writers.total() > mark + 5, slow(15.0)),
                            "no writes under n4's leadership")
            # remove n4 while it leads: it hands over first, then is removed
            r = base[0].api("DELETE", "/admin/cluster/members/n4", timeout=slow(30.0))
            self.assertEqual(r.status, 204, r)
            new_leader = self.agreed_leader(base)
            self.assertIn(new_leader, ("n1", "n2", "n3"))
            for n in base:
                with self.subTest(node=n.id):
                    ok = wait_until(lambda: "n4" not in [m["id"] for m in n.status()["members"]],
                                    slow(10.0))
                    self.assertTrue(ok, n.status())
            mark = writers.total()
            self.assertTrue(wait_until(lambda: writers.total() > mark + 5, slow(15.0)),
                            "no writes after n4 left")
            # the removed node, still running, does not disrupt the others (no new terms)
            term = max(n.status()["term"] for n in base)
            time.sleep(3 * ELECTION_MS / 1000.0)
            self.assertEqual(max(n.status()["term"] for n in base), term,
                             "a removed member raised the term")
            self.assertEqual(self.agreed_leader(base), new_leader)
            n4.stop()
            mark = writers.total()
            self.assertTrue(wait_until(lambda: writers.total() > mark + 5, slow(15.0)),
                            "no writes after n4 stopped")
            self.assertTrue(writers.stop(), "writer threads did not stop")
            stopped = True
        finally:
            if not stopped:
                writers.stop()
        self.assertEqual(writers.failed, [], "writes that never got a final answer")
        self.assertEqual(writers.wrong, [], "writes with a wrong answer")
        # no acknowledged write lost, none applied twice
        for i in range(3):
            r = base[i % 3].api("GET", "/v1/counters/c%d" % i, token=False)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["value"], writers.acked[i],
                             "counter c%d: %r, acknowledged %d" % (i, r.json(), writers.acked[i]))
        self.assertGreater(writers.total(), 30)
        print("writes: %d acknowledged, %d retries, slowest %.2fs" % (
            writers.total(), sum(writers.retries), max(writers.max_latency)), file=sys.stderr)

    def test_2_remove_the_current_leader(self):
        """Runs after the test above: n4 is gone, three voters remain."""
        leader = self.agreed_leader(self.nodes)
        ln = self.node(leader)
        writers = Writers(self.nodes, threads=2, prefix="d")
        writers.start()
        try:
            time.sleep(slow(0.3))
            r = ln.api("DELETE", "/admin/cluster/members/" + leader, timeout=slow(30.0))
            self.assertEqual(r.status, 204, r)
            rest = [n for n in self.nodes if n.id != leader]
            new_leader = self.agreed_leader(rest)
            self.assertNotEqual(new_leader, leader)
            for n in rest:
                ok = wait_until(lambda: leader not in [m["id"] for m in n.status()["members"]],
                                slow(10.0))
                self.assertTrue(ok, n.status())
            ln.stop()
            writers.nodes = rest
            mark = writers.total()
            self.assertTrue(wait_until(lambda: writers.total() > mark + 5, slow(15.0)),
                            "no writes on the two remaining voters")
            for n in rest:
                self.assertTrue(wait_until(n.ready, slow(10.0)))
        finally:
            self.assertTrue(writers.stop())
        self.assertEqual(writers.failed, [])
        self.assertEqual(writers.wrong, [])
        rest = [n for n in self.nodes if n.alive()]
        for i in range(2):
            r = rest[0].api("GET", "/v1/counters/d%d" % i, token=False)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["value"], writers.acked[i], r)
        # one of the two voters left: the other loses its leader and says so
        rest[1].stop()

        def no_leader():
            r = harness.request(rest[0].api_port, "GET", "/readyz", timeout=slow(2.0))
            return r.status == 503 and error_code(r) == "no_leader"
        self.assertTrue(wait_until(no_leader, slow(15.0)), rest[0].tail())
        st = rest[0].status()
        self.assertIsNone(st["leader"], st)
        # without a leader a route change is refused, and the local table still reads
        v = rest[0].api("GET", "/admin/routes").json()["version"]
        t0 = time.monotonic()
        r = rest[0].api("PUT", "/admin/routes/nl", body=route("nl", "/nl", [self.up]),
                        timeout=slow(30.0))
        self.assertEqual((r.status, error_code(r)), (503, "no_leader"), r)
        self.assertTrue((r.header("Retry-After") or "").isdigit(), r)
        self.assertLess(time.monotonic() - t0, slow(15.0))
        doc = rest[0].api("GET", "/admin/routes").json()
        self.assertEqual(doc["version"], v)
        self.assertNotIn("nl", [x["name"] for x in doc["routes"]])
        self.assertEqual(rest[0].proxy("/echo/x").status, 200)


if __name__ == "__main__":
    harness.main()
