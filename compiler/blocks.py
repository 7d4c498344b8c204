"""Building blocks shared by every model family: norms, rotary positions, the Llama-style transformer
block, the masked-mixer block and a Stack (embedding -> blocks -> final norm [-> head]).

Module names follow Hugging Face's Llama (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so a
LlamaForCausalLM state dict maps onto a Stack by renaming three top-level keys (compiler/llama.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import plan as P
from compiler.attention import attend


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # computed in fp32 like Llama, so bf16 runs normalise the same way
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin [B, T, 1, D] of Llama's half-split rotary embedding for positions [B, T]. Computed once per
    Stack call and shared by every layer (they depend on positions only)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer of one transformer Stack, preallocated for `max_len` positions, so
    incremental decoding appends in place: a new token costs one row of attention, not a recompute of the
    prefix, and the cache's size is known up front (the cost model's kv_cache_bytes is exactly `nbytes`)."""

    def __init__(self, cfg: P.Stack, batch: int, max_len: int, device=None, dtype=torch.float32):
        hd = cfg.d_model // cfg.n_heads
        self.kv = torch.zeros(cfg.n_layers, 2, batch, max_len, cfg.kv_heads, hd, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def reset(self) -> None:
        """Start over in the same allocation: attention only ever reads the filled positions."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def capacity(self) -> int:
        """Positions allocated."""
        return self.kv.shape[3]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this call's k, v [B, t, H, D] after the filled positions; return all keys and values so far."""
        end = self.length + k.shape[1]
        if end > self.kv.shape[3]:
            raise ValueError(f'KV cache full: {end} positions needed, {self.kv.shape[3]} allocated')
        self.kv[layer, 0, :, self.length:end] = k
        self.kv[layer, 1, :, self.length:end] = v
        return self.kv[layer, 0, :, :end], self.kv[layer, 1, :, :end]


def fused_linear(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """The outputs of bias-free Linear layers that read the same input, from one matrix product over their
    concatenated weights: one wide product runs faster than several narrow ones, most of all on a CPU. Names,
    parameters and checkpoints stay those of the separate layers."""
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: P.Stack):
        super().__init__()
        self.cfg, d, hd = cfg, cfg.d_model, cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x, rot, key_mask, keep_last=None, cache=None, layer=0):
        """x [B, T, d]; rot = rope_tables of x's positions. keep_last: only the last positions' outputs are
        wanted, so queries are computed for them alone (keys and values still cover every position).
        cache: a KVCache this call's keys and values are appended to; attention then covers the whole cache."""
        b, t, _ = x.shape
        hd = self.cfg.d_model // self.cfg.n_heads
        cos, sin = rot
        # one matrix product for the projections that read the same rows (the weights stay three parameters)
        if keep_last is None:
            xq, cq, sq = x, cos, sin
            q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            xq, cq, sq = x[:, -keep_last:], cos[:, -keep_last:], sin[:, -keep_last:]
            q, (k, v) = self.q_proj(xq), fused_linear(x, self.k_proj, self.v_proj)
        q = apply_rope(q.view(b, xq.shape[1], self.cfg.n_heads, hd), cq, sq)
        k = apply_rope(k.view(b, t, self.cfg.kv_heads, hd), cos, sin)
        v = v.view(b, t, self.cfg.kv_heads, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = attend(q, k, v, causal=self.cfg.causal, key_mask=key_mask, backend=self.cfg.attention)
        return self.o_proj(out.reshape(b, xq.shape[1], -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = fused_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: P.Stack, seq_len: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn)

    def forward(self, x, rot, key_mask, keep_last=None, cache=None, layer=0):
        h = self.self_attn(self.input_layernorm(x), rot, key_mask, keep_last, cache, layer)
        x = (x if keep_last is None else x[:, -keep_last:]) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class MaskedTokenConv(nn.Module):
    """Token mixing of the masked mixer: a Conv1d whose channels are token positions, sliding over the hidden
    dimension. Causality comes from multiplying the weight by a lower-triangular (out, in) mask inside forward,
    never by overwriting the weight, so the masked-out entries cannot drift or leak through an optimiser.
    heads > 1: each head gets its own Linear(d, d/h) input projection and its own convolution (grouped conv)."""

    def __init__(self, cfg: P.Stack, seq_len: int):
        super().__init__()
        h, d, k = cfg.mixer_heads, cfg.d_model, cfg.mixer_kernel
        self.heads, self.kernel, self.seq_len = h, k, seq_len
        self.weight = nn.Parameter(torch.empty(h * seq_len, seq_len, k))
        self.bias = nn.Parameter(torch.zeros(h * seq_len))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # Conv1d's own default init
        mask = torch.ones(seq_len, seq_len).tril() if cfg.causal else torch.ones(seq_len, seq_len)
        self.register_buffer('mask', mask.repeat(h, 1)[:, :, None], persistent=False)
        if h > 1:
            self.proj_in = nn.Linear(d, d, bias=False)  # = h separate Linear(d, d/h) stacked
            self.proj_out = nn.Linear(d, d, bias=False)

    def forward(self, x):  # x: [B, L, d]
        b, t, d = x.shape
        h = self.heads
        if h > 1:  # [B, L, d] -> [B, h*L, d/h]: head-major channel groups
            x = self.proj_in(x).view(b, t, h, d // h).permute(0, 2, 1, 3).reshape(b, h * t, d // h)
        y = F.conv1d(x, self.weight * self.mask, self.bias, padding='same', groups=h)
        if h > 1:
            y = y.view(b, h, t, d // h).permute(0, 2, 1, 3).reshape(b, t, d)
            y = self.proj_out(y)
        return y


class MixerBlock(nn.Module):
    def __init__(self, cfg: P.Stack, seq_len: int):
        super().__init__()
        self.seq_norm = nn.LayerNorm(cfg.d_model)
        self.conv = MaskedTokenConv(cfg, seq_len)
        self.patch_norm = nn.LayerNorm(cfg.d_model)
        self.patch_ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.d_model))

    def forward(self, x, rot, key_mask, keep_last=None, cache=None, layer=0):
        if cache is not None:
            raise ValueError('masked mixers keep no KV cache: decode them by recomputing the window')
        h = self.seq_norm(x)
        if key_mask is not None:  # padding must not mix into real positions (matters for bidirectional mixers)
            h = h * key_mask[..., None].to(h.dtype)
        x = x + self.conv(h)
        if keep_last is not None:  # token mixing needs every position; only the per-position MLP can skip
            x = x[:, -keep_last:]
        return x + self.patch_ff(self.patch_norm(x))


class Stack(nn.Module):
    """embedding -> n_layers blocks -> final norm [-> head]. Mixers need the sequence length at build time."""

    def __init__(self, cfg: P.Stack, vocab: int, seq_len: int, embedding: bool = True, head: bool = False):
        super().__init__()
        self.cfg, self.seq_len = cfg, seq_len
        block = TransformerBlock if cfg.kind == 'transformer' else MixerBlock
        self.embedding = nn.Embedding(vocab, cfg.d_model) if embedding else None
        self.layers = nn.ModuleList(block(cfg, seq_len) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.kind == 'transformer' else nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False) if head else None

    def forward(self, tokens=None, *, embeds=None, key_mask=None, positions=None, keep_last=None, cache=None):
        """tokens [B, T] or embeds [B, T, d]; key_mask [B, T] True = real. Returns final-normed hidden [B, T, d].

        Positions default to the index among real tokens (a left-padded row starts at 0), which is what makes
        padded and unpadded inputs give the same outputs on real tokens.
        keep_last: return only the last `keep_last` positions; the last block then computes nothing else (the
        work nobody reads: a memory reads one position of the encoder, the head reads only token positions).
        cache: incremental decoding. x holds the new positions only; key_mask, if given, covers the cache's
        positions followed by the new ones; positions default to continuing after the cache."""
        x = self.embedding(tokens) if embeds is None else embeds
        b, t = x.shape[:2]
        past = 0 if cache is None else cache.length
        if positions is None:
            if key_mask is None:
                positions = torch.arange(past, past + t, device=x.device).expand(b, -1)
            else:
                positions = ((key_mask.long().cumsum(-1) - 1).clamp(min=0))[:, -t:]
        rot = rope_tables(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta) \
            if self.cfg.kind == 'transformer' else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, rot, key_mask, keep_last if i == last else None, cache, i)
        if cache is not None:
            cache.length += t
        return self.norm(x)
