"""A stand-in Hugging Face Hub for tests (see server.py) and its pytest fixture."""

from tests.hubserver.server import HubServer, git_blob_sha1

__all__ = ["HubServer", "git_blob_sha1"]
