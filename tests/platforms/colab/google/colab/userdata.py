"""Colab secrets (colabtools google/colab/userdata.py): `get(key)` asks the frontend through the kernel.

Raises as colabtools does: ValueError for an empty name or one with whitespace, TimeoutException when
no reply comes, SecretNotFoundError when the user has no such secret, NotebookAccessError when this
notebook was not granted access; AttributeError from a non-kernel process (via _message).
"""

import re as _re

from google.colab import _message, errors


class NotebookAccessError(Exception):
    """Exception thrown when the current notebook doesn't have access to the requested secret."""

    def __init__(self, key):
        super().__init__(f"Notebook does not have access to secret {key}")


class SecretNotFoundError(errors.Error):
    """Exception thrown when the requested secret is not found."""

    def __init__(self, key):
        super().__init__(f"Secret {key} does not exist.")


class TimeoutException(errors.Error):
    """Exception thrown when requesting a secret times out."""

    def __init__(self, key):
        super().__init__(
            f"Requesting secret {key} timed out. Secrets can only be fetched when running from the Colab UI."
        )


def get(key):
    if not key or not isinstance(key, str):
        raise ValueError("Please enter a valid secret name")
    if _re.search(r"\s", key):
        raise ValueError("Secret name cannot contain spaces or whitespace")
    resp = _message.blocking_request("GetSecret", request={"key": key}, timeout_sec=10)
    if not resp:
        raise TimeoutException(key)
    if not resp.get("exists", False):
        raise SecretNotFoundError(key)
    if not resp.get("access", False):
        raise NotebookAccessError(key)
    return resp.get("payload", "")
