#!/usr/bin/env python3
"""The command line and config validation (API.md sections 1 and 2)."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route  # noqa: E402

GOOD = {
    "node": {"id": "n1", "listen": "127.0.0.1:18081", "api_listen": "127.0.0.1:19091",
             "shutdown_grace_ms": 10000, "max_body_bytes": 1048576, "max_connections": 20000},
    "routes": [
        route("orders", "/api/orders", ["http://127.0.0.1:18080"], methods=["GET", "POST"],
              balance="round_robin", timeout_ms=5000, connect_timeout_ms=1000),
        route("users", "/api/users", ["http://127.0.0.1:18080", "http://127.0.0.1:18082"],
              strip=True, balance="least_outstanding"),
    ],
}

LINE = re.compile(r"^config error at (.+?): (.+)$")


def run(args, timeout=20):
    p = subprocess.run([harness.GW_BIN] + args, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def with_change(fn):
    cfg = copy.deepcopy(GOOD)
    fn(cfg)
    return cfg


class ConfigTest(harness.Case):
    def write(self, name, cfg):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return path

    def check(self, cfg, name="cfg.json"):
        """Runs --check-config; returns (exit code, {path: message}, all output)."""
        path = self.write(name, cfg)
        code, out, err = run(["--check-config", "-c", path])
        errors = {}
        for line in (out + err).splitlines():
            m = LINE.match(line.strip())
            if m:
                errors.setdefault(m.group(1), m.group(2))
        return code, errors, out + err

    def assertRejected(self, cfg, path_re):
        code, errors, text = self.check(cfg)
        self.assertEqual(code, 1, text)
        self.assertTrue(any(re.fullmatch(path_re, p) for p in errors),
                        "no 'config error at %s: ...' line in:\n%s" % (path_re, text))
        return errors

    def test_version(self):
        code, out, err = run(["--version"])
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out + err, r"\d+\.\d+\.\d+")

    def test_good_file_passes(self):
        code, errors, text = self.check(GOOD)
        self.assertEqual(code, 0, text)
        self.assertEqual(errors, {})

    def test_example_config_passes(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        example = os.path.join(root, "etc", "gateway.json")
        code, out, err = run(["--check-config", "-c", example])
        self.assertEqual(code, 0, out + err)

    def test_full_api_example_passes(self):
        cfg = copy.deepcopy(GOOD)
        cfg["routes"][0]["policies"] = {
            "token_bucket": {"capacity": 100, "refill_per_sec": 50, "key": "route",
                             "scope": "local"},
            "sliding_window": {"limit": 1000, "window_ms": 60000, "key": "client_ip",
                               "scope": "local"},
            "circuit_breaker": {"window": "count", "window_size": 20, "min_calls": 10,
                                "failure_rate": 0.5, "slow_call_ms": 2000,
                                "slow_call_rate": 1.0, "open_ms": 30000,
                                "half_open_calls": 5, "failure_statuses": [500, 502, 503, 504]},
            "retry": {"max_attempts": 3, "base_ms": 50, "max_backoff_ms": 2000,
                      "jitter": "full", "per_try_timeout_ms": 1000,
                      "on": ["connect_failure", "timeout", "status"],
                      "statuses": [502, 503, 504], "budget_percent": 20,
                      "budget_min_per_sec": 10},
            "degradation": {"fallback": {"status": 200,
                                         "headers": {"Content-Type": "application/json"},
                                         "body": {"items": [], "degraded": True}},
                            "on": ["circuit_open", "upstream_error", "shed", "slow"],
                            "max_concurrent": 256, "slow_ms": 2000, "slow_window_ms": 10000,
                            "stale_if_error_ms": 60000},
            "idempotency": {"header": "Idempotency-Key", "methods": ["POST", "PATCH"],
                            "ttl_ms": 86400000, "required": False},
        }
        cfg["backend"] = {"type": "memory"}
        code, errors, text = self.check(cfg)
        self.assertEqual(code, 0, text)

    def test_unknown_top_level_key(self):
        self.assertRejected(with_change(lambda c: c.update(bogus=1)), r"bogus")

    def test_unknown_nested_keys(self):
        self.assertRejected(with_change(lambda c: c["node"].update(colour="red")),
                            r"node\.colour")
        self.assertRejected(with_change(lambda c: c["routes"][1]["upstream"].update(x=1)),
                            r"routes\[1\]\.upstream\.x")
        self.assertRejected(with_change(lambda c: c["routes"][0]["match"].update(pathprefix="/")),
                            r"routes\[0\]\.match\.pathprefix")

    def test_wrong_types(self):
        self.assertRejected(with_change(lambda c: c["node"].update(max_body_bytes="big")),
                            r"node\.max_body_bytes")
        self.assertRejected(with_change(lambda c: c["routes"][0]["upstream"].update(
            strip_prefix="yes")), r"routes\[0\]\.upstream\.strip_prefix")
        self.assertRejected(with_change(lambda c: c["routes"][0]["match"].update(methods="GET")),
                            r"routes\[0\]\.match\.methods")
        self.assertRejected(with_change(lambda c: c.update(routes={})), r"routes")
        self.assertRejected(with_change(lambda c: c["node"].update(shutdown_grace_ms=1.5)),
                            r"node\.shutdown_grace_ms")

    def test_out_of_range_values(self):
        def retry(c):
            c["routes"][1]["policies"] = {"retry": {"max_attempts": 11}}
        errors = self.assertRejected(with_change(retry), r"routes\[1\]\.policies\.retry\.max_attempts")
        self.assertIn("integer", errors["routes[1].policies.retry.max_attempts"])
        self.assertRejected(with_change(lambda c: c["routes"][0]["upstream"].update(
            timeout_ms=-5)), r"routes\[0\]\.upstream\.timeout_ms")
        self.assertRejected(with_change(lambda c: c["node"].update(max_connections=0)),
                            r"node\.max_connections")
        self.assertRejected(with_change(lambda c: c["routes"][0]["upstream"].update(
            balance="random")), r"routes\[0\]\.upstream\.balance")

    def test_duplicate_route_names(self):
        def dup(c):
            c["routes"][1]["name"] = "orders"
        self.assertRejected(with_change(dup), r"routes\[1\](\.name)?")

    def test_unparsable_addresses(self):
        self.assertRejected(with_change(lambda c: c["node"].update(listen="not-an-address")),
                            r"node\.listen")
        self.assertRejected(with_change(lambda c: c["node"].update(api_listen="127.0.0.1:99999")),
                            r"node\.api_listen")
        self.assertRejected(with_change(lambda c: c["routes"][0]["upstream"].update(
            targets=["ftp://127.0.0.1:21"])), r"routes\[0\]\.upstream\.targets\[0\]")
        self.assertRejected(with_change(lambda c: c["routes"][0]["upstream"].update(
            targets=["http://127.0.0.1:18080", "http://:x"])),
            r"routes\[0\]\.upstream\.targets\[1\]")

    def test_cluster_scope_needs_a_shared_backend(self):
        def cluster_scope(c):
            c["routes"][0]["policies"] = {"token_bucket": {"capacity": 10, "refill_per_sec": 5,
                                                           "scope": "cluster"}}
        self.assertRejected(with_change(cluster_scope),
                            r"routes\[0\]\.policies\.token_bucket(\.scope)?")

    def test_every_problem_is_reported(self):
        def many(c):
            c["bogus"] = True
            c["node"]["max_body_bytes"] = "big"
            c["routes"][0]["upstream"]["timeout_ms"] = -1
        code, errors, text = self.check(with_change(many))
        self.assertEqual(code, 1, text)
        self.assertGreaterEqual(len(errors), 3, text)

    def test_invalid_json(self):
        code, _, text = self.check('{"node": {"listen": "127.0.0.1:1"}, "routes": [')
        self.assertEqual(code, 1, text)
        self.assertIn("config error", text)

    def test_missing_file(self):
        code, out, err = run(["--check-config", "-c", os.path.join(self.workdir, "nope.json")])
        self.assertEqual(code, 1, out + err)
        self.assertIn("config error", out + err)

    def test_run_with_bad_file_fails_clearly(self):
        path = self.write("bad-run.json", with_change(lambda c: c.update(bogus=1)))
        code, out, err = run(["-c", path])
        self.assertNotEqual(code, 0)
        self.assertGreater(code, 0, "killed by a signal")
        self.assertIn("bogus", out + err)

    def run_with_busy_listen(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        try:
            cfg = copy.deepcopy(GOOD)
            cfg["node"]["listen"] = "127.0.0.1:%d" % busy.getsockname()[1]
            cfg["node"]["api_listen"] = "127.0.0.1:%d" % harness.free_port()
            path = self.write("busy.json", cfg)
            code, out, err = run(["-c", path], timeout=15)
        finally:
            busy.close()
        return cfg["node"]["listen"], code, out + err

    def test_listen_address_in_use_fails_clearly(self):
        addr, code, text = self.run_with_busy_listen()
        self.assertNotEqual(code, 0, text)
        self.assertIn(addr, text)

    def test_listen_address_in_use_exits_cleanly(self):
        # An ordinary exit status, not a signal (under ASan: no leak report on this path).
        addr, code, text = self.run_with_busy_listen()
        self.assertGreater(code, 0, text)
        for marker in harness.SANITIZER_MARKERS:
            self.assertNotIn(marker, text)

    def test_bad_command_line(self):
        code, out, err = run(["--no-such-flag"])
        self.assertNotEqual(code, 0)
        self.assertGreater(code, 0)


if __name__ == "__main__":
    harness.main()
