"""Tiered KV store: keys and layout, entry format, tiers, the TieredStore and the KVConnector."""

from kvstore.config import GiB, StoreConfig
from kvstore.connector import KVConnector, RetrievedKV
from kvstore.format import CorruptEntry, Entry, decode, encode, encode_bytes
from kvstore.keys import Namespace, chunk_bounds, token_array
from kvstore.layout import KVLayout
from kvstore.store import TieredStore

__all__ = [
    "CorruptEntry",
    "Entry",
    "GiB",
    "KVConnector",
    "KVLayout",
    "Namespace",
    "RetrievedKV",
    "StoreConfig",
    "TieredStore",
    "chunk_bounds",
    "decode",
    "encode",
    "encode_bytes",
    "token_array",
]
