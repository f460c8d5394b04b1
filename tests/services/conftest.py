"""Fixtures for the service tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.recsys.feature_store import delete_prefix, unique_prefix


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own; its keys are deleted afterwards."""
    name = unique_prefix()
    yield name
    await delete_prefix(name)
