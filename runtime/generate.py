"""python -m runtime.generate RUN --prompt TEXT [--prompt ...] [--context TEXT | --context-file F | --memories S:ROW]

Text generation from a trained run, conditioned on memories (the paper's claim 3: a chunk of context costs the
decoder one slot, not chunk_len cache rows).

RUN is a run id or its full name <id>-<key> under --runs, or the path of a run folder (store/runref.py). The run is
loaded through store.runref.load_run (its operative.gin, weights checked against the recorded sha256, tokenizer).
How each family reads text (a KV cache over memories, one over the window, or the trained forward pass without a
cache) is runtime/reading.py's; the decoding itself is runtime/decoding.py (cached) and runtime/window.py (forward).
Families that cannot generate (autoencoder and probe regenerate a memory; the oracle's encoder reads the future)
are refused with their registry record's reason.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

from compiler.errors import UserError, cli
from compiler.families import family
from runtime.decoding import generate
from runtime.reading import MODES, MemoryCache, check_decodes, reading
from store.layout import RunFolder, memory_store
from store.runref import load_run as load_recorded


def load_run(ref, stage: str | None = None, runs='runs', device: str = 'cpu', sampling: bool = False):
    """store.runref.load_run with the runtime's fallback for runs recorded before folders held their tokenizer (the
    data cache rebuilt: runtime.data.prepare); a family that cannot continue text (`sampling`: generate it) is
    refused before its weights are read."""
    from runtime.data import prepare
    return load_recorded(ref, stage, runs=runs, device=device, vocabulary=functools.partial(prepare, progress=False),
                         check=functools.partial(check_decodes, sampling=sampling))


def stored_memories(ref: str, plan, folder: RunFolder):
    """--memories STAGE:ROW -> (memories [1, N-1, d] the stored example's last chunk was decoded with, its tokens)."""
    from store import memories as M
    stage, _, row = ref.rpartition(':')
    where = f'--memories {ref}'
    if not stage or not row.isdigit():
        raise UserError(where, 'expected STAGE:ROW, e.g. clm:0',
                        'name a stage of the run and a row of its stored memories')
    if not family(plan).stores_memories:
        raise UserError(where, f"a '{plan.family}' run has no encoder, so it stored no memories",
                        'condition it on text with --context or --context-file')
    store = memory_store(plan.run, folder.out_dir)
    if store is None:
        raise UserError(where, "the run stored no memories (Run.memory_store = 'none')",
                        'condition on text with --context')
    try:
        group = M.open_group(store, folder.name, stage)
    except UserError as e:  # name the option the user gave first
        raise UserError(where, f'{e.where}: {e.what}', e.fix) from None
    rows = group.memories.shape[0]
    if int(row) >= rows:
        raise UserError(where, f'row {row} is out of range: the stage stored {rows} rows',
                        f'pick a row in 0..{rows - 1}')
    mem, tokens, mask = group.rows(int(row), int(row) + 1)
    return mem[:, :plan.memory.chunks - 1], tokens[0, -1][mask[0, -1]]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m runtime.generate', description=__doc__.split('\n\n')[1])
    ap.add_argument('run', metavar='RUN', help='run id or full name <id>-<key> under --runs, or a run folder\'s path')
    ap.add_argument('--runs', default='runs', help='folder of run folders (default runs)')
    ap.add_argument('--stage', help='weights at the end of this stage (default: final.safetensors)')
    ap.add_argument('--prompt', required=True, action='append',
                    help='text to continue: the end of the conditioning text; repeat it to generate a batch (one row '
                         'per prompt, after the same context, whose memories are encoded once)')
    src = ap.add_mutually_exclusive_group()
    src.add_argument('--context', help='text before the prompt (memory models: encoded into memories chunk by chunk)')
    src.add_argument('--context-file', help='read the context from this UTF-8 file')
    src.add_argument('--memories', metavar='STAGE:ROW', help="memories of a stored held-out example (the run's Zarr "
                     "store): the N-1 its last chunk was decoded with")
    ap.add_argument('--memory', default='on', choices=MODES,
                    help="on (default); ablated: every memory slot empty; full_context: a memory model's decoder reads "
                         'the context tokens themselves in its window of slots + chunk positions')
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
        raise UserError(f'--max-new-tokens {args.max_new_tokens}', 'must be at least 1',
                        'pass --max-new-tokens 1 or more')
    if args.temperature < 0:
        raise UserError(f'--temperature {args.temperature}', 'must be >= 0',
                        'pass 0 for greedy decoding, or a positive value')
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f'--top-k {args.top_k}', 'must be at least 1', 'pass --top-k 1 or more, or leave it out')
    if not all(args.prompt):
        raise UserError('--prompt', 'the prompt is empty', 'give --prompt some text: generation continues it')
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f'--device {args.device}', f'device not usable: {str(e).splitlines()[0]}', 'use --device cpu')


def context_text(args) -> str:
    if args.context_file is None:
        return args.context or ''
    try:
        return Path(args.context_file).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'--context-file {args.context_file}',
                        f'cannot read it: {e.strerror if isinstance(e, OSError) else e}',
                        'give a readable UTF-8 text file')


def fits_window(plan, model, n_tokens: int, max_new: int, mode: str = 'on') -> None:
    """Causal readings: the cache holds the conditioning tokens and every new token but the last (never fed)."""
    how = reading(model, mode)
    one_sequence = model.family.generation == 'causal'  # clm, full_context: no memories slide
    if not how.causal or (how.forward and not one_sequence):
        return
    window = how.window
    if n_tokens + max_new - 1 > window:
        fix = (f'lower --max-new-tokens to {window - n_tokens + 1}' if n_tokens <= window else
               f'shorten --context/--prompt to at most {window} tokens')
        raise UserError(f'--max-new-tokens {max_new}',
                        f"{n_tokens} conditioning tokens + {max_new} new tokens do not fit "
                        f"the {plan.family} model's context of {window} tokens "
                        + ('(Memory.chunks x chunk_len)' if one_sequence else '(its memory slots + one chunk)'),
                        fix + ' (a memory model reads any length: its memories slide)')


@cli
def main(argv=None) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    args = parser().parse_args(argv)
    check_options(args)
    loaded = load_run(args.run, args.stage, args.runs, args.device, sampling=True)
    plan, model, data, folder = loaded.plan, loaded.model, loaded.vocab, loaded.folder
    tok = data.tokenizer
    memories = None
    if args.memories:
        memories, last = stored_memories(args.memories, plan, folder)
        memories = memories.to(args.device)
        print(f'[generate] {memories.shape[1]} stored memories of {args.memories}; that example\'s last chunk was: '
              f'{tok.decode(last.tolist(), skip_special_tokens=False)!r}', file=sys.stderr)
    context = tok.encode(context_text(args), add_special_tokens=False).ids
    rows = [context + tok.encode(p, add_special_tokens=False).ids for p in args.prompt]
    reading(model, args.memory)  # an inapplicable mode is refused before any work
    if memories is not None and len({len(r) for r in rows}) > 1:
        raise UserError(f'--memories {args.memories}', 'stored memories condition prompts of one token length only',
                        'give one --prompt, or prompts that encode to the same number of tokens')
    for ids in rows:
        fits_window(plan, model, len(ids), args.max_new_tokens, args.memory)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    out = generate(model, rows, memories, args.max_new_tokens, args.temperature, args.top_k, data.eod_id, gen,
                   mode=args.memory, memory_cache=MemoryCache(), device=args.device)
    if out.dropped[0]:
        why = ('a no_memory model reads no memories' if not family(plan).has_encoder else
               'memories are ablated' if args.memory == 'ablated' else
               f'the decoder has {plan.memory.chunks - 1} memory slots; the newest are kept')
        print(f'[generate] {out.dropped[0]} context chunk(s) of {plan.memory.chunk_len} tokens not read: {why}',
              file=sys.stderr)
    for row in out.tokens:
        text = tok.decode(row, skip_special_tokens=False)
        if args.json:
            print(json.dumps({'tokens': row, 'text': text, 'ttft_s': out.ttft_s,
                              'tokens_per_s': out.tokens_per_s if out.decoded else None,
                              'kv_cache_bytes': out.kv_cache_bytes}))
        else:
            print(text)
    if not args.json:
        print(f'[generate] {len(out.tokens)} x {max(map(len, out.tokens))} tokens; time to first token '
              f'{out.ttft_s * 1e3:.1f} ms, {out.tokens_per_s:.0f} tokens/s, KV cache '
              f'{out.kv_cache_bytes / 2**20:.2f} MiB', file=sys.stderr)


if __name__ == '__main__':
    main()
