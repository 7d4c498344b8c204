"""How a trained model reads conditioning text: the memory modes, the three ways a family decodes, and the memory
LRU that generation and scoring share.

A family decodes (generation, scoring) one of three ways, read from its registry record (compiler/families.py):
- cached, memory reading (memory, no_memory with a transformer decoder): complete chunks -> memories (one batched
  `model.encode`), the current chunk through a KV cache of S + L positions (runtime/decoding.py);
- cached, causal reading (clm, full_context with a transformer decoder): one KV cache over the window of N*L tokens;
- forward reading (no KV cache: masked-mixer decoders, whose token mixing is a convolution over the whole window,
  the recurrent memory transformer, whose memory is the previous chunk's decoder output, and the oracle): the
  trained forward pass over a window of N chunks x L tokens, laid out from the start of the text as training lays
  them out (runtime/window.py). Every position is computed again for each new token, so it is slower, and its
  numbers are those of the trained graph exactly. The oracle's encoder reads the whole window, the scored
  continuation included: it scores (an upper bound on memory benefit, as in training) but cannot generate.
Families whose decoder regenerates a memory (autoencoder, probe) do not continue text: their stored memories are
decoded by `python -m store.analyze decode`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from compiler.errors import UserError, either
from compiler.families import REGISTRY, family

MODES = ('on', 'ablated', 'full_context')
_GENERATING = sorted((f for f in REGISTRY.values() if f.token_decoder and f.encoder != 'sequence'),
                     key=lambda f: f.generation != 'memory')
OTHER_USE = f'use a {either(f.name for f in _GENERATING)} run'  # memory models first


@dataclass(frozen=True)
class Reading:
    """How a model reads its conditioning tokens under a memory mode (`reading`).
    causal: one window of `window` token positions over the tokens themselves (clm and full_context families, a
    chunked decoder in 'full_context' mode, or a forward reading); else chunks -> memories, the decoder reading the
    newest `keep`. forward: no KV cache, the trained forward pass over N chunks of L tokens (runtime/window.py)."""
    mode: str
    causal: bool
    keep: int = 0
    window: int | None = None  # causal: positions the decoder was built for (None: memories slide, no limit)
    chunk: int = 0  # tokens per memory (the run's chunk_len, or a shorter one for a compression sweep)
    forward: bool = False


def cached(model) -> bool:
    """Does the model decode through a KV cache (a transformer decoder of a family with a cached generation)?"""
    return model.family.generation is not None and model.decoder.cfg.kind in ('transformer', 'backbone')


def check_decodes(plan, where: str, sampling: bool = False) -> None:
    """Families that cannot continue text (or, `sampling`, cannot generate it): one message each, from the family
    record, naming what to use instead."""
    fam = family(plan)
    if fam.token_decoder and not (sampling and fam.encoder == 'sequence'):
        return
    fix = (f'decode its stored memories with `python -m store.analyze decode RUN`, or {OTHER_USE}'
           if fam.readout(plan) == 'decoder' else
           f'score it with python -m runtime.evaluate, or {OTHER_USE} to generate' if fam.token_decoder else OTHER_USE)
    raise UserError(where, f"family '{plan.family}' cannot generate: {fam.cannot_generate}", fix)


def keep_memories(model) -> int:
    """How many memories the decoder reads: its N-1 memory slots (none without an encoder)."""
    return model.n - 1 if getattr(model, 'use_memory', False) else 0


def _forward_reading(model, mode: str, keep, chunk_len) -> Reading:
    fam = model.family
    if mode == 'ablated' and not fam.ablation:
        raise UserError(f'--memory {mode}', f"a '{fam.name}' model has no memory slots to ablate",
                        'use --memory on' + (' (a no_memory run is already the ablated control)'
                                             if not fam.forms_memories else ''))
    if mode == 'full_context':
        raise UserError(f'--memory {mode}', f"a '{fam.name}' model without a KV cache reads its window of "
                        f'{model.n} x {model.l} tokens as it was trained', 'use --memory on')
    if keep is not None or chunk_len is not None:
        raise UserError('keep, chunk_len', f'a {fam.name} model without a KV cache reads its trained layout only',
                        'sweep a memory model with a transformer decoder')
    return Reading(mode, True, 0, model.n * model.l, model.l, forward=True)


def reading(model, mode: str = 'on', keep: int | None = None, chunk_len: int | None = None) -> Reading:
    """The Reading of `model` under memory mode `mode`:
    - 'on': as trained (memory models keep their N-1 newest memories);
    - 'ablated': every memory slot empty (the pad slot): the same decoder without memory information, the stage-end
      ablation of training; only for families that form memories;
    - 'full_context': no compression: a chunked decoder reads the context tokens themselves in its own window of
      S + L positions (S memory slots + one chunk: the positions it was trained on), the oldest tokens falling out;
      families that read all tokens anyway (clm, full_context) have no such mode.
    Compression sweeps (memory readings): `keep` memories instead of N-1 (0..N-1), chunks of `chunk_len` tokens
    instead of the trained L (1..L: the encoder reads any length up to the one it was built for, and the decoder's
    slots + chunk positions stay within those it was trained on)."""
    fam = model.family
    if mode not in MODES:
        raise UserError(f'--memory {mode}', 'unknown memory mode', f"use one of {', '.join(MODES)}")
    if not cached(model):
        return _forward_reading(model, mode, keep, chunk_len)
    causal = fam.generation == 'causal'
    if mode == 'ablated' and not fam.forms_memories:
        raise UserError(f'--memory {mode}', f"a '{fam.name}' model forms no memories, so there is nothing to ablate",
                        "use --memory on (a no_memory run is already the ablated control)")
    if mode == 'full_context' and causal:
        raise UserError(f'--memory {mode}', f"a '{fam.name}' model reads every context token in its window already",
                        'use --memory on for it; full_context mode is for memory models (their decoder then reads '
                        'tokens instead of memories)')
    if causal or mode == 'full_context':
        if keep is not None or chunk_len is not None:
            raise UserError('keep, chunk_len', f'a {mode} reading of a {fam.name} model has no memories to sweep',
                            'sweep a memory model with --memory on')
        return Reading(mode, True, 0, model.decoder.seq_len)
    most = keep_memories(model) if mode == 'on' else 0
    if keep is not None and not 0 <= keep <= most:
        raise UserError(f'keep={keep}', f'the decoder reads 0..{most} memories in {mode} mode',
                        f'pick keep in 0..{most}')
    if chunk_len is not None and not (1 <= chunk_len <= model.l and model.family.has_encoder
                                      and getattr(model.encoder.cfg, 'kind', '') == 'transformer'):
        raise UserError(f'chunk_len={chunk_len}', f'the encoder of this {fam.name} model reads chunks of 1..{model.l} '
                        'tokens only if it is a transformer (masked mixers are built for one length)',
                        f'pick chunk_len in 1..{model.l} for a transformer encoder, or leave it out')
    return Reading(mode, False, most if keep is None else keep, None, chunk_len or model.l)


def how(model, mode) -> Reading:
    """`mode` is a memory mode name or a Reading already made (a compression sweep's)."""
    return mode if isinstance(mode, Reading) else reading(model, mode)


class MemoryCache:
    """LRU of memories keyed by their chunk's tokens: a memory depends on its chunk alone (the encoder reads each
    chunk by itself at positions 0..L-1), so prompts that share a context, and requests that share chunks, encode
    each chunk once. Belongs to one model (its weights): make a new one for other weights."""

    def __init__(self, capacity: int = 8192):
        self.capacity, self.entries = capacity, OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [M, L] -> memories [M, d]; the chunks not cached go through ONE batched model.encode call."""
        keys = [tuple(c) for c in chunks.tolist()]
        todo = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            new = model.encode(torch.tensor(todo, dtype=chunks.dtype, device=chunks.device))
            for k, m in zip(todo, new):
                self.entries[k] = m
        for k in keys:
            self.entries.move_to_end(k)
        out = torch.stack([self.entries[k] for k in keys])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return out


def encode(model, chunks: torch.Tensor, cache: MemoryCache | None) -> torch.Tensor:
    return model.encode(chunks) if cache is None else cache.encode(model, chunks)
