"""Shared pieces for the blend tests: short real passages, a host-RAM store, a connector, a fuser."""

from __future__ import annotations

import pytest
import torch
from blend_cases import PASSAGES, QUESTION

from blend.fuse import Fuser
from engine.chat import build_chat
from kvstore import KVConnector, KVLayout, Namespace, StoreConfig, TieredStore


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in these tests: on 2 cores shared with other jobs, 2 threads spin against each
    other and a short forward gets several times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store():
    with TieredStore(StoreConfig(host_bytes=1 << 30)) as s:
        yield s


@pytest.fixture
def connector(loaded, store):
    return KVConnector(store, Namespace(loaded.model_id, KVLayout.for_spec(loaded.spec), salt="blend-test"))


@pytest.fixture
def fuser(engine, connector):
    return Fuser(engine, connector)


@pytest.fixture(scope="module")
def prompt(loaded):
    return build_chat(loaded.tokenizer, QUESTION, PASSAGES)


@pytest.fixture(scope="module")
def full_logits(engine, prompt):
    return engine.forward(prompt.ids).logits[0, -1]
