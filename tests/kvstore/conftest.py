"""Fixtures for the kvstore tests (real tensors, real files, real Redis)."""

from __future__ import annotations

import pytest
from kvstore_helpers import TINY

from kvstore import Namespace


@pytest.fixture
def tiny_ns() -> Namespace:
    return Namespace("tiny-model", TINY)
