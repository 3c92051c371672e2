"""The Llama family (Llama 2/3.x, SmolLM2, Mistral) and its close relatives Qwen2 (QKV bias) and
Qwen3 (per-head q/k RMSNorm), as one decoder over shared layers.

Q, K and V are one matrix product (`qkv_proj`) and gate/up another (`gate_up_proj`); the loader
maps the checkpoint's separate tensors into their slices.

Under tensor parallelism (`tp`, see plait/runtime/distributed) every rank builds the same modules
at its shard's sizes (`DecoderShard`): its heads, its slice of the MLP, its range of the
vocabulary. The loader cuts each checkpoint tensor to the rank's part (`checkpoint_split`); the
row-parallel products (o_proj, down_proj) and the embedding are summed across ranks, the logits
gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from plait.runtime.distributed.parallel import SINGLE, TensorParallel
from plait.runtime.distributed.sharding import DecoderShard, Span
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.attention import RadixAttention
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_and_store


@dataclass(frozen=True)
class DecoderArch:
    """The shape of a decoder, read from a Hugging Face `config.json` dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict, *, qkv_bias: bool = False, qk_norm: bool = False) -> "DecoderArch":
        num_heads = config["num_attention_heads"]
        rope_params = config.get("rope_parameters") or {}
        rope_scaling = config.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias or bool(config.get("attention_bias", False)),
            qk_norm=qk_norm,
        )


class DecoderAttention(nn.Module):
    def __init__(self, arch: DecoderArch, layer_id: int, shard: DecoderShard, tp: TensorParallel):
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads  # this rank's
        self.q_size = self.num_heads * arch.head_dim
        self.kv_size = self.num_kv_heads * arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.attn = RadixAttention(
            layer_id=layer_id,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=arch.head_dim,
            scaling=arch.head_dim**-0.5,
        )

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [num_tokens, hidden_size]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.arch.head_dim)
        k = k.view(-1, self.num_kv_heads, self.arch.head_dim)
        v = v.view(-1, self.num_kv_heads, self.arch.head_dim)
        if self.arch.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if batch.attn_backend.stores_kv_with_rotary and apply_rotary_and_store(
            q, k, v, cos_sin, *batch.kv_pool.layer_buffers(self.attn.layer_id), batch.out_cache_loc
        ):
            return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch, kv_stored=True)))
        q, k = apply_rotary(q, k, cos_sin)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch)))  # row parallel: sum of the ranks' heads


class DecoderMLP(nn.Module):
    def __init__(self, arch: DecoderArch, shard: DecoderShard, tp: TensorParallel):
        super().__init__()
        width = shard.intermediate.count  # this rank's columns of the MLP
        self.tp = tp
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, arch.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden_size]; down_proj is row parallel: each rank's partial sum, all-reduced
        return self.tp.all_reduce(self.down_proj(self.act(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, arch: DecoderArch, layer_id: int, shard: DecoderShard, tp: TensorParallel):
        super().__init__()
        self.self_attn = DecoderAttention(arch, layer_id, shard, tp)
        self.mlp = DecoderMLP(arch, shard, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: DecoderArch, shard: DecoderShard, tp: TensorParallel):
        super().__init__()
        self.shard, self.tp = shard, tp
        # `_weight` skips the random init, which the loader overwrites anyway: on the meta device it would
        # import torch._dynamo (seconds) just to fill nothing.
        rows = shard.vocab.count  # this rank's vocabulary range
        self.embed_tokens = nn.Embedding(rows, arch.hidden_size, _weight=torch.empty(rows, arch.hidden_size))
        self.rotary = RotaryEmbedding(
            arch.head_dim, max_position=arch.max_position_embeddings, base=arch.rope_theta, scaling=arch.rope_scaling
        )
        self.layers = nn.ModuleList([DecoderLayer(arch, i, shard, tp) for i in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [num_tokens] -> [num_tokens, hidden_size]
        if self.tp.size == 1:
            return self.embed_tokens(ids)
        # Vocabulary parallel: each rank looks up the ids in its range, zeros for the rest; the sum
        # over ranks is the full lookup.
        local = ids - self.shard.vocab.start
        outside = (local < 0) | (local >= self.shard.vocab.count)
        x = self.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed(batch.input_ids)
        cos_sin = self.rotary.cos_sin(batch.positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(cos_sin, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x  # [num_tokens, hidden_size]


# checkpoint name fragment -> (our fused parameter, which slice)
_STACKED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    embedding_module_name = "model.embed_tokens"

    def __init__(self, config: dict, *, tp: TensorParallel | None = None):
        super().__init__()
        self.arch = arch = DecoderArch.from_config(config, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)
        self.tp = tp or SINGLE
        self.shard = DecoderShard.plan(num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                                       intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
                                       rank=self.tp.rank, size=self.tp.size)
        self.model = DecoderModel(arch, self.shard, self.tp)
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, self.shard.vocab.count, bias=False)
        # A module computing the logits from the final hidden states, when the weights live elsewhere
        # than a float `lm_head_weight` (the CPU kernels' stored weights); see `use_logits_head`.
        self.logits_head: nn.Module | None = None

    def use_logits_head(self, head: nn.Module) -> None:
        self.logits_head = head

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.arch.tie_word_embeddings else self.lm_head.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden_size] -> [n, vocab_size] float32 (the product runs in the model's dtype, as the reference does)
        if self.logits_head is not None:
            logits = self.logits_head(hidden).float()
        else:
            logits = torch.nn.functional.linear(hidden, self.lm_head_weight).float()
        if self.tp.size == 1:
            return logits
        # Vocabulary parallel: each rank's range (padded to one width), gathered in rank order.
        pad = self.shard.vocab_per_rank - logits.shape[-1]
        if pad:
            logits = torch.nn.functional.pad(logits, (0, pad))
        return self.tp.all_gather_last_dim(logits)[:, : self.arch.vocab_size].contiguous()

    def checkpoint_split(self, name: str) -> tuple[int, Span] | None:
        """This rank's part of checkpoint tensor `name`: (dimension, span) to cut, or None for all of it."""
        if self.tp.size == 1:
            return None
        sh, d = self.shard, self.arch.head_dim
        heads, kv_heads = Span(sh.q_heads.start * d, sh.q_heads.count * d), Span(sh.kv_heads.start * d, sh.kv_heads.count * d)
        for part, span in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads),
                           ("gate_proj", sh.intermediate), ("up_proj", sh.intermediate)):
            if f".{part}." in name:
                return 0, span  # column parallel: output rows (and their bias)
        for part, span in (("o_proj", heads), ("down_proj", sh.intermediate)):
            if f".{part}." in name:
                if not name.endswith(".weight"):
                    raise ValueError(f"{name}: a bias of a row-parallel layer is not supported under tensor parallelism")
                return 1, span  # row parallel: input columns
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return 0, sh.vocab
        return None

    def _shard_rows(self, shard: str | int) -> tuple[int, int]:
        """(first row, rows) of a checkpoint tensor's slice of its fused parameter (this rank's sizes)."""
        d, sh = self.arch.head_dim, self.shard
        if shard in ("q", "k", "v"):
            q_size, kv_size = sh.num_heads * d, sh.num_kv_heads * d
            return {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard]
        return shard * sh.intermediate.count, sh.intermediate.count

    def _slice_for(self, param: torch.Tensor, shard: str | int) -> torch.Tensor:
        return param.narrow(0, *self._shard_rows(shard))

    def checkpoint_rows(self, name: str) -> tuple[str, int] | None:
        """Where a checkpoint weight lands: (our module's name, its first output row), or None for
        tensors that are not a module's `weight`."""
        if not name.endswith(".weight"):
            return None
        for ckpt_part, fused_part, shard_id in _STACKED:
            if f".{ckpt_part}." in name:
                return name.replace(ckpt_part, fused_part)[: -len(".weight")], self._shard_rows(shard_id)[0]
        return name[: -len(".weight")], 0

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            target_name, shard = name, None
            for ckpt_part, fused_part, shard_id in _STACKED:
                if f".{ckpt_part}." in name:
                    target_name, shard = name.replace(ckpt_part, fused_part), shard_id
                    break
            if target_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target_name]
            split = self.checkpoint_split(name)
            if split is not None:
                tensor = tensor.narrow(split[0], *split[1])
            dest = param if shard is None else self._slice_for(param, shard)
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target_name}:{shard}")
        expected = set()
        for pname in params:
            if "qkv_proj" in pname:
                expected |= {f"{pname}:{s}" for s in ("q", "k", "v")}
            elif "gate_up_proj" in pname:
                expected |= {f"{pname}:{s}" for s in (0, 1)}
            else:
                expected.add(f"{pname}:None")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
