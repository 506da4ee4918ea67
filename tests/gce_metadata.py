"""A GCE metadata server stand-in on 127.0.0.1: the real path, header check,
ETags and `?wait_for_change=true` hanging GETs."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import urllib.parse
from typing import Iterator

PREFIX = "/computeMetadata/v1/"


def _etag(value: str) -> str:
    return hashlib.sha1(value.encode()).hexdigest()[:16]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        key = path[len(PREFIX) :] if path.startswith(PREFIX) else None
        with server.changed:
            server.requests += 1
            # Like GCE: without `Metadata-Flavor: Google` nothing is served.
            if (
                self.headers.get("Metadata-Flavor") != "Google"
                or key not in server.values
            ):
                self.send_response(404)
                self.end_headers()
                return
            if params.get("wait_for_change") == ["true"]:
                server.hanging += 1
                # As documented: answer when the value's ETag differs from
                # last_etag (at once if it already does), or at timeout_sec.
                last = params.get("last_etag", [None])[0]
                timeout = float(params.get("timeout_sec", ["300"])[0])
                if last is None:
                    last = _etag(server.values[key])
                server.changed.wait_for(
                    lambda: _etag(server.values[key]) != last, timeout=timeout
                )
            value = server.values[key]
        body = value.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", _etag(value))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def set(self, key: str, value: str) -> None:
        """Changes a value, waking the hanging GETs that wait for it."""
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()


@contextlib.contextmanager
def serve(values: dict[str, str] | None = None) -> Iterator[_Server]:
    """Serves `values` (paths under /computeMetadata/v1/); change them with
    `server.set(key, value)` while it runs.

    The server counts requests in `server.requests` and hanging GETs in
    `server.hanging`; `server.url` is the /computeMetadata/v1 base URL.
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.values = dict(values or {})
    server.changed = threading.Condition()
    server.requests = 0
    server.hanging = 0
    server.url = f"http://127.0.0.1:{server.server_port}{PREFIX.rstrip('/')}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        with server.changed:  # Release hanging GETs, so shutdown returns.
            server.values = {k: v + " " for k, v in server.values.items()}
            server.changed.notify_all()
        server.shutdown()
        server.server_close()
