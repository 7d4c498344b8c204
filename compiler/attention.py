"""Attention backends. All layouts are converted here and nowhere else.

Callers pass q, k, v as [batch, time, heads, head_dim] (xformers' native BMHK layout) and an optional
key mask [batch, time] (True = real token). Backends:
- 'xformers': xformers.ops.memory_efficient_attention (CUDA only): LowerTriangularMask for plain causal
  attention, an additive bias tensor when a key mask is present;
- 'sdpa': torch.nn.functional.scaled_dot_product_attention (any device), boolean mask;
- 'auto': xformers when the tensors are on CUDA and xformers' kernels run there (probed once), else sdpa.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from compiler.errors import SpecError


@functools.cache
def _xformers_ops():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # xformers warns at import on CPU-only machines
            import xformers.ops as xops
        return xops
    except Exception:  # noqa: BLE001  (any import failure means: not available)
        return None


_PROBLEMS: dict[int, str | None] = {}  # CUDA device index -> why xformers cannot run there (None: it can)


def xformers_problem(device: torch.device) -> str | None:
    """Why xformers cannot run on this device, or None when it can. Importing is not enough: a wheel built for
    another torch imports, then has no kernels (xformers 0.0.35, built for torch 2.10, on torch 2.11: 'No
    operator found'), so one tiny call per dtype decides, once per CUDA device. A plain dict lookup afterwards,
    which torch.compile traces as a constant."""
    if device.type != 'cuda':
        return f'it has no kernels for {device.type} tensors'
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROBLEMS:
        _PROBLEMS[index] = _probe_xformers(torch.device('cuda', index))
    return _PROBLEMS[index]


@torch.compiler.disable
def _probe_xformers(device: torch.device) -> str | None:
    xops = _xformers_ops()
    if xops is None:
        return 'xformers does not import'
    try:
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.zeros(1, 8, 1, 64, device=device, dtype=dtype)
            xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask())
    except Exception as e:  # noqa: BLE001  (whatever the failure, the answer is: not here)
        return f'its kernels do not run with torch {torch.__version__} ({str(e).strip().splitlines()[0]})'
    return None


def resolve_backend(name: str, device: torch.device) -> str:
    if name == 'sdpa':
        return 'sdpa'
    problem = xformers_problem(device)
    if name == 'auto':
        return 'sdpa' if problem else 'xformers'
    if problem:
        raise SpecError("Stack.attention = 'xformers'",
                        f'xformers memory-efficient attention cannot run on this {device.type} device: {problem}',
                        "use Stack.attention = 'auto' (xformers where it runs, else sdpa) or 'sdpa'")
    return 'xformers'


def dense_mask(t_q: int, t_k: int, causal: bool, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean [batch or 1, 1, t_q, t_k] mask, True = may attend. None when nothing is masked. Queries are the
    last t_q of the t_k key positions (fewer when decoding with a KV cache or keeping only the last outputs)."""
    mask = None
    if causal:
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, :].bool()
        mask = km if mask is None else (mask & km)
        # A query row with no visible key (a padding query under left padding) would give NaN; let such rows
        # see themselves. Their outputs are padding and never read.
        eye = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q).triu(t_k - t_q)[None, None]
        mask = mask | (eye & ~mask.any(-1, keepdim=True))
    return mask


def attend(q, k, v, *, causal: bool, key_mask: torch.Tensor | None = None, backend: str = 'auto') -> torch.Tensor:
    """q, k, v: [B, T, H, D] (k, v may have fewer heads: grouped-query). Returns [B, T, H, D].

    Queries may be fewer than keys (incremental decoding with a KV cache): they are then the *last* t_q
    positions, so causal masking is aligned bottom-right; a single query sees every key."""
    backend = resolve_backend(backend, q.device)
    t_q, t_k = q.shape[1], k.shape[1]
    causal = causal and t_q > 1  # one query at the end of the keys may attend to all of them
    if k.shape[2] != q.shape[2]:  # grouped-query attention: share each kv head among q heads
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    if backend == 'xformers':
        xops = _xformers_ops()
        if key_mask is None:
            bias = (None if not causal else xops.LowerTriangularMask() if t_q == t_k
                    else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask())
        else:
            allowed = dense_mask(t_q, t_k, causal, key_mask, q.device)
            bias = _additive_bias(allowed, q.shape[2], q.dtype)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    # sdpa's is_causal is aligned top-left, so it is only used when queries and keys are the same positions
    is_causal = causal and key_mask is None and t_q == t_k
    mask = None if is_causal else dense_mask(t_q, t_k, causal, key_mask, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2)


def _additive_bias(allowed: torch.Tensor, heads: int, dtype) -> torch.Tensor:
    """xformers wants a float bias [B, H, Tq, Tk] whose last dim is allocated in multiples of 8."""
    b, _, tq, tk = allowed.shape
    pad = (-tk) % 8
    storage = torch.zeros(b, heads, tq, tk + pad, dtype=dtype, device=allowed.device)
    bias = storage[..., :tk]
    bias.masked_fill_(~allowed.expand(b, heads, tq, tk), float('-inf'))
    return bias


def naive_attention(q, k, v, *, causal: bool, key_mask=None) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(d)) v with explicit masking. [B, T, H, D] in and out. For tests."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / q.shape[-1] ** 0.5
    mask = dense_mask(q.shape[1], k.shape[1], causal, key_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf'))
    return torch.einsum('bhqk,bkhd->bqhd', scores.softmax(-1), v)
