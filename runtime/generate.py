"""python -m runtime.generate RUN --prompt TEXT [--context TEXT | --context-file F | --memories STAGE:ROW] [options]

Text generation from a trained run with a KV cache, conditioned on memories (the paper's claim 3: a chunk of
context costs the decoder one slot, not chunk_len cache rows).

Memory models (families memory, no_memory) decode exactly as ChunkedMemoryLM.forward lays a chunk out:
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

Library (benchmarks/inference.py reuses it): prefill() reads conditioning tokens into a State, step() feeds one token,
sample() picks one, generate() times the whole thing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.blocks import KVCache
from compiler.errors import SpecError, cli, either
from compiler.families import REGISTRY, family
from store.layout import RunFolder, memory_store, parse_name

_GENERATING = sorted((f for f in REGISTRY.values() if f.generation), key=lambda f: f.generation != 'memory')
OTHER_USE = f'generate with a {either(f.name for f in _GENERATING)} run'  # memory models first


@dataclass
class State:
    """Incremental decoding of a batch of rows that advance together."""
    cache: KVCache
    mask: torch.Tensor | None  # [B, cache size] key mask of the cache positions; None = every position is real
    tokens: torch.Tensor  # [B, t] tokens in the cache: the current chunk (memory families) or everything (causal LMs)
    memories: torch.Tensor | None  # [B, k, d] memories of earlier chunks, oldest first (memory families)
    logits: torch.Tensor | None = None  # [B, vocab] scores of the next token
    dropped: int = 0  # complete context chunks that did not fit the N-1 memory slots (or, no_memory: all of them)


def _causal(model) -> bool:
    """One window over every token (clm, full_context), or chunks turned into memories (memory, no_memory)."""
    return model.family.generation == 'causal'


def _feed(model, state: State, x: torch.Tensor) -> None:
    """Embeddings x [B, t, d] of new positions through the decoder and its cache; keep the last position's scores.
    keep_last=1: the last block computes only the position whose scores are read."""
    km = None if state.mask is None else state.mask[:, :state.cache.length + x.shape[1]]
    h = model.decoder(embeds=x, key_mask=km, cache=state.cache, keep_last=1)
    state.logits = model.decoder.head(h[:, -1])


def _start_chunk(model, cache: KVCache, memories: torch.Tensor | None, tokens: torch.Tensor, dropped: int = 0) -> State:
    """Restart `cache` with the decoder input of a chunk that follows k = len(memories) chunks: chunk k's row of
    model.memory.slots, the layout, key mask and positions ChunkedMemoryLM.forward trains with."""
    b = tokens.shape[0]
    slots, slot_mask = model.memory.chunk_slots(memories, model.n, model.variable)
    slots, slot_mask = slots.expand(b, -1, -1), slot_mask.expand(b, -1)
    cache.reset()
    mask = None
    if not bool(slot_mask.all()):  # variable slots: unused ones are masked out, and positions then start at m0
        mask = torch.ones(b, cache.kv.shape[3], dtype=torch.bool, device=tokens.device)
        mask[:, :slot_mask.shape[1]] = slot_mask
    state = State(cache, mask, tokens, memories, dropped=dropped)
    _feed(model, state, torch.cat([slots, model.decoder.embedding(tokens)], 1))
    return state


def new_cache(model, batch: int) -> KVCache:
    """A KV cache for the decoder's whole sequence, allocated once: S slots + L tokens for memory models, N*L tokens
    for causal LMs (what compiler.cost.kv_cache_bytes counts)."""
    p = next(model.decoder.parameters())
    return KVCache(model.decoder.cfg, batch, model.decoder.seq_len, device=p.device, dtype=p.dtype)


def keep_memories(model) -> int:
    """How many memories the decoder reads: its N-1 memory slots (none without an encoder)."""
    return model.n - 1 if getattr(model, 'use_memory', False) else 0


def prefill(model, tokens: torch.Tensor, memories: torch.Tensor | None = None) -> State:
    """Read conditioning tokens [B, T] (T >= 1), after optional earlier memories [B, k, d]. Causal LMs cache them all.
    Memory models: complete chunks become memories (one batched encode of those that are kept), the rest (at least
    one token) is the current chunk."""
    if model.family.generation is None:
        raise ValueError(f'family {model.family.name} cannot decode through a KV cache (see check_generates)')
    b, t = tokens.shape
    if _causal(model):
        state = State(new_cache(model, b), None, tokens, None)
        _feed(model, state, model.decoder.embedding(tokens))
        return state
    l, keep = model.l, keep_memories(model)
    complete = (t - 1) // l  # the current chunk keeps >= 1 token: the decoder needs a position to predict from
    encode = min(complete, keep)  # older chunks would not fit the slots: they are not encoded at all
    if encode:
        new = model.encode(tokens[:, (complete - encode) * l:complete * l].reshape(b * encode, l)).view(b, encode, -1)
        memories = new if memories is None else torch.cat([memories, new], 1)
    have = 0 if memories is None else memories.shape[1]
    if have > keep:
        memories = memories[:, have - keep:]
    dropped = complete - encode + max(0, have - keep)
    return _start_chunk(model, new_cache(model, b), memories, tokens[:, complete * l:], dropped)


def step(model, state: State, token: torch.Tensor) -> State:
    """Feed the sampled tokens [B]; state.logits then scores the token after them."""
    token = token[:, None]
    if _causal(model) or state.tokens.shape[1] < model.l:
        state.tokens = torch.cat([state.tokens, token], 1)
        _feed(model, state, model.decoder.embedding(token))
        return state
    # the chunk is complete: it becomes a memory (the newest N-1 are kept) and `token` starts the next chunk
    memories, keep = state.memories, keep_memories(model)
    if keep:
        new = model.encode(state.tokens)[:, None]
        memories = new if memories is None else torch.cat([memories, new], 1)[:, -keep:]
    return _start_chunk(model, state.cache, memories, token)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, vocab] -> [B] token ids: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the new tokens (an eod token ends a row and is not included)
    ttft_s: float  # prefill (memory encoding included) + first token
    decode_s: float  # every later token
    decoded: int  # tokens sampled after the first (per row)
    kv_cache_bytes: int  # the decoder's cache tensors
    dropped: int  # context chunks beyond the memory slots

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second."""
        return self.decoded / self.decode_s if self.decoded else float('nan')


def _clock(device) -> float:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)  # kernels run asynchronously: time what has finished
    return time.perf_counter()


@torch.inference_mode()
def generate(model, tokens: torch.Tensor, memories: torch.Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, eod: int | None = None,
             generator: torch.Generator | None = None) -> Generation:
    """Continue tokens [B, T] (after optional memories [B, k, d]) by up to max_new_tokens tokens, timed."""
    model.eval()
    t0 = _clock(tokens.device)
    state = prefill(model, tokens, memories)
    dropped = state.dropped
    tok = sample(state.logits, temperature, top_k, generator)
    out, done = [tok], None if eod is None else tok == eod  # rows that have ended
    t1 = _clock(tokens.device)
    while len(out) < max_new_tokens and not (done is not None and bool(done.all())):
        state = step(model, state, tok)
        tok = sample(state.logits, temperature, top_k, generator)
        out.append(tok)
        if done is not None:
            done = done | (tok == eod)
    t2 = _clock(tokens.device)
    rows = torch.stack(out, 1).tolist()
    if eod is not None:
        rows = [r[:r.index(eod)] if eod in r else r for r in rows]
    return Generation(rows, t1 - t0, t2 - t1, len(out) - 1, state.cache.nbytes, dropped)


# ------------------------------------------------------------------------------------------------------------ CLI

def run_folder(run: str, runs: str) -> Path:
    """RUN: a run folder's path, or a run id or full run name (<id>-<key>) under --runs (an id that several folders
    share, runs of different databases, is refused with the candidates listed)."""
    path = Path(run)
    if path.is_dir() and RunFolder.at(path).operative.is_file():
        return path
    under, ref = (path.parent, path.name) if len(path.parts) > 1 else (Path(runs), run)
    where = f'RUN {run}'
    if parse_name(ref) is not None:
        found = RunFolder.find(under, ref, where)  # several runs with this id: refused, the candidates listed
        if found is not None and found.operative.is_file():
            return found.root
    raise SpecError(where, f'no run folder at {run} and no run {ref} under {under} (a run folder holds operative.gin)',
                    'give a run id (python -m store.runs list), its full name <id>-<key> under --runs, or a run '
                    'folder')


def read_weights(path: Path, where: str) -> dict:
    """A run's safetensors weights; a truncated or foreign file is refused (exit 2) rather than read."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (SafetensorError: header too small, file not fully covered, ...)
        text = str(e).strip()
        raise SpecError(where, f"cannot read the weights {path}: {text.splitlines()[0] if text else type(e).__name__}",
                        'the file is damaged or not a safetensors file: rerun the run (or the stage) to rewrite it')


def check_generates(plan, where: str) -> None:
    """Families and stacks that cannot decode through a KV cache: one message each, naming what to use instead."""
    fam = family(plan)
    if fam.generation is None:
        fix = (f'decode its stored memories with `python -m store.analyze decode RUN_ID`, or {OTHER_USE}'
               if fam.readout(plan) == 'decoder' else OTHER_USE)
        raise SpecError(where, f"family '{plan.family}' cannot generate: {fam.cannot_generate}", fix)
    if plan.decoder.kind != 'transformer':
        raise SpecError(where, f"family '{plan.family}' with a masked-mixer decoder cannot generate: "
                        'masked mixers keep no KV cache (their token mixing is a convolution over the whole window)',
                        f"{OTHER_USE} whose decoder is a transformer (decoder/Stack.kind = 'transformer')")


def load_run(folder: Path, stage: str | None, device: str = 'cpu'):
    """(plan, model with the run's weights, prepared data: tokenizer and special ids) of a run folder."""
    from compiler.model import build
    from compiler.spec import load
    from runtime.data import prepare
    plan = load([str(RunFolder.at(folder).operative)]).plan
    check_generates(plan, f'run {folder}')
    if stage is not None and stage not in plan.stage_names:
        raise SpecError(f'--stage {stage}',
                        f"run {folder} has no stage '{stage}' (stages: {', '.join(plan.stage_names)})",
                        'pick one of the listed stages, or leave --stage out for the final weights')
    weights = RunFolder.at(folder).weights(stage)
    if not weights.is_file():
        raise SpecError(f'run {folder}', f'no weights at {weights} (the run did not finish'
                        + (' that stage)' if stage else ')'),
                        'let the run finish (python -m runtime.run ... --resume ID), or pick a finished --stage')
    state = read_weights(weights, f'run {folder}')  # before any work: a damaged file is bad input
    data = prepare(plan, progress=False)
    model = build(plan, data.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f'run {folder}', f'the weights {weights} do not fit the model of its operative.gin: '
                        f'{str(e).strip().splitlines()[-1].strip()}', 'rerun the run to rewrite them')
    return plan, model.to(device).eval(), data


def stored_memories(ref: str, plan, folder: Path):
    """--memories STAGE:ROW -> (memories [1, N-1, d] the stored example's last chunk was decoded with, its tokens)."""
    from store import memories as M
    stage, _, row = ref.rpartition(':')
    where = f'--memories {ref}'
    if not stage or not row.isdigit():
        raise SpecError(where, 'expected STAGE:ROW, e.g. clm:0',
                        'name a stage of the run and a row of its stored memories')
    if not family(plan).stores_memories:
        raise SpecError(where, f"a '{plan.family}' run has no encoder, so it stored no memories",
                        'condition it on text with --context or --context-file')
    store = memory_store(plan.run, folder.parent)
    if store is None:
        raise SpecError(where, "the run stored no memories (Run.memory_store = 'none')",
                        'condition on text with --context')
    try:
        group = M.open_group(store, folder.name, stage)
    except SpecError as e:  # name the option the user gave first
        raise SpecError(where, f'{e.where}: {e.what}', e.fix) from None
    rows = group.memories.shape[0]
    if int(row) >= rows:
        raise SpecError(where, f'row {row} is out of range: the stage stored {rows} rows',
                        f'pick a row in 0..{rows - 1}')
    mem, tokens, mask = group.rows(int(row), int(row) + 1)
    return mem[:, :plan.memory.chunks - 1], tokens[0, -1][mask[0, -1]]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m runtime.generate', description=__doc__.split('\n\n')[1])
    ap.add_argument('run', metavar='RUN', help='run id or full run name (<id>-<key>) under --runs, or a run folder')
    ap.add_argument('--runs', default='runs', help='folder of run folders (default runs)')
    ap.add_argument('--stage', help='weights at the end of this stage (default: final.safetensors)')
    ap.add_argument('--prompt', required=True, help='text to continue: the end of the conditioning text')
    src = ap.add_mutually_exclusive_group()
    src.add_argument('--context', help='text before the prompt (memory models: encoded into memories chunk by chunk)')
    src.add_argument('--context-file', help='read the context from this UTF-8 file')
    src.add_argument('--memories', metavar='STAGE:ROW', help="memories of a stored held-out example (the run's Zarr "
                     "store): the N-1 its last chunk was decoded with")
    ap.add_argument('--max-new-tokens', type=int, default=64)
    ap.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (default)')
    ap.add_argument('--top-k', type=int, help='sample only among the k most likely tokens')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='cpu', help='torch device (default cpu)')
    ap.add_argument('--json', action='store_true',
                    help='print tokens, text, ttft_s, tokens_per_s, kv_cache_bytes as JSON')
    return ap


def check_options(args) -> None:
    if args.max_new_tokens < 1:
        raise SpecError(f'--max-new-tokens {args.max_new_tokens}', 'must be at least 1',
                        'pass --max-new-tokens 1 or more')
    if args.temperature < 0:
        raise SpecError(f'--temperature {args.temperature}', 'must be >= 0',
                        'pass 0 for greedy decoding, or a positive value')
    if args.top_k is not None and args.top_k < 1:
        raise SpecError(f'--top-k {args.top_k}', 'must be at least 1', 'pass --top-k 1 or more, or leave it out')
    if not args.prompt:
        raise SpecError('--prompt', 'the prompt is empty', 'give --prompt some text: generation continues it')
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise SpecError(f'--device {args.device}', f'device not usable: {str(e).splitlines()[0]}', 'use --device cpu')


def context_text(args) -> str:
    if args.context_file is None:
        return args.context or ''
    try:
        return Path(args.context_file).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f'--context-file {args.context_file}',
                        f'cannot read it: {e.strerror if isinstance(e, OSError) else e}',
                        'give a readable UTF-8 text file')


def fits_window(plan, model, n_tokens: int, max_new: int) -> None:
    """Causal LMs: the cache holds the conditioning tokens and every new token but the last (which is never fed)."""
    if not _causal(model):
        return
    window = model.n * model.l
    if n_tokens + max_new - 1 > window:
        fix = (f'lower --max-new-tokens to {window - n_tokens + 1}' if n_tokens <= window else
               f'shorten --context/--prompt to at most {window} tokens')
        raise SpecError(f'--max-new-tokens {max_new}',
                        f"{n_tokens} conditioning tokens + {max_new} new tokens do not fit "
                        f"the {plan.family} model's context of {window} tokens (Memory.chunks x chunk_len)",
                        fix + ' (a memory model reads any length: its memories slide)')


@cli
def main(argv=None) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    args = parser().parse_args(argv)
    check_options(args)
    folder = run_folder(args.run, args.runs)
    plan, model, data = load_run(folder, args.stage, args.device)
    tok = data.tokenizer
    memories = None
    if args.memories:
        memories, last = stored_memories(args.memories, plan, folder)
        memories = memories.to(args.device)
        print(f'[generate] {memories.shape[1]} stored memories of {args.memories}; that example\'s last chunk was: '
              f'{tok.decode(last.tolist(), skip_special_tokens=False)!r}', file=sys.stderr)
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids
    ids = tok.encode(context_text(args), add_special_tokens=False).ids + prompt
    fits_window(plan, model, len(ids), args.max_new_tokens)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=args.device), memories, args.max_new_tokens, args.temperature,
                   args.top_k, data.eod_id, gen)
    if out.dropped:
        why = ('a no_memory model reads no memories' if not family(plan).has_encoder else
               f'the decoder has {plan.memory.chunks - 1} memory slots; the newest are kept')
        print(f'[generate] {out.dropped} context chunk(s) of {plan.memory.chunk_len} tokens not read: {why}',
              file=sys.stderr)
    text = tok.decode(out.tokens[0], skip_special_tokens=False)
    if args.json:
        print(json.dumps({'tokens': out.tokens[0], 'text': text, 'ttft_s': out.ttft_s,
                          'tokens_per_s': out.tokens_per_s if out.decoded else None,
                          'kv_cache_bytes': out.kv_cache_bytes}))
    else:
        print(text)
        print(f'[generate] {len(out.tokens[0])} tokens; time to first token {out.ttft_s * 1e3:.1f} ms, '
              f'{out.tokens_per_s:.0f} tokens/s, KV cache {out.kv_cache_bytes / 2**20:.2f} MiB', file=sys.stderr)


if __name__ == '__main__':
    main()
