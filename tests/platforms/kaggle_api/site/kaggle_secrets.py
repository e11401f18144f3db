"""A minimal stand-in of Kaggle's `kaggle_secrets` module for notebooks the stand-in server runs.

On Kaggle, `UserSecretsClient().get_secret(NAME)` asks Kaggle's secrets service for a secret
attached to the notebook (Kaggle/docker-python, patches/kaggle_secrets.py). Here the secrets
are a JSON object in the 0600 file named by RELAY_TEST_KAGGLE_SECRETS.
"""

from __future__ import annotations

import json
import os


class BackendError(Exception):
    pass


class UserSecretsClient:
    def get_secret(self, label: str) -> str:
        with open(os.environ["RELAY_TEST_KAGGLE_SECRETS"]) as f:
            secrets = json.load(f)
        if label not in secrets:
            raise BackendError(f"Unexpected response from the service. Response: No user secrets exist for {label}.")
        return secrets[label]
