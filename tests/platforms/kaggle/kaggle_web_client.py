"""Stand-in for Kaggle's `kaggle_web_client` module (tests/platforms; not Kaggle's code).

Behaves as Kaggle/docker-python patches/kaggle_web_client.py does: the base URL is
$KAGGLE_URL_BASE (default https://www.kaggle.com); constructing a client without
$KAGGLE_USER_SECRETS_TOKEN raises CredentialError; a request POSTs JSON with the header
`X-Kaggle-Authorization: Bearer <token>` and returns the answer's "result" when "wasSuccessful",
else raises BackendError naming the response; HTTP 401/403 raise CredentialError; an unreachable
service (the notebook's internet off) raises ConnectionError, an OSError.
"""

import json
import os
import urllib.error
import urllib.request

DEFAULT_URL_BASE = "https://www.kaggle.com"
URL_BASE_VAR = "KAGGLE_URL_BASE"
TOKEN_VAR = "KAGGLE_USER_SECRETS_TOKEN"
TIMEOUT_S = 40


class CredentialError(Exception):
    pass


class BackendError(Exception):
    pass


class KaggleWebClient:
    def __init__(self):
        self.url_base = os.getenv(URL_BASE_VAR) or DEFAULT_URL_BASE
        token = os.getenv(TOKEN_VAR)
        if token is None:
            raise CredentialError(
                f"A JWT Token is required to call Kaggle, but none found in environment variable {TOKEN_VAR}"
            )
        self.headers = {"Content-type": "application/json", "X-Kaggle-Authorization": f"Bearer {token}"}

    def make_post_request(self, data, endpoint, timeout=TIMEOUT_S):
        request = urllib.request.Request(
            self.url_base + endpoint, headers=self.headers, data=json.dumps(dict(data)).encode("utf-8")
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise CredentialError(
                    f"Service responded with error code {exc.code}. Please ensure you have access to the resource."
                ) from exc
            raise BackendError("Unexpected response from the service.") from exc
        except (TimeoutError, urllib.error.URLError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
                raise ConnectionError(
                    "Timeout error trying to communicate with service. Please ensure internet is on."
                ) from exc
            raise ConnectionError("Connection error trying to communicate with service.") from exc
        if not answer.get("wasSuccessful") or "result" not in answer:
            raise BackendError(f"Unexpected response from the service. Response: {answer}.")
        return answer["result"]
