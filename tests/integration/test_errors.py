#!/usr/bin/env python3
"""The gateway's own errors (API.md section 3), connection limits and malformed requests."""

import os
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

MAX_BODY = 4096


class ErrorsTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.up = cls.upstream("e")
        cls.dead_port = harness.free_port()  # nothing listens here
        cls.gw = cls.gateway([
            route("ok", "/ok", [cls.up], strip=True, timeout_ms=5000),
            route("dead", "/dead", ["http://127.0.0.1:%d" % cls.dead_port],
                  connect_timeout_ms=1000, timeout_ms=3000),
            route("slowroute", "/slow", [cls.up], strip=True, timeout_ms=300),
        ], node={"max_body_bytes": MAX_BODY})

    def assertServing(self):
        r = self.gw.get("/ok/bench")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"ok\n")
        self.assertTrue(self.gw.proc.alive())

    # --- 404 -------------------------------------------------------------------------------

    def test_route_not_found(self):
        for m, p in [("GET", "/"), ("GET", "/nope"), ("POST", "/nope/deeper?x=1"),
                     ("DELETE", "/okay")]:
            with self.subTest(method=m, path=p):
                r = self.gw.req(m, p, body=b"" if m == "POST" else None)
                self.assertErrorBody(r, 404, "route_not_found")

    def test_route_not_found_for_head_has_no_body(self):
        r = self.gw.req("HEAD", "/nope")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.body, b"")

    # --- 413 -------------------------------------------------------------------------------

    def test_body_at_the_limit_is_accepted(self):
        r = self.gw.req("POST", "/ok/echo", body=b"y" * MAX_BODY)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["body_len"], MAX_BODY)

    def test_body_over_the_limit(self):
        before = self.up.stats()["received"]
        r = self.gw.req("POST", "/ok/echo", body=b"y" * (MAX_BODY + 1))
        self.assertErrorBody(r, 413, "body_too_large")
        r = self.gw.req("PUT", "/ok/echo", body=b"z" * (10 * MAX_BODY))
        self.assertErrorBody(r, 413, "body_too_large")
        self.assertEqual(self.up.stats()["received"], before)
        self.assertServing()

    def test_chunked_body_over_the_limit(self):
        chunk = b"c" * 1000
        enc = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
        r = self.gw.req("POST", "/ok/echo", headers=[("Transfer-Encoding", "chunked")],
                        body=enc)
        self.assertErrorBody(r, 413, "body_too_large")
        self.assertServing()

    def test_huge_declared_length_is_refused_early(self):
        # Content-Length far above the limit with no body sent: the answer must not wait for it.
        data = (b"POST /ok/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        t0 = time.monotonic()
        out, _ = harness.raw_exchange(self.gw.port, data, timeout=5)
        self.assertLess(time.monotonic() - t0, 4.0)
        self.assertEqual(harness.status_of(out), 413, out[:300])
        self.assertServing()

    def test_expect_100_continue_over_the_limit_is_refused_before_the_body(self):
        data = (b"POST /ok/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % (MAX_BODY * 4))
        out, _ = harness.raw_exchange(self.gw.port, data, timeout=5)
        self.assertEqual(harness.status_of(out), 413, out[:300])
        self.assertServing()

    # --- 502 / 504 -------------------------------------------------------------------------

    def test_upstream_unavailable(self):
        t0 = time.monotonic()
        r = self.gw.get("/dead/x")
        self.assertLess(time.monotonic() - t0, 2.5)
        self.assertErrorBody(r, 502, "upstream_unavailable")

    def test_upstream_timeout(self):
        t0 = time.monotonic()
        r = self.gw.get("/slow/delay/3000")
        took = time.monotonic() - t0
        self.assertErrorBody(r, 504, "upstream_timeout")
        self.assertGreaterEqual(took, 0.25)
        self.assertLess(took, 2.5)
        self.assertServing()

    def test_fast_enough_upstream_is_not_a_timeout(self):
        r = self.gw.get("/slow/delay/50")
        self.assertEqual(r.status, 200, r)

    def test_upstream_closing_without_reply_is_a_502(self):
        # Two closes: libcurl transparently retries once when a reused connection dies.
        self.up.fail(count=2, status=0)
        r = self.gw.get("/ok/echo/closed")
        self.up.reset()
        self.assertEqual(r.status, 502, r)
        self.assertEqual(r.header("Content-Type").split(";")[0], "application/json")
        self.assertIn("code", r.json()["error"])
        self.assertServing()

    def test_upstream_errors_are_not_rewritten(self):
        r = self.gw.get("/ok/status/502")
        self.assertEqual(r.status, 502)
        self.assertEqual(r.json(), {"upstream": "e", "status": 502})
        r = self.gw.get("/ok/status/504")
        self.assertEqual(r.status, 504)
        self.assertEqual(r.json(), {"upstream": "e", "status": 504})

    # --- malformed requests ----------------------------------------------------------------

    def check_malformed(self, data, name, also=()):
        out, closed = harness.raw_exchange(self.gw.port, data, timeout=3)
        st = harness.status_of(out)
        ok = (st is not None and (400 <= st < 500 or st in also)) or (st is None and closed)
        self.assertTrue(ok, "%s: got %r (closed=%s)" % (name, out[:200], closed))
        self.assertServing()

    def test_garbage_bytes(self):
        self.check_malformed(bytes(range(256)) * 4 + b"\r\n\r\n", "binary garbage")

    def test_bad_request_line(self):
        for name, data in [
            ("no target", b"GET\r\n\r\n"),
            ("no version", b"GET /ok/x\r\nHost: x\r\n\r\n\r\n"),
            ("bad version", b"GET /ok/x HTTP/9.9\r\nHost: x\r\n\r\n"),
            ("spaces", b"G E T /ok/x HTTP/1.1\r\nHost: x\r\n\r\n"),
        ]:
            with self.subTest(case=name):
                # 505 is the precise answer to an unsupported version (RFC 9110 section 15.6.6).
                self.check_malformed(data, name, also=(505,))

    # known gap: libmicrohttpd 0.9.75 ends the target at the NUL and the gateway proxies
    # "/ok/" with 200; the request line is not visible to the gateway to reject it.
    @unittest.expectedFailure
    def test_nul_in_target(self):
        # A NUL byte is not allowed in a request target (RFC 9112 section 3.2); forwarding a
        # target cut short at the NUL would route and proxy a different request.
        self.check_malformed(b"GET /ok/\x00x HTTP/1.1\r\nHost: x\r\n\r\n", "nul in target")

    def test_bad_headers(self):
        for name, data in [
            ("no colon", b"GET /ok/x HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
            ("bad content-length",
             b"POST /ok/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
            ("two content-lengths",
             b"POST /ok/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            ("bad chunk size",
             b"POST /ok/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ]:
            with self.subTest(case=name):
                self.check_malformed(data, name)

    def test_huge_header(self):
        data = (b"GET /ok/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n")
        self.check_malformed(data, "huge header")

    def test_many_headers(self):
        data = b"GET /ok/x HTTP/1.1\r\nHost: x\r\n" + \
            b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
        self.check_malformed(data, "many headers")

    def test_connect_and_close_without_request(self):
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=2)
            s.close()
        s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=2)
        s.sendall(b"GET /ok/x HT")
        s.close()
        self.assertServing()


class MaxConnectionsTest(harness.Case):
    LIMIT = 6

    WORKERS = 1

    @classmethod
    def start_class(cls):
        cls.up = cls.upstream("mc")
        cls.gw = cls.gateway([route("all", "/", [cls.up])],
                             node={"max_connections": cls.LIMIT, "workers": cls.WORKERS})

    def open_and_use(self):
        s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=3)
        s.sendall(b"GET /bench HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while not harness._complete_response(buf):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return s, buf

    def test_connections_above_the_limit_are_refused(self):
        held = []
        try:
            for i in range(self.LIMIT):
                s, out = self.open_and_use()
                held.append(s)
                self.assertEqual(harness.status_of(out), 200, "connection %d: %r" % (i, out))
            # One more: closed (or refused) without being proxied.
            before = self.up.stats()["received"]
            try:
                out, closed = harness.raw_exchange(
                    self.gw.port, b"GET /bench HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
                st = harness.status_of(out)
                self.assertTrue(st is None or st == 503, out[:300])
            except OSError:
                pass
            self.assertEqual(self.up.stats()["received"], before)
            # The held connections still work.
            for s in held[:2]:
                s.sendall(b"GET /bench HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertIn(b"200", s.recv(4096)[:20])
        finally:
            for s in held:
                s.close()

        # Once they are gone, new connections are served again.
        def served():
            try:
                return self.gw.get("/bench", timeout=2).status == 200
            except OSError:
                return False
        self.assertTrue(harness.wait_until(served, 5 * harness.SLOW, 0.1))


class MaxConnectionsManyWorkersTest(MaxConnectionsTest):
    # The limit is for the node, however many workers share the listening port.
    WORKERS = 3


if __name__ == "__main__":
    harness.main()
