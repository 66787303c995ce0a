"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2): one class, flags from ModelConfig.

q/k/v are fused into one `qkv_proj` and gate/up into one `gate_up_proj` at load (one matmul each);
`checkpoint_layout` says which rows of which parameter each HF checkpoint tensor fills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine.models.attention import Attention, AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.rotary import cos_sin_cache

# Where a checkpoint tensor goes: our parameter's name and the rows it fills (None = all of it).
Destination = tuple[str, slice | None]


class RMSNorm(nn.Module):
    """RMSNorm; given the residual stream it adds it first and returns (normed, new residual)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class MLP(nn.Module):
    """Gated SiLU MLP: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block; the residual add is fused into the following RMSNorm."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer,
                                   qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias, qk_norm=cfg.qk_norm,
                                   rms_norm_eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None, kv_cache: Tensor,
                cos_sin: Tensor, attn: AttentionMetadata) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, cos_sin, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class CausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models read logits through the embedding matrix itself: no second copy to keep in sync.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.build_rotary_cache()

    def build_rotary_cache(self) -> None:
        """(Re)compute the fp32 RoPE table on the parameters' device (after `to_empty`, for one)."""
        device = self.embed_tokens.weight.device
        self.cos_sin_cache = cos_sin_cache(self.cfg.max_position_embeddings, self.cfg.head_dim,
                                           self.cfg.rope_theta, self.cfg.rope_scaling, device)

    def forward(self, input_ids: Tensor, positions: Tensor, kv_cache: Tensor, attn: AttentionMetadata) -> Tensor:
        """Run the packed tokens [T] of this step; returns final hidden states [T, H]."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, kv_cache, self.cos_sin_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Logits [S, V] in the model dtype, as HF's lm_head computes them, so greedy picks match HF's
        in bf16/fp16 too. No float32 copy here: the sampler widens (exactly) only in the stages that
        compute in float32, and at 1024 rows a copy would move almost 1 GB per step."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def checkpoint_layout(self) -> dict[str, Destination]:
        """Every HF checkpoint tensor name this model needs -> (our parameter, rows it fills)."""
        cfg = self.cfg
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        qkv_rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        gate_up_rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter)}
        layout: dict[str, Destination] = {
            "model.embed_tokens.weight": ("embed_tokens.weight", None),
            "model.norm.weight": ("norm.weight", None),
        }
        if self.lm_head is not None:
            layout["lm_head.weight"] = ("lm_head.weight", None)
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            kinds = ["weight"] + (["bias"] if cfg.attention_bias else [])
            for proj, rows in qkv_rows.items():
                for kind in kinds:
                    layout[f"{hf}.self_attn.{proj}.{kind}"] = (f"{ours}.self_attn.qkv_proj.{kind}", rows)
            for kind in ["weight"] + (["bias"] if cfg.o_proj_bias else []):
                layout[f"{hf}.self_attn.o_proj.{kind}"] = (f"{ours}.self_attn.o_proj.{kind}", None)
            if cfg.qk_norm:
                layout[f"{hf}.self_attn.q_norm.weight"] = (f"{ours}.self_attn.q_norm", None)
                layout[f"{hf}.self_attn.k_norm.weight"] = (f"{ours}.self_attn.k_norm", None)
            for kind in ["weight"] + (["bias"] if cfg.mlp_bias else []):
                for proj, rows in gate_up_rows.items():
                    layout[f"{hf}.mlp.{proj}.{kind}"] = (f"{ours}.mlp.gate_up_proj.{kind}", rows)
                layout[f"{hf}.mlp.down_proj.{kind}"] = (f"{ours}.mlp.down_proj.{kind}", None)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                layout[f"{hf}.{norm}.weight"] = (f"{ours}.{norm}.weight", None)
        return layout
