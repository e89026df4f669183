"""Server-side apply sends UTF-8, not surrogate-pair escapes: the apiserver decodes an apply body as
YAML, which rejects "\\ud83d\\udca5" (an emoji outside the BMP as the kubernetes client's json.dumps
writes it), so a model name with an emoji left the pool without its Deployment. The real client
library posts to a loopback HTTP server that keeps what it was sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubernetes import client

from kvpilot.operator.kube import Kube


def test_apply_sends_non_bmp_text_as_utf8() -> None:
    seen: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            seen.append((self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_port}"))
        Kube(api).apply({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "c", "namespace": "ns"}, "data": {"model": "💥模型"}})
    finally:
        server.shutdown()
    (content_type, body), = seen
    assert content_type == "application/apply-patch+yaml"
    assert b"\\ud83d" not in body and "💥模型".encode() in body
    assert json.loads(body)["data"]["model"] == "💥模型"
