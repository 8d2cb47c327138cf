"""Retrieval tests run many tiny tensor ops per step: one intra-op thread avoids spin-waiting on 2 busy cores."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts(shared_data):
    from retrieval.tasks import passages

    return passages(limit=20)
