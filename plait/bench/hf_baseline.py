"""The one_batch measurement with Hugging Face `transformers` `generate`: the baseline users know.

Same shapes, same random text-token prompts, same result fields as `plait.bench.one_batch`:
one static batch (no padding: all prompts have input_len tokens), greedy, with
`min_new_tokens = max_new_tokens` so nothing stops early.

    python -m plait.bench.hf_baseline --batch-size 1 8 --input-len 512 --output-len 128 --dtype bfloat16
    python -m plait.bench.hf_baseline --model-path path/to/hf-folder
    python -m plait.bench.hf_baseline --model-path llama-3.1-8b --load-format dummy --device cuda

`--model-path` is an HF folder or a .gguf file (dequantized by transformers' GGUF loader);
default: the default model's GGUF. With `--load-format dummy` it is anything plait's dummy loader
takes (a preset name such as llama-3.1-8b, a config.json): transformers builds the model from that
config with its own random initialization, on the device. Per-step times come from a logits
processor, which generate calls once per step right after the forward pass (on a GPU it waits for
the device first): the first call ends the prefill, the gaps between calls are the decode steps.
Generation uses transformers' default (dynamic) KV cache and no torch.compile.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

from plait.bench.datasets import text_token_ids
from plait.bench.one_batch import (
    BatchTiming,
    add_shape_args,
    environment,
    print_result,
    print_table,
    shapes,
    summarize_timing,
    write_result,
)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _StepClock:
    """A logits processor that only notes the time; generate calls it once per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def load_hf_model(model_path: str | None, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, path) from an HF folder or a GGUF file; None is the default model's GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path is None:
        from plait.runtime.model_loader import default_model_path

        model_path = default_model_path()
    path = os.path.abspath(os.path.expanduser(model_path))
    if path.endswith(".gguf"):
        folder, name = os.path.split(path)
        kwargs: dict[str, Any] = {"gguf_file": name}
        try:  # newer transformers keep GGUF tensors quantized unless asked to dequantize
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).to(dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer, path


def dummy_hf_model(model_path: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): transformers' model for a dummy-loader config, randomly initialized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.runtime.model_loader import resolve_model

    source = resolve_model(model_path, load_format="dummy")
    fields = dict(source.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = source.tokenizer.hf if source.tokenizer is not None else None
    return model.eval(), tokenizer, model_path


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


@torch.inference_mode()
def run_generate(model: Any, prompts: list[list[int]], output_len: int, pad_token_id: int) -> BatchTiming:
    from transformers import LogitsProcessorList

    input_ids = torch.tensor(prompts, dtype=torch.int64, device=model.device)  # [batch_size, input_len]
    clock = _StepClock()
    if input_ids.is_cuda:
        torch.cuda.synchronize(input_ids.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=output_len,
        min_new_tokens=output_len, logits_processor=LogitsProcessorList([clock]), pad_token_id=pad_token_id,
        temperature=None, top_p=None, top_k=None,
    )
    end = time.perf_counter()
    assert out.shape[1] == input_ids.shape[1] + output_len, "generate stopped early"
    assert len(clock.times) == output_len
    # The last step's argmax and generate's bookkeeping after it count to the last decode step.
    ends = clock.times[1:-1] + [end] if output_len > 1 else []
    decode = [b - a for a, b in zip(clock.times, ends)]
    return BatchTiming(clock.times[0] - start, decode)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--model-path", default=None, help="HF folder or .gguf file (default: the default model)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: random weights for the config --model-path names (a preset name, a config.json)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    import transformers

    load_start = time.perf_counter()
    device = torch.device(args.device)
    if args.load_format == "dummy":
        model, tokenizer, path = dummy_hf_model(args.model_path, _DTYPES[args.dtype], device)
    else:
        model, tokenizer, path = load_hf_model(args.model_path, _DTYPES[args.dtype])
        model = model.to(device)
    vocab_size = model.config.vocab_size
    print(f"loaded {path} with transformers {transformers.__version__} ({args.dtype}) in "
          f"{time.perf_counter() - load_start:.1f} s; torch threads {torch.get_num_threads()}")
    token_ids = text_token_ids(tokenizer, vocab_size)
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else (model.config.eos_token_id or 0)
    if isinstance(pad, list):
        pad = pad[0]
    rng = random.Random(args.seed)
    env = {**environment(), "transformers": transformers.__version__}
    results = []
    for batch_size, input_len, output_len in shapes(args):
        prompts = [rng.choices(token_ids, k=input_len) for _ in range(batch_size)]
        if args.warmup:
            run_generate(model, prompts, min(output_len, args.warmup + 1), pad)
        timing = run_generate(model, prompts, output_len, pad)
        record = {
            "bench": "one_batch", "engine": "hf", "run_name": args.run_name, "model": path,
            "load_format": "dummy" if args.load_format == "dummy" else "gguf" if path.endswith(".gguf") else "safetensors",
            "dtype": args.dtype, "device": str(device),
            "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
            **summarize_timing(timing, batch_size, input_len, output_len),
            "env": env,
        }
        print_result("transformers", record)
        write_result(args.result_file, record)
        results.append(record)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
