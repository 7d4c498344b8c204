"""python -m runtime.generate RUN --prompt TEXT [--prompt ...] [--context TEXT | --context-file F | --memories S:ROW]

Text generation from a trained run, conditioned on memories (the paper's claim 3: a chunk of context costs the
decoder one slot, not chunk_len cache rows).

RUN is a run id or its full name <id>-<key> under --runs, the path of a run folder (store/runref.py), or a folder
`python -m store.export` wrote (its config.json, model.safetensors checked against the sha256 recorded beside it,
tokenizer.json; no --stage, no stored --memories). A run is loaded through store.runref.load_run (its operative.gin,
weights checked against the recorded sha256, tokenizer).
How each family reads text (a KV cache over memories, one over the window, or the trained forward pass without a
cache) is runtime/reading.py's; the decoding itself is runtime/decoding.py (cached) and runtime/window.py (forward).
Families that cannot generate (autoencoder and probe regenerate a memory; the oracle's encoder reads the future)
are refused with their registry record's reason.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch

from compiler.args import SEED, Parser, integer, real
from compiler.errors import UserError, cli
from compiler.families import family
from runtime.decoding import generate
from runtime.reading import MODES, MemoryCache, check_decodes, reading
from store.layout import RunFolder, memory_store
from store.runref import load_run as load_recorded


def is_export(ref) -> bool:
    """RUN names a folder store.export wrote (its config.json; a run folder has none)."""
    return (Path(str(ref)) / 'config.json').is_file()


def load_export(folder: Path, stage: str | None, device: str = 'cpu', sampling: bool = False):
    """compiler.load.Loaded of an exported folder (compiler.load.from_pretrained's checks), `.folder` None."""
    from compiler import load
    where, fix = f'RUN {folder}', 'export the run again (python -m store.export RUN OUT)'
    if stage is not None:
        raise UserError(f'--stage {stage}', f'{folder} is an export: it holds the weights it was exported with',
                        'leave --stage out, or export that stage (python -m store.export RUN OUT --stage NAME)')
    cfg = load.read_export_config(folder, where, fix)
    plan = load.plan_from_dict(cfg['plan'], f'{where}: config.json', fix)
    check_decodes(plan, where, sampling=sampling)
    sha = cfg['weights'].get('sha256')
    loaded = load.load(plan, load.inside(folder, cfg['weights'].get('file'), f'{where}: config.json', fix),
                       where=where, fix=fix, sha256=sha if isinstance(sha, str) else None,
                       tokenizer=load.inside(folder, 'tokenizer.json', where, fix), device=device)
    loaded.folder = None
    return loaded


def load_run(ref, stage: str | None = None, runs='runs', device: str = 'cpu', sampling: bool = False):
    """store.runref.load_run (or load_export for an exported folder) with the runtime's fallback for runs recorded
    before folders held their tokenizer (the data cache rebuilt: runtime.data.prepare); a family that cannot continue
    text (`sampling`: generate it) is refused before its weights are read."""
    from runtime.data import prepare
    if is_export(ref):
        return load_export(Path(str(ref)), stage, device, sampling)
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


# The most tokens one call generates. A memory model's memories slide, so it could go on forever; a call keeps every
# new token and prints them at the end, so an unbounded count would run with no output and no end.
MAX_NEW_TOKENS = 2 ** 16


def parser() -> Parser:
    ap = Parser(prog='python -m runtime.generate', description=__doc__.split('\n\n')[1])
    ap.add_argument('run', metavar='RUN', help="run id or full name <id>-<key> under --runs, a run folder's path, or "
                                               'a folder python -m store.export wrote')
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
    ap.add_argument('--max-new-tokens', type=integer(1, MAX_NEW_TOKENS), default=64,
                    help=f'tokens to generate per prompt (default 64, at most {MAX_NEW_TOKENS}; a plain LM also '
                         'within its window)')
    ap.add_argument('--temperature', type=real(0, 1e4), default=0.0, help='0 = greedy (default)')
    ap.add_argument('--top-k', type=integer(1, 2 ** 31 - 1), help='sample only among the k most likely tokens')
    ap.add_argument('--seed', type=integer(0, SEED), default=0)
    ap.add_argument('--device', default='cpu', help='torch device (default cpu)')
    ap.add_argument('--json', action='store_true',
                    help='print tokens, text, ttft_s, tokens_per_s, kv_cache_bytes as JSON')
    return ap


def check_options(args) -> None:
    """What argparse's types (compiler/args.py: range-checked numbers) cannot say."""
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


def complete(loaded, prompts: list[str], context: str = '', max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, memory: str = 'on', memories=None, device: str = 'cpu'):
    """Continue each prompt after `context`: (texts, the Generation). `loaded` is what load_run returns, for a run
    folder or an export (`load_run('runs/export-0')`); a memory model encodes the context's complete chunks into
    memories, so any length reads (its forward pass, by contrast, takes [batch, chunks, chunk_len] blocks). Refuses
    what cannot fit a plain LM's window."""
    plan, model, tok = loaded.plan, loaded.model, loaded.vocab.tokenizer
    ids = tok.encode(context, add_special_tokens=False).ids
    rows = [ids + tok.encode(p, add_special_tokens=False).ids for p in prompts]
    reading(model, memory)  # an inapplicable mode is refused before any work
    for row in rows:
        fits_window(plan, model, len(row), max_new_tokens, memory)
    gen = torch.Generator(device).manual_seed(seed)
    out = generate(model, rows, memories, max_new_tokens, temperature, top_k, loaded.vocab.eod_id, gen,
                   mode=memory, memory_cache=MemoryCache(), device=device)
    return [tok.decode(row, skip_special_tokens=False) for row in out.tokens], out


@cli
def main(argv=None) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    args = parser().parse_args(argv)
    check_options(args)
    loaded = load_run(args.run, args.stage, args.runs, args.device, sampling=True)
    plan, data, folder = loaded.plan, loaded.vocab, loaded.folder
    tok = data.tokenizer
    memories = None
    if args.memories:
        if folder is None:
            raise UserError(f'--memories {args.memories}', f'{args.run} is an export: it has no memory store',
                            'condition on text with --context, or give the run folder')
        memories, last = stored_memories(args.memories, plan, folder)
        memories = memories.to(args.device)
        print(f'[generate] {memories.shape[1]} stored memories of {args.memories}; that example\'s last chunk was: '
              f'{tok.decode(last.tolist(), skip_special_tokens=False)!r}', file=sys.stderr)
    context = context_text(args)
    if memories is not None and len({len(tok.encode(p, add_special_tokens=False).ids) for p in args.prompt}) > 1:
        raise UserError(f'--memories {args.memories}', 'stored memories condition prompts of one token length only',
                        'give one --prompt, or prompts that encode to the same number of tokens')
    texts, out = complete(loaded, args.prompt, context, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                          args.memory, memories, args.device)
    if out.dropped[0]:
        why = ('a no_memory model reads no memories' if not family(plan).has_encoder else
               'memories are ablated' if args.memory == 'ablated' else
               f'the decoder has {plan.memory.chunks - 1} memory slots; the newest are kept')
        print(f'[generate] {out.dropped[0]} context chunk(s) of {plan.memory.chunk_len} tokens not read: {why}',
              file=sys.stderr)
    for row, text in zip(out.tokens, texts):
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
