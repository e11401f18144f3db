"""Stand-in for Kaggle's user-secrets service, the HTTP endpoint behind $KAGGLE_URL_BASE.

Answers POST /requests/GetUserSecretByLabelRequest as docker-python's tests/test_user_secrets.py
describes the real one: with the right `X-Kaggle-Authorization: Bearer <KAGGLE_USER_SECRETS_TOKEN>`
and an attached secret, {"wasSuccessful": true, "result": {"secret": …, "secretType": …}}; for a
label that is not attached, {"wasSuccessful": false, "errors": ["No user secrets exist for kernel"]};
a wrong or missing token gets 401. `url` goes into KAGGLE_URL_BASE (tests.platforms.apply /
child_env take it as an extra variable). Records every label asked for.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.platforms.kaggle_t4x2 import KAGGLE_VARS

ENDPOINT = "/requests/GetUserSecretByLabelRequest"


class KaggleSecretsService:
    def __init__(self, secrets: dict[str, str] | None = None, token: str = KAGGLE_VARS["KAGGLE_USER_SECRETS_TOKEN"]):
        self.secrets = dict(secrets or {})
        self.token = token
        self.asked: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != ENDPOINT:
                    return self._answer(404, {"wasSuccessful": False, "errors": ["not found"]})
                if self.headers.get("X-Kaggle-Authorization") != f"Bearer {service.token}":
                    return self._answer(401, {"wasSuccessful": False, "errors": ["unauthorized"]})
                label = body.get("Label", "")
                service.asked.append(label)
                if label not in service.secrets:
                    return self._answer(200, {"wasSuccessful": False, "errors": ["No user secrets exist for kernel"]})
                secret = service.secrets[label]
                return self._answer(200, {"wasSuccessful": True, "result": {"secret": secret, "secretType": "string"}})

            def _answer(self, status: int, payload: dict) -> None:
                blob = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def __enter__(self) -> KaggleSecretsService:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
