"""Smaller KV: a kvpress-shaped compressor interface, ThinK channel pruning, Chelsea token merging,
and token-eviction baselines (StreamingLLM, SnapKV, kvpress's zeroing ThinK)."""

from compress.base import REGISTRY, CompressedLayer, Compressor, compressor_for
from compress.chelsea import Chelsea
from compress.kvpress_think import KVPressThinK
from compress.runtime import attend, compress_cache, compressing, kv_bytes, kv_ratio, observe, prefill
from compress.snapkv import SnapKV
from compress.storage import compressed_layout, from_entry, to_entry
from compress.streaming import StreamingLLM
from compress.think import ThinK

__all__ = [
    "REGISTRY",
    "Chelsea",
    "CompressedLayer",
    "Compressor",
    "KVPressThinK",
    "SnapKV",
    "StreamingLLM",
    "ThinK",
    "attend",
    "compress_cache",
    "compressed_layout",
    "compressing",
    "compressor_for",
    "from_entry",
    "kv_bytes",
    "kv_ratio",
    "observe",
    "prefill",
    "to_entry",
]
