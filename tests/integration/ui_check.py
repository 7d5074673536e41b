"""Headless Chromium for checking /admin/ui: a small DevTools-protocol client (Python stdlib).

Browser() starts Debian's chromium with --headless and --remote-debugging-port=0 in a fresh
user-data dir, reads the port from DevToolsActivePort, and talks to the first page target over
a WebSocket (RFC 6455, text frames only). It can add a script that runs before every document
(to preset the admin token in sessionStorage), answer JavaScript dialogs (the page's token
prompt), navigate, evaluate expressions, wait for one to become true, and take a PNG screenshot.

Run as a program it prints what the page shows for each route:
    python3 ui_check.py http://127.0.0.1:9090/admin/ui [--token T] [--screenshot out.png]
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

BASE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio",
              "--hide-scrollbars"]


def chromium_path():
    """The chromium binary, or None when none is installed."""
    env = os.environ.get("GW_CHROMIUM")
    for p in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if p and os.access(p, os.X_OK):
            return p
    return None


class WebSocket:
    """A client WebSocket over a plain TCP socket: masked text frames out, frames in."""

    def __init__(self, host, port, path, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n" % (path, host, port, key))
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("websocket handshake refused: %r" % head[:200])

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_text(self, text):
        data = text.encode()
        n = len(data)
        if n < 126:
            hdr = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(hdr + mask + masked)

    def recv_text(self, timeout):
        """One whole text message (continuations joined); control frames are handled here."""
        self.sock.settimeout(timeout)
        parts = []
        while True:
            b0, b1 = self._read(2)
            op = b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if op == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if op == 0x9:  # ping: answer with a masked pong
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + b"\0\0\0\0" +
                                  payload)
                continue
            if op in (0x1, 0x2, 0x0):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode("utf-8", "replace")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    """One headless chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary=None, width=1280, height=900, timeout=30.0):
        self.binary = binary or chromium_path()
        if not self.binary:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="gw-ui-chromium-")
        self.log_path = os.path.join(self.profile, "chromium.log")
        self.log = open(self.log_path, "wb")
        argv = [self.binary] + BASE_FLAGS + [
            "--user-data-dir=" + self.profile, "--remote-debugging-port=0",
            "--remote-allow-origins=*", "--window-size=%d,%d" % (width, height), "about:blank"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        self.ws = None
        self.next_id = 0
        self.events = []
        self.dialogs = []  # (type, message) of every dialog seen
        self.dialog_answer = None  # text for prompts; None dismisses them
        try:
            self._connect()
        except Exception:
            self.close()
            raise

    def _connect(self):
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.timeout
        port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("chromium exited with %s: %s" % (self.proc.returncode,
                                                                    self.tail()))
            try:
                with open(port_file) as f:
                    port = int(f.readline().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        if port is None:
            raise RuntimeError("chromium wrote no DevToolsActivePort: %s" % self.tail())
        self.port = port
        page = None
        while time.monotonic() < deadline and page is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port,
                                            timeout=5) as r:
                    targets = json.loads(r.read())
                page = next((t for t in targets if t.get("type") == "page"), None)
            except OSError:
                pass
            if page is None:
                time.sleep(0.05)
        if page is None:
            raise RuntimeError("chromium has no page target: %s" % self.tail())
        url = page["webSocketDebuggerUrl"]
        path = url.split("://", 1)[1]
        path = path[path.index("/"):]
        self.ws = WebSocket("127.0.0.1", port, path, self.timeout)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def tail(self, n=3000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def _handle_event(self, msg):
        if msg.get("method") == "Page.javascriptDialogOpening":
            p = msg.get("params", {})
            self.dialogs.append((p.get("type"), p.get("message")))
            params = {"accept": self.dialog_answer is not None}
            if self.dialog_answer is not None:
                params["promptText"] = self.dialog_answer
            self._send("Page.handleJavaScriptDialog", params)
        else:
            self.events.append(msg)
            del self.events[:-200]

    def _send(self, method, params=None):
        self.next_id += 1
        self.ws.send_text(json.dumps({"id": self.next_id, "method": method,
                                      "params": params or {}}))
        return self.next_id

    def call(self, method, params=None, timeout=None):
        """Sends one command and returns its result; events that arrive meanwhile are handled."""
        want = self._send(method, params)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer to %s" % method)
            msg = json.loads(self.ws.recv_text(left))
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            if "method" in msg:
                self._handle_event(msg)

    def on_new_document(self, source):
        """Runs source in every document before its own scripts."""
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def navigate(self, url):
        r = self.call("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise RuntimeError("navigation to %s failed: %s" % (url, r["errorText"]))

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError("evaluate %r: %s" % (expression, r["exceptionDetails"]))
        return r.get("result", {}).get("value")

    def wait_for(self, expression, timeout, interval=0.1):
        """Evaluates expression until it is truthy or timeout passes; returns the last value."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.evaluate(expression)
            if v or time.monotonic() >= deadline:
                return v
            time.sleep(interval)

    def screenshot(self, path):
        r = self.call("Page.captureScreenshot", {"format": "png"})
        with open(path, "wb") as f:
            f.write(base64.b64decode(r["data"]))
        return path

    def close(self):
        if self.ws:
            try:
                self._send("Browser.close")
            except OSError:
                pass
            self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# JavaScript that reads the routes table of /admin/ui: {name: {breaker, cells}}.
ROUTES_JS = """(() => {
  const out = {};
  for (const tr of document.querySelectorAll('#routes tbody tr[data-route]')) {
    const b = tr.querySelector('td.breaker');
    out[tr.getAttribute('data-route')] = {
      breaker: b ? b.textContent.trim() : null,
      cells: Array.from(tr.cells).map(td => td.textContent.trim())};
  }
  return out;
})()"""

ERROR_JS = "(document.getElementById('error') || {}).textContent || ''"


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="Show what /admin/ui renders, headless.")
    ap.add_argument("url")
    ap.add_argument("--token", default=None)
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--wait", type=float, default=5.0)
    a = ap.parse_args(argv)
    with Browser() as b:
        b.dialog_answer = a.token
        if a.token:
            b.on_new_document("try{sessionStorage.setItem('gwtoken', %s);}catch(e){}" %
                              json.dumps(a.token))
        b.navigate(a.url)
        b.wait_for("document.querySelectorAll('#routes tbody tr').length > 0", a.wait)
        print(json.dumps({"routes": b.evaluate(ROUTES_JS), "error": b.evaluate(ERROR_JS),
                          "stamp": b.evaluate("document.getElementById('stamp').textContent")},
                         indent=2))
        if a.screenshot:
            print(b.screenshot(a.screenshot))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
