"""A fault-injecting HTTP proxy on 127.0.0.1, in front of fake-gcs-server.

Clients reach it as their storage emulator (STORAGE_EMULATOR_HOST), so gcsfs
and google-cloud-storage talk to it exactly as they talk to GCS. Per request,
from a seeded random stream, it:

- "503":   answers 503 Service Unavailable without forwarding;
- "reset": resets the connection without forwarding;
- "lost":  forwards the request, reads the server's answer, then resets the
           connection: the request landed, the client never hears of it;
- "short": forwards the request, sends the answer's headers and half its
           body, then closes the connection: a body cut short;
- forbids: from `forbid_writes = True` on, answers 403 to every write.

A test that needs a fault at a given request, not a rate, sets
`script_writes`: the faults (or None) for the next writes, in order, used
before `rates`. Random faults can come back to back, and the storage client
backs off exponentially between retries: a scripted fault costs one retry.

`counts` tallies the faults injected, by kind, and the requests seen.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import json
import random
import socket
import struct
import threading
import urllib.parse

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te"}
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


class FaultProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, *, seed: int = 0, rates=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.upstream_url = upstream
        self.rates = dict(rates or {})  # kind -> probability per request
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.forbid_writes = False
        self.down = False  # Every request reset: the store is gone (see `go_down`).
        self.script_writes: list[str | None] = []
        self.url = f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request, client_address):
        # A client that gave up on a request (its timeout, its own retry)
        # leaves the proxy writing into a closed socket: not a test failure.
        pass

    def start(self) -> FaultProxy:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def go_down(self) -> None:
        """The store is gone: new connections are refused, and a request on a
        connection the clients keep alive is reset."""
        self.down = True
        self.stop()

    def decide(self, method: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.down:
                self.counts["down"] += 1
                return "reset"
            if self.forbid_writes and method in _WRITES:
                self.counts["403"] += 1
                return "403"
            if self.script_writes and method in _WRITES:
                kind = self.script_writes.pop(0)
                self.counts[kind or "passed"] += 1
                return kind
            draw = self.rng.random()
            for kind, rate in sorted(self.rates.items()):
                if draw < rate:
                    self.counts[kind] += 1
                    return kind
                draw -= rate
            return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # Keep-alive, as the clients expect.

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, as a dropped connection looks.
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.close_connection = True

    def _answer(self, status: int, message: str) -> None:
        body = json.dumps({"error": {"code": status, "message": message}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.decide(self.command)
        if fault == "403":
            return self._answer(
                403,
                "fault proxy: the caller does not have storage.objects.create access",
            )
        if fault == "503":
            return self._answer(503, "fault proxy: service unavailable")
        if fault == "reset":
            return self._reset()
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault == "lost":
            return self._reset()
        self.send_response(response.status, response.reason)
        if fault == "short":  # Content-Length promises the whole body.
            data = data[: len(data) // 2]
            self.close_connection = True
        for key, value in response.getheaders():
            if key.lower() not in _HOP:
                self.send_header(key, value)
        promised = response.getheader("Content-Length") if fault == "short" else None
        self.send_header("Content-Length", promised or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

    def log_message(self, *args):
        pass
