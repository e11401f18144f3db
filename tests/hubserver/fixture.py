"""The `hub` pytest fixture: a running stand-in Hub with user "alice" (write token) and her read token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hubserver.server import HubServer


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server
