"""The metrics alone on their own port (``metrics.port``): a small threaded HTTP server beside the
gateway's, for a Prometheus that scrapes a private interface."""
from __future__ import annotations

import logging
from typing import Any

from .metrics import CONTENT_TYPE

log = logging.getLogger("helixagent.observability")


def start_multiprocess_metrics_server(path: str, host: str, port: int) -> Any:
    from .multiproc import scrape_multiprocess
    return start_metrics_server(lambda: scrape_multiprocess(path), host, port)


def start_metrics_server(expose: Any, host: str, port: int) -> Any:
    """Serve the metrics alone on ``port`` (no authentication: bind it to a private interface)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            try:
                body = expose()
            except Exception:
                log.exception("metrics scrape failed")
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE.decode())
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="helixagent-metrics").start()
    log.info("metrics served on http://%s:%d/metrics (no authentication)", host, port)
    return srv
