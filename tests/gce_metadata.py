"""A GCE metadata server stand-in on 127.0.0.1, with the real path and header check."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator

PREFIX = "/computeMetadata/v1/"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests += 1
        key = self.path[len(PREFIX) :] if self.path.startswith(PREFIX) else None
        # Like GCE: without `Metadata-Flavor: Google` nothing is served.
        if self.headers.get("Metadata-Flavor") != "Google" or key not in server.values:
            self.send_response(404)
            self.end_headers()
            return
        body = server.values[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(values: dict[str, str] | None = None) -> Iterator[http.server.HTTPServer]:
    """Serves `server.values` (paths under /computeMetadata/v1/, mutable while it runs).

    The server counts requests in `server.requests`; `server.url` is the
    /computeMetadata/v1 base URL.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.values = dict(values or {})
    server.requests = 0
    server.url = f"http://127.0.0.1:{server.server_port}{PREFIX.rstrip('/')}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
