"""Entry bytes: exact round trips, extensible headers, and corrupt input caught, never returned."""

from __future__ import annotations

import pytest
import torch
from kvstore_helpers import SMOL

from kvstore import CorruptEntry, Entry, KVLayout, StoreConfig, TieredStore, decode, encode_bytes
from kvstore.format import PREFIX_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_for_every_model_dtype(dtype):
    layout = KVLayout(SMOL.num_layers, SMOL.num_kv_heads, SMOL.head_dim, dtype, SMOL.chunk_tokens)
    kv = torch.randn(layout.chunk_shape(16)).to(dtype)
    kv[0, 0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-8]).to(dtype)
    positions = torch.arange(100, 116, dtype=torch.int64)
    entry = Entry.plain("k1", layout, kv, positions, source="test")
    back = decode(bytearray(encode_bytes(entry)), expect_key="k1")
    assert back.kv.dtype == dtype
    # bitwise equality (covers -0.0 and infinities, which == would blur)
    assert torch.equal(_bits(back.kv), _bits(kv))
    assert torch.equal(back.positions, positions)
    assert back.layout == layout and back.meta == {"source": "test"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_read_only_bytes_are_copied_so_the_result_is_writable():
    entry = Entry.plain("k", SMOL, torch.ones(SMOL.chunk_shape(3), dtype=torch.float16))
    back = decode(encode_bytes(entry))
    back.kv.add_(1)  # would be undefined behaviour on a view of immutable bytes
    assert float(back.kv.max()) == 2.0


def test_a_written_entry_is_hashed_anew_and_a_frozen_one_once():
    kv = torch.ones(SMOL.chunk_shape(3), dtype=torch.float16)
    entry = Entry.plain("k", SMOL, kv)
    encode_bytes(entry)
    kv.add_(1)  # a caller's own entry may change between encodes: never a stale checksum
    assert float(decode(bytearray(encode_bytes(entry))).kv.max()) == 2.0
    frozen = Entry.trusted("k", SMOL, {"kv": kv.clone()}, None, {}, frozen=True)
    first = encode_bytes(frozen)
    assert frozen._checksum is not None and encode_bytes(frozen) == first
    frozen.meta["note"] = "x"  # a changed header is hashed again, so the bytes stay valid
    assert decode(bytearray(encode_bytes(frozen))).meta == {"note": "x"}


def test_a_frozen_decode_hands_its_verified_checksum_to_the_host_copy():
    raw = encode_bytes(Entry.plain("k", SMOL, torch.randn(SMOL.chunk_shape(5)).half(), source="t"))
    with TieredStore(StoreConfig(host_bytes=1 << 20, disk_path=None)) as store:
        store.put(decode(bytearray(raw), frozen=True))
        stored = store.get("k", copy=False)
        assert stored.frozen and stored._checksum is not None  # carried over: no second hash
        assert encode_bytes(stored) == raw
        store.put(decode(bytearray(raw)))  # not frozen: the store's copy hashes on its first encode
        assert store.get("k", copy=False)._checksum is None


def test_compressed_entries_carry_extra_named_tensors_and_params():
    layout = SMOL.with_method("think", keep_ratio=0.5, channels=[1, 2])
    tensors = {
        "k": torch.randn(30, 16, 3, 32).half(),  # pruned key channels: a different shape
        "v": torch.randn(30, 16, 3, 64).half(),
        "kept": torch.arange(32, dtype=torch.int64).repeat(30, 3, 1),
    }
    entry = Entry("c1", layout, tensors, torch.arange(16, dtype=torch.int64), {"num_tokens": 16})
    back = decode(bytearray(encode_bytes(entry)))
    assert back.layout.method == "think" and dict(back.layout.params)["keep_ratio"] == 0.5
    assert list(back.tensors) == ["k", "v", "kept"]
    for name, t in tensors.items():
        assert torch.equal(back.tensors[name], t)
    assert back.num_tokens == 16


def test_every_truncation_is_caught():
    data = encode_bytes(Entry.plain("k", SMOL, torch.randn(SMOL.chunk_shape(2)).half()))
    for cut in [0, 3, PREFIX_BYTES - 1, PREFIX_BYTES + 5, len(data) // 2, len(data) - 1]:
        with pytest.raises(CorruptEntry):
            decode(data[:cut])


def test_any_flipped_byte_is_caught():
    data = bytearray(encode_bytes(Entry.plain("k", SMOL, torch.randn(SMOL.chunk_shape(2)).half())))
    for pos in [0, 5, PREFIX_BYTES + 2, len(data) // 2, len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptEntry):
            decode(bad)


def test_wrong_key_and_trailing_bytes_are_caught():
    data = encode_bytes(Entry.plain("k", SMOL, torch.randn(SMOL.chunk_shape(2)).half()))
    with pytest.raises(CorruptEntry, match="expected 'other'"):
        decode(data, expect_key="other")
    with pytest.raises(CorruptEntry):
        decode(data + b"x")


def test_no_pickle_in_the_bytes():
    data = encode_bytes(Entry.plain("k", SMOL, torch.zeros(SMOL.chunk_shape(1), dtype=torch.float16)))
    assert data.startswith(b"KVF1")
    assert b"torch._utils" not in data and b"\x80\x04" not in data[:64]


def test_bad_entries_are_refused_with_the_bad_value_named():
    good = torch.zeros(SMOL.chunk_shape(4), dtype=torch.float16)
    with pytest.raises(TypeError, match="float32"):
        Entry.plain("k", SMOL, good.float())
    with pytest.raises(ValueError, match="shape"):
        Entry.plain("k", SMOL, torch.zeros(30, 2, 4, 3, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        Entry.plain("k", SMOL, good.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="positions"):
        Entry.plain("k", SMOL, good, torch.arange(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="cannot be stored"):
        Entry("k", SMOL.with_method("x"), {"a": torch.zeros(2, dtype=torch.complex64)})


def _forged(header: dict, payload: bytes = b"") -> bytes:
    """Entry bytes with a hand-made header and a valid checksum (what a client may send)."""
    import msgpack
    import xxhash

    from kvstore.format import _PREFIX, MAGIC

    raw = msgpack.packb(header)
    return _PREFIX.pack(MAGIC, len(raw), xxhash.xxh3_64_intdigest(raw + payload)) + raw + payload


@pytest.mark.parametrize(
    ("shape", "named"),
    [
        ([-2, -2, 4, 1, 4], "whole numbers >= 0"),
        ([-1, 0], "whole numbers >= 0"),
        ([2.5], "whole numbers >= 0"),  # was truncated to 2 and stored
        ([0, 2**40, 2**40, 2**40], "more than"),  # an empty tensor whose strides overflow
        ([0, 2**63], "more than"),
        ("abc", "must be a list"),
    ],
)
def test_forged_shapes_are_corrupt_entries_not_crashes(shape, named):
    layout = SMOL.with_method("x").to_dict()
    header = {"key": "k", "layout": layout, "tensors": [{"name": "a", "dtype": "float16", "shape": shape}]}
    with pytest.raises(CorruptEntry, match=named):
        decode(_forged(header, b"\0" * 8))


def test_forged_header_fields_are_named():
    layout = SMOL.with_method("x").to_dict()
    with pytest.raises(CorruptEntry, match="dtype must be a name"):
        decode(
            _forged({"key": "k", "layout": layout, "tensors": [{"name": "a", "dtype": [1], "shape": [1]}]})
        )
    with pytest.raises(CorruptEntry, match="'tensors' must be a list"):
        decode(_forged({"key": "k", "layout": layout, "tensors": 5}))
    with pytest.raises(CorruptEntry, match="params must be a list of"):
        decode(_forged({"key": "k", "layout": {**layout, "params": {"a": 1}}, "tensors": []}))


def test_forged_frame_shapes_are_value_errors():
    import msgpack

    from kvstore.wire import _PREFIX, MAGIC, decode_frame

    for shape in ([0, 2**40, 2**40, 2**40], [-1, 3], [1.5, 3]):
        header = msgpack.packb({"tensors": [{"name": "a", "dtype": "float16", "shape": shape}]})
        with pytest.raises(ValueError, match="shape"):
            decode_frame(_PREFIX.pack(MAGIC, len(header)) + header)
