#!/usr/bin/env python3
"""Signals (API.md section 1): SIGHUP reload, SIGTERM/SIGINT drain and exit."""

import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402


class LifecycleTest(harness.Case):
    @classmethod
    def start_class(cls):
        cls.up = cls.upstream("life")

    def new_gateway(self, routes, node=None):
        return self.gateway(routes, node=node, subdir=self.id().rsplit(".", 1)[-1])

    def test_sighup_with_a_bad_file_keeps_the_running_config(self):
        gw = self.new_gateway([route("old", "/old", [self.up], strip=True)])
        self.assertEqual(gw.get("/old/bench").status, 200)
        log_before = len(gw.log())

        for bad in ['{"node": ', json.dumps(dict(gw.config, bogus=True))]:
            gw.write_config(bad)
            gw.proc.signal(signal.SIGHUP)
            time.sleep(0.5 * harness.SLOW)
            self.assertTrue(gw.proc.alive(), gw.log()[-2000:])
            self.assertEqual(gw.get("/old/bench").status, 200)
            self.assertTrue(gw.healthy())
        # The rejection is logged (as JSON lines, like everything on stderr).
        self.assertTrue(harness.wait_until(lambda: len(gw.log()) > log_before, 3),
                        "no log line for the rejected config")
        self.assertIn("config", gw.log()[log_before:].lower())

        # A good file is then applied.
        good = dict(gw.config, routes=[route("new", "/new", [self.up], strip=True)])
        gw.write_config(good)
        gw.proc.signal(signal.SIGHUP)
        self.assertTrue(harness.wait_until(
            lambda: gw.get("/new/bench").status == 200, 5 * harness.SLOW, 0.1),
            gw.log()[-2000:])
        self.assertErrorBody(gw.get("/old/bench"), 404, "route_not_found")

    def test_sighup_applies_changed_routes_without_dropping_connections(self):
        gw = self.new_gateway([route("r", "/r", [self.up], strip=True)])
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        try:
            s.sendall(b"GET /r/bench HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b" 200 ", s.recv(4096)[:20])
            gw.write_config(dict(gw.config, routes=[
                route("r", "/r", [self.up], strip=True),
                route("r2", "/r2", [self.up], strip=True)]))
            gw.proc.signal(signal.SIGHUP)
            self.assertTrue(harness.wait_until(
                lambda: gw.get("/r2/bench").status == 200, 5 * harness.SLOW, 0.1))
            # The keep-alive connection opened before the reload still works.
            s.sendall(b"GET /r/bench HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b" 200 ", s.recv(4096)[:20])
        finally:
            s.close()

    def test_sigterm_drains_in_flight_requests(self):
        gw = self.new_gateway([route("d", "/d", [self.up], strip=True, timeout_ms=10000)],
                              node={"shutdown_grace_ms": 5000})
        result = {}

        def slow():
            t0 = time.monotonic()
            try:
                r = gw.get("/d/delay/1500", timeout=15)
                result["status"] = r.status
                result["body"] = r.body
            except OSError as e:
                result["error"] = repr(e)
            result["took"] = time.monotonic() - t0
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.4)
        sent = time.monotonic()
        gw.proc.signal(signal.SIGTERM)

        # New connections are refused (or closed unanswered) soon after the signal.
        def refused():
            try:
                out, closed = harness.raw_exchange(
                    gw.port, b"GET /d/bench HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1)
                return harness.status_of(out) is None
            except OSError:
                return True
        self.assertTrue(harness.wait_until(refused, 1.0 * harness.SLOW, 0.05),
                        "new connections still served after SIGTERM")

        t.join(20)
        self.assertEqual(result.get("status"), 200, result)
        code = gw.proc.wait(timeout=6 * harness.SLOW)
        self.assertEqual(code, 0, gw.log()[-3000:])
        # It exits once the in-flight request is done, well before the grace period ends.
        self.assertLess(time.monotonic() - sent, 5.0 + 1.0 * harness.SLOW)

    def test_sigterm_gives_up_after_the_grace_period(self):
        gw = self.new_gateway([route("d", "/d", [self.up], strip=True, timeout_ms=30000)],
                              node={"shutdown_grace_ms": 1000})
        t = threading.Thread(target=lambda: self._swallow(gw, "/d/delay/20000"))
        t.start()
        time.sleep(0.4)
        sent = time.monotonic()
        gw.proc.signal(signal.SIGTERM)
        code = gw.proc.wait(timeout=10)
        took = time.monotonic() - sent
        self.assertIsNotNone(code, "still running 10 s after SIGTERM")
        self.assertEqual(code, 0, gw.log()[-3000:])
        self.assertLess(took, 1.0 + 1.5 * harness.SLOW)
        t.join(25)

    @staticmethod
    def _swallow(gw, path):
        try:
            gw.get(path, timeout=25)
        except OSError:
            pass

    def test_sigint_exits_zero_when_idle(self):
        gw = self.new_gateway([route("i", "/i", [self.up])])
        self.assertEqual(gw.get("/i/bench").status, 200)
        gw.proc.signal(signal.SIGINT)
        code = gw.proc.wait(timeout=5 * harness.SLOW)
        self.assertEqual(code, 0, gw.log()[-3000:])

    def test_healthz_and_readyz(self):
        gw = self.new_gateway([route("h", "/h", [self.up])])
        self.assertEqual(harness.request(gw.api_port, "GET", "/healthz").status, 200)
        self.assertEqual(harness.request(gw.api_port, "GET", "/readyz").status, 200)


if __name__ == "__main__":
    harness.main()
