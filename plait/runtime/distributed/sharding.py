"""How a decoder's weights split across tensor-parallel ranks (Megatron style).

    qkv_proj, gate_up_proj   column parallel: each rank computes its heads / its slice of the MLP
    o_proj, down_proj        row parallel: each rank multiplies its input columns; all-reduce
    embed_tokens, lm_head    vocabulary parallel: each rank holds a range of token rows

Attention heads split by KV head, so each rank keeps whole GQA groups: with 3 KV heads over 2
ranks one rank holds 2 groups and the other 1 (uneven, but exact: the default model has 9 query
and 3 KV heads, which no even split of query heads would respect). With fewer KV heads than ranks
each KV head is replicated on `size / num_kv_heads` ranks, which split its query heads.

Splits of the MLP are in units of 32 columns where the size allows, so that the CPU kernels can
read a row-parallel shard of a GGUF's 32-value blocks as whole blocks.
"""

from __future__ import annotations

from typing import NamedTuple

BLOCK = 32  # values per GGUF block (Q4_0, Q4_1, Q8_0)


class Span(NamedTuple):
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def split_evenly(total: int, parts: int, index: int, *, unit: int = 1) -> Span:
    """Part `index` of `total` items cut into `parts` contiguous pieces whose sizes differ by at most
    one `unit` (the first pieces take the remainder). `unit` must divide `total`."""
    assert 0 <= index < parts and total % unit == 0
    units, extra = divmod(total // unit, parts)
    start = index * units + min(index, extra)
    count = units + (1 if index < extra else 0)
    return Span(start * unit, count * unit)


class DecoderShard(NamedTuple):
    """One rank's part of a decoder: which heads, MLP columns and vocabulary rows it holds."""

    rank: int
    size: int
    q_heads: Span
    kv_heads: Span
    intermediate: Span
    vocab: Span
    vocab_per_rank: int  # every rank's logits are padded to this width before they are gathered

    @property
    def num_heads(self) -> int:
        return self.q_heads.count

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads.count

    @classmethod
    def plan(cls, *, num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int,
             rank: int = 0, size: int = 1) -> "DecoderShard":
        """Raises ValueError when the model cannot split `size` ways."""
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads do not form groups over {num_kv_heads} KV heads")
        group = num_heads // num_kv_heads
        if num_kv_heads >= size:
            kv = split_evenly(num_kv_heads, size, rank)
            q = Span(kv.start * group, kv.count * group)
        else:
            if size % num_kv_heads:
                raise ValueError(f"--tp-size {size} cannot replicate {num_kv_heads} KV heads evenly: "
                                 f"use a multiple of {num_kv_heads} or at most {num_kv_heads}")
            ranks_per_kv = size // num_kv_heads
            if group < ranks_per_kv:
                raise ValueError(f"--tp-size {size} leaves some ranks without an attention head "
                                 f"({num_heads} heads, {num_kv_heads} KV heads)")
            kv = Span(rank // ranks_per_kv, 1)
            within = split_evenly(group, ranks_per_kv, rank % ranks_per_kv)
            q = Span(kv.start * group + within.start, within.count)
        unit = BLOCK if intermediate_size % (BLOCK * size) == 0 else 1
        if intermediate_size < size:
            raise ValueError(f"--tp-size {size} exceeds the MLP width {intermediate_size}")
        per_rank = -(-vocab_size // size)
        start = min(rank * per_rank, vocab_size)
        vocab = Span(start, min(per_rank, vocab_size - start))
        return cls(rank, size, q, kv, split_evenly(intermediate_size, size, rank, unit=unit), vocab, per_rank)
