"""Stand-in for Kaggle's `kaggle_secrets` module (tests/platforms; not Kaggle's code).

Behaves as Kaggle/docker-python patches/kaggle_secrets.py does for what Relay uses:
`UserSecretsClient().get_secret(label)` POSTs {"Label": label} to
/requests/GetUserSecretByLabelRequest through kaggle_web_client and returns result["secret"].
An empty label raises ValidationError; a secret that does not exist or is not attached to the
notebook raises BackendError ("Unexpected response from the service. Response: {...}", the service
answering wasSuccessful false, as in docker-python tests/test_user_secrets.py); no token raises
CredentialError; internet off raises ConnectionError. It is HTTP, so it works from a `!python`
child process as well as in the kernel.
"""

from kaggle_web_client import BackendError, CredentialError, KaggleWebClient

__all__ = ["BackendError", "CredentialError", "NotFoundError", "UserSecretsClient", "ValidationError"]


class ValidationError(Exception):
    pass


class NotFoundError(Exception):
    pass


class UserSecretsClient:
    GET_USER_SECRET_BY_LABEL_ENDPOINT = "/requests/GetUserSecretByLabelRequest"

    def __init__(self):
        self.web_client = KaggleWebClient()

    def get_secret(self, label) -> str:
        if not label:
            raise ValidationError("Label must be non-empty.")
        result = self.web_client.make_post_request({"Label": label}, self.GET_USER_SECRET_BY_LABEL_ENDPOINT)
        if "secret" not in result:
            raise BackendError(f"Unexpected response from the service. Response: {result}")
        return result["secret"]
