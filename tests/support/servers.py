"""Local HTTP servers: a file server with resumable-download knobs, and a handler that refuses
every request with 401 (an auth proxy without our token)."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `payload` at any path (404 at /missing). Knobs: ``cut_after`` (send that many body
    bytes, then close: "close" = FIN, "reset" = RST), ``ignore_range`` (always answer 200)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_after: int | None = None
        self.cut_mode = "close"
        self.ignore_range = False
        self.requests: list[dict] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path == "/missing":
                    self.send_error(404)
                    return
                data = srv.payload
                total = len(data)
                rng = self.headers.get("Range")
                start, status = 0, 200
                if rng and not srv.ignore_range:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    assert m, rng
                    start = int(m.group(1))
                    if start >= total:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{total}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.end_headers()
                if srv.cut_after is not None:
                    self.wfile.write(body[: srv.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    if srv.cut_mode == "reset":
                        time.sleep(0.3)  # let the client read what was sent, then RST
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/VOCtrainval.tar") -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class DenyHandler(BaseHTTPRequestHandler):
    """Answers every GET and POST with 401 and an MLflow-style JSON error."""

    def do_GET(self):  # noqa: N802
        body = b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass
