#!/usr/bin/env python3
"""Pass-through fidelity, routing, balancing and proxy headers (API.md sections 2 and 3)."""

import json
import os
import socket
import sys
import threading
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

HOP_BY_HOP = ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
              "proxy-authorization", "proxy-authenticate"]


def echo_headers(body):
    """The echoed request headers as a list of (lower-case name, value)."""
    return [(k.lower(), v) for k, v in body["headers"]]


def header_values(body, name):
    return [v for k, v in echo_headers(body) if k == name.lower()]


class ProxyTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.a = cls.upstream("a")
        cls.b = cls.upstream("b")
        cls.slow = cls.upstream("slow")
        a, b = cls.a, cls.b
        cls.gw = cls.gateway([
            route("echo", "/echo", [a]),
            route("strip", "/strip", [a], strip=True),
            route("api", "/api", [a]),
            route("api_v2", "/api/v2", [b]),
            route("lp", "/lp", [a], methods=["GET"]),
            route("lp_deep", "/lp/deep", [b]),
            route("m_any", "/m", [a]),
            route("m_post", "/m", [b], methods=["POST", "PUT"]),
            route("m_only", "/monly", [a], methods=["GET"]),
            route("h_any", "/h", [a]),
            route("h_b", "/h", [b], host="b.example"),
            route("h_only", "/honly", [b], host="only.example"),
            route("rr", "/rr", [a, b], balance="round_robin", strip=True),
            route("lo", "/lo", [cls.slow, b], balance="least_outstanding", strip=True),
        ])

    def echo(self, method, target, headers=None, body=None):
        r = self.gw.req(method, target, headers=headers, body=body)
        self.assertEqual(r.status, 200, r)
        return r, r.json()

    # --- fidelity --------------------------------------------------------------------------

    def test_every_method_passes_through(self):
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]:
            with self.subTest(method=m):
                body = b"payload-" + m.encode() if m in ("POST", "PUT", "PATCH") else None
                r, e = self.echo(m, "/echo/m", body=body)
                self.assertEqual(e["method"], m)
                self.assertEqual(e["path"], "/echo/m")
                if body is not None:
                    self.assertEqual(e["body"].encode(), body)
                self.assertEqual(r.header("Upstream-Name"), "a")

    def test_head_gets_headers_and_no_body(self):
        r = self.gw.req("HEAD", "/echo/head")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"")
        self.assertEqual(r.header("Upstream-Name"), "a")
        st = self.a.stats()
        self.assertGreaterEqual(st["by_path"].get("/echo/head", 0), 1)

    def test_query_is_forwarded_byte_for_byte(self):
        for q in ["?a=%2F&b=1&b=2&c", "?x=%20y+z&empty=&=v&%E2%82%AC=1", "?", "?a=b?c=d"]:
            with self.subTest(query=q):
                _, e = self.echo("GET", "/echo/q" + q)
                self.assertEqual(e["target"], "/echo/q" + q)

    def test_percent_encoded_path_is_forwarded_unchanged(self):
        for p in ["/echo/a%2Fb", "/echo/%7Euser/x%20y", "/echo/caf%C3%A9", "/echo/a%252F"]:
            with self.subTest(path=p):
                _, e = self.echo("GET", p + "?k=%2F")
                self.assertEqual(e["target"], p + "?k=%2F")

    def test_request_headers_pass_in_order_with_repeats(self):
        hdrs = [("X-One", "1"), ("X-Dup", "first"), ("X-Two", "two words"),
                ("X-Dup", "second"), ("Accept", "application/json")]
        _, e = self.echo("GET", "/echo/h", headers=hdrs)
        got = [(k, v) for k, v in echo_headers(e) if k in ("x-one", "x-dup", "x-two", "accept")]
        dups = header_values(e, "x-dup")
        # Repeated fields may arrive as two lines or combined (RFC 9110 section 5.3).
        self.assertIn(dups, (["first", "second"], ["first, second"], ["first,second"]), e)
        self.assertEqual(header_values(e, "x-one"), ["1"])
        self.assertEqual(header_values(e, "x-two"), ["two words"])
        self.assertEqual(header_values(e, "accept"), ["application/json"])
        names = [k for k, _ in got]
        self.assertLess(names.index("x-one"), names.index("x-two"), got)

    def test_request_body_passes_through(self):
        body = bytes(range(32, 127)) * 1000  # ~95 KB of printable bytes
        _, e = self.echo("POST", "/echo/body", headers=[("Content-Type", "text/plain")],
                         body=body)
        self.assertEqual(e["body_len"], len(body))
        self.assertEqual(e["body"].encode(), body)
        self.assertEqual(header_values(e, "content-type"), ["text/plain"])

    def test_chunked_request_body_is_forwarded_without_transfer_encoding(self):
        chunks = [b"hello ", b"chunked ", b"world"]
        enc = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        r = self.gw.req("POST", "/echo/chunked", headers=[("Transfer-Encoding", "chunked")],
                        body=enc)
        self.assertEqual(r.status, 200, r)
        e = r.json()
        self.assertEqual(e["body"], "hello chunked world")
        self.assertEqual(header_values(e, "transfer-encoding"), [])

    def test_upstream_status_and_body_pass_through(self):
        for status in [200, 201, 202, 400, 404, 409, 418, 500, 503]:
            with self.subTest(status=status):
                r = self.gw.get("/strip/status/%d" % status)
                self.assertEqual(r.status, status, r)
                self.assertEqual(r.json(), {"upstream": "a", "status": status})
                self.assertEqual(r.header("Upstream-Name"), "a")

    def test_no_content_passes_through(self):
        r = self.gw.get("/strip/status/204")
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"")

    def test_retry_after_from_upstream_passes_through(self):
        r = self.gw.get("/strip/status/503?retry_after=7")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header("Retry-After"), "7")

    def test_repeated_response_headers_are_kept(self):
        r = self.gw.get("/strip/cookies")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header_all("Set-Cookie"), ["a=1", "b=2", "c=3"], r)
        multi = r.header_all("X-Multi")
        self.assertIn(multi, (["one", "two"], ["one, two"], ["one,two"]), r)
        self.assertEqual(r.body, b"cookies\n")

    def test_large_response_body(self):
        n = 3 * 1024 * 1024 + 17
        r = self.gw.get("/strip/size/%d" % n)
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.body), n)
        self.assertEqual(r.body.count(b"x"), n)

    def test_keep_alive_connection_serves_many_requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=10)
        try:
            for i in range(50):
                r = harness.request_on(conn, "GET", "/echo/ka?i=%d" % i)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json()["query"], "i=%d" % i)
        finally:
            conn.close()

    def test_pipelined_requests_are_answered_in_order(self):
        reqs = b"".join(b"GET /echo/pipe?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
        s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
        try:
            s.sendall(reqs)
            f = s.makefile("rb")
            for i in range(5):
                r = harness.read_response_from(f)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json()["query"], "n=%d" % i)
        finally:
            s.close()

    def test_expect_100_continue(self):
        body = b"expected body"
        s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
        try:
            s.sendall(b"POST /echo/expect HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"Expect: 100-continue\r\n\r\n" % len(body))
            f = s.makefile("rb")
            interim = harness.read_response_from(f)
            self.assertEqual(interim.status, 100, interim)
            s.sendall(body)
            r = harness.read_response_from(f)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body"], body.decode())
        finally:
            s.close()

    # --- strip_prefix ----------------------------------------------------------------------

    def test_strip_prefix(self):
        _, e = self.echo("GET", "/strip/foo/bar?x=1")
        self.assertEqual(e["target"], "/foo/bar?x=1")
        _, e = self.echo("GET", "/strip")
        self.assertEqual(e["path"], "/")
        _, e = self.echo("GET", "/strip?y=2")
        self.assertEqual(e["target"], "/?y=2")

    def test_no_strip_keeps_the_prefix(self):
        _, e = self.echo("GET", "/echo/foo")
        self.assertEqual(e["target"], "/echo/foo")

    # --- routing ---------------------------------------------------------------------------

    def test_longest_prefix_wins(self):
        self.assertEqual(self.gw.get("/api/v1/x").header("Upstream-Name"), "a")
        self.assertEqual(self.gw.get("/api/v2/x").header("Upstream-Name"), "b")
        self.assertEqual(self.gw.get("/api/v2").header("Upstream-Name"), "b")
        self.assertEqual(self.gw.get("/api").header("Upstream-Name"), "a")

    def test_longest_prefix_beats_method(self):
        # /lp names GET, /lp/deep names no method: the longer prefix still wins for GET.
        r = self.gw.get("/lp/deep/x")
        self.assertEqual(r.header("Upstream-Name"), "b", r)

    def test_prefix_matches_at_segment_boundary(self):
        self.assertErrorBody(self.gw.get("/echoes"), 404, "route_not_found")
        self.assertEqual(self.gw.get("/echo?z=1").status, 200)

    def test_methods_then_host(self):
        self.assertEqual(self.gw.req("POST", "/m/x", body=b"").header("Upstream-Name"), "b")
        self.assertEqual(self.gw.req("PUT", "/m/x", body=b"").header("Upstream-Name"), "b")
        self.assertEqual(self.gw.get("/m/x").header("Upstream-Name"), "a")
        self.assertEqual(self.gw.req("DELETE", "/m/x").header("Upstream-Name"), "a")

    def test_method_not_listed_is_route_not_found(self):
        self.assertEqual(self.gw.get("/monly").status, 200)
        self.assertErrorBody(self.gw.req("DELETE", "/monly"), 404, "route_not_found")

    def test_host_match(self):
        self.assertEqual(self.gw.get("/h", headers=[("Host", "b.example")])
                         .header("Upstream-Name"), "b")
        self.assertEqual(self.gw.get("/h", headers=[("Host", "B.Example:8080")])
                         .header("Upstream-Name"), "b")
        self.assertEqual(self.gw.get("/h", headers=[("Host", "c.example")])
                         .header("Upstream-Name"), "a")
        self.assertEqual(self.gw.get("/honly", headers=[("Host", "only.example")]).status, 200)
        self.assertErrorBody(self.gw.get("/honly", headers=[("Host", "other.example")]),
                             404, "route_not_found")

    # --- balancing -------------------------------------------------------------------------

    def test_round_robin_alternates(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=10)
        names = []
        try:
            for _ in range(10):
                r = harness.request_on(conn, "GET", "/rr/bench")
                self.assertEqual(r.status, 200, r)
                names.append(r.header("Upstream-Name"))
        finally:
            conn.close()
        self.assertEqual(names.count("a"), 5, names)
        self.assertEqual(names.count("b"), 5, names)
        for x, y in zip(names, names[1:]):
            self.assertNotEqual(x, y, names)

    def test_least_outstanding_prefers_the_fast_target(self):
        self.slow.reset()
        self.slow.fail(count=1000, status=200, delay_ms=400)
        names = []
        lock = threading.Lock()

        def client():
            for _ in range(4):
                r = self.gw.get("/lo/bench")
                with lock:
                    names.append((r.status, r.header("Upstream-Name")))
        try:
            ts = [threading.Thread(target=client) for _ in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
        finally:
            self.slow.reset()
        self.assertTrue(all(s == 200 for s, _ in names), names)
        n_slow = sum(1 for _, n in names if n == "slow")
        n_fast = sum(1 for _, n in names if n == "b")
        self.assertEqual(n_slow + n_fast, 32, names)
        self.assertGreater(n_fast, 2 * n_slow, names)

    # --- proxy headers ---------------------------------------------------------------------

    def test_hop_by_hop_request_headers_are_not_forwarded(self):
        hdrs = [("Connection", "keep-alive, X-Hop-Named"), ("X-Hop-Named", "secret"),
                ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-Trail"),
                ("Upgrade", "example/1"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Authenticate", "Basic"), ("X-End-To-End", "kept")]
        _, e = self.echo("GET", "/echo/hop", headers=hdrs)
        names = [k for k, _ in echo_headers(e)]
        for h in HOP_BY_HOP + ["x-hop-named"]:
            if h == "connection":
                # The gateway may manage its own upstream connection, but never pass ours on.
                self.assertNotIn("x-hop-named", " ".join(header_values(e, h)).lower(), e)
                continue
            self.assertNotIn(h, names, e)
        self.assertEqual(header_values(e, "x-end-to-end"), ["kept"])

    def test_hop_by_hop_response_headers_are_not_forwarded(self):
        q = ("Connection=X-Resp-Hop&X-Resp-Hop=1&Keep-Alive=timeout%3D5&Trailer=X-T"
             "&Upgrade=example%2F1&Proxy-Authenticate=Basic&X-Kept=yes")
        r = self.gw.get("/strip/headers?" + q)
        self.assertEqual(r.status, 200, r)
        names = [k.lower() for k, _ in r.headers]
        for h in ["x-resp-hop", "keep-alive", "trailer", "upgrade", "proxy-authenticate"]:
            self.assertNotIn(h, names, r)
        self.assertNotIn("x-resp-hop", " ".join(r.header_all("Connection")).lower(), r)
        self.assertEqual(r.header("X-Kept"), "yes", r)
        self.assertEqual(r.body, b"headers\n")

    def test_x_forwarded_for_is_appended(self):
        _, e = self.echo("GET", "/echo/xff", headers=[("X-Forwarded-For", "203.0.113.9")])
        vals = ",".join(header_values(e, "x-forwarded-for"))
        self.assertEqual([v.strip() for v in vals.split(",")], ["203.0.113.9", "127.0.0.1"], e)

    def test_x_forwarded_for_is_created(self):
        _, e = self.echo("GET", "/echo/xff")
        self.assertEqual(header_values(e, "x-forwarded-for"), ["127.0.0.1"], e)

    def test_x_forwarded_proto_and_host(self):
        _, e = self.echo("GET", "/echo/xfh", headers=[("Host", "front.example:8443")])
        self.assertEqual(header_values(e, "x-forwarded-proto"), ["http"], e)
        self.assertEqual(header_values(e, "x-forwarded-host"), ["front.example:8443"], e)

    def test_x_forwarded_proto_replaces_a_client_value(self):
        _, e = self.echo("GET", "/echo/xfp", headers=[("X-Forwarded-Proto", "https")])
        self.assertEqual(header_values(e, "x-forwarded-proto"), ["http"], e)

    def test_request_id_is_kept(self):
        r, e = self.echo("GET", "/echo/rid", headers=[("X-Request-Id", "client-id-123")])
        self.assertEqual(header_values(e, "x-request-id"), ["client-id-123"], e)
        self.assertEqual(r.header("X-Request-Id"), "client-id-123", r)

    def test_request_id_is_created_and_returned(self):
        r, e = self.echo("GET", "/echo/rid")
        sent = header_values(e, "x-request-id")
        self.assertEqual(len(sent), 1, e)
        self.assertTrue(sent[0], e)
        self.assertEqual(r.header("X-Request-Id"), sent[0], r)
        r2, e2 = self.echo("GET", "/echo/rid")
        self.assertNotEqual(header_values(e2, "x-request-id")[0], sent[0])

    def test_request_id_on_gateway_errors(self):
        r = self.gw.get("/nowhere", headers=[("X-Request-Id", "err-id-1")])
        self.assertErrorBody(r, 404, "route_not_found")
        self.assertEqual(r.header("X-Request-Id"), "err-id-1", r)

    # --- access log ------------------------------------------------------------------------

    def test_access_log_line(self):
        rid = "access-log-%d" % time.monotonic_ns()
        r = self.gw.req("POST", "/echo/logged?q=1", headers=[("X-Request-Id", rid)], body=b"x")
        self.assertEqual(r.status, 200)

        def find():
            return [o for o in self.gw.access_logs() if o.get("request_id") == rid]
        lines = harness.wait_until(find, 5)
        self.assertEqual(len(lines), 1, self.gw.log()[-3000:])
        o = lines[0]
        self.assertEqual(o["type"], "access")
        self.assertEqual(o["route"], "echo")
        self.assertEqual(o["method"], "POST")
        self.assertIn(o["path"], ("/echo/logged", "/echo/logged?q=1"))
        self.assertEqual(o["status"], 200)
        self.assertIn(str(self.a.port), str(o["upstream"]))
        self.assertIsInstance(o["duration_ms"], (int, float))
        self.assertGreaterEqual(o["duration_ms"], 0)

    def test_every_log_line_is_json(self):
        self.gw.get("/echo/any")
        self.gw.get("/nowhere")
        text = self.gw.log()
        for line in text.splitlines():
            if not line.strip():
                continue
            with self.subTest(line=line[:200]):
                self.assertIsInstance(json.loads(line), dict)

    def test_access_log_for_route_not_found(self):
        rid = "nf-%d" % time.monotonic_ns()
        self.gw.get("/nowhere/at/all", headers=[("X-Request-Id", rid)])
        lines = harness.wait_until(
            lambda: [o for o in self.gw.access_logs() if o.get("request_id") == rid], 5)
        self.assertEqual(len(lines), 1, self.gw.log()[-2000:])
        self.assertEqual(lines[0]["status"], 404)
        self.assertEqual(lines[0]["method"], "GET")


if __name__ == "__main__":
    harness.main()
