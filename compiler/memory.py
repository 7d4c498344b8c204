"""Memory formation (chunk hidden states -> one embedding), memory insertion (slots in front of a chunk's
tokens) and the autoencoder decoder input (repeat / unroll). All batched: no loop over chunks."""
from __future__ import annotations

import torch
import torch.nn as nn

from compiler import plan as P


def select_index(key_mask: torch.Tensor | None, m: int, t: int, position: str, device=None) -> torch.Tensor:
    """[M] index of the position a memory is read from: the last real token (or the one before it)."""
    if key_mask is None:
        last = torch.full((m,), t - 1, device=device)
    else:
        last = torch.where(key_mask.bool(), torch.arange(t, device=key_mask.device), -1).amax(-1)
    if position == 'second_last':
        last = last - 1
    return last.clamp(min=0)


def select_position(hidden: torch.Tensor, key_mask: torch.Tensor | None, position: str) -> torch.Tensor:
    """hidden [M, T, d] -> [M, d]: the hidden state at the last real token (or the one before it)."""
    m, t, _ = hidden.shape
    return hidden[torch.arange(m, device=hidden.device), select_index(key_mask, m, t, position, hidden.device)]


class MemoryModule(nn.Module):
    """Everything between encoder and decoder. Children are components a spec may freeze:
    memory.compress, memory.proj, memory.unroll, memory.pad."""

    def __init__(self, cfg: P.Memory, d_enc: int | None, d_dec: int, *, former: bool, unroll: bool, pad: bool):
        super().__init__()
        self.cfg, self.d_dec = cfg, d_dec
        self.compress = self.proj = self.unroll = None
        if former and cfg.compression > 1:
            self.compress = nn.Sequential(nn.Linear(d_enc, d_enc // cfg.compression),
                                          nn.Linear(d_enc // cfg.compression, d_enc))
        if former and d_enc != d_dec:
            self.proj = nn.Linear(d_enc, d_dec, bias=False)
        if unroll:
            self.unroll = nn.Linear(d_dec // 2, d_dec)
        if pad:
            init = torch.zeros(d_dec) if cfg.pad == 'zeros' else torch.ones(d_dec)
            if cfg.pad == 'learned':
                self.pad = nn.Parameter(init)
            else:
                self.register_buffer('pad', init, persistent=False)

    def form(self, hidden, key_mask):
        """[M, T, d_enc] -> memories [M, d_dec]."""
        return self.project(select_position(hidden, key_mask, self.cfg.position))

    def project(self, m):
        """The selected hidden states [M, d_enc] -> memories [M, d_dec]."""
        if self.compress is not None:
            m = self.compress(m)
        if self.training and self.cfg.noise > 0:
            # quantization-aware training: uniform noise of one quantization step (amplitude `noise`)
            m = m + (torch.rand_like(m) - 0.5) * self.cfg.noise
        if self.proj is not None:
            m = self.proj(m)
        return m

    def decoder_input(self, memory: torch.Tensor, length: int) -> torch.Tensor:
        """Autoencoder decoder input [M, length, d] from memories [M, d] (the decoder never sees tokens)."""
        if self.cfg.decoder_input == 'repeat':
            return memory[:, None, :].expand(-1, length, -1)
        return self.unroll(memory[:, unroll_index(length, memory.shape[-1], memory.device)])

    def slots(self, memories: torch.Tensor | None, b: int, n: int, variable: bool):
        """Memory slots for every chunk at once: memories [b, n-1, d], or None (no-memory control: all pad).
        Returns slots [b, n, S, d] and slot mask [b, n, S] (True = attended).
        fixed:    chunk c gets [m0 .. m(c-1), pad x (n-c)]       (S = n, tokens always start at position n)
        variable: chunk c gets [unused x (n-1-c), m0 .. m(c-1)]  (S = n-1; unused slots are masked out, so
                  chunk c attends exactly [m0..m(c-1), tokens] with positions starting at m0)."""
        dev = self.pad.device
        s = n - 1 if variable else n
        c = torch.arange(n, device=dev)[:, None]
        j = torch.arange(s, device=dev)[None, :]
        src = j - (n - 1 - c) if variable else j.expand(n, s)  # which memory each slot holds
        valid = (src >= 0) & (src < c) if memories is not None else torch.zeros(n, s, dtype=torch.bool, device=dev)
        pad = self.pad.expand(b, n, s, -1)
        if memories is not None:
            gathered = memories[:, src.clamp(0, max(n - 2, 0))]  # [b, n, S, d]
            pad = torch.where(valid[None, :, :, None], gathered, pad.to(memories.dtype))
        mask = valid if variable else torch.ones(n, s, dtype=torch.bool, device=dev)
        return pad, mask.expand(b, n, s)


    def chunk_slots(self, memories: torch.Tensor | None, n: int, variable: bool):
        """The slots of ONE chunk that follows k = memories.shape[1] chunks (memories [b, k, d], k <= n-1, or
        None): row k of `slots`, the same layout, mask and pad as training. For generation and offline decoding."""
        if memories is None:
            s, m = self.slots(None, 1, n, variable)
            return s[:, 0], m[:, 0]
        b, k, d = memories.shape
        full = memories.new_zeros(b, n - 1, d)  # slots() lays out all n chunks from n-1 memories; row k reads k
        full[:, :k] = memories
        s, m = self.slots(full, b, n, variable)
        return s[:, k], m[:, k]


def unroll_index(length: int, d: int, device=None) -> torch.Tensor:
    """[length, d/2] indices: row i is the window h[(i mod d) : (i mod d) + d/2] of the memory, wrapping."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(d // 2, device=device)[None, :]
    return (i % d + j) % d
