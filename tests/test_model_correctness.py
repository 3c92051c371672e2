"""Our decoder against Hugging Face `transformers` on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner
from tests.tiny_models import FAMILIES, InMemorySource, tiny_hf_model

TOL = 1e-4  # max |difference| relative to the logit scale


# The CPU execution paths: the kernels with the whole stack in one native call (the default), the
# kernels layer by layer from the model's modules, and PyTorch operations (the reference).
CPU_PATHS = {
    "cpu-graph": {},
    "cpu-kernels-eager": {"disable_cpu_graph": True},
    "torch": {"disable_cpu_kernels": True},
}


def make_runner(hf_model, path: str = "cpu-graph", config: dict | None = None, **memory) -> ModelRunner:
    runner = ModelRunner(
        ModelConfig(dtype="float32", device="cpu", **CPU_PATHS[path], **(config or {})),
        MemoryConfig(max_total_tokens=memory.get("max_total_tokens", 2048), max_running_requests=8),
        source=InMemorySource(hf_model),
    )
    from plait.runtime.cpu import kernels

    if kernels.available():  # the path asked for is the path that runs
        assert (runner.cpu_stack is not None) == (path == "cpu-graph")
        assert runner.use_cpu_kernels == (path != "torch")
    return runner


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()  # [len, vocab]


def extend(runner: ModelRunner, rows: list[int], prefix_lens: list[int], chunks: list[list[int]], **kw):
    slots = runner.allocator.alloc(sum(len(c) for c in chunks))
    batch = make_extend_batch(
        req_pool_indices=rows, prefix_lens=prefix_lens, new_token_ids=chunks, out_cache_loc=slots,
        req_to_token_pool=runner.req_to_token_pool, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend, **kw,
    )
    return runner.forward(batch)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= TOL * scale, f"max diff {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module", params=[(f, p) for f in FAMILIES for p in CPU_PATHS], ids=lambda fp: "-".join(fp))
def family_pair(request):
    family, path = request.param
    hf = tiny_hf_model(family)
    return hf, make_runner(hf, path)


def test_prefill_logits_match_transformers(family_pair):
    hf, runner = family_pair
    ids = torch.randint(0, 320, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    row = runner.req_to_token_pool.alloc()
    out = extend(runner, [row], [0], [ids], logits_start_lens=[0])
    ref = hf_logits(hf, ids)
    assert_close(out.input_token_logits[0], ref)
    assert_close(out.next_token_logits[0], ref[-1])
    runner.req_to_token_pool.free(row)


def test_extend_over_cached_prefix_and_decode_equal_full_prefill(family_pair):
    hf, runner = family_pair
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = hf_logits(hf, ids)
    row = runner.req_to_token_pool.alloc()
    extend(runner, [row], [0], [ids[:20]])
    out = extend(runner, [row], [20], [ids[20:45]], logits_start_lens=[0])
    assert_close(out.input_token_logits[0], ref[20:45])
    # Then decode the rest one token at a time.
    for pos in range(45, 50):
        slot = runner.allocator.alloc(1)
        batch = make_decode_batch(
            req_pool_indices=[row], seq_lens=[pos + 1], last_token_ids=[ids[pos]], out_cache_loc=slot,
            req_to_token_pool=runner.req_to_token_pool, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend,
        )
        assert_close(runner.forward(batch).next_token_logits[0], ref[pos])
    runner.req_to_token_pool.free(row)


def test_batch_equals_requests_alone(family_pair):
    hf, runner = family_pair
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 31, 12)]
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    # Request 1 has a cached prefix of 10 tokens already; the others start empty.
    extend(runner, [rows[1]], [0], [prompts[1][:10]])
    out = extend(runner, rows, [0, 10, 0], [prompts[0], prompts[1][10:], prompts[2]], logits_start_lens=[0, 0, None])
    refs = [hf_logits(hf, p) for p in prompts]
    assert_close(out.input_token_logits[0], refs[0])
    assert_close(out.input_token_logits[1], refs[1][10:])
    assert out.input_token_logits[2] is None
    for i in range(3):
        assert_close(out.next_token_logits[i], refs[i][-1])
    # A decode step over the three requests of different lengths, with one more token each.
    nxt = [7, 8, 9]
    slots = runner.allocator.alloc(3)
    batch = make_decode_batch(
        req_pool_indices=rows, seq_lens=[len(p) + 1 for p in prompts], last_token_ids=nxt, out_cache_loc=slots,
        req_to_token_pool=runner.req_to_token_pool, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend,
    )
    dec = runner.forward(batch).next_token_logits
    for i, p in enumerate(prompts):
        assert_close(dec[i], hf_logits(hf, p + [nxt[i]])[-1])
    for row in rows:
        runner.req_to_token_pool.free(row)


@pytest.mark.parametrize("attention", ["float", "int16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_native_stack_equals_the_layer_by_layer_kernels(family, attention):
    """The CPU "graph" (the whole stack in one native call, with its fused decode-sized path) against
    the same kernels called layer by layer from the modules, in float32: a mixed extend batch (over a
    cached prefix) and decode steps give the same logits to float32 rounding, with the prefill's
    attention in float32 or on integer codes."""
    from plait.runtime.cpu import kernels

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    config = tiny_hf_model(family).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if attention == "int16" and not kernels.int16_attention_available(head_dim):
        pytest.skip("integer attention does not run here")
    hf = tiny_hf_model(family)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (9, 40, 3)]
    results = []
    for path in ("cpu-graph", "cpu-kernels-eager"):
        runner = make_runner(hf, path, {"cpu_prefill_attention": attention})
        assert runner.execution["prefill_attention"] == attention
        rows = [runner.req_to_token_pool.alloc() for _ in prompts]
        extend(runner, [rows[1]], [0], [prompts[1][:16]])
        logits = [extend(runner, rows, [0, 16, 0], [prompts[0], prompts[1][16:], prompts[2]]).next_token_logits]
        lens = [len(p) for p in prompts]
        for step in range(4):  # decode steps (one row each: the fused small-step path)
            lens = [n + 1 for n in lens]
            batch = make_decode_batch(
                req_pool_indices=rows, seq_lens=lens, last_token_ids=[11 + step] * 3,
                out_cache_loc=runner.allocator.alloc(3), req_to_token_pool=runner.req_to_token_pool,
                kv_pool=runner.kv_pool, attn_backend=runner.attn_backend,
            )
            logits.append(runner.forward(batch).next_token_logits)
        results.append(torch.stack(logits))
    graph, eager = results
    assert (graph - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_native_stack_runs_the_last_layer_on_the_returned_rows_only(family):
    """A prefill without prompt logprobs reads one hidden row per request, so the native stack runs its
    last layer's output product and MLP on those rows alone: they equal the unpruned step's to float32
    rounding (and the logits transformers'), the other rows are left stale; asking for prompt logprobs
    runs every row."""
    from plait.runtime.cpu import kernels

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    hf = tiny_hf_model(family)
    runner = make_runner(hf, "cpu-graph")
    stack, forward = runner.cpu_stack, runner.cpu_stack.forward
    seen = []

    def recording(batch, meta, out_rows=None, prune=True):
        hidden = forward(batch, meta, out_rows if prune else None)
        seen.append((None if out_rows is None else out_rows.tolist(), hidden.clone()))
        return hidden

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (9, 40, 3)]
    for prune in (True, False):
        stack.forward = lambda batch, meta, out_rows=None: recording(batch, meta, out_rows, prune)
        rows = [runner.req_to_token_pool.alloc() for _ in prompts]
        out = extend(runner, rows, [0, 0, 0], prompts)
        for i, p in enumerate(prompts):
            assert_close(out.next_token_logits[i], hf_logits(hf, p)[-1])
        for row in rows:
            runner.req_to_token_pool.free(row)
    (last, pruned), (asked, full) = seen
    assert last == asked == [8, 48, 51]
    assert (pruned[last] - full[last]).abs().max() <= 1e-5 * full[last].abs().max()
    others = [r for r in range(52) if r not in last]
    assert not torch.allclose(pruned[others], full[others])  # the pruned step left them stale
    stack.forward = lambda batch, meta, out_rows=None: recording(batch, meta, out_rows, True)
    row = runner.req_to_token_pool.alloc()
    extend(runner, [row], [0], [prompts[1]], logits_start_lens=[0])
    assert seen[-1][0] is None  # prompt logprobs read every row


def test_unknown_architecture_is_a_clear_error():
    from plait.runtime.models.registry import UnsupportedArchitectureError, get_model_class

    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM"):
        get_model_class({"architectures": ["GPTNeoXForCausalLM"]})
