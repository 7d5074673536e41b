"""Harness for the Raft cluster tests: N real gateway processes on loopback.

Each node gets free ports (data plane, control plane, raft), its own data_dir and config file
under one temp dir, and its stderr in its own log file. Nodes can be started, stopped (SIGTERM),
killed (SIGKILL) and restarted on the same ports and data dir. Every wait is bounded and scaled
by GW_TEST_SLOW. The leader is found by asking each node a linearizable read with the header
`Gateway-Forwarded-By`: such a request is never forwarded, so only the leader answers it 200.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SLOW, free_port, request, wait_until  # noqa: E402,F401

GW_BIN = harness.GW_BIN
START_TIMEOUT_S = 15.0 * SLOW
# A leader must be known within this after every node is up (a few election timeouts).
ELECTION_WAIT_S = 15.0 * SLOW


def slow(seconds):
    """A duration scaled for slow (sanitizer) builds."""
    return seconds * SLOW


def jbody(obj):
    return None if obj is None else json.dumps(obj).encode()


class Node:
    """One gateway process of a cluster; its ports and data dir survive restarts."""

    def __init__(self, cluster, node_id):
        self.cluster = cluster
        self.id = node_id
        self.port = free_port()
        self.api_port = free_port()
        self.raft_port = free_port()
        self.dir = os.path.join(cluster.workdir, node_id)
        os.makedirs(self.dir, exist_ok=True)
        self.data_dir = os.path.join(self.dir, "data")
        self.config_path = os.path.join(self.dir, "gateway.json")
        self.log_path = os.path.join(self.dir, "gateway.log")
        self.proc = None
        self.starts = 0
        self.exit_codes = []

    def new_ports(self):
        self.port = free_port()
        self.api_port = free_port()
        self.raft_port = free_port()

    # ---- configuration ----

    def peer(self):
        return {"id": self.id, "raft": "127.0.0.1:%d" % self.raft_port,
                "api": "127.0.0.1:%d" % self.api_port}

    def config(self):
        c = self.cluster
        cfg = {
            "node": {"id": self.id, "listen": "127.0.0.1:%d" % self.port,
                     "api_listen": "127.0.0.1:%d" % self.api_port,
                     "data_dir": self.data_dir, "shutdown_grace_ms": 2000},
            "backend": {"type": "raft"},
            "routes": [],
        }
        if c.clustered:
            cfg["cluster"] = {
                "raft_listen": "127.0.0.1:%d" % self.raft_port,
                "peers": [n.peer() for n in c.nodes],
                "election_timeout_ms": c.election_timeout_ms,
                "heartbeat_ms": c.heartbeat_ms,
                "snapshot_every": c.snapshot_every,
            }
        return cfg

    def write_config(self):
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.config(), f, indent=2)
        os.replace(tmp, self.config_path)

    # ---- process control ----

    def start(self, wait=True):
        """Starts the process (not if it runs); with wait, until /healthz answers 200."""
        if self.alive():
            return
        self.write_config()
        with open(self.log_path, "ab") as f:
            f.write(("---- start %d at %.3f ----\n" % (self.starts + 1, time.time())).encode())
        self.proc = harness.Proc([GW_BIN, "-c", self.config_path], self.log_path)
        self.starts += 1
        if wait:
            if not wait_until(self.healthy, START_TIMEOUT_S, 0.05):
                raise RuntimeError("node %s not serving /healthz: %s" % (self.id, self.tail()))

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def healthy(self):
        if not self.alive():
            raise RuntimeError("node %s exited with %s: %s" % (
                self.id, self.proc.p.returncode if self.proc else None, self.tail()))
        try:
            return request(self.api_port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def ready(self):
        """True when /readyz answers 200 (a leader is known); never raises."""
        if not self.alive():
            return False
        try:
            return request(self.api_port, "GET", "/readyz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self, timeout=None):
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.alive():
            self.proc.signal(signal.SIGTERM)
            if self.proc.wait(timeout or slow(10.0)) is None:
                self.proc.kill()
        self.proc.kill()  # reaps and closes the log file
        rc = self.proc.p.returncode
        self.exit_codes.append(rc)
        return rc

    def kill9(self):
        """SIGKILL: no chance to flush anything."""
        if self.proc is None:
            return None
        if self.proc.alive():
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc.kill()
        rc = self.proc.p.returncode
        self.exit_codes.append(rc)
        return rc

    def run_to_exit(self, timeout=None):
        """Starts the node expecting it to exit on its own; returns (exit code, log of that run)."""
        self.write_config()
        before = len(self.log())
        self.proc = harness.Proc([GW_BIN, "-c", self.config_path], self.log_path)
        self.starts += 1
        rc = self.proc.wait(timeout or START_TIMEOUT_S)
        if rc is None:
            self.proc.kill()
            rc = None
        else:
            self.proc.kill()
        return rc, self.log()[before:]

    # ---- logs and files ----

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n=3000):
        return self.log()[-n:]

    def files(self, suffix):
        try:
            names = os.listdir(self.data_dir)
        except OSError:
            return []
        return sorted(os.path.join(self.data_dir, x) for x in names if x.endswith(suffix))

    def segments(self):
        return self.files(".wal")

    def snapshots(self):
        return self.files(".snap")

    # ---- requests ----

    def req(self, method, path, body=None, headers=None, timeout=None):
        """A control-plane request (a JSON body unless bytes); raises on transport errors."""
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = jbody(body)
        hs = list(headers or [])
        if body is not None and not any(k.lower() == "content-type" for k, _ in hs):
            hs.append(("Content-Type", "application/json"))
        return request(self.api_port, method, path, headers=hs, body=body,
                       timeout=timeout or slow(10.0))

    def is_leader(self):
        """True when this node answers a linearizable read itself (the leader)."""
        if not self.alive():
            return False
        try:
            r = request(self.api_port, "GET", "/v1/counters/leader-probe",
                        headers=[("Gateway-Forwarded-By", "probe")], timeout=slow(2.0))
            return r.status == 200
        except OSError:
            return False

    def __repr__(self):
        return "Node(%s api=%d raft=%d)" % (self.id, self.api_port, self.raft_port)


class Cluster:
    """N nodes sharing one temp dir. Use as a context manager or call close()."""

    def __init__(self, n=3, election_timeout_ms=600, heartbeat_ms=60, snapshot_every=10000,
                 clustered=True, prefix="gw-cluster-"):
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.election_timeout_ms = election_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.snapshot_every = snapshot_every
        self.clustered = clustered
        self.nodes = [Node(self, "n%d" % (i + 1)) for i in range(n)]
        self._cleanups = []
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def node(self, node_id):
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def on_close(self, fn):
        """Runs fn() at close, before the temp dir is removed (last registered runs first)."""
        self._cleanups.append(fn)

    def start(self, nodes=None):
        """Starts the given nodes (default all) without waiting, then waits for /healthz on each.

        The first start of the whole cluster is retried on fresh ports when a port was taken
        meanwhile by another process (nothing is on disk yet, so nothing is lost)."""
        first = nodes is None and all(n.starts == 0 for n in self.nodes)
        nodes = self.nodes if nodes is None else nodes
        for attempt in range(3):
            for n in nodes:
                n.start(wait=False)
            try:
                for n in nodes:
                    if not wait_until(n.healthy, START_TIMEOUT_S, 0.05):
                        raise RuntimeError("node %s not serving /healthz: %s" % (n.id, n.tail()))
                return
            except RuntimeError as e:
                if not (first and "Address already in use" in str(e)) or attempt == 2:
                    raise
                for n in nodes:
                    n.stop(timeout=slow(5.0))
                    n.new_ports()
                    shutil.rmtree(n.data_dir, ignore_errors=True)

    def running(self):
        return [n for n in self.nodes if n.alive()]

    def wait_ready(self, nodes=None, timeout=None):
        """Waits until /readyz is 200 on every given (default: running) node."""
        nodes = self.running() if nodes is None else nodes
        ok = wait_until(lambda: all(n.ready() for n in nodes), timeout or ELECTION_WAIT_S, 0.05)
        if not ok:
            raise AssertionError("not ready: %s" % ", ".join(
                "%s=%s" % (n.id, n.ready()) for n in nodes))

    def leader(self, timeout=None, exclude=()):
        """The running node that leads now (waiting up to timeout), or None."""
        found = []

        def probe():
            ls = [n for n in self.running() if n not in exclude and n.is_leader()]
            if len(ls) == 1:
                found[:] = ls
                return True
            return False
        if wait_until(probe, timeout or ELECTION_WAIT_S, 0.05):
            return found[0]
        return None

    def followers(self, leader):
        return [n for n in self.running() if n is not leader]

    def close(self):
        if self.closed:
            return
        self.closed = True
        for n in self.nodes:
            try:
                n.stop(timeout=slow(5.0))
            except Exception:
                pass
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # cleanup must go on
                print("cleanup failed: %r" % (e,), file=sys.stderr)
        reports = self.sanitizer_reports()
        if os.environ.get("GW_KEEP_LOGS") or reports or getattr(self, "keep", False):
            print("cluster logs kept in", self.workdir, file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if reports:
            raise AssertionError("sanitizer report:\n" + "\n".join(reports))

    def sanitizer_reports(self):
        out = []
        for n in self.nodes:
            text = n.log()
            for marker in harness.SANITIZER_MARKERS:
                i = text.find(marker)
                if i >= 0:
                    out.append("%s: %s" % (n.log_path, text[max(0, i - 200):i + 3000]))
                    break
        return out


class RetryingClient:
    """Writes with an Idempotency-Key through a list of nodes, retrying the same key on
    503 (no_leader / outcome_unknown / overloaded) and transport errors until a deadline."""

    RETRYABLE = ("no_leader", "outcome_unknown", "overloaded", "shutting_down")

    def __init__(self, nodes, deadline_s):
        self.nodes = nodes
        self.deadline_s = deadline_s
        self.lock = threading.Lock()

    def call(self, method, path, body=None, key=None, start=0, timeout=None):
        """Returns (response, attempts). Raises TimeoutError when no final answer came in time."""
        deadline = time.monotonic() + self.deadline_s
        i = start
        attempts = 0
        last = None
        while time.monotonic() < deadline:
            node = self.nodes[i % len(self.nodes)]
            i += 1
            attempts += 1
            hs = [("Idempotency-Key", key)] if key else []
            try:
                r = node.req(method, path, body=body, headers=hs, timeout=timeout or slow(8.0))
            except OSError as e:
                last = e
                time.sleep(0.02)
                continue
            if r.status == 503:
                last = r
                try:
                    code = r.json()["error"]["code"]
                except Exception:
                    code = None
                if code in self.RETRYABLE:
                    time.sleep(0.05)
                    continue
            return r, attempts
        raise TimeoutError("no final answer for %s %s (key %s) in %.1fs; last: %r" % (
            method, path, key, self.deadline_s, last))
