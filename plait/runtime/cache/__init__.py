"""Prefix caches, chosen by name: `radix` (RadixAttention, the default), `flat` (exact-prefix table,
the "no tree" ablation) and `none` (`--disable-radix-cache`, the "no cache" ablation)."""

from __future__ import annotations

from plait.runtime.cache.base import (
    CacheStats,
    InsertResult,
    MatchResult,
    NoPrefixCache,
    PrefixCache,
    TreeNode,
    UnfinishedResult,
    cache_finished,
    cache_unfinished,
)
from plait.runtime.cache.flat_cache import FlatCache
from plait.runtime.cache.radix_cache import RadixCache
from plait.runtime.memory.kv_pool import SlotAllocator

PREFIX_CACHES: dict[str, type[PrefixCache]] = {
    "radix": RadixCache,
    "flat": FlatCache,
    "none": NoPrefixCache,
}
DEFAULT_PREFIX_CACHE = "radix"


def create_prefix_cache(name: str, allocator: SlotAllocator) -> PrefixCache:
    if name not in PREFIX_CACHES:
        raise ValueError(f"unknown prefix cache {name!r}; choose from {sorted(PREFIX_CACHES)}")
    return PREFIX_CACHES[name](allocator)


__all__ = [
    "DEFAULT_PREFIX_CACHE",
    "PREFIX_CACHES",
    "CacheStats",
    "FlatCache",
    "InsertResult",
    "MatchResult",
    "NoPrefixCache",
    "PrefixCache",
    "RadixCache",
    "TreeNode",
    "UnfinishedResult",
    "cache_finished",
    "cache_unfinished",
    "create_prefix_cache",
]
