"""Shared harness for the integration tests: real processes on loopback.

Starts `gateway -c CONFIG` and `gw-upstream` as child processes on free ports, waits for
readiness (the gateway's /healthz on api_listen, the upstream's /__control/stats), keeps
each process's stderr in a temp file, and kills everything at the end. Every wait is
bounded. The binaries come from the environment: GW_BIN (gateway) and GW_UPSTREAM.
"""

import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

GW_BIN = os.environ.get("GW_BIN", "")
UP_BIN = os.environ.get("GW_UPSTREAM", "")

# Sanitizer builds are several times slower; waits scale with this factor.
SLOW = float(os.environ.get("GW_TEST_SLOW", "1"))
START_TIMEOUT_S = 15.0 * SLOW
# Set by ctest in the ASan/UBSan build (GW_SANITIZE=ON).
SANITIZED = os.environ.get("GW_SANITIZED", "0") == "1"


def require_binaries():
    missing = [n for n, p in (("GW_BIN", GW_BIN), ("GW_UPSTREAM", UP_BIN))
               if not p or not os.access(p, os.X_OK)]
    if missing:
        print("integration: set %s to built binaries" % " and ".join(missing), file=sys.stderr)
        sys.exit(2)


def raise_nofile(want):
    """Raises RLIMIT_NOFILE (soft) to at least `want` if the hard limit allows; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer")

_used_ports = set()


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port():
    """A loopback TCP port that nothing listens on now and that this process has not handed out.

    Ports come from below the kernel's ephemeral range, so the outgoing connections of a
    concurrent test (1,000 clients) cannot take a port between this check and the bind."""
    lo, _ = _ephemeral_range()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        if lo > 12000:
            port = rng.randrange(10000, lo - 1)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
        if port in _used_ports:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port")


def wait_until(pred, timeout_s, interval_s=0.05):
    """Polls pred() until it returns a true value or timeout_s passes; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval_s)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # list of (name, value) in received order
        self.body = body

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body.decode("utf-8", "surrogateescape"))

    def __repr__(self):
        return "Response(%d, %r, %r)" % (self.status, self.headers, self.body[:300])


def request(port, method, target, headers=None, body=None, timeout=10.0, host="127.0.0.1"):
    """One request on a fresh connection; returns a Response. Raises on transport errors."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        return request_on(conn, method, target, headers, body)
    finally:
        conn.close()


def request_on(conn, method, target, headers=None, body=None):
    """One request on an existing http.client connection (keep-alive)."""
    conn.putrequest(method, target, skip_host=_has(headers, "host"),
                    skip_accept_encoding=True)
    for k, v in (headers or []):
        conn.putheader(k, v)
    if body is not None and not _has(headers, "content-length") and \
            not _has(headers, "transfer-encoding"):
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    return Response(r.status, r.getheaders(), data)


def _has(headers, name):
    return any(k.lower() == name for k, _ in (headers or []))


def raw_exchange(port, data, timeout=5.0, shut_write=False):
    """Sends raw bytes and reads until the peer closes or `timeout`; returns (bytes, closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    closed = False
    try:
        try:
            s.sendall(data)
            if shut_write:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
            # A complete response with a body length is enough: stop waiting for the close.
            if _complete_response(out):
                break
    finally:
        s.close()
    return out, closed


def _complete_response(buf):
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return m is not None and len(rest) >= int(m.group(1))


def read_response_from(f):
    """Reads one response (Content-Length framed) from a buffered binary file; a Response."""
    line = f.readline(65536)
    m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
    if not m:
        raise ValueError("bad status line %r" % line)
    headers = []
    while True:
        h = f.readline(65536)
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    n = 0
    for k, v in headers:
        if k.lower() == "content-length":
            n = int(v)
    return Response(int(m.group(1)), headers, f.read(n) if n else b"")


def status_of(raw):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else None


class Proc:
    """A child process whose stderr goes to a file; stopped by stop() or kill()."""

    def __init__(self, argv, log_path, env=None):
        self.argv = argv
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                  stderr=self.log_file, env=env, start_new_session=True)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                self.p.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        """Waits up to timeout seconds; returns the exit code or None if still running."""
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=5.0):
        self.signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            self.kill()

    def kill(self):
        if self.alive():
            try:
                self.p.kill()
            except ProcessLookupError:
                pass
            self.p.wait(timeout=10)
        self.log_file.close()

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Upstream:
    """A gw-upstream process."""

    def __init__(self, workdir, name, port=None, threads=2):
        self.name = name
        self.port = port or free_port()
        self.workdir = workdir
        self.threads = threads
        self.proc = None
        self.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        log = os.path.join(self.workdir, "upstream-%s.log" % self.name)
        self.proc = Proc([UP_BIN, "--listen", "127.0.0.1:%d" % self.port, "--name", self.name,
                          "--threads", str(self.threads)], log)

        def ready():
            if not self.proc.alive():
                raise RuntimeError("gw-upstream %s exited: %s" % (self.name, self.proc.log()))
            try:
                return request(self.port, "GET", "/__control/stats", timeout=1).status == 200
            except OSError:
                return False
        if not wait_until(ready, START_TIMEOUT_S):
            raise RuntimeError("gw-upstream %s not ready: %s" % (self.name, self.proc.log()))

    def kill(self):
        if self.proc:
            self.proc.kill()

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc.kill()

    def fail(self, count, status, retry_after=None, delay_ms=0):
        body = {"count": count, "status": status, "delay_ms": delay_ms}
        if retry_after is not None:
            body["retry_after"] = retry_after
        r = request(self.port, "POST", "/__control/fail", body=json.dumps(body).encode())
        assert r.status == 200, r

    def stats(self):
        return request(self.port, "GET", "/__control/stats").json()

    def reset(self):
        assert request(self.port, "POST", "/__control/reset").status == 200


def route(name, prefix, targets, methods=None, host=None, strip=False, balance=None,
          timeout_ms=None, connect_timeout_ms=None, policies=None):
    """A route object as in API.md section 2; targets are Upstream objects or URLs."""
    match = {"path_prefix": prefix}
    if methods is not None:
        match["methods"] = methods
    if host is not None:
        match["host"] = host
    up = {"targets": [t.url if isinstance(t, Upstream) else t for t in targets],
          "strip_prefix": strip}
    if balance is not None:
        up["balance"] = balance
    if timeout_ms is not None:
        up["timeout_ms"] = timeout_ms
    if connect_timeout_ms is not None:
        up["connect_timeout_ms"] = connect_timeout_ms
    r = {"name": name, "match": match, "upstream": up}
    if policies is not None:
        r["policies"] = policies
    return r


class Gateway:
    """A gateway process with a generated config in workdir."""

    def __init__(self, workdir, routes, node=None, start=True, extra=None):
        self.workdir = workdir
        self.port = free_port()
        self.api_port = free_port()
        self.node = {"id": "n1", "listen": "127.0.0.1:%d" % self.port,
                     "api_listen": "127.0.0.1:%d" % self.api_port,
                     "data_dir": os.path.join(workdir, "data"),
                     "shutdown_grace_ms": 5000}
        self.node.update(node or {})
        self.config = {"node": self.node, "routes": routes}
        self.config.update(extra or {})
        self.config_path = os.path.join(workdir, "gateway.json")
        self.write_config(self.config)
        self.proc = None
        if start:
            self.start()

    def write_config(self, cfg_or_text):
        text = cfg_or_text if isinstance(cfg_or_text, str) else json.dumps(cfg_or_text, indent=2)
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def start(self):
        log = os.path.join(self.workdir, "gateway.log")
        self.proc = Proc([GW_BIN, "-c", self.config_path], log)
        try:
            ready = wait_until(self.healthy, START_TIMEOUT_S, 0.05)
        except Exception:
            self.proc.kill()
            raise
        if not ready:
            self.proc.kill()
            raise RuntimeError("gateway not ready on %d: %s" % (self.api_port, self.proc.log()))

    def healthy(self):
        if not self.proc.alive():
            raise RuntimeError("gateway exited with %s: %s" % (self.proc.p.returncode,
                                                               self.proc.log()[-4000:]))
        try:
            return request(self.api_port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def get(self, target, headers=None, timeout=10.0):
        return request(self.port, "GET", target, headers=headers, timeout=timeout)

    def req(self, method, target, headers=None, body=None, timeout=10.0):
        return request(self.port, method, target, headers=headers, body=body, timeout=timeout)

    def log(self):
        return self.proc.log() if self.proc else ""

    def log_lines(self):
        """The gateway's stderr parsed as JSON objects (lines that do not parse are skipped)."""
        out = []
        for line in self.log().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def access_logs(self):
        return [o for o in self.log_lines() if isinstance(o, dict) and o.get("type") == "access"]

    def stop(self):
        if self.proc:
            self.proc.stop(timeout=10)
            self.proc.kill()


class Case(unittest.TestCase):
    """Base class: a temp dir per test class; every process started through it is killed."""

    @classmethod
    def setUpClass(cls):
        cls.workdir = tempfile.mkdtemp(prefix="gw-it-%s-" % cls.__name__)
        cls._procs = []
        try:
            cls.start_class()
        except Exception:
            cls._cleanup()
            raise

    @classmethod
    def start_class(cls):
        pass

    @classmethod
    def tearDownClass(cls):
        cls._cleanup()

    @classmethod
    def _cleanup(cls):
        for p in reversed(cls._procs):
            try:
                p.stop()
            except Exception:
                pass
        # A sanitizer report in any process (gateway or upstream) fails the class.
        reports = []
        for p in cls._procs:
            text = p.proc.log() if p.proc else ""
            for marker in SANITIZER_MARKERS:
                i = text.find(marker)
                if i >= 0:
                    reports.append("%s: %s" % (p.proc.log_path, text[max(0, i - 200):i + 3000]))
                    break
        keep = os.environ.get("GW_KEEP_LOGS") or reports
        if keep:
            print("logs kept in", cls.workdir, file=sys.stderr)
        else:
            shutil.rmtree(cls.workdir, ignore_errors=True)
        if reports:
            raise AssertionError("sanitizer report:\n" + "\n".join(reports))

    @classmethod
    def upstream(cls, name, **kw):
        u = Upstream(cls.workdir, name, **kw)
        cls._procs.append(u)
        return u

    @classmethod
    def gateway(cls, routes, node=None, start=True, extra=None, subdir=None):
        wd = cls.workdir
        if subdir:
            wd = os.path.join(cls.workdir, subdir)
            os.makedirs(wd, exist_ok=True)
        g = Gateway(wd, routes, node=node, start=start, extra=extra)
        cls._procs.append(g)
        return g

    def assertErrorBody(self, r, status, code):
        """The gateway's own error: status, JSON content type, {"error": {"code", "message"}}."""
        self.assertEqual(r.status, status, r)
        ctype = (r.header("Content-Type") or "").split(";")[0].strip().lower()
        self.assertEqual(ctype, "application/json", r)
        body = r.json()
        self.assertIsInstance(body, dict, r)
        self.assertEqual(list(body.keys()), ["error"], r)
        err = body["error"]
        self.assertIsInstance(err, dict, r)
        self.assertEqual(err.get("code"), code, r)
        self.assertIsInstance(err.get("message"), str, r)
        self.assertTrue(err["message"], r)


def main():
    """Runs the tests in __main__ with a summary; exits non-zero on any failure."""
    require_binaries()
    prog = unittest.TestProgram(module="__main__", exit=False, verbosity=2,
                                argv=[sys.argv[0]] + sys.argv[1:])
    res = prog.result
    name = os.path.basename(sys.argv[0])
    print("%s: %d run, %d failures, %d errors, %d skipped, %d expected failures, "
          "%d unexpected successes" % (name, res.testsRun, len(res.failures), len(res.errors),
                                       len(res.skipped), len(res.expectedFailures),
                                       len(res.unexpectedSuccesses)))
    sys.exit(0 if res.wasSuccessful() else 1)
