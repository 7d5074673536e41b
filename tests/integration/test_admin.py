#!/usr/bin/env python3
"""The admin API, /metrics and /admin/ui on one node with backend memory (API.md section 5).

Routes: list, get, 404s, PUT of a new route that serves traffic without a restart, PUTs that
fail validation (400 invalid_config naming the path inside the route), a PUT that changes only
the upstream keeps the route's limiter and breaker state, DELETE then route_not_found. Live
state: breaker counts, limiter fill, in-flight, degradation, counters, all moved by traffic.
Overrides: breaker open/closed/auto, degrade forced/auto, 409 policy_not_configured, 400s.
Admin token from the config and from GATEWAY_ADMIN_TOKEN. /metrics: the documented families,
values that follow traffic, `promtool check metrics` and a strict parser of the text format.
SIGHUP reloads the file's routes. /admin/ui in headless Chromium shows a breaker trip.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import route, wait_until  # noqa: E402

SLOW = harness.SLOW
TOKEN = "main-admin-token-7Qx"
BREAKER = {"window": "count", "window_size": 4, "min_calls": 4, "failure_rate": 0.5,
           "open_ms": 60000, "half_open_calls": 1}
FALLBACK = {"status": 200, "headers": {"Content-Type": "application/json"},
            "body": {"items": [], "degraded": True}}


def slow(s):
    return s * SLOW


def auth(token=TOKEN):
    return [("Authorization", "Bearer " + token)]


class Admin:
    """Control-plane calls with the admin token."""

    def __init__(self, api_port, token=TOKEN):
        self.port = api_port
        self.token = token

    def call(self, method, path, body=None, token=None, raw=None, headers=None):
        hs = list(headers or [])
        tok = self.token if token is None else token
        if tok:
            hs += auth(tok)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hs.append(("Content-Type", "application/json"))
        return harness.request(self.port, method, path, headers=hs, body=data,
                               timeout=slow(10.0))

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def put_route(self, name, obj, **kw):
        return self.call("PUT", "/admin/routes/" + name, body=obj, **kw)

    def delete_route(self, name, **kw):
        return self.call("DELETE", "/admin/routes/" + name, **kw)

    def state(self, name):
        r = self.get("/admin/routes/%s/state" % name)
        assert r.status == 200, r
        return r.json()

    def breaker(self, name, state):
        return self.call("POST", "/admin/routes/%s/breaker" % name, body={"state": state})

    def degrade(self, name, mode):
        return self.call("POST", "/admin/routes/%s/degrade" % name, body={"mode": mode})

    def routes(self):
        r = self.get("/admin/routes")
        assert r.status == 200, r
        return r.json()

    def metrics_text(self):
        r = harness.request(self.port, "GET", "/metrics", timeout=slow(10.0))
        assert r.status == 200, r
        return r.body.decode("utf-8"), r


# ---- a strict parser of the Prometheus text exposition format (version 0.0.4) ----

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class ExpositionError(AssertionError):
    pass


def _parse_float(s):
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    if s == "NaN":
        return math.nan
    if not re.match(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)$", s):
        raise ValueError(s)
    return float(s)


def _check_help_escapes(text, lineno):
    """HELP text may escape only backslash and newline."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1:i + 2] not in ("\\", "n"):
                raise ExpositionError("line %d: bad escape in HELP: %r" % (lineno, text))
            i += 2
        else:
            i += 1


def _parse_labels(text, i, lineno):
    """Parses `{a="x",b="y"}` starting at text[i] == '{'; returns (dict, index after '}')."""
    labels = {}
    i += 1
    while True:
        if i < len(text) and text[i] == "}":
            return labels, i + 1
        m = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").match(text, i)
        if not m:
            raise ExpositionError("line %d: bad label name at %r" % (lineno, text[i:]))
        name = m.group(0)
        if name.startswith("__"):
            raise ExpositionError("line %d: reserved label name %s" % (lineno, name))
        if name in labels:
            raise ExpositionError("line %d: duplicate label %s" % (lineno, name))
        i = m.end()
        if text[i:i + 2] != '="':
            raise ExpositionError("line %d: expected =\" after %s" % (lineno, name))
        i += 2
        val = []
        while True:
            if i >= len(text):
                raise ExpositionError("line %d: unterminated label value" % lineno)
            ch = text[i]
            if ch == "\\":
                nxt = text[i + 1:i + 2]
                if nxt == "\\":
                    val.append("\\")
                elif nxt == '"':
                    val.append('"')
                elif nxt == "n":
                    val.append("\n")
                else:
                    raise ExpositionError("line %d: bad escape \\%s in label value" % (lineno, nxt))
                i += 2
                continue
            if ch == '"':
                i += 1
                break
            if ch == "\n":
                raise ExpositionError("line %d: raw newline in label value" % lineno)
            val.append(ch)
            i += 1
        labels[name] = "".join(val)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "}":
            return labels, i + 1
        raise ExpositionError("line %d: expected , or } at %r" % (lineno, text[i:]))


def parse_exposition(text):
    """Parses and checks an exposition strictly. Returns {family: {"type", "help", "samples":
    [(name, labels, value)]}}. Raises ExpositionError naming the first problem."""
    if text and not text.endswith("\n"):
        raise ExpositionError("the exposition does not end with a newline")
    families = {}
    order = []
    current = None
    seen_series = set()
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.match(name):
                    raise ExpositionError("line %d: bad metric name %r" % (lineno, name))
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = {"type": None, "help": None, "samples": []}
                    order.append(name)
                elif fam["samples"]:
                    raise ExpositionError("line %d: %s for %s after its samples" %
                                          (lineno, parts[1], name))
                if current is not None and current != name and families[current]["samples"] and \
                        name in order[:-1] and order[-1] != name:
                    raise ExpositionError("line %d: family %s split" % (lineno, name))
                current = name
                rest = parts[3] if len(parts) == 4 else ""
                if parts[1] == "HELP":
                    if fam["help"] is not None:
                        raise ExpositionError("line %d: second HELP for %s" % (lineno, name))
                    _check_help_escapes(rest, lineno)
                    fam["help"] = rest
                else:
                    if fam["type"] is not None:
                        raise ExpositionError("line %d: second TYPE for %s" % (lineno, name))
                    if rest not in TYPES:
                        raise ExpositionError("line %d: bad type %r" % (lineno, rest))
                    fam["type"] = rest
            continue
        # A sample: name[{labels}] value [timestamp]
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if not m:
            raise ExpositionError("line %d: bad sample %r" % (lineno, line))
        sname = m.group(0)
        i = m.end()
        labels = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, lineno)
        if i >= len(line) or line[i] != " ":
            raise ExpositionError("line %d: expected a space before the value: %r" %
                                  (lineno, line))
        fields = line[i + 1:].split(" ")
        if len(fields) not in (1, 2) or not fields[0]:
            raise ExpositionError("line %d: bad value part %r" % (lineno, line[i:]))
        try:
            value = _parse_float(fields[0])
        except ValueError:
            raise ExpositionError("line %d: bad value %r" % (lineno, fields[0]))
        if len(fields) == 2 and not re.match(r"^-?\d+$", fields[1]):
            raise ExpositionError("line %d: bad timestamp %r" % (lineno, fields[1]))
        fam_name = sname
        if current is not None and families[current]["type"] in ("histogram", "summary"):
            for suf in ("_bucket", "_sum", "_count"):
                if sname == current + suf:
                    fam_name = current
        if fam_name != current:
            if fam_name in families:
                raise ExpositionError("line %d: samples of %s are not together" %
                                      (lineno, fam_name))
            families[fam_name] = {"type": None, "help": None, "samples": []}
            order.append(fam_name)
            current = fam_name
        fam = families[fam_name]
        if fam["type"] == "histogram" and sname == fam_name:
            raise ExpositionError("line %d: a histogram sample needs a suffix" % lineno)
        key = (sname, tuple(sorted(labels.items())))
        if key in seen_series:
            raise ExpositionError("line %d: duplicate series %s%s" % (lineno, sname, labels))
        seen_series.add(key)
        if fam["type"] == "counter" and not (value >= 0):
            raise ExpositionError("line %d: negative or NaN counter %s" % (lineno, sname))
        fam["samples"].append((sname, labels, value))
    for name, fam in families.items():
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _check_histogram(name, samples):
    groups = {}
    for sname, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            if "le" not in labels:
                raise ExpositionError("%s: bucket without le" % name)
            try:
                le = _parse_float(labels["le"])
            except ValueError:
                raise ExpositionError("%s: bad le %r" % (name, labels["le"]))
            g["buckets"].append((le, value))
        elif sname == name + "_sum":
            g["sum"] = value
        elif sname == name + "_count":
            g["count"] = value
    for rest, g in groups.items():
        b = g["buckets"]
        if not b:
            raise ExpositionError("%s%s: no buckets" % (name, dict(rest)))
        les = [le for le, _ in b]
        if les != sorted(les) or len(set(les)) != len(les):
            raise ExpositionError("%s%s: le not strictly increasing: %s" % (name, dict(rest), les))
        if les[-1] != math.inf:
            raise ExpositionError("%s%s: the last bucket is not +Inf" % (name, dict(rest)))
        vals = [v for _, v in b]
        if any(vals[i] > vals[i + 1] for i in range(len(vals) - 1)):
            raise ExpositionError("%s%s: buckets not cumulative: %s" % (name, dict(rest), vals))
        if g["count"] is None or g["sum"] is None:
            raise ExpositionError("%s%s: _sum or _count missing" % (name, dict(rest)))
        if g["count"] != vals[-1]:
            raise ExpositionError("%s%s: _count %s != +Inf bucket %s" %
                                  (name, dict(rest), g["count"], vals[-1]))


def sample(fams, name, **labels):
    """The value of the one series of `name` (a family or a histogram part) with these labels."""
    fam_name = name
    for suf in ("_bucket", "_sum", "_count"):
        if name.endswith(suf) and name[:-len(suf)] in fams:
            fam_name = name[:-len(suf)]
    fam = fams.get(fam_name)
    if fam is None:
        raise AssertionError("no family %s" % fam_name)
    for sname, ls, v in fam["samples"]:
        if sname == name and ls == labels:
            return v
    raise AssertionError("no series %s%s in %s" % (name, labels, fam["samples"][:20]))


# ---- shared helpers ----

def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


class AdminCase(harness.Case):

    def assertError(self, r, status, code):
        self.assertErrorBody(r, status, code)
        return r.json()["error"]

    def upstream_count(self, up, path=None):
        s = up.stats()
        return s["received"] if path is None else s["by_path"].get(path, 0)


# ---- the main single-node suite ----

class AdminApiTest(AdminCase):
    """One gateway (token in the config), two upstreams; tests add their own routes by PUT."""

    @classmethod
    def start_class(cls):
        cls.u1 = cls.upstream("u1", threads=4)
        cls.u2 = cls.upstream("u2", threads=4)
        cls.base_routes = [
            route("orders", "/api/orders", [cls.u1], methods=["GET", "POST"],
                  policies={"token_bucket": {"capacity": 1000, "refill_per_sec": 1},
                            "circuit_breaker": BREAKER,
                            "degradation": {"fallback": FALLBACK, "on": ["circuit_open"]}}),
            route("plain", "/plain", [cls.u1]),
        ]
        cls.gw = cls.gateway(cls.base_routes, extra={"admin": {"token": TOKEN}},
                             node={"workers": 1})
        cls.admin = Admin(cls.gw.api_port)

    def setUp(self):
        self.u1.reset()
        self.u2.reset()

    def put_ok(self, name, obj):
        before = self.admin.routes()["version"]
        r = self.admin.put_route(name, obj)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Content-Type").split(";")[0], "application/json", r)
        body = r.json()
        self.assertEqual(body["name"], name, r)
        self.assertIsInstance(body["version"], int, r)
        self.assertGreater(body["version"], before, r)
        return body["version"]

    # -- routes --

    def test_list_routes(self):
        r = self.admin.get("/admin/routes")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Content-Type").split(";")[0], "application/json")
        doc = r.json()
        self.assertEqual(set(doc), {"version", "routes"}, doc)
        self.assertIsInstance(doc["version"], int)
        by_name = {x["name"]: x for x in doc["routes"]}
        for want in self.base_routes:
            self.assertEqual(by_name.get(want["name"]), want, doc)

    def test_get_route_and_404s(self):
        r = self.admin.get("/admin/routes/orders")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), self.base_routes[0])
        for method, path in (("GET", "/admin/routes/no-such-route"),
                             ("DELETE", "/admin/routes/no-such-route"),
                             ("GET", "/admin/routes/no-such-route/state"),
                             ("POST", "/admin/routes/no-such-route/breaker"),
                             ("POST", "/admin/routes/no-such-route/degrade")):
            with self.subTest(method=method, path=path):
                body = {"state": "open"} if path.endswith("breaker") else \
                    {"mode": "forced"} if path.endswith("degrade") else None
                self.assertError(self.admin.call(method, path, body=body), 404, "route_not_found")

    def test_unknown_admin_paths_and_methods(self):
        self.assertError(self.admin.get("/admin/nothing"), 404, "not_found")
        self.assertError(self.admin.call("POST", "/admin/routes/orders/other", body={}), 404,
                         "not_found")
        for method, path in (("POST", "/admin/routes"), ("DELETE", "/admin/routes"),
                             ("GET", "/admin/routes/orders/breaker"),
                             ("GET", "/admin/routes/orders/degrade"),
                             ("POST", "/admin/routes/orders/state"),
                             ("POST", "/admin/routes/orders"),
                             ("PUT", "/admin/cluster"),
                             ("GET", "/admin/cluster/members"),
                             ("GET", "/admin/cluster/transfer"),
                             ("POST", "/metrics")):
            with self.subTest(method=method, path=path):
                self.assertError(self.admin.call(method, path, raw=b"{}"), 405,
                                 "method_not_allowed")

    def test_put_new_route_serves_without_restart(self):
        r = self.gw.get("/fresh/a")
        self.assertError(r, 404, "route_not_found")
        pid = self.gw.proc.pid
        obj = route("fresh", "/fresh", [self.u2], methods=["GET"])
        v = self.put_ok("fresh", obj)
        self.assertEqual(self.admin.routes()["version"], v)
        got = self.admin.get("/admin/routes/fresh")
        self.assertEqual(got.status, 200, got)
        self.assertEqual(got.json(), obj)
        self.assertIn(obj, self.admin.routes()["routes"])
        r = self.gw.get("/fresh/a?x=1")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Upstream-Name"), "u2", r)
        self.assertEqual(r.json()["target"], "/fresh/a?x=1")
        self.assertEqual(self.upstream_count(self.u2, "/fresh/a"), 1)
        # methods of the new route apply: POST does not match it
        self.assertError(self.gw.req("POST", "/fresh/a", body=b"x"), 404, "route_not_found")
        self.assertEqual(self.gw.proc.pid, pid)
        self.assertTrue(self.gw.proc.alive())
        # a PUT without "name" takes the name from the URL
        obj2 = {"match": {"path_prefix": "/fresh2"}, "upstream": {"targets": [self.u1.url]}}
        self.put_ok("fresh2", obj2)
        got = self.admin.get("/admin/routes/fresh2").json()
        self.assertEqual(got.get("name", "fresh2"), "fresh2")
        self.assertEqual(self.gw.get("/fresh2/z").header("Upstream-Name"), "u1")

    def test_put_invalid_is_400_with_the_path(self):
        ok = route("val", "/val", [self.u1])
        self.put_ok("val", ok)
        before = self.admin.routes()
        cases = [
            ("unknown key", dict(ok, bogus=1), "route.bogus"),
            ("unknown key in upstream", dict(ok, upstream={"targets": [self.u1.url], "x": 1}),
             "route.upstream.x"),
            ("bad target", dict(ok, upstream={"targets": ["ftp://127.0.0.1:1"]}),
             "route.upstream.targets[0]"),
            ("second target bad", dict(ok, upstream={"targets": [self.u1.url, "nope"]}),
             "route.upstream.targets[1]"),
            ("wrong type", dict(ok, match={"path_prefix": 5}), "route.match.path_prefix"),
            ("wrong type of methods", dict(ok, match={"path_prefix": "/val", "methods": "GET"}),
             "route.match.methods"),
            ("policy out of range", dict(ok, policies={"retry": {"max_attempts": 99}}),
             "route.policies.retry.max_attempts"),
            ("unknown policy", dict(ok, policies={"nope": {}}), "route.policies.nope"),
            ("cluster scope on memory", dict(ok, policies={"token_bucket": {
                "capacity": 5, "refill_per_sec": 1, "scope": "cluster"}}),
             "route.policies.token_bucket.scope"),
            ("name differs from the URL", dict(ok, name="other"), "route.name"),
            ("missing upstream", {"name": "val", "match": {"path_prefix": "/val"}},
             "route.upstream"),
        ]
        for what, obj, path in cases:
            with self.subTest(what=what):
                r = self.admin.put_route("val", obj)
                err = self.assertError(r, 400, "invalid_config")
                self.assertEqual(err.get("path"), path, r)
                self.assertTrue(err["message"].startswith("config error at %s: " % path), r)
                self.assertIsInstance(err.get("errors"), list, r)
                self.assertIn(err["message"], err["errors"], r)
                for line in err["errors"]:
                    self.assertTrue(line.startswith("config error at route"), r)
        # nothing changed
        self.assertEqual(self.admin.routes(), before)
        self.assertEqual(self.gw.get("/val/x").status, 200)
        # a body that is not JSON at all
        r = self.admin.call("PUT", "/admin/routes/val", raw=b"{not json")
        self.assertEqual(r.status, 400, r)
        self.assertIn(error_code(r), ("invalid_json", "invalid_config"), r)
        self.assertEqual(self.admin.routes(), before)

    def test_put_bad_name_and_too_large(self):
        before = self.admin.routes()["version"]
        r = self.admin.put_route("bad!name", {"match": {"path_prefix": "/bn"},
                                              "upstream": {"targets": [self.u1.url]}})
        err = self.assertError(r, 400, "invalid_config")
        self.assertEqual(err.get("path"), "route.name", r)
        big = route("big", "/big", [self.u1])
        big["match"]["host"] = "h" * (70 * 1024)
        r = self.admin.put_route("big", big)
        self.assertError(r, 413, "body_too_large")
        self.assertEqual(self.admin.routes()["version"], before)
        self.assertError(self.admin.get("/admin/routes/big"), 404, "route_not_found")

    def test_change_visible_at_once(self):
        """A PUT answered 200 applies to the next request (read your writes)."""
        # The workers must be idle in their wait when the change lands: pause between rounds.
        stale = None
        for i in range(120):
            up = self.u1 if i % 2 else self.u2
            r = self.admin.put_route("flip", route("flip", "/flip", [up]))
            self.assertEqual(r.status, 200, r)
            g = self.gw.get("/flip/%d" % i)
            if g.status != 200 or g.header("Upstream-Name") != up.name:
                stale = (i, g.status, g.header("Upstream-Name"), up.name)
                break
            time.sleep(0.02)
        self.assertEqual(self.admin.delete_route("flip").status, 204)
        self.assertIsNone(stale, "a request right after a 200 PUT saw the old route "
                          "(round, status, upstream, expected upstream)")

    def test_put_empty_body_is_400(self):
        before = self.admin.routes()
        r = self.admin.call("PUT", "/admin/routes/empty-body", raw=b"")
        self.assertEqual(r.status, 400, r)
        self.assertIn(error_code(r), ("invalid_json", "invalid_config"), r)
        self.assertEqual(self.admin.routes()["version"], before["version"])

    def test_put_upstream_change_keeps_limiter_and_breaker_state(self):
        pol = {"token_bucket": {"capacity": 20, "refill_per_sec": 1},
               "circuit_breaker": BREAKER}
        self.put_ok("keep", route("keep", "/keep", [self.u1], policies=pol))
        t0 = time.monotonic()
        for i in range(10):
            r = self.gw.get("/keep/%d" % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Upstream-Name"), "u1")
        st = self.admin.state("keep")
        self.assertEqual(st["token_bucket"]["limit"], 20, st)
        self.assertEqual(st["token_bucket"]["admitted"], 10, st)
        self.assertLessEqual(st["token_bucket"]["remaining"],
                             10 + math.ceil(time.monotonic() - t0), st)
        self.assertEqual(self.admin.breaker("keep", "open").status, 200)
        # Same policies, another upstream and timeout.
        self.put_ok("keep", route("keep", "/keep", [self.u2], timeout_ms=4000, policies=pol))
        st2 = self.admin.state("keep")
        elapsed = time.monotonic() - t0
        self.assertEqual(st2["token_bucket"]["admitted"], 10, st2)
        self.assertLessEqual(st2["token_bucket"]["remaining"], 10 + math.ceil(elapsed), st2)
        self.assertLess(st2["token_bucket"]["remaining"], 20, st2)
        self.assertEqual(st2["breaker"]["state"], "open", st2)
        self.assertEqual(st2["breaker"]["mode"], "forced_open", st2)
        self.assertEqual(self.admin.breaker("keep", "auto").status, 200)
        r = self.gw.get("/keep/after")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Upstream-Name"), "u2", r)
        m = re.match(r'^"keep";r=(\d+);t=\d+$', r.header("RateLimit") or "")
        self.assertTrue(m, r)
        self.assertLessEqual(int(m.group(1)), 9 + math.ceil(time.monotonic() - t0), r)
        # Exhaust: the bucket holds what it held, not a fresh 20.
        admitted = 1
        for i in range(40):
            if self.gw.get("/keep/x%d" % i).status == 429:
                break
            admitted += 1
        total = 10 + admitted
        self.assertLessEqual(total, 20 + math.ceil(time.monotonic() - t0) + 1,
                             "the token bucket was reset by the PUT")
        # A changed limiter policy starts a new, full bucket.
        pol2 = dict(pol, token_bucket={"capacity": 50, "refill_per_sec": 1})
        self.put_ok("keep", route("keep", "/keep", [self.u2], policies=pol2))
        st3 = self.admin.state("keep")
        self.assertEqual(st3["token_bucket"]["limit"], 50, st3)
        self.assertEqual(st3["token_bucket"]["remaining"], 50, st3)

    def test_policy_change_keeps_the_overrides_of_unchanged_policies(self):
        pol = {"circuit_breaker": BREAKER,
               "degradation": {"fallback": FALLBACK, "on": ["upstream_error"]}}
        self.put_ok("ovr", route("ovr", "/ovr", [self.u1], policies=pol))
        self.assertEqual(self.admin.breaker("ovr", "open").status, 200)
        self.assertEqual(self.admin.degrade("ovr", "forced").status, 200)
        # another policy is added; the breaker and degradation policies are as they were
        pol2 = dict(pol, token_bucket={"capacity": 100, "refill_per_sec": 1})
        self.put_ok("ovr", route("ovr", "/ovr", [self.u1], policies=pol2))
        s = self.admin.state("ovr")
        self.assertEqual(s["breaker"]["mode"], "forced_open", s)
        self.assertEqual(s["degradation"]["mode"], "forced", s)
        r = self.gw.get("/ovr/x")
        self.assertEqual(r.header("Gateway-Degraded"), "forced", r)

    def test_changes_under_traffic(self):
        """Route PUTs (policies changing each time), overrides, state, /metrics and traffic
        all at once: every answer is a valid one and the gateway stays up (and clean under a
        sanitizer)."""
        pols = [{"circuit_breaker": BREAKER, "token_bucket": {"capacity": 100000,
                                                              "refill_per_sec": 1000}},
                {"circuit_breaker": dict(BREAKER, min_calls=3), "idempotency": {},
                 "degradation": {"fallback": FALLBACK, "on": ["circuit_open"]}},
                {"sliding_window": {"limit": 100000, "window_ms": 1000},
                 "retry": {"max_attempts": 2, "statuses": [503]}}]
        self.put_ok("churn", route("churn", "/churn", [self.u1], policies=pols[0]))
        stop = threading.Event()
        problems = []
        counts = {"traffic": 0, "puts": 0, "reads": 0}

        def guard(fn):
            def run():
                try:
                    while not stop.is_set():
                        fn()
                except Exception as e:  # noqa: BLE001 - reported below
                    problems.append(repr(e))
            return run

        def traffic():
            r = self.gw.get("/churn/%d" % counts["traffic"], timeout=slow(10))
            counts["traffic"] += 1
            if r.status not in (200, 503) or (r.status == 503 and
                                               error_code(r) != "circuit_open"):
                problems.append(("traffic", r))

        def puts():
            i = counts["puts"]
            counts["puts"] += 1
            up = self.u1 if i % 2 else self.u2
            r = self.admin.put_route("churn", route("churn", "/churn", [up],
                                                    policies=pols[i % len(pols)]))
            if r.status != 200:
                problems.append(("put", r))
            for path, body in (("breaker", {"state": ("open", "auto", "closed")[i % 3]}),
                               ("degrade", {"mode": ("forced", "auto")[i % 2]})):
                r = self.admin.call("POST", "/admin/routes/churn/" + path, body=body)
                if r.status not in (200, 409):
                    problems.append((path, r))

        def reads():
            counts["reads"] += 1
            r = self.admin.get("/admin/routes/churn/state")
            if r.status != 200:
                problems.append(("state", r))
            text, _ = self.admin.metrics_text()
            parse_exposition(text)
            if self.admin.get("/admin/routes").status != 200:
                problems.append("routes")
        ts = [threading.Thread(target=guard(f), daemon=True)
              for f in (traffic, traffic, puts, reads)]
        for t in ts:
            t.start()
        time.sleep(slow(3.0))
        stop.set()
        for t in ts:
            t.join(slow(20))
        self.assertTrue(self.gw.proc.alive(), self.gw.log()[-3000:])
        self.assertEqual(problems[:5], [])
        self.assertGreater(counts["puts"], 5, counts)
        self.assertGreater(counts["traffic"], 20, counts)
        self.assertEqual(self.admin.delete_route("churn").status, 204)

    def test_delete_route(self):
        self.put_ok("gone", route("gone", "/gone", [self.u1]))
        self.assertEqual(self.gw.get("/gone/1").status, 200)
        v = self.admin.routes()["version"]
        r = self.admin.delete_route("gone")
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"")
        self.assertGreater(self.admin.routes()["version"], v)
        self.assertNotIn("gone", [x["name"] for x in self.admin.routes()["routes"]])
        self.assertError(self.admin.get("/admin/routes/gone"), 404, "route_not_found")
        self.assertError(self.gw.get("/gone/1"), 404, "route_not_found")
        self.assertError(self.admin.delete_route("gone"), 404, "route_not_found")
        self.assertError(self.admin.get("/admin/routes/gone/state"), 404, "route_not_found")
        # the other routes are untouched
        self.assertEqual(self.gw.get("/plain/x").status, 200)

    # -- live state --

    def test_state_fields_follow_traffic(self):
        pol = {"token_bucket": {"capacity": 1000, "refill_per_sec": 1},
               "sliding_window": {"limit": 1000, "window_ms": 60000},
               "circuit_breaker": dict(BREAKER, window_size=10, min_calls=10),
               "degradation": {"fallback": FALLBACK, "on": ["circuit_open"],
                               "max_concurrent": 10}}
        self.put_ok("st", route("st", "/st", [self.u1], strip=True, policies=pol))
        s = self.admin.state("st")
        self.assertEqual(s["name"], "st")
        self.assertEqual((s["in_flight"], s["requests"]), (0, 0), s)
        b = s["breaker"]
        self.assertEqual((b["state"], b["mode"], b["window_calls"], b["window_failures"]),
                         ("closed", "auto", 0, 0), s)
        for k in ("window_slow", "failure_rate", "slow_call_rate", "trials_admitted",
                  "trials_done", "open_remaining_ms", "transitions", "rejected"):
            self.assertIn(k, b)
        self.assertEqual(b["transitions"], {"open": 0, "half_open": 0, "closed": 0})
        for lim in ("token_bucket", "sliding_window"):
            self.assertEqual(s[lim]["limit"], 1000, s)
            self.assertEqual(s[lim]["remaining"], 1000, s)
            self.assertEqual((s[lim]["admitted"], s[lim]["rejected"]), (0, 0), s)
        d = s["degradation"]
        self.assertEqual((d["mode"], d["in_flight"], d["max_concurrent"], d["slow"]),
                         ("auto", 0, 10, False), s)
        self.assertEqual(s["counters"], {"rate_limited": 0, "breaker_rejected": 0,
                                         "retries": 0, "replays": 0, "store_errors": 0}, s)
        # 3 successes and 2 failures
        t0 = time.monotonic()
        for i in range(3):
            self.assertEqual(self.gw.get("/st/ok%d" % i).status, 200)
        self.u1.fail(count=2, status=500)
        for i in range(2):
            self.assertEqual(self.gw.get("/st/bad%d" % i).status, 500)
        s = self.admin.state("st")
        self.assertEqual(s["requests"], 5, s)
        self.assertEqual(s["in_flight"], 0, s)
        b = s["breaker"]
        self.assertEqual((b["state"], b["window_calls"], b["window_failures"]),
                         ("closed", 5, 2), s)
        self.assertAlmostEqual(b["failure_rate"], 0.4, places=3)
        self.assertEqual(s["sliding_window"]["remaining"], 995, s)
        self.assertEqual(s["sliding_window"]["admitted"], 5, s)
        self.assertEqual(s["token_bucket"]["admitted"], 5, s)
        self.assertLessEqual(s["token_bucket"]["remaining"],
                             995 + math.ceil(time.monotonic() - t0), s)
        self.assertGreaterEqual(s["token_bucket"]["remaining"], 995, s)
        # in flight: two slow requests
        hold_ms = int(1500 * SLOW)
        done = []
        ts = [threading.Thread(target=lambda i=i: done.append(
            self.gw.get("/st/delay/%d" % hold_ms, timeout=slow(20)).status)) for i in range(2)]
        for t in ts:
            t.start()
        try:
            seen = wait_until(lambda: self.admin.state("st")["in_flight"] == 2, slow(5.0))
            self.assertTrue(seen, self.admin.state("st"))
            s = self.admin.state("st")
            self.assertEqual(s["degradation"]["in_flight"], 2, s)
        finally:
            for t in ts:
                t.join(slow(20))
        self.assertEqual(done, [200, 200])
        s = self.admin.state("st")
        self.assertEqual((s["in_flight"], s["degradation"]["in_flight"], s["requests"]),
                         (0, 0, 7), s)
        # a rate-limit refusal shows in the limiter and the counters
        self.put_ok("st2", route("st2", "/st2", [self.u1], policies={
            "sliding_window": {"limit": 2, "window_ms": 60000}}))
        codes = [self.gw.get("/st2/%d" % i).status for i in range(3)]
        self.assertEqual(codes, [200, 200, 429])
        s = self.admin.state("st2")
        self.assertEqual((s["sliding_window"]["admitted"], s["sliding_window"]["rejected"],
                          s["sliding_window"]["remaining"]), (2, 1, 0), s)
        self.assertEqual(s["counters"]["rate_limited"], 1, s)
        self.assertNotIn("breaker", s)
        self.assertNotIn("token_bucket", s)
        self.assertNotIn("degradation", s)

    # -- overrides --

    def test_breaker_forced_open_closed_auto(self):
        self.put_ok("brk", route("brk", "/brk", [self.u1], policies={"circuit_breaker": BREAKER}))
        r = self.admin.breaker("brk", "open")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["breaker"]["state"], "open", r)
        self.assertEqual(r.json()["breaker"]["mode"], "forced_open", r)
        for i in range(3):
            r = self.gw.get("/brk/%d" % i)
            self.assertError(r, 503, "circuit_open")
            self.assertTrue((r.header("Retry-After") or "").isdigit(), r)
        self.assertEqual(self.upstream_count(self.u1), 0)
        s = self.admin.state("brk")
        self.assertEqual(s["breaker"]["rejected"], 3, s)
        self.assertEqual(s["counters"]["breaker_rejected"], 3, s)
        # auto: closed again, traffic flows
        r = self.admin.breaker("brk", "auto")
        self.assertEqual(r.status, 200, r)
        self.assertEqual((r.json()["breaker"]["state"], r.json()["breaker"]["mode"]),
                         ("closed", "auto"), r)
        self.assertEqual(self.gw.get("/brk/ok").status, 200)
        # failures trip it on their own: 3 of 4 calls failed reaches the 50% rate
        self.u1.fail(count=3, status=500)
        for i in range(3):
            self.assertEqual(self.gw.get("/brk/f%d" % i).status, 500)
        self.assertEqual(self.admin.state("brk")["breaker"]["state"], "open")
        self.assertError(self.gw.get("/brk/x"), 503, "circuit_open")
        # forced closed: the upstream is reached even while it keeps failing
        r = self.admin.breaker("brk", "closed")
        self.assertEqual(r.status, 200, r)
        self.assertEqual((r.json()["breaker"]["state"], r.json()["breaker"]["mode"]),
                         ("closed", "forced_closed"), r)
        self.u1.reset()
        self.u1.fail(count=8, status=500)
        codes = [self.gw.get("/brk/c%d" % i).status for i in range(8)]
        self.assertEqual(codes, [500] * 8)
        self.assertEqual(self.upstream_count(self.u1), 8)
        self.assertEqual(self.admin.state("brk")["breaker"]["state"], "closed")
        # auto again: the breaker judges by itself once more
        self.assertEqual(self.admin.breaker("brk", "auto").status, 200)
        self.assertEqual(self.gw.get("/brk/ok2").status, 200)
        self.u1.fail(count=3, status=500)
        for i in range(3):
            self.assertEqual(self.gw.get("/brk/g%d" % i).status, 500)
        self.assertEqual(self.admin.state("brk")["breaker"]["state"], "open")
        self.assertError(self.gw.get("/brk/y"), 503, "circuit_open")
        self.assertEqual(self.admin.breaker("brk", "auto").status, 200)

    def test_breaker_open_with_fallback(self):
        r = self.admin.breaker("orders", "open")
        self.assertEqual(r.status, 200, r)
        try:
            n0 = self.upstream_count(self.u1)
            r = self.gw.get("/api/orders/1")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Gateway-Degraded"), "circuit_open", r)
            self.assertEqual(r.json(), FALLBACK["body"])
            self.assertEqual(self.upstream_count(self.u1), n0)
        finally:
            self.assertEqual(self.admin.breaker("orders", "auto").status, 200)
        r = self.gw.get("/api/orders/2")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"), r)
        self.assertEqual(r.header("Upstream-Name"), "u1")

    def test_degrade_forced_and_auto(self):
        self.put_ok("deg", route("deg", "/deg", [self.u1], policies={
            "degradation": {"fallback": FALLBACK, "on": ["upstream_error"]}}))
        r = self.admin.degrade("deg", "forced")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["degradation"]["mode"], "forced", r)
        for i in range(2):
            r = self.gw.get("/deg/%d" % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Gateway-Degraded"), "forced", r)
            self.assertEqual(r.json(), FALLBACK["body"], r)
        self.assertEqual(self.upstream_count(self.u1), 0)
        s = self.admin.state("deg")
        self.assertEqual(s["degradation"]["mode"], "forced", s)
        self.assertEqual(s["degradation"]["degraded"], 2, s)
        r = self.admin.degrade("deg", "auto")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["degradation"]["mode"], "auto", r)
        r = self.gw.get("/deg/3")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Gateway-Degraded"), r)
        self.assertEqual(r.header("Upstream-Name"), "u1", r)

    def test_policy_not_configured(self):
        self.assertError(self.admin.breaker("plain", "open"), 409, "policy_not_configured")
        self.assertError(self.admin.degrade("plain", "forced"), 409, "policy_not_configured")
        self.assertEqual(self.gw.get("/plain/x").status, 200)

    def test_bad_override_bodies(self):
        for path, field, bad in (("breaker", "state", ["half_open", "", "OPEN", 1, None, []]),
                                 ("degrade", "mode", ["on", "", "Forced", 0, True])):
            for v in bad:
                with self.subTest(path=path, value=v):
                    r = self.admin.call("POST", "/admin/routes/orders/" + path, body={field: v})
                    err = self.assertError(r, 400, "invalid_field")
                    self.assertEqual(err.get("field"), field, r)
            with self.subTest(path=path, value="missing"):
                err = self.assertError(self.admin.call("POST", "/admin/routes/orders/" + path,
                                                       body={}), 400, "invalid_field")
            for raw in (b"", b"{", b"[]", b'"open"', b"nul"):
                with self.subTest(path=path, raw=raw):
                    r = self.admin.call("POST", "/admin/routes/orders/" + path, raw=raw)
                    self.assertError(r, 400, "invalid_json")
        s = self.admin.state("orders")
        self.assertEqual((s["breaker"]["mode"], s["degradation"]["mode"]), ("auto", "auto"), s)

    # -- token --

    def test_token_required_on_every_admin_path(self):
        paths = [("GET", "/admin/routes"), ("GET", "/admin/routes/orders"),
                 ("PUT", "/admin/routes/orders"), ("DELETE", "/admin/routes/orders"),
                 ("GET", "/admin/routes/orders/state"), ("POST", "/admin/routes/orders/breaker"),
                 ("POST", "/admin/routes/orders/degrade"), ("GET", "/admin/cluster"),
                 ("POST", "/admin/cluster/members"), ("DELETE", "/admin/cluster/members/n9"),
                 ("POST", "/admin/cluster/transfer")]
        bad_headers = [[], [("Authorization", "Bearer wrong")],
                       [("Authorization", "Bearer " + TOKEN[:-1])],
                       [("Authorization", "Bearer " + TOKEN + "x")],
                       [("Authorization", "Basic " + TOKEN)],
                       [("Authorization", TOKEN)],
                       [("Authorization", "Bearer")]]
        v = self.admin.routes()["version"]
        for method, path in paths:
            for hs in bad_headers:
                with self.subTest(method=method, path=path, headers=hs):
                    r = harness.request(self.gw.api_port, method, path, headers=hs,
                                        body=b'{"state":"open","mode":"forced"}'
                                        if method != "GET" else None)
                    self.assertError(r, 401, "unauthorized")
        # nothing happened
        self.assertEqual(self.admin.routes()["version"], v)
        self.assertEqual(self.admin.state("orders")["breaker"]["mode"], "auto")
        self.assertEqual(self.gw.get("/api/orders/1").status, 200)
        # the right token works; the open endpoints need none
        self.assertEqual(self.admin.get("/admin/routes").status, 200)
        self.assertEqual(self.admin.get("/admin/cluster").status, 200)
        for p in ("/healthz", "/readyz", "/metrics", "/admin/ui"):
            with self.subTest(open_path=p):
                self.assertEqual(harness.request(self.gw.api_port, "GET", p).status, 200)
        r = harness.request(self.gw.api_port, "GET", "/admin/ui")
        self.assertTrue(r.header("Content-Type").startswith("text/html"), r)
        self.assertNotIn(TOKEN.encode(), r.body)

    def test_unknown_admin_path_needs_the_token(self):
        # every /admin path but /admin/ui needs the token: no answer tells which paths exist
        for hs in ([], [("Authorization", "Bearer wrong")]):
            for method, path in (("GET", "/admin/nothing"), ("POST", "/admin/routes/x/other"),
                                 ("GET", "/admin/cluster/members/n1")):
                with self.subTest(method=method, path=path, headers=hs):
                    r = harness.request(self.gw.api_port, method, path, headers=hs,
                                        body=b"{}" if method == "POST" else None)
                    self.assertError(r, 401, "unauthorized")

    def test_401_names_the_scheme(self):
        r = harness.request(self.gw.api_port, "GET", "/admin/routes")
        self.assertEqual(r.status, 401, r)
        self.assertTrue((r.header("WWW-Authenticate") or "").lower().startswith("bearer"), r)

    def test_bearer_scheme_is_case_insensitive(self):
        # RFC 9110 11.1: the authentication scheme is a case-insensitive token
        for scheme in ("bearer", "BEARER"):
            r = harness.request(self.gw.api_port, "GET", "/admin/routes",
                                headers=[("Authorization", scheme + " " + TOKEN)])
            self.assertEqual(r.status, 200, r)

    def test_405_lists_the_allowed_methods(self):
        for path, allowed in (("/admin/routes", {"GET"}),
                              ("/admin/routes/orders/breaker", {"POST"}),
                              ("/admin/cluster", {"GET"})):
            r = self.admin.call("PATCH", path, raw=b"{}")
            self.assertEqual(r.status, 405, r)
            got = {m.strip() for m in (r.header("Allow") or "").split(",") if m.strip()}
            self.assertTrue(allowed <= got, r)

    def test_cluster_status_single_node(self):
        r = self.admin.get("/admin/cluster")
        self.assertEqual(r.status, 200, r)
        c = r.json()
        self.assertEqual(c["node_id"], "n1")
        for k in ("leader", "term", "commit_index", "applied_index", "members"):
            self.assertIn(k, c)
        self.assertEqual(c["leader"], "n1")
        self.assertEqual([m["id"] for m in c["members"]], ["n1"])
        for k in ("id", "raft", "api", "role", "match_index"):
            self.assertIn(k, c["members"][0])
        # memory backend: membership changes are refused, not attempted
        for method, path, body in (("POST", "/admin/cluster/members",
                                    {"id": "n2", "raft": "127.0.0.1:1", "api": "127.0.0.1:2"}),
                                   ("DELETE", "/admin/cluster/members/n2", None),
                                   ("POST", "/admin/cluster/transfer", {"to": "n2"})):
            with self.subTest(path=path):
                r = self.admin.call(method, path, body=body)
                self.assertEqual(r.status, 409, r)
                self.assertEqual(error_code(r), "not_clustered", r)

    # -- metrics --

    REQUIRED_FAMILIES = {
        "gateway_requests_total": "counter",
        "gateway_request_duration_seconds": "histogram",
        "gateway_requests_in_flight": "gauge",
        "gateway_rate_limited_total": "counter",
        "gateway_breaker_state": "gauge",
        "gateway_breaker_transitions_total": "counter",
        "gateway_breaker_rejected_total": "counter",
        "gateway_retries_total": "counter",
        "gateway_degraded_total": "counter",
        "gateway_idempotent_replays_total": "counter",
        "gateway_raft_term": "gauge",
        "gateway_raft_commit_index": "gauge",
        "gateway_raft_applied_index": "gauge",
        "gateway_raft_is_leader": "gauge",
        "gateway_raft_leader": "gauge",
        "gateway_raft_proposals_total": "counter",
        "gateway_raft_proposal_commit_seconds": "histogram",
        "gateway_raft_fsync_seconds": "histogram",
    }

    def metrics(self):
        text, r = self.admin.metrics_text()
        self.assertTrue(r.header("Content-Type").startswith("text/plain"), r)
        self.assertIn("version=0.0.4", r.header("Content-Type"))
        return parse_exposition(text)

    def test_metrics_families_and_values_follow_traffic(self):
        self.put_ok("mx", route("mx", "/mx", [self.u1], strip=True, policies={
            "retry": {"max_attempts": 2, "base_ms": 1, "max_backoff_ms": 5, "on": ["status"],
                      "statuses": [503]},
            "idempotency": {}}))
        self.put_ok("mx3", route("mx3", "/mx3", [self.u1], policies={
            "degradation": {"fallback": FALLBACK, "on": ["upstream_error"]},
            "circuit_breaker": BREAKER}))
        m0 = self.metrics()
        for fam, typ in self.REQUIRED_FAMILIES.items():
            with self.subTest(family=fam):
                self.assertIn(fam, m0)
                self.assertEqual(m0[fam]["type"], typ)
                self.assertTrue(m0[fam]["help"])
        self.assertEqual(sample(m0, "gateway_requests_total", route="mx", code="2xx"), 0)
        self.assertEqual(sample(m0, "gateway_request_duration_seconds_count", route="mx"), 0)
        for reason in ("circuit_open", "upstream_error", "shed", "slow", "forced", "stale"):
            self.assertEqual(sample(m0, "gateway_degraded_total", route="mx3", reason=reason), 0)
        self.assertEqual(sample(m0, "gateway_breaker_state", route="mx3"), 0)
        unrouted0 = sample(m0, "gateway_requests_total", route="", code="4xx")

        # traffic
        for i in range(3):
            self.assertEqual(self.gw.get("/mx/ok%d" % i).status, 200)
        self.assertEqual(self.gw.get("/mx/status/404").status, 404)
        self.u1.fail(count=1, status=503)
        self.assertEqual(self.gw.get("/mx/retry").status, 200)
        hs = [("Idempotency-Key", "metrics-key-1")]
        r1 = self.gw.req("POST", "/mx/pay", headers=hs, body=b"x")
        r2 = self.gw.req("POST", "/mx/pay", headers=hs, body=b"x")
        self.assertEqual((r1.status, r2.status), (200, 200))
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertError(self.gw.get("/no-route-here"), 404, "route_not_found")
        self.assertEqual(self.admin.breaker("mx3", "open").status, 200)
        self.assertError(self.gw.get("/mx3/a"), 503, "circuit_open")
        self.assertEqual(self.admin.degrade("mx3", "forced").status, 200)
        r = self.gw.get("/mx3/b")
        self.assertEqual(r.header("Gateway-Degraded"), "forced", r)

        # a /v1 write goes through the node
        r = harness.request(self.gw.api_port, "POST", "/v1/counters/metrics-probe",
                            body=b'{"add": 1}')
        self.assertEqual(r.status, 200, r)

        # the node publishes its status on its own turn: wait for the write to show
        got = {}

        def raft_moved():
            got["m"] = self.metrics()
            return sample(got["m"], "gateway_raft_proposals_total") > \
                sample(m0, "gateway_raft_proposals_total")
        wait_until(raft_moved, slow(5.0))
        m1 = got["m"]
        # 3 plain, 1 retried, 1 POST and its replay; one 404 from the upstream
        self.assertEqual(sample(m1, "gateway_requests_total", route="mx", code="2xx"), 6)
        self.assertEqual(sample(m1, "gateway_requests_total", route="mx", code="4xx"), 1)
        self.assertEqual(sample(m1, "gateway_requests_total", route="mx", code="5xx"), 0)
        self.assertEqual(sample(m1, "gateway_request_duration_seconds_count", route="mx"), 7)
        self.assertGreater(sample(m1, "gateway_request_duration_seconds_sum", route="mx"), 0)
        self.assertEqual(sample(m1, "gateway_retries_total", route="mx"), 1)
        self.assertEqual(sample(m1, "gateway_idempotent_replays_total", route="mx"), 1)
        self.assertEqual(sample(m1, "gateway_requests_total", route="", code="4xx"),
                         unrouted0 + 1)
        self.assertEqual(sample(m1, "gateway_degraded_total", route="mx3", reason="forced"), 1)
        self.assertEqual(sample(m1, "gateway_degraded_total", route="mx3",
                                reason="circuit_open"), 0)
        self.assertEqual(sample(m1, "gateway_breaker_rejected_total", route="mx3"), 1)
        self.assertEqual(sample(m1, "gateway_breaker_state", route="mx3"), 1)
        self.assertEqual(sample(m1, "gateway_breaker_transitions_total", route="mx3",
                                to="open"), 1)
        self.assertEqual(self.admin.breaker("mx3", "auto").status, 200)
        self.assertEqual(self.admin.degrade("mx3", "auto").status, 200)
        m2 = self.metrics()
        self.assertEqual(sample(m2, "gateway_breaker_state", route="mx3"), 0)
        self.assertEqual(sample(m2, "gateway_breaker_transitions_total", route="mx3",
                                to="closed"), 1)
        # the other degradation reasons: an upstream error, an open circuit with a fallback
        self.u1.fail(count=1, status=500)
        r = self.gw.get("/mx3/c")
        self.assertEqual((r.status, r.header("Gateway-Degraded")), (200, "upstream_error"), r)
        co0 = sample(m2, "gateway_degraded_total", route="orders", reason="circuit_open")
        self.assertEqual(self.admin.breaker("orders", "open").status, 200)
        try:
            r = self.gw.get("/api/orders/metrics")
            self.assertEqual(r.header("Gateway-Degraded"), "circuit_open", r)
        finally:
            self.assertEqual(self.admin.breaker("orders", "auto").status, 200)
        m3 = self.metrics()
        self.assertEqual(sample(m3, "gateway_degraded_total", route="mx3",
                                reason="upstream_error"), 1)
        self.assertEqual(sample(m3, "gateway_degraded_total", route="mx3", reason="forced"), 1)
        self.assertEqual(sample(m3, "gateway_degraded_total", route="orders",
                                reason="circuit_open"), co0 + 1)
        # raft
        self.assertGreaterEqual(sample(m1, "gateway_raft_term"), 1)
        self.assertEqual(sample(m1, "gateway_raft_is_leader"), 1)
        self.assertEqual(sample(m1, "gateway_raft_leader", leader="n1"), 1)
        self.assertEqual(sample(m1, "gateway_raft_proposals_total"),
                         sample(m0, "gateway_raft_proposals_total") + 1)
        self.assertEqual(sample(m1, "gateway_raft_proposal_commit_seconds_count"),
                         sample(m0, "gateway_raft_proposal_commit_seconds_count") + 1)
        self.assertGreater(sample(m1, "gateway_raft_commit_index"),
                           sample(m0, "gateway_raft_commit_index"))
        self.assertGreater(sample(m1, "gateway_raft_applied_index"),
                           sample(m0, "gateway_raft_applied_index"))
        self.assertLessEqual(sample(m1, "gateway_raft_applied_index"),
                             sample(m1, "gateway_raft_commit_index"))

    def test_metrics_rate_limited_and_in_flight(self):
        self.put_ok("mrl", route("mrl", "/mrl", [self.u1], policies={
            "token_bucket": {"capacity": 2, "refill_per_sec": 1}}))
        codes = [self.gw.get("/mrl/%d" % i).status for i in range(4)]
        self.assertEqual(codes.count(429), 2, codes)
        m = self.metrics()
        self.assertEqual(sample(m, "gateway_rate_limited_total", route="mrl"), 2)
        self.assertEqual(sample(m, "gateway_requests_total", route="mrl", code="4xx"), 2)
        self.assertEqual(sample(m, "gateway_requests_in_flight", route="mrl"), 0)
        self.put_ok("mif", route("mif", "/mif", [self.u1], strip=True))
        hold_ms = int(1500 * SLOW)
        t = threading.Thread(target=lambda: self.gw.get("/mif/delay/%d" % hold_ms,
                                                        timeout=slow(20)))
        t.start()
        try:
            ok = wait_until(lambda: sample(self.metrics(), "gateway_requests_in_flight",
                                           route="mif") == 1, slow(5.0))
            self.assertTrue(ok, "gateway_requests_in_flight never showed the request")
        finally:
            t.join(slow(20))
        self.assertEqual(sample(self.metrics(), "gateway_requests_in_flight", route="mif"), 0)
        m = self.metrics()
        # the slow request landed in a bucket at or above its duration
        hold_s = hold_ms / 1000.0
        below = [v for sname, ls, v in m["gateway_request_duration_seconds"]["samples"]
                 if sname.endswith("_bucket") and ls.get("route") == "mif" and
                 _parse_float(ls["le"]) < hold_s * 0.9]
        self.assertTrue(all(v == 0 for v in below), below)
        self.assertEqual(sample(m, "gateway_request_duration_seconds_count", route="mif"), 1)

    def test_metrics_promtool(self):
        # some traffic first, so histograms have data
        for i in range(3):
            self.gw.get("/api/orders/%d" % i)
        self.gw.get("/nowhere")
        text, _ = self.admin.metrics_text()
        promtool = shutil.which("promtool") or \
            ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
        if not promtool:
            self.skipTest("promtool not installed (Debian package prometheus): "
                          "apt-get install -y prometheus")
        p = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = p.stdout.decode("utf-8", "replace")
        self.assertEqual(p.returncode, 0, "promtool check metrics failed:\n%s" % out)
        self.assertEqual(out.strip(), "", "promtool check metrics reported:\n%s" % out)

    def test_metrics_strict_parser(self):
        for i in range(3):
            self.gw.get("/api/orders/%d" % i)
        text, _ = self.admin.metrics_text()
        fams = parse_exposition(text)
        for name, fam in fams.items():
            with self.subTest(family=name):
                self.assertIsNotNone(fam["type"], "no TYPE for %s" % name)
                self.assertIsNotNone(fam["help"], "no HELP for %s" % name)
                self.assertTrue(fam["samples"], "no samples for %s" % name)
                if fam["type"] == "counter":
                    self.assertTrue(name.endswith("_total"), name)
        # the parser itself rejects what it must
        bad = [
            "x_total 1",  # no newline at the end
            "# TYPE x counter\nx -1\n",
            "x{a=\"1\"} 1\nx{a=\"1\"} 2\n",
            "x{a=\"\\q\"} 1\n",
            "x{1a=\"b\"} 1\n",
            "x{a=\"b\"}1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n"
            "h_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            "# TYPE x gauge\nx 1\n# TYPE x gauge\n",
            "# TYPE x gauge\nx 1\n# TYPE y gauge\ny 1\nx{a=\"b\"} 2\n",
            "# TYPE x gauge\nx one\n",
            "# TYPE x wrong\nx 1\n",
        ]
        for t in bad:
            with self.subTest(bad=t):
                with self.assertRaises(ExpositionError):
                    parse_exposition(t)
        good = ('# HELP a_total A "quoted" help \\\\ and \\n.\n# TYPE a_total counter\n'
                'a_total{l="x\\"y\\\\z\\n"} 3 1700000000000\n'
                '# TYPE h histogram\nh_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 2\n'
                'h_sum 0.7\nh_count 2\n')
        fams = parse_exposition(good)
        self.assertEqual(sample(fams, "a_total", l='x"y\\z\n'), 3)


# ---- a PUT whose body is not a JSON object, on a gateway of its own ----

class NonObjectRouteBodyTest(AdminCase):

    @classmethod
    def start_class(cls):
        cls.u = cls.upstream("u")
        cls.gw = cls.gateway([route("a", "/a", [cls.u])])
        cls.admin = Admin(cls.gw.api_port, token="")

    def test_array_body_is_400_and_the_gateway_lives(self):
        for raw in (b"[1]", b'"x"', b"5", b"null"):
            with self.subTest(raw=raw):
                try:
                    r = self.admin.call("PUT", "/admin/routes/b", raw=raw)
                except OSError as e:
                    self.fail("no answer to PUT %r: %r; gateway alive: %s" %
                              (raw, e, self.gw.proc.alive()))
                self.assertEqual(r.status, 400, r)
                self.assertIn(error_code(r), ("invalid_json", "invalid_config"), r)
                self.assertTrue(self.gw.proc.alive())
        self.assertEqual(self.gw.get("/a/x").status, 200)


# ---- the admin token from the environment, and no token at all ----

class TokenFromEnvTest(AdminCase):

    @classmethod
    def start_class(cls):
        cls.u = cls.upstream("u")
        old = os.environ.get("GATEWAY_ADMIN_TOKEN")
        os.environ["GATEWAY_ADMIN_TOKEN"] = "env-token-42"
        try:
            cls.gw = cls.gateway([route("a", "/a", [cls.u])], subdir="env")
        finally:
            if old is None:
                os.environ.pop("GATEWAY_ADMIN_TOKEN", None)
            else:
                os.environ["GATEWAY_ADMIN_TOKEN"] = old
        cls.open_gw = cls.gateway([route("a", "/a", [cls.u])], subdir="open")

    def test_env_token(self):
        port = self.gw.api_port
        self.assertError(harness.request(port, "GET", "/admin/routes"), 401, "unauthorized")
        self.assertError(harness.request(port, "GET", "/admin/routes", headers=auth("nope")),
                         401, "unauthorized")
        r = harness.request(port, "GET", "/admin/routes", headers=auth("env-token-42"))
        self.assertEqual(r.status, 200, r)
        r = harness.request(port, "PUT", "/admin/routes/b", headers=auth("env-token-42"),
                            body=json.dumps(route("b", "/b", [self.u])).encode())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.gw.get("/b/1").status, 200)
        self.assertError(harness.request(port, "DELETE", "/admin/routes/b"), 401, "unauthorized")
        self.assertEqual(self.gw.get("/b/1").status, 200)
        self.assertEqual(harness.request(port, "GET", "/admin/ui").status, 200)

    def test_applied_catches_up_with_commit_at_rest(self):
        def status():
            return harness.request(self.open_gw.api_port, "GET", "/admin/cluster").json()
        self.assertTrue(wait_until(lambda: status()["commit_index"] >= 1, slow(5.0)), status())
        self.assertTrue(wait_until(lambda: status()["applied_index"] == status()["commit_index"],
                                   slow(3.0)),
                        harness.request(self.open_gw.api_port, "GET", "/admin/cluster").json())

    def test_no_token_configured_is_open(self):
        port = self.open_gw.api_port
        r = harness.request(port, "GET", "/admin/routes")
        self.assertEqual(r.status, 200, r)
        r = harness.request(port, "GET", "/admin/routes/a/state",
                            headers=[("Authorization", "Bearer anything")])
        self.assertEqual(r.status, 200, r)


# ---- SIGHUP with backend memory ----

class ReloadTest(AdminCase):

    @classmethod
    def start_class(cls):
        cls.u1 = cls.upstream("u1")
        cls.u2 = cls.upstream("u2")
        cls.gw = cls.gateway([route("a", "/a", [cls.u1])], extra={"admin": {"token": TOKEN}},
                             node={"workers": 1})
        cls.admin = Admin(cls.gw.api_port)

    def test_sighup_reloads_routes(self):
        v0 = self.admin.routes()["version"]
        # an admin PUT first: the file wins on reload with backend memory
        r = self.admin.put_route("adm", route("adm", "/adm", [self.u1]))
        self.assertEqual(r.status, 200, r)
        cfg = dict(self.gw.config)
        cfg["routes"] = [route("a", "/a", [self.u2]), route("b", "/b", [self.u2])]
        self.gw.write_config(cfg)
        self.gw.proc.signal(signal.SIGHUP)

        def reloaded():
            names = sorted(x["name"] for x in self.admin.routes()["routes"])
            return names == ["a", "b"]
        self.assertTrue(wait_until(reloaded, slow(5.0)), self.admin.routes())
        doc = self.admin.routes()
        self.assertGreater(doc["version"], v0 + 1, doc)
        self.assertEqual(self.gw.get("/b/1").header("Upstream-Name"), "u2")
        self.assertEqual(self.gw.get("/a/1").header("Upstream-Name"), "u2")
        self.assertError(self.gw.get("/adm/1"), 404, "route_not_found")
        # a bad file is refused and the running routes stay
        v1 = doc["version"]
        self.gw.write_config('{"routes": [{"name": "a"}]')
        self.gw.proc.signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "reload rejected" in self.gw.log(), slow(5.0)),
                        self.gw.log()[-2000:])
        self.assertEqual(self.admin.routes()["version"], v1)
        self.assertEqual(self.gw.get("/b/1").status, 200)
        self.assertTrue(self.gw.proc.alive())
        self.gw.write_config(cfg)


# ---- /admin/ui in headless Chromium ----

class AdminUiTest(AdminCase):
    """Loads /admin/ui in headless Chromium, trips a breaker, and watches the page change."""

    @classmethod
    def start_class(cls):
        import ui_check
        cls.ui = ui_check
        if not ui_check.chromium_path():
            if os.environ.get("GW_REQUIRE_BROWSER") == "1":
                raise RuntimeError("chromium is required (GW_REQUIRE_BROWSER=1) but missing")
            raise unittest.SkipTest("chromium is not installed (Debian package chromium: "
                                    "apt-get install -y chromium); /admin/ui not checked")
        cls.u = cls.upstream("u", threads=4)
        cls.gw = cls.gateway([
            route("shop", "/shop", [cls.u], policies={"circuit_breaker": BREAKER}),
            route("other", "/other", [cls.u]),
        ], extra={"admin": {"token": TOKEN}}, node={"workers": 1})
        cls.admin = Admin(cls.gw.api_port)
        cls.url = "http://127.0.0.1:%d/admin/ui" % cls.gw.api_port

    def browser(self):
        b = self.ui.Browser(timeout=slow(30.0))
        self.addCleanup(b.close)
        return b

    def breaker_text(self, b, name):
        rows = b.evaluate(self.ui.ROUTES_JS) or {}
        row = rows.get(name)
        return row["breaker"] if row else None

    def test_page_shows_a_breaker_trip(self):
        self.assertEqual(self.admin.breaker("shop", "auto").status, 200)
        b = self.browser()
        b.on_new_document("try{sessionStorage.setItem('gwtoken', %s);}catch(e){}" %
                          json.dumps(TOKEN))
        b.navigate(self.url)
        shown = b.wait_for("document.querySelector('#routes tr[data-route=\"shop\"]') !== null",
                           slow(10.0))
        self.assertTrue(shown, "no row for the route: error=%r dialogs=%r" %
                        (b.evaluate(self.ui.ERROR_JS), b.dialogs))
        self.assertEqual(b.dialogs, [])
        rows = b.evaluate(self.ui.ROUTES_JS)
        self.assertEqual(set(rows), {"shop", "other"}, rows)
        self.assertTrue(rows["shop"]["breaker"].startswith("closed"), rows)
        self.assertIn("circuit_breaker", rows["shop"]["cells"][2])
        self.assertEqual(rows["other"]["breaker"], "-", rows)
        self.assertEqual(b.evaluate(self.ui.ERROR_JS), "")
        # trip the breaker with upstream failures, not through the admin API
        self.u.fail(count=4, status=500)
        for i in range(4):
            self.assertEqual(self.gw.get("/shop/%d" % i).status, 500)
        self.assertEqual(self.admin.state("shop")["breaker"]["state"], "open")
        # the page refreshes itself
        ok = wait_until(lambda: (self.breaker_text(b, "shop") or "").startswith("open"),
                        slow(6.0), 0.2)
        self.assertTrue(ok, "page still shows %r" % self.breaker_text(b, "shop"))
        self.assertIn("auto", self.breaker_text(b, "shop"))
        cls_name = b.evaluate("document.querySelector('#routes tr[data-route=\"shop\"] "
                              "td.breaker span').className")
        self.assertEqual(cls_name, "open")
        # and a fresh load shows it too
        b.navigate(self.url)
        ok = b.wait_for("(document.querySelector('#routes tr[data-route=\"shop\"] td.breaker')"
                        "||{}).textContent", slow(10.0))
        self.assertTrue((ok or "").startswith("open"), ok)
        # closing it through the admin API shows as closed (forced)
        self.assertEqual(self.admin.breaker("shop", "closed").status, 200)
        ok = wait_until(lambda: (self.breaker_text(b, "shop") or "").startswith("closed"),
                        slow(6.0), 0.2)
        self.assertTrue(ok, self.breaker_text(b, "shop"))
        self.assertIn("forced_closed", self.breaker_text(b, "shop"))
        self.assertEqual(self.admin.breaker("shop", "auto").status, 200)
        path = os.path.join(self.workdir, "admin-ui.png")
        b.screenshot(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_page_asks_for_the_token(self):
        b = self.browser()
        b.dialog_answer = TOKEN
        b.navigate(self.url)
        ok = b.wait_for("document.querySelectorAll('#routes tbody tr[data-route]').length == 2",
                        slow(10.0))
        self.assertTrue(ok, "error=%r dialogs=%r" % (b.evaluate(self.ui.ERROR_JS), b.dialogs))
        self.assertTrue(b.dialogs, "no prompt for the token")
        self.assertEqual(b.dialogs[0], ("prompt", "Admin token"))
        self.assertEqual(b.evaluate("sessionStorage.getItem('gwtoken')"), TOKEN)

    def test_page_without_token_shows_unauthorized(self):
        b = self.browser()
        b.dialog_answer = None  # dismiss the prompt
        b.navigate(self.url)
        ok = b.wait_for("document.getElementById('error') && "
                        "document.getElementById('error').textContent", slow(10.0))
        self.assertEqual(ok, "unauthorized")
        self.assertEqual(b.evaluate("document.querySelectorAll('#routes tbody tr').length"), 0)

    def test_page_asks_for_the_token_once(self):
        b = self.browser()
        b.dialog_answer = TOKEN
        b.navigate(self.url)
        b.wait_for("document.querySelectorAll('#routes tbody tr[data-route]').length == 2",
                   slow(10.0))
        time.sleep(1.5)
        b.evaluate("1")
        self.assertEqual(len(b.dialogs), 1, b.dialogs)


if __name__ == "__main__":
    harness.main()
