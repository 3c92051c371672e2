"""Write a synthetic tokenizer folder whose vocabulary matches a dummy-weight preset's size.

The GPU machine has no model files, and `plait serve` needs a tokenizer to stream text. A benchmark
that sends token ids (`plait.bench.serving --prompt-format ids`) only needs the server to turn the
generated ids back into text, and random weights generate any id of the vocabulary: so this writes
a word-level tokenizer with exactly `vocab_size` entries ("▁w0" ... decoding to " w0 ..."), the preset's
BOS/EOS ids marked special, and a `tokenizer_config.json`. Speeds measured with it are those of the
real vocabulary size; the text means nothing.

    python scripts/gpu/make_tokenizer.py /tmp/tok --preset llama-3.1-8b
    plait serve --model-path llama-3.1-8b --load-format dummy --tokenizer-path /tmp/tok
"""

from __future__ import annotations

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from plait.runtime.model_loader.dummy import preset_config


def special_ids(config: dict) -> dict[str, int]:
    """The preset's BOS and first EOS id by role."""
    out = {}
    for role in ("bos_token_id", "eos_token_id"):
        value = config.get(role)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            out[role] = int(value)
    return out


def build(vocab_size: int, specials: dict[str, int]) -> Tokenizer:
    names = {idx: f"<|{role.removesuffix('_token_id')}|>" for role, idx in specials.items()}
    vocab = {names.get(i, f"\u2581w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token=names.get(specials.get("eos_token_id", -1), "\u2581w0")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(list(names.values()))
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--preset", default="llama-3.1-8b",
                        help="a dummy preset of plait's model loader, or a model folder with a config.json")
    args = parser.parse_args(argv)
    config = preset_config(args.preset)
    if config is None and os.path.isfile(os.path.join(args.preset, "config.json")):
        with open(os.path.join(args.preset, "config.json")) as f:
            config = json.load(f)
    if config is None:
        raise SystemExit(f"{args.preset!r}: neither a preset nor a folder with a config.json")
    specials = special_ids(config)
    tok = build(int(config["vocab_size"]), specials)
    os.makedirs(args.folder, exist_ok=True)
    tok.save(os.path.join(args.folder, "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}
    for role, idx in specials.items():
        tok_config[role.removesuffix("_id")] = tok.id_to_token(idx)
    with open(os.path.join(args.folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=1)
    print(f"{args.folder}: {tok.get_vocab_size()} tokens, specials {specials}")


if __name__ == "__main__":
    main()
