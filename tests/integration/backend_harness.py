"""Harness for the backend tests: the policy backends (memory, raft, redis) as parameters.

- RedisServer: a private redis-server on a free loopback port (no persistence, noeviction),
  which can be killed and restarted on the same port; a tiny RESP client talks to it.
- BACKENDS: the backends the core policy suite runs against. Each entry says how to write the
  `backend` section, which `scope` the rate limiters use and what the backend needs (a Redis
  server, a leader). parametrize() turns one mixin of tests into one TestCase per backend.
- CLUSTER_BACKENDS: the backends whose `scope: cluster` limiters are one budget for the whole
  cluster; GatewayCluster starts N gateways sharing one of them in front of one upstream.

Adding a backend (for example raft with `scope: cluster` once the loader accepts it) is one
entry in BACKENDS or CLUSTER_BACKENDS. Every wait is bounded and scaled by GW_TEST_SLOW.
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import SLOW, free_port, request, wait_until  # noqa: E402,F401

START_TIMEOUT_S = 15.0 * SLOW


def slow(seconds):
    return seconds * SLOW


# ---- Redis ----------------------------------------------------------------------------------

def redis_server_binary():
    """The redis-server to run: $GW_REDIS_SERVER, else the one on PATH (or /usr/bin); None."""
    p = os.environ.get("GW_REDIS_SERVER")
    if p:
        return p if os.access(p, os.X_OK) else None
    p = shutil.which("redis-server")
    if p:
        return p
    for cand in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    return None


class RedisError(Exception):
    pass


def _resp_encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, int):
            a = str(a)
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _resp_read(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_resp_read(f) for _ in range(n)]
    raise RedisError("unexpected reply %r" % line)


def redis_command(port, *args, timeout=2.0):
    """One command on a fresh connection; returns the decoded reply. Raises OSError if down."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(_resp_encode(args))
        f = s.makefile("rb")
        try:
            return _resp_read(f)
        finally:
            f.close()
    finally:
        s.close()


class RedisServer:
    """A redis-server child on 127.0.0.1:port, no persistence; kill() and start() again on the
    same port model an outage and a restart that lost everything."""

    def __init__(self, workdir, name="redis", port=None):
        self.binary = redis_server_binary()
        if not self.binary:
            raise RuntimeError("redis-server not found (install it or set GW_REDIS_SERVER)")
        self.workdir = workdir
        self.name = name
        self.port = port or free_port()
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.log_path = os.path.join(self.dir, "redis.log")
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def argv(self):
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", self.dir, "--maxmemory-policy", "noeviction",
                "--protected-mode", "no", "--loglevel", "warning"]

    def start(self):
        if self.alive():
            return self
        with open(self.log_path, "ab") as f:
            f.write(("---- start %d at %.3f ----\n" % (self.starts + 1, time.time())).encode())
        self.proc = harness.Proc(self.argv(), self.log_path)
        self.starts += 1

        def ready():
            if not self.proc.alive():
                raise RuntimeError("redis-server exited: %s" % self.proc.log()[-2000:])
            return self.ping()
        if not wait_until(ready, START_TIMEOUT_S, 0.05):
            self.kill()
            raise RuntimeError("redis-server not answering on %d: %s" % (
                self.port, self.proc.log()[-2000:]))
        return self

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def ping(self):
        try:
            return redis_command(self.port, "PING", timeout=1.0) == "PONG"
        except (OSError, RedisError):
            return False

    def cmd(self, *args):
        return redis_command(self.port, *args)

    def keys(self, pattern="*"):
        return sorted(k.decode() for k in self.cmd("KEYS", pattern))

    def flushall(self):
        self.cmd("FLUSHALL")

    def kill(self):
        """SIGKILL, then reap: the port is free when this returns (bounded)."""
        if self.proc is None:
            return
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

    stop = kill

    def log(self):
        return self.proc.log() if self.proc else ""


class DelayProxy:
    """A TCP proxy on a free loopback port to 127.0.0.1:target_port that delivers what the
    client sends `delay_s` late (the replies come back at once): a slow link to Redis."""

    def __init__(self, target_port, delay_s):
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = free_port()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        self.conns = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                t = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                t.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, t]
            q = queue.Queue()
            threading.Thread(target=self._read_delayed, args=(c, t, q), daemon=True).start()
            threading.Thread(target=self._write_delayed, args=(t, c, q), daemon=True).start()
            threading.Thread(target=self._pump, args=(t, c), daemon=True).start()

    def _read_delayed(self, src, dst, q):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay_s, data))
            if not data:
                return

    def _write_delayed(self, dst, src, q):
        while True:
            due, data = q.get()
            left = due - time.monotonic()
            if left > 0:
                time.sleep(left)
            if not data:
                _close(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                _close(src)
                return

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                _close(src)
                return

    def close(self):
        self.closed = True
        _close(self.sock)
        with self.lock:
            for c in self.conns:
                _close(c)


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# ---- backends -------------------------------------------------------------------------------

class Backend:
    """How one backend is configured for the policy tests.

    type: the `backend.type`; limiter_scope: the `scope` given to token_bucket and
    sliding_window; needs_redis: a RedisServer is started for the test class; needs_leader: wait
    for /readyz (a Raft leader) before the first request. For the cluster suite:
    cluster_limits, `scope: cluster` is one budget for all nodes; cluster_idempotency, a record
    made on one node is seen by every node; leased, the cluster budget is spent from allotments
    each node holds (quota leasing): admitted counts are exact, but the RateLimit remaining a
    node reports is its own view (an upper bound), not one count over the cluster, and the units
    a node held when it died are lost for their lease."""

    def __init__(self, name, type, limiter_scope, needs_redis=False, needs_leader=False,
                 redis_timeout_ms=200, cluster_limits=False, cluster_idempotency=False,
                 leased=False):
        self.name = name
        self.type = type
        self.limiter_scope = limiter_scope
        self.needs_redis = needs_redis
        self.needs_leader = needs_leader
        self.redis_timeout_ms = redis_timeout_ms
        self.cluster_limits = cluster_limits
        self.cluster_idempotency = cluster_idempotency
        self.leased = leased

    def unavailable(self):
        """A reason this backend cannot run here, or None."""
        if self.needs_redis and not redis_server_binary():
            return ("redis-server is not installed (`make test` installs it; or set "
                    "GW_REDIS_SERVER)")
        return None

    def config(self, redis=None, url=None):
        """The `backend` section of a gateway config (url: another address for Redis)."""
        b = {"type": self.type}
        if self.type == "redis":
            if redis is None and url is None:
                raise ValueError("backend redis needs a RedisServer")
            b["redis"] = {"url": url or redis.url, "timeout_ms": self.redis_timeout_ms}
        return b

    def tb_lease_s(self, capacity, refill_per_sec):
        """How much later a drained token bucket refills than one exact bucket would: with
        leasing a granted token holds its place until its lease ends (backends/README.md:
        a quarter of the refill time, 20 ms to 1 s); 0 otherwise."""
        if not self.leased:
            return 0.0
        return min(1.0, max(0.02, capacity / refill_per_sec / 4.0))

    def shared_limits(self):
        return self.limiter_scope == "cluster"

    def __repr__(self):
        return "Backend(%s)" % self.name


# The store's timeout for the suites that do not test outages: generous, so that a loaded
# machine's scheduling delays do not turn into store errors (fail open or 503).
SUITE_REDIS_TIMEOUT_MS = int(2000 * SLOW)

# The core policy suite runs once per entry.
BACKENDS = [
    Backend("memory", "memory", "local"),
    Backend("redis", "redis", "cluster", needs_redis=True,
            redis_timeout_ms=SUITE_REDIS_TIMEOUT_MS),
    Backend("raft", "raft", "cluster", needs_leader=True, leased=True),
]

# The cluster suite (three gateways) runs its limit tests once per entry with cluster_limits
# and its idempotency tests once per entry with cluster_idempotency.
CLUSTER_BACKENDS = [
    Backend("redis", "redis", "cluster", needs_redis=True,
            redis_timeout_ms=SUITE_REDIS_TIMEOUT_MS, cluster_limits=True,
            cluster_idempotency=True),
    Backend("raft", "raft", "cluster", needs_leader=True, cluster_limits=True,
            cluster_idempotency=True, leased=True),
]


def class_name(prefix, backend):
    return "%s_%s" % (prefix, "".join(c if c.isalnum() else "_" for c in backend.name))


def parametrize(mixin, base, namespace, backends=None, prefix=None):
    """Defines in `namespace` one TestCase class per backend: mixin + base with BACKEND set.

    A backend that cannot run here is still defined, and every test of its class is skipped
    with the reason."""
    made = []
    for b in backends if backends is not None else BACKENDS:
        name = class_name(prefix or mixin.__name__, b)
        attrs = {"BACKEND": b, "__module__": namespace.get("__name__", "__main__")}
        reason = b.unavailable()
        cls = type(name, (mixin, base), attrs)
        if reason:
            cls = unittest.skip("backend %s: %s" % (b.name, reason))(cls)
        namespace[name] = cls
        made.append(cls)
    return made


class BackendCase(harness.Case):
    """A test class bound to self.BACKEND: one RedisServer for the class when the backend needs
    it (flushed before each test), and gateways started with the backend's config section."""

    BACKEND = None
    redis = None

    @classmethod
    def start_class(cls):
        if cls.BACKEND is not None and cls.BACKEND.needs_redis:
            r = RedisServer(cls.workdir, "redis")
            cls._procs.append(r)
            cls.redis = r.start()

    def setUp(self):
        super().setUp()
        if self.redis is not None:
            if not self.redis.alive():
                self.redis.start()
            self.redis.flushall()

    def backend_extra(self):
        return {"backend": self.BACKEND.config(self.redis)}

    def scope(self):
        return self.BACKEND.limiter_scope

    def start_gateway(self, routes, node=None, subdir=None):
        gw = self.gateway(routes, node=node, subdir=subdir or self._testMethodName,
                          extra=self.backend_extra())
        self.addCleanup(gw.stop)
        if self.BACKEND.needs_leader:
            ok = wait_until(lambda: _ready(gw.api_port), START_TIMEOUT_S, 0.05)
            if not ok:
                raise AssertionError("no leader on %d: %s" % (gw.api_port, gw.log()[-3000:]))
        return gw


def _ready(api_port):
    try:
        return request(api_port, "GET", "/readyz", timeout=1).status == 200
    except OSError:
        return False


# ---- several gateways sharing one backend ---------------------------------------------------

class GatewayNode:
    """One gateway process of a GatewayCluster; its ports survive restarts."""

    def __init__(self, cluster, node_id):
        self.cluster = cluster
        self.id = node_id
        self.port = free_port()
        self.api_port = free_port()
        self.raft_port = free_port()
        self.dir = os.path.join(cluster.workdir, node_id)
        os.makedirs(self.dir, exist_ok=True)
        self.config_path = os.path.join(self.dir, "gateway.json")
        self.log_path = os.path.join(self.dir, "gateway.log")
        self.proc = None
        self.redis_url = None  # set to reach Redis another way (a DelayProxy)

    def peer(self):
        return {"id": self.id, "raft": "127.0.0.1:%d" % self.raft_port,
                "api": "127.0.0.1:%d" % self.api_port}

    def config(self):
        c = self.cluster
        cfg = {"node": {"id": self.id, "listen": "127.0.0.1:%d" % self.port,
                        "api_listen": "127.0.0.1:%d" % self.api_port,
                        "data_dir": os.path.join(self.dir, "data"),
                        "shutdown_grace_ms": 2000},
               "backend": c.backend.config(c.redis, self.redis_url),
               "routes": c.routes}
        if c.backend.type == "raft":
            cfg["cluster"] = {"raft_listen": "127.0.0.1:%d" % self.raft_port,
                              "peers": [n.peer() for n in c.nodes],
                              "election_timeout_ms": 600, "heartbeat_ms": 60}
        return cfg

    def write_config(self):
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.config(), f, indent=2)
        os.replace(tmp, self.config_path)

    def start(self, wait=True):
        if self.alive():
            return
        self.write_config()
        self.proc = harness.Proc([harness.GW_BIN, "-c", self.config_path], self.log_path)
        if wait:
            self.wait_healthy()

    def wait_healthy(self):
        if not wait_until(self.healthy, START_TIMEOUT_S, 0.05):
            raise RuntimeError("gateway %s not serving /healthz: %s" % (self.id, self.tail()))

    def healthy(self):
        if not self.alive():
            raise RuntimeError("gateway %s exited with %s: %s" % (
                self.id, self.proc.p.returncode if self.proc else None, self.tail()))
        try:
            return request(self.api_port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def ready(self):
        return self.alive() and _ready(self.api_port)

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def kill9(self):
        if self.proc is None:
            return
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

    def stop(self):
        if self.proc is not None:
            self.proc.stop(timeout=slow(5.0))
            self.proc.kill()

    def req(self, method, target, headers=None, body=None, timeout=None):
        return request(self.port, method, target, headers=headers, body=body,
                       timeout=timeout or slow(10.0))

    def admin(self, method, path, timeout=None):
        return request(self.api_port, method, path, timeout=timeout or slow(10.0))

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n=3000):
        return self.log()[-n:]

    def __repr__(self):
        return "GatewayNode(%s port=%d)" % (self.id, self.port)


class GatewayCluster:
    """N gateways with the same routes and one shared backend (a RedisServer when the backend
    needs one, started here; or one Raft group). close() stops everything it started."""

    def __init__(self, backend, routes, n=3, prefix="gw-it-backend-"):
        self.backend = backend
        self.routes = routes
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.redis = None
        self.nodes = [GatewayNode(self, "n%d" % (i + 1)) for i in range(n)]
        self.closed = False

    def start(self):
        try:
            if self.backend.needs_redis:
                self.redis = RedisServer(self.workdir, "redis").start()
            for n in self.nodes:
                n.start(wait=False)
            for n in self.nodes:
                n.wait_healthy()
            if self.backend.needs_leader or self.backend.type == "raft":
                ok = wait_until(lambda: all(n.ready() for n in self.nodes), START_TIMEOUT_S, 0.05)
                if not ok:
                    raise RuntimeError("cluster not ready")
        except Exception:
            self.close()
            raise
        return self

    def running(self):
        return [n for n in self.nodes if n.alive()]

    def close(self):
        if self.closed:
            return
        self.closed = True
        for n in self.nodes:
            try:
                n.stop()
            except Exception:
                pass
        if self.redis is not None:
            try:
                self.redis.kill()
            except Exception:
                pass
        reports = []
        for n in self.nodes:
            text = n.log()
            for marker in harness.SANITIZER_MARKERS:
                i = text.find(marker)
                if i >= 0:
                    reports.append("%s: %s" % (n.log_path, text[max(0, i - 200):i + 3000]))
                    break
        if os.environ.get("GW_KEEP_LOGS") or reports:
            print("logs kept in", self.workdir, file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if reports:
            raise AssertionError("sanitizer report:\n" + "\n".join(reports))
