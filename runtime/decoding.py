"""KV-cached decoding: the cached readings of runtime/reading.py (forward readings: runtime/window.py).

Text generation from a trained run with a KV cache, conditioned on memories (the paper's claim 3: a chunk of
context costs the decoder one slot, not chunk_len cache rows).

Memory models (memory, no_memory; transformer decoders) decode exactly as ChunkedMemoryLM.forward lays a chunk out:
- the conditioning tokens (context, then prompt) are cut into chunk_len-token chunks; the complete ones become
  memories in ONE batched `model.encode` call (the decoder has N-1 memory slots: only the newest N-1 are kept);
  the rest is the current chunk (a whole last chunk when the tokens end on a chunk boundary);
- the current chunk is prefilled, after its memory slots (`model.memory.slots`, the training layout: fixed or
  variable slots, same key mask, same positions), into a KV cache of S + L positions, then decoded token by token;
- when the chunk holds L tokens, the next token is the first of a new chunk: the full chunk is encoded into a new
  memory and the cache restarts from the new slots.
Label alignment (compiler/objectives.py, shifted_labels): position t of a chunk is trained to predict token t+1 of
the same chunk, and the last position has no label. So every token inside a chunk comes from a trained position;
the first token of a new chunk is the one exception: it is sampled from the last position of the finished chunk,
which training never supervised (nothing else sees both that chunk's tokens and "what comes next"). The full-context
baseline is trained on the same label set, so its chunk-boundary positions are equally unsupervised.

Causal LMs (families clm, full_context) decode plainly over context + prompt through a cache of the model's whole
context, N*L positions; a request that does not fit is refused.

Batches (evaluation, the harness adapter runtime/lm_adapter.py, and several --prompt): rows of any lengths. Causal
readings left-pad them (key mask; positions of real tokens start at 0). Memory readings group rows that share the
current chunk's length and their memory count, so a group's chunks fill up and roll over at the same steps; the
groups advance in lockstep. Either way a row's greedy output equals generating it alone. Memories come through an
LRU keyed by the chunk's tokens (MemoryCache): prompts that share a context encode its chunks once.

Library (benchmarks/inference.py reuses it): prefill() reads conditioning tokens into a State, step() feeds one token,
advance() feeds many (teacher forcing), generate() times the whole thing (runtime/scoring.py scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compiler.blocks import KVCache
from runtime import reading as R
from runtime import window
from runtime.reading import MemoryCache, Reading
from runtime.sampling import Generation, as_rows, clock, record, sample


@dataclass
class State:
    """Incremental decoding of a batch of rows that advance together."""
    cache: KVCache
    mask: torch.Tensor | None  # [B, cache size] key mask of the cache positions; None = every position is real
    tokens: torch.Tensor  # [B, t] tokens in the cache: the current chunk (memory families) or everything (causal LMs)
    memories: torch.Tensor | None  # [B, k, d] memories of earlier chunks, oldest first (memory families)
    logits: torch.Tensor | None = None  # [B, vocab] scores of the next token
    dropped: int = 0  # complete context chunks that did not fit the N-1 memory slots (or, no_memory: all of them)
    reading: Reading | None = None
    memory_cache: MemoryCache | None = None
    scores: torch.Tensor | None = None  # [B, keep, vocab] scores of the last positions a prefill was asked for


def _feed(model, state: State, x: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Embeddings x [B, t, d] of new positions through the decoder and its cache. Returns the scores [B, keep, vocab]
    of the last `keep` positions (the last block computes only those) and keeps the last one in state.logits."""
    km = None if state.mask is None else state.mask[:, :state.cache.length + x.shape[1]]
    h = model.decoder(embeds=x, key_mask=km, cache=state.cache, keep_last=keep)
    logits = model.decoder.head(h)
    state.logits = logits[:, -1]
    return logits


def _start_chunk(model, cache: KVCache, memories: torch.Tensor | None, tokens: torch.Tensor, dropped: int = 0,
                 keep: int = 1) -> tuple[State, torch.Tensor]:
    """Restart `cache` with the decoder input of a chunk that follows k = len(memories) chunks: chunk k's row of
    model.memory.slots, the layout, key mask and positions ChunkedMemoryLM.forward trains with. Returns the state
    and the scores of the last `keep` token positions."""
    b = tokens.shape[0]
    slots, slot_mask = model.memory.chunk_slots(memories, model.n, model.variable)
    slots, slot_mask = slots.expand(b, -1, -1), slot_mask.expand(b, -1)
    cache.reset()
    mask = None
    if not bool(slot_mask.all()):  # variable slots: unused ones are masked out, and positions then start at m0
        mask = torch.ones(b, cache.capacity, dtype=torch.bool, device=tokens.device)
        mask[:, :slot_mask.shape[1]] = slot_mask
    state = State(cache, mask, tokens, memories, dropped=dropped)
    logits = _feed(model, state, torch.cat([slots, model.decoder.embedding(tokens)], 1), keep)
    return state, logits


def new_cache(model, batch: int) -> KVCache:
    """A KV cache for the decoder's whole sequence, allocated once: S slots + L tokens for memory models, N*L tokens
    for causal LMs (what compiler.cost.kv_cache_bytes counts)."""
    if hasattr(model.decoder, 'members'):  # a pretrained backbone: transformers' own cache
        from compiler.backbone import BackboneCache
        return BackboneCache(model.decoder, model.decoder.seq_len)
    p = next(model.decoder.parameters())
    return KVCache(model.decoder.cfg, batch, model.decoder.seq_len, device=p.device, dtype=p.dtype)


def prefill(model, tokens: torch.Tensor, memories: torch.Tensor | None = None, mode: str | Reading = 'on',
            mask: torch.Tensor | None = None, memory_cache: MemoryCache | None = None, keep: int = 1) -> State:
    """Read conditioning tokens [B, T] (T >= 1), after optional earlier memories [B, k, d]. Causal readings cache
    them all (left padding allowed: mask [B, T], True = real token; positions of real tokens start at 0). Memory
    models: complete chunks become memories (one batched encode of those that are kept), the rest (at least one
    token) is the current chunk; rows advance together, so they share their length. `keep`: also return the scores
    of the last `keep` positions (state.scores), for teacher-forced scoring."""
    how = R.how(model, mode)
    if how.forward:
        raise ValueError(f'a {model.family.name} model with this decoder keeps no KV cache (runtime/window.py)')
    b, t = tokens.shape
    if how.causal:
        if t > how.window:
            raise ValueError(f'{t} tokens do not fit the window of {how.window} positions')
        state = State(new_cache(model, b), None, tokens, None, reading=how, memory_cache=memory_cache)
        if mask is not None and not bool(mask.all()):
            state.mask = torch.ones(b, state.cache.capacity, dtype=torch.bool, device=tokens.device)
            state.mask[:, :t] = mask
        state.scores = _feed(model, state, model.decoder.embedding(tokens), min(keep, t))
        return state
    if mask is not None and not bool(mask.all()):
        raise ValueError('memory models read rows of one length together (generate() groups ragged rows)')
    l = how.chunk
    complete = (t - 1) // l  # the current chunk keeps >= 1 token: the decoder needs a position to predict from
    encode = min(complete, how.keep)  # older chunks would not fit the slots: they are not encoded at all
    if encode:
        chunks = tokens[:, (complete - encode) * l:complete * l].reshape(b * encode, l)
        new = R.encode(model, chunks, memory_cache).view(b, encode, -1)
        memories = new if memories is None else torch.cat([memories, new], 1)
    if how.keep == 0:
        memories = None
    have = 0 if memories is None else memories.shape[1]
    if have > how.keep:
        memories = memories[:, have - how.keep:]
    dropped = complete - encode + max(0, have - how.keep)
    current = tokens[:, complete * l:]
    state, scores = _start_chunk(model, new_cache(model, b), memories, current, dropped, min(keep, current.shape[1]))
    state.reading, state.memory_cache, state.scores = how, memory_cache, scores
    return state


def _roll_over(model, state: State, token: torch.Tensor) -> State:
    """The chunk is complete: it becomes a memory (the newest `keep` are kept) and `token` [B, 1] starts the next."""
    memories, keep = state.memories, state.reading.keep
    if keep:
        new = R.encode(model, state.tokens, state.memory_cache)[:, None]
        memories = new if memories is None else torch.cat([memories, new], 1)[:, -keep:]
    nxt, _ = _start_chunk(model, state.cache, memories, token)
    nxt.reading, nxt.memory_cache = state.reading, state.memory_cache
    return nxt


def _reading_of(model, state: State) -> Reading:
    if state.reading is None:  # a State built by hand
        state.reading = R.reading(model)
    return state.reading


def step(model, state: State, token: torch.Tensor) -> State:
    """Feed the sampled tokens [B]; state.logits then scores the token after them."""
    token = token[:, None]
    how = _reading_of(model, state)
    if how.causal or state.tokens.shape[1] < how.chunk:
        state.tokens = torch.cat([state.tokens, token], 1)
        _feed(model, state, model.decoder.embedding(token))
        return state
    return _roll_over(model, state, token)


def advance(model, state: State, tokens: torch.Tensor) -> tuple[State, torch.Tensor]:
    """Teacher forcing: feed tokens [B, t] with step()'s semantics (a full chunk becomes a memory and the next token
    starts a new chunk), as few decoder calls as the chunk boundaries allow. Returns the state and the scores
    [B, t, vocab]: scores[:, i] scores the token after tokens[:, i]."""
    how, out, i, t = _reading_of(model, state), [], 0, tokens.shape[1]
    while i < t:
        room = t - i if how.causal else how.chunk - state.tokens.shape[1]
        if room == 0:
            state = _roll_over(model, state, tokens[:, i:i + 1])
            out.append(state.logits[:, None])
            i += 1
            continue
        piece = tokens[:, i:i + room]
        state.tokens = torch.cat([state.tokens, piece], 1)
        out.append(_feed(model, state, model.decoder.embedding(piece), piece.shape[1]))
        i += piece.shape[1]
    return state, torch.cat(out, 1)


def _continue(model, parts, states, toks, done, max_new_tokens: int, pick, note) -> int:
    """Step the groups in lockstep until every row is done or has max_new_tokens tokens; returns the count."""
    n = 1
    while n < max_new_tokens and not all(done):
        for k, (g, state) in enumerate(zip(parts, states)):
            if all(done[i] for i in g.rows):
                continue
            states[k] = state = step(model, state, toks[k])
            toks[k] = pick(state.logits)
            note(g, toks[k])
        n += 1
    return n


def _layout(model, how: Reading, row: list[int]) -> tuple[tuple, list[int], int]:
    """(group key, the tokens the row's prefill reads, complete chunks it drops). Causal readings: the newest
    `window` tokens, one group (left padding). Memory readings: the kept complete chunks + the current chunk; rows
    that share (current chunk length, memories) roll over at the same steps, so they advance together."""
    if how.causal:
        return ('causal',), row[-how.window:], 0
    l = how.chunk
    complete = (len(row) - 1) // l
    kept = min(complete, how.keep)
    return (len(row) - complete * l, kept), row[(complete - kept) * l:], complete - kept


@dataclass
class Group:
    rows: list[int]  # indices into the batch
    tokens: torch.Tensor  # [b, T] left-padded (causal readings) or equal-length rows
    mask: torch.Tensor | None  # [b, T] True = real token (causal readings with ragged rows)
    dropped: list[int]


def groups(model, rows: list[list[int]], mode: str | Reading = 'on', device='cpu',
           size: int | None = None) -> list[Group]:
    """Split a ragged batch into groups of rows that advance together (at most `size` rows each)."""
    how = R.how(model, mode)
    by: dict[tuple, list] = {}
    for i, row in enumerate(rows):
        key, toks, dropped = _layout(model, how, row)
        by.setdefault(key, []).append((i, toks, dropped))
    out = []
    for members in by.values():
        for s in range(0, len(members), size or len(members)):
            part = members[s:s + (size or len(members))]
            width = max(len(t) for _, t, _ in part)
            tokens = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.bool)
            for j, (_, t, _) in enumerate(part):  # left padding: real tokens end at the last column
                tokens[j, width - len(t):] = torch.tensor(t)
                mask[j, width - len(t):] = True
            out.append(Group([i for i, _, _ in part], tokens.to(device),
                             None if bool(mask.all()) else mask.to(device), [d for _, _, d in part]))
    return out


@torch.inference_mode()
def generate(model, tokens, memories: torch.Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, eod: int | None = None,
             generator: torch.Generator | None = None, mode: str | Reading = 'on',
             memory_cache: MemoryCache | None = None, stop: Callable[[list[int]], bool] | None = None,
             device=None) -> Generation:
    """Continue every row of `tokens` (a [B, T] tensor, or a list of token lists of any lengths) by up to
    max_new_tokens tokens, timed. Ragged rows are grouped (`groups`) and the groups advance in lockstep; greedy
    output of a row equals generating that row alone. `memories` [B, k, d]: earlier memories before every row
    (equal-length rows). `stop(row's new tokens)`: the row is done (e.g. a stop string appeared)."""
    model.eval()
    device = device or (tokens.device if isinstance(tokens, torch.Tensor) else next(model.parameters()).device)
    rows = as_rows(tokens)
    if R.how(model, mode).forward:
        if memories is not None:
            raise ValueError('a model without a KV cache reads text, not stored memories')
        return window.generate(model, rows, max_new_tokens, temperature, top_k, eod, generator, R.how(model, mode),
                               stop, device)
    if memories is not None and len({len(r) for r in rows}) > 1:
        raise ValueError('stored memories condition rows of one length')
    t0 = clock(device)
    parts = groups(model, rows, mode, device)
    states = []
    for g in parts:
        mem = None if memories is None else memories[g.rows]
        states.append(prefill(model, g.tokens, mem, mode, g.mask, memory_cache))
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    toks = []
    for g, state in zip(parts, states):
        toks.append(sample(state.logits, temperature, top_k, generator))
        record(g.rows, toks[-1], out, done, eod, stop)
    t1 = clock(device)
    n = _continue(model, parts, states, toks, done, max_new_tokens,
                  pick=lambda logits: sample(logits, temperature, top_k, generator),
                  note=lambda g, tok: record(g.rows, tok, out, done, eod, stop))
    t2 = clock(device)
    dropped = [0] * len(rows)
    for g, state in zip(parts, states):
        for i, d in zip(g.rows, g.dropped):
            dropped[i] = d + state.dropped
    return Generation(out, t1 - t0, t2 - t1, n - 1, max(s.cache.nbytes for s in states), dropped)
