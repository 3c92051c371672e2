"""How coarse the products' arithmetic may be before greedy outputs change (the default model).

    python -m plait.bench.rounding [--new-tokens 64] [--bits 16 14 12 10 8] [--output-file out.jsonl]

Plait holds its fast paths to one bar: greedy outputs equal those of `transformers` in float32. This
program asks, for a kind of rounding a faster product would need, whether that bar still holds. It
runs the default model in `transformers` (float32, the GGUF's own dequantized weights) on eight
prompts (short, chat and long ones of 250-480 tokens) and decodes `--new-tokens` greedy tokens, once
exactly and once per variant, with every linear layer's input (and for some variants its weight)
rounded first:

- `x int<b> per 32`: x rounded to b-bit integers per block of 32 values (scale = largest |x| of the
  block), as integer products over block weights would (b = 16: the int16 products; 8: int8 ones);
- `x 16 bits, w bf16`: x to 16 significant bits (its two bfloat16 parts), weights to bfloat16, as two
  AMX passes over x's parts and one weight part would;
- `x bf16, w bf16`: both rounded to bfloat16, as one AMX pass would (vLLM's arithmetic).

With `--attention`, attention variants instead (the linear layers exact): keys and values rounded to
float16 as the KV pool stores them, then
- `kv float16`: float math, what the CPU kernels compute today;
- `attention q,k int<a>; p,v int<b>`: integer attention as `VPDPWSSD` would run it without
  overflowing its 32-bit sums: q and k rounded to a-bit integers per row of a head (scores exact
  from the codes), the softmax weights times each value row's scale rounded to b-bit integers per 32
  keys, values to b bits per row (a = 13 and b = 14 keep 64 products of a head and 32 keys of a
  block inside 2^31).

Prints, per variant, how many prompts' outputs equal the exact ones and where the first differences
fall, and appends one JSON line to `--output-file`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from plait.bench.one_batch import environment, write_result

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = ["Tell me about Paris.", "What is 2 + 2?"]
LONG = ["The history of computing spans many centuries. " * 40 + "Summarize:",
        "Write a poem about the sea. " * 20,
        ("The history of the city begins with a small settlement on the river, where traders met to exchange "
         "salt, grain and cloth. Over the centuries it grew into a market town, then a port. ") * 8
        + "In summary, the city"]


def round_blocks(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits`-bit integers per block of 32 values of its last dimension, scaled back."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    top = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    levels = 2 ** (bits - 1) - 1
    return (torch.round(blocks * (levels / top)) * (top / levels)).reshape(x.shape)


def round_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to `bits`-bit integers per row (one scale per output feature), scaled back."""
    codes, scale = integer_rows(w, bits)
    return codes * scale


def two_bf16_parts(x: torch.Tensor) -> torch.Tensor:
    """x as the sum of its two bfloat16 parts (16 significant bits)."""
    hi = x.bfloat16().float()
    return hi + (x - hi).bfloat16().float()


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def integer_rows(x: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows (last dimension) as `bits`-bit integer codes and one scale a row: x ~ codes * scale."""
    top = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    levels = 2 ** (bits - 1) - 1
    return torch.round(x * (levels / top)), top / levels


def integer_attention(bits_qk: int | None, bits_pv: int | None, block: int = 32) -> Callable:
    """An attention function for `transformers.AttentionInterface`: keys and values rounded to float16
    (the KV pool), then, for each bit count not None, the integer rounding the module docstring
    describes; products of codes in float64 (exact), the softmax in float32."""
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        groups = module.num_key_value_groups
        k = key.half().float().repeat_interleave(groups, dim=1)
        v = value.half().float().repeat_interleave(groups, dim=1)
        q_len, k_len = query.shape[2], k.shape[2]
        if bits_qk is None:
            scores = (query.double() @ k.double().transpose(2, 3)).float()
        else:
            (qc, qs), (kc, ks) = integer_rows(query, bits_qk), integer_rows(k, bits_qk)
            scores = ((qc.double() @ kc.double().transpose(2, 3)) * (qs.double() * ks.double().transpose(2, 3))).float()
        scores = scores * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if attention_mask is not None:
            scores = scores + attention_mask[..., :k_len]
        elif q_len > 1:
            rows = torch.arange(q_len)[:, None] + (k_len - q_len)
            scores = scores.masked_fill(torch.arange(k_len)[None, :] > rows, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if bits_pv is None:
            out = weights.double() @ v.double()
        else:
            vc, vs = integer_rows(v, bits_pv)
            scaled = torch.nn.functional.pad(weights * vs.transpose(2, 3), (0, (-k_len) % block))
            blocks = scaled.reshape(*scaled.shape[:-1], -1, block)
            codes, step = integer_rows(blocks, bits_pv)
            out = (codes * step).reshape(scaled.shape)[..., :k_len].double() @ vc.double()
        return out.float().transpose(1, 2).contiguous(), None
    return attend


def greedy(model, ids: list[int], n: int, eos: list[int]) -> list[int]:
    """Greedy decoding of a `transformers` model with its own KV cache; stops at EOS as the engine does."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            res = model(torch.tensor([[token]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="*", default=[16, 14, 12, 10, 8])
    parser.add_argument("--weight-bits", type=int, nargs="*", default=[],
                        help="also: the decoder's weights rounded to b bits per row (one scale per output "
                             "feature; the LM head exact) with x at 28 - b bits per 32 (so that 32 products of "
                             "the two codes fit an int32 sum)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attention", action="store_true",
                        help="attention variants (float16 KV, integer attention) instead of the products'")
    parser.add_argument("--output-file", default="rounding.jsonl")
    args = parser.parse_args()
    import transformers

    from plait.runtime.model_loader import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model_path or default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompts = [tokenizer.encode(p) for p in PROMPTS + LONG]
    prompts += [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                               add_generation_prompt=True), add_special_tokens=False)
                for c in CHATS]
    eos = [tokenizer.eos_token_id]

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    exact_weights = {id(m): m.weight.data.clone() for m in linears}
    round_input: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None]
    for module in linears:
        module.register_forward_pre_hook(lambda _m, a: None if round_input[0] is None else (round_input[0](a[0]),))

    reference = [greedy(model, ids, args.new_tokens, eos) for ids in prompts]
    variants: list[tuple[str, Callable, Callable | None]] = [
        (f"x int{b} per 32", (lambda b: lambda x: round_blocks(x, b))(b), None) for b in args.bits]
    variants += [("x 16 bits, w bf16", two_bf16_parts, bf16), ("x bf16, w bf16", bf16, bf16)]
    head = model.get_output_embeddings()
    variants += [(f"x int{28 - b} per 32, w int{b} per row", (lambda b: lambda x: round_blocks(x, 28 - b))(b),
                  (lambda b: lambda w: round_rows(w, b))(b)) for b in args.weight_bits]
    if args.attention:
        variants = [(label, None, None) for label in ("kv float16", "attention q,k int13; p,v int14",
                                                      "attention q,k int12; p,v int12")]
        bits = {"kv float16": (None, None), "attention q,k int13; p,v int14": (13, 14),
                "attention q,k int12; p,v int12": (12, 12)}
        for label, (a, b) in bits.items():
            transformers.AttentionInterface.register(f"plait-rounding-{a}-{b}", integer_attention(a, b))
    rows = []
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} greedy tokens each, against transformers in float32")
    print(f"{'variant':>20} {'equal':>7}  first differences (token index)")
    for label, x_round, w_round in variants:
        for module in linears:
            exact = w_round is None or (module is head and label.endswith("per row"))
            module.weight.data = exact_weights[id(module)] if exact else w_round(exact_weights[id(module)])
        round_input[0] = x_round
        if args.attention:
            model.set_attn_implementation("plait-rounding-{}-{}".format(*bits[label]))
        outputs = [greedy(model, ids, args.new_tokens, eos) for ids in prompts]
        firsts = [next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
                  for out, ref in zip(outputs, reference) if out != ref]
        equal = len(prompts) - len(firsts)
        rows.append({"variant": label, "equal": equal, "prompts": len(prompts), "first_differences": firsts})
        print(f"{label:>20} {equal:>3}/{len(prompts):<3}  {firsts}", flush=True)
    round_input[0] = None
    write_result(args.output_file, {"environment": environment(), "model": path, "new_tokens": args.new_tokens,
                                    "variants": rows})


if __name__ == "__main__":
    main()
