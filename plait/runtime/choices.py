"""The names each registry accepts, for the command line's `choices`, without importing the registries.

The registries live beside their implementations, most of which import torch; parsing flags must not
(the server's HTTP process never needs torch, and `import torch` is seconds of its start-up). A test
(tests/test_cli_args.py) checks that these names match the registries' keys.
"""

from __future__ import annotations

SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")  # plait.runtime.scheduler.policy
PREFIX_CACHES = ("radix", "flat", "none")  # plait.runtime.cache
ATTENTION_BACKENDS = ("torch_native", "triton", "cpu")  # plait.runtime.attention.base
WRITE_POLICIES = ("write_through", "write_back", "write_through_selective")  # plait.runtime.cache.hiradix_cache
STORAGE_BACKENDS = ("file",)  # plait.runtime.memory.host_pool
EVICTION_POLICIES = ("lru", "lfu", "workflow")  # plait.runtime.cache.eviction
