"""A stand-in for a Grafana server: only the HTTP endpoints `pagedserve grafana --url` calls.

This is not Grafana (its server cannot be installed on the test machines); it answers as
Grafana's HTTP API documents: bearer-token auth (401 otherwise), `GET/POST /api/folders`,
`POST /api/dashboards/db` (412 when the uid exists and `overwrite` is false) and
`GET /api/dashboards/uid/<uid>`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GrafanaStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "version"}
        self.folders: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GrafanaStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def _route(self, method: str) -> None:
                standin.requests.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    return self._send(401, {"message": "Invalid API key"})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, answer = standin.answer(method, self.path.split("?")[0], body)
                self._send(status, answer)

            def _send(self, status: int, answer) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, method: str, path: str, body) -> tuple[int, object]:
        if (method, path) == ("GET", "/api/folders"):
            return 200, self.folders
        if (method, path) == ("POST", "/api/folders"):
            folder = {"id": len(self.folders) + 1, "uid": f"f{len(self.folders) + 1}",
                      "title": body["title"]}
            self.folders.append(folder)
            return 200, folder
        if (method, path) == ("POST", "/api/dashboards/db"):
            return self._save(body)
        if method == "GET" and path.startswith("/api/dashboards/uid/"):
            stored = self.dashboards.get(path.rsplit("/", 1)[1])
            return (200, stored) if stored else (404, {"message": "Dashboard not found"})
        return 404, {"message": "Not found"}

    def _save(self, body: dict) -> tuple[int, dict]:
        dash = body["dashboard"]
        uid = dash["uid"]
        old = self.dashboards.get(uid)
        if old is not None and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists",
                         "status": "name-exists"}
        version = 1 if old is None else old["version"] + 1
        self.dashboards[uid] = {"dashboard": dash, "folderUid": body.get("folderUid"),
                                "version": version}
        return 200, {"id": 1, "uid": uid, "url": f"/d/{uid}/pagedserve", "status": "success",
                     "version": version, "slug": "pagedserve"}
