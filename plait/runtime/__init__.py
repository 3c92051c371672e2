"""The serving runtime (engine, scheduler, cache, model execution, server).

Importing it asks PyTorch's CPU allocator for transparent huge pages before torch is imported
(`plait.runtime.huge_pages`; THP_MEM_ALLOC_ENABLE=0 turns that off)."""

from plait.runtime.huge_pages import request_huge_pages

request_huge_pages()
