"""python -m store.analyze {decode,info,retrieve,plot} RUN_ID ... [--store runs/memories.zarr] [--stage NAME]

Offline analysis of the memory embeddings a run stored (store/memories.py) with the checkpoint that wrote them.

  decode RUN_ID [--stage S] [-n 5]              original vs regenerated text of the first n sequences, per-sequence
                                                token accuracy
  info RUN_ID [RUN_ID ...] [--csv FILE|-]       token accuracy, normalized Hamming distance, cross-entropy,
                                                I_e = 1 - CE / ln V, bits per byte of decoding from stored memories,
                                                one row per run and stage
  retrieve RUN_ID [--stage S] [--n 7] [--mode ngram|nbag] [--seed 0] [--queries 2048]
                                                n-gram / n-bag retrieval: query = the run's encoder on n tokens of a
                                                stored chunk, candidates = every stored chunk memory, cosine;
                                                top-1 / top-5 accuracy vs chance
  plot RUN_ID --out DIR [--db URL]              PNGs: memory PCA, accuracy by position in the chunk, metric curves
                                                (from --db, default the run's <out_dir>/sacred.db)

How stored memories are decoded (the run's own decoder, rebuilt from the run folder's plan and stage checkpoint; the
family registry's `readout` decides, compiler/families.py):
- autoencoder / probe: model.memory.decoder_input(memory) -> model.decoder -> head; target = every real token.
- memory family with an ae_decoder (frozen-encoder curriculum): the memories of a stage that autoencodes, the same
  through model.ae_decoder; those of later stages, which leave the ae_decoder as it was, by the blank-copy read-out
  below (through the ae_decoder every later stage would repeat the autoencode stage's numbers).
- memory family without one: blank-copy style: memory m_c in the first slot (other slots the pad slot), blank tokens
  at the chunk's real positions; position t predicts token t+1 (the blank-copy label convention), so the first
  token of a chunk has no prediction. `--readout ae_decoder|blank_copy` forces one read-out for every stage.

RUN_ID is a run's id or its full name <id>-<key> (the name of its folder and group, store/layout.py). Ids repeat
across run databases: an id that matches several groups of the store is refused with the candidates listed (give
the full name, or --db to take the run key from that database's record).

Every subcommand streams the store in slices of store.memories.ROWS rows (model work in smaller micro-batches), so
memory stays bounded on stores of millions of rows. Bad input (missing store, unknown or ambiguous run, unknown stage,
half-written group, incompatible store version, damaged metadata, missing or corrupt chunks (the message names the
run, stage and rows), a checkpoint that does not match the stored widths) -> one message, exit 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compiler import objectives as O
from compiler import plan as P
from compiler.errors import SpecError, cli
from compiler.families import REGISTRY, family
from compiler.spec import load
from store import memories as M
from store import tables
from store.database import default_url, display_url, open_db, recorded_run
from store.layout import RunFolder, memory_store, parse_name, resolve, run_name
from store.plots import Series, curves
from store.tables import num

DEFAULT_STORE = str(memory_store(P.Run()))
LOGITS_BUDGET = 1 << 25  # floats of logits per model micro-batch (128 MiB in float32)


# ---------------------------------------------------------------------------------------------------- store access

def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit='rows', dynamic_ncols=True, file=sys.stderr, mininterval=0.5, disable=None)


def slices(group: M.Group, limit: int | None = None, desc: str = ''):
    """(start, stop, memories, tokens, mask) for consecutive slices of ROWS rows; a tqdm bar on stderr."""
    total = group.memories.shape[0] if limit is None else min(limit, group.memories.shape[0])
    with _bar(total, desc) as bar:
        for start in range(0, total, M.ROWS):
            stop = min(start + M.ROWS, total)
            mem, tok, msk = group.rows(start, stop)
            yield start, stop, mem, tok, msk.bool()
            bar.update(stop - start)


def run_group(store, ref: str, db: str | None = None) -> str:
    """The store group a RUN argument names: a group name as listed ('3-1a2b3c4d5e'), or a run id. An id goes
    through the run database's record when --db is given (its run key names the group), else it must match one group
    of the store: ids repeat across databases, so several matches are refused with the candidates listed."""
    ref = str(ref)
    names = sorted({g['run'] for g in M.listing(store)})
    if ref in names:
        return ref
    parsed = parse_name(ref)
    if parsed is None:
        return ref  # open_group reports that the store has no such run, listing the runs it has
    if db:
        found = open_db(db).runs(run_id=parsed[0])
        if not found:
            raise SpecError(f'run {ref}', f'no run {parsed[0]} in {display_url(db)}',
                            'pick an id from python -m store.runs list --db ..., or leave --db out')
        name = found[0].name
        if parsed[1] is not None and name != ref:
            raise SpecError(f'run {ref}', f'run {parsed[0]} of {display_url(db)} is {name}, not {ref}',
                            f'analyse {name}, or pass the --db that recorded {ref}')
        return name
    return resolve(names, ref, f'run {ref}', f'in {store}',
                   'or pass --db with the run database that recorded the run you mean') or ref


def stages(store, run: str, stage: str | None = None) -> list[tuple[str, M.Group]]:
    """The run's groups to analyse (`run`: a group name, see run_group): the named stage, or every complete stage in
    curriculum order (by step). Half-written stages are skipped with a note; a run whose every stage is half-written
    is an error."""
    run = str(run)
    if stage is not None:
        return [(stage, M.open_group(store, run, stage))]
    names = [g['stage'] for g in M.listing(store) if g['run'] == run]
    if not names:
        M.open_group(store, run, '?')  # raises: no store here / unknown run (with the runs listed)
        raise SpecError(f'{store} run {run}', 'the run has no stage groups', 'rerun the run to write its memories')
    out, torn = [], []
    for name in names:
        try:
            out.append((name, M.open_group(store, run, name)))
        except SpecError as e:
            if 'half-written' not in e.what:
                raise
            torn.append(e)
    if not out:
        raise torn[0]
    for e in torn:
        print(f'note: skipping {e.where}: {e.what}', file=sys.stderr)
    return sorted(out, key=lambda sg: (sg[1].attrs.get('step', 0), sg[0]))


# ------------------------------------------------------------------------------------------------ rebuilding models

def _label(attrs: dict) -> str:
    """The run that wrote a group, as its folder and group are named."""
    return run_name(attrs.get('run_id'), attrs.get('run_key'))


def run_folder(attrs: dict) -> Path:
    """The run folder: the checkpoint_path attribute is its stage weights file (store/layout.py)."""
    return Path(attrs['checkpoint_path']).parent.parent


def database_of(attrs: dict, db: str | None = None) -> str | None:
    """The run database of a group's run: --db, else the default beside its run folder (<out_dir>/sacred.db) when
    that file exists (None: neither)."""
    if db:
        return db
    if not attrs.get('checkpoint_path'):
        return None
    out_dir = run_folder(attrs).parent
    return default_url(out_dir) if (out_dir / 'sacred.db').is_file() else None


def _plan_from_operative(path: Path):
    """The run folder's operative.gin is a complete spec: load it like any other."""
    spec = load([str(path)])
    return spec.plan, spec.hash


def _plan_from_sacred(url: str, run_id: str, run_key: str | None):
    run = recorded_run(url, run_id)
    if run is None:
        raise LookupError(f'run {run_id} is not in {display_url(url)}')
    if run_key is not None and run.run_key != run_key:  # another database's run with the same id
        raise LookupError(f'run {run_id} of {display_url(url)} is {run.name}, not the run that wrote these memories '
                          f'(key {run_key})')
    plan = P.Plan.from_dict(run.config['plan'])
    return plan, plan.hash


_PLANS: dict = {}


def load_plan(attrs: dict, db: str | None = None) -> P.Plan:
    """The Plan that wrote a group: the run folder's operative.gin (compiler.spec.load), else the plan recorded in
    the run's Sacred config (--db, default <out_dir>/sacred.db). Checked against the group's spec_hash."""
    folder, run_id = run_folder(attrs), attrs['run_id']
    key = (str(folder), db)
    if key in _PLANS:
        return _PLANS[key]
    tried = []
    op = RunFolder.at(folder).operative
    candidates = [('operative.gin', lambda: _plan_from_operative(op))] if op.is_file() else []
    url = database_of(attrs, db)
    if url is not None:
        candidates.append((f'Sacred config in {display_url(url)}',
                           lambda: _plan_from_sacred(url, run_id, attrs.get('run_key'))))
    fallback = None
    for name, fn in candidates:
        try:
            plan, h = fn()
        except (SpecError, LookupError, KeyError, TypeError, ValueError, P.PlanError) as e:
            tried.append(f'{name}: {str(e).splitlines()[0]}')
            continue
        if h == attrs.get('spec_hash'):
            _PLANS[key] = plan
            return plan
        tried.append(f'{name}: plan hash {h} != stored spec_hash {attrs.get("spec_hash")}')
        fallback = fallback or plan
    if fallback is not None:  # a plan with the same model is still usable; the width checks below guard the rest
        print(f'warning: run {run_id}: no plan source matches the stored spec_hash ({"; ".join(tried)}); '
              'using the closest one', file=sys.stderr)
        _PLANS[key] = fallback
        return fallback
    raise SpecError(f'run {run_id} ({folder})', 'cannot rebuild the plan that wrote these memories'
                    + (f" ({'; '.join(tried)})" if tried
                       else ' (no operative.gin in the run folder and no Sacred database)'),
                    'keep the run folder next to the store, or pass --db with the database the run was recorded in')


@dataclass
class Decoder:
    """The model that wrote a group, and how its memories are decoded."""
    model: torch.nn.Module
    kind: str  # 'decoder' (autoencoder/probe), 'ae_decoder' (memory family), 'blank_copy' (memory family)
    pad: int
    blank: int
    vocab: int
    chunk_len: int
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))

    @property
    def shifted(self) -> bool:
        return self.kind == 'blank_copy'


def load_decoder(group: M.Group, db: str | None = None, device: str = 'cpu', readout: str = 'auto') -> Decoder:
    """Rebuild the run's model from its plan and the group's stage checkpoint; check it against the stored widths."""
    from safetensors.torch import load_file

    from compiler.model import build
    a = group.attrs
    where = f"run {_label(a)} stage {a['stage']}"
    missing = [k for k in ('checkpoint_path', 'vocab_size', 'chunks', 'chunk_len', 'spec_hash') if a.get(k) is None]
    if missing:
        raise SpecError(where, f"the group lacks the attribute(s) {', '.join(missing)} needed to rebuild its model "
                        '(not written by runtime.run?)', 'analyse groups a training run wrote')
    plan = load_plan(a, db)
    fam = family(plan)
    if fam.readout(plan) is None:
        raise SpecError(where, f"family '{plan.family}' has no memory decoder to analyse",
                        'analyse a run of a family that stores memories: '
                        + ', '.join(f.name for f in REGISTRY.values() if f.stores_memories))
    ck = Path(a['checkpoint_path'])
    if not ck.is_file():
        raise SpecError(where, f'stage checkpoint {ck} not found', 'keep the run folder where the run wrote it')
    try:
        state = load_file(str(ck))
    except Exception as e:  # noqa: BLE001  (a torn or foreign file is the user's input)
        raise SpecError(where, f'cannot read checkpoint {ck}: {str(e).splitlines()[0]}',
                        'rerun the stage to rewrite it')
    vocab = int(a['vocab_size'])
    model = build(plan, vocab)
    d_mem = model.memory.d_dec
    stored = group.memories.shape[-1]
    if int(a.get('memory_dim', stored)) != d_mem or stored != d_mem:
        raise SpecError(where, f"checkpoint does not match the stored widths: memory_dim {a.get('memory_dim')} "
                        f'(arrays {stored}) but the model forms {d_mem}-wide memories',
                        'decode with the run that wrote the store')
    if (int(a['chunks']), int(a['chunk_len'])) != (plan.memory.chunks, plan.memory.chunk_len) \
            or tuple(group.tokens.shape[1:]) != (plan.memory.chunks, plan.memory.chunk_len):
        raise SpecError(where, f"stored chunks x chunk_len {tuple(group.tokens.shape[1:])} do not match the plan's "
                        f'{plan.memory.chunks} x {plan.memory.chunk_len}', 'decode with the run that wrote the store')
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(where, f'checkpoint {ck} does not match the model of the plan that wrote the store: '
                        f'{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}',
                        'decode with the run that wrote the store')
    model.eval().to(device)
    kind = fam.readout(plan, a.get('stage'))
    if readout != 'auto' and readout != kind:
        if kind == 'decoder' or (readout == 'ae_decoder' and not hasattr(model, 'ae_decoder')):
            raise SpecError(f'--readout {readout}', f"{where}: the '{plan.family}' model "
                            f"{'has no ae_decoder' if readout == 'ae_decoder' else 'has no memory slots to read from'}",
                            f"use --readout auto (here: {kind})")
        kind = readout
    if kind == 'blank_copy' and plan.memory.chunks < 2:
        raise SpecError(where, 'a memory model with 1 chunk has no memory slot to decode from',
                        'analyse a run with chunks >= 2')
    ids = a.get('special_ids') or {}
    return Decoder(model, kind, int(ids.get('<pad>', 0)), int(ids.get('<blank>', 0)), vocab, plan.memory.chunk_len,
                   torch.device(device))


@torch.no_grad()
def decode_chunks(dec: Decoder, mem: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Stored memories [M, d] of M chunks (+ their tokens and mask [M, L]) -> (logits [M, L, V], labels [M, L])."""
    model, l = dec.model, dec.chunk_len
    mem, tokens, mask = mem.to(dec.device), tokens.to(dec.device), mask.to(dec.device)
    if dec.kind in ('decoder', 'ae_decoder'):
        stack = getattr(model, dec.kind)
        logits = stack.head(stack(embeds=model.memory.decoder_input(mem, l)))
        return logits, torch.where(mask, tokens, O.IGNORE)
    # the slots of a chunk that follows one chunk: exactly one memory (m_c), the rest pad / unused
    slots, slot_mask = model.memory.chunk_slots(mem[:, None], model.n, model.variable)
    blank = torch.where(mask, torch.full_like(tokens, dec.blank), torch.full_like(tokens, dec.pad))
    x = torch.cat([slots, model.decoder.embedding(blank)], 1)
    km = torch.cat([slot_mask, mask], 1)
    h = model.decoder(embeds=x, key_mask=None if bool(km.all()) else km)
    return model.decoder.head(h[:, -l:]), O.shifted_labels(tokens, mask)


def decode_rows(dec: Decoder, mem, tokens, mask):
    """Rows [B, N, ...] -> (logits [B, N, L, V], labels [B, N, L]); model micro-batches bounded by LOGITS_BUDGET."""
    b, n, l = tokens.shape
    step = max(1, LOGITS_BUDGET // (l * dec.vocab))
    fm, ft, fk = mem.reshape(b * n, -1), tokens.reshape(b * n, l), mask.reshape(b * n, l)
    parts = [decode_chunks(dec, fm[i:i + step], ft[i:i + step], fk[i:i + step]) for i in range(0, b * n, step)]
    logits = torch.cat([p[0] for p in parts]).view(b, n, l, -1)
    return logits, torch.cat([p[1] for p in parts]).view(b, n, l)


def iter_decoded(dec: Decoder, group: M.Group, limit: int | None = None, desc: str = ''):
    """Stream (logits, labels) over the group, slice by slice (logits never held for more than one micro-batch)."""
    b, n, l = group.tokens.shape
    step = max(1, LOGITS_BUDGET // (n * l * dec.vocab))
    for _, _, mem, tok, msk in slices(group, limit, desc):
        for i in range(0, len(tok), step):
            yield decode_rows(dec, mem[i:i + step], tok[i:i + step], msk[i:i + step])


# --------------------------------------------------------------------------------------------------------- decode

def tokenizer_of(attrs: dict):
    """The run's tokenizer: the copy in its run folder, else the tokenizer_path the group names (groups written
    before run folders held a copy point into the data cache)."""
    from tokenizers import Tokenizer
    copy = RunFolder.at(run_folder(attrs)).tokenizer if attrs.get('checkpoint_path') else None
    p = str(copy) if copy is not None and copy.is_file() else attrs.get('tokenizer_path')
    if not p or not Path(p).is_file():
        raise SpecError(f"run {_label(attrs)} stage {attrs['stage']}", f'tokenizer {p} not found',
                        "keep the run folder (it holds tokenizer.json) or the run's data cache (Data.cache_dir) where "
                        'the run wrote them')
    return Tokenizer.from_file(p)


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False).replace('\n', '\u23ce')


def decode_samples(dec: Decoder, group: M.Group, n: int, tok) -> list[dict]:
    """The first n stored sequences: per sequence the original and decoded text (chunks joined by ' | ', only
    positions that have a target) and its token accuracy (correct / targets over all its chunks)."""
    out = []
    k = min(n, group.tokens.shape[0])
    for start in range(0, k, M.ROWS):
        mem, tokens, mask = group.rows(start, min(start + M.ROWS, k))
        logits, labels = decode_rows(dec, mem, tokens, mask.bool())
        pred = logits.argmax(-1).cpu()
        labels = labels.cpu()
        for r in range(len(tokens)):
            valid = labels[r] != O.IGNORE
            correct = int(((pred[r] == labels[r]) & valid).sum())
            total = int(valid.sum())
            orig = [_text(tok, labels[r, c][valid[c]].tolist()) for c in range(labels.shape[1])]
            got = [_text(tok, pred[r, c][valid[c]].tolist()) for c in range(labels.shape[1])]
            out.append({'row': start + r, 'original': ' | '.join(orig), 'decoded': ' | '.join(got),
                        'correct': correct, 'targets': total, 'accuracy': correct / total if total else float('nan')})
    return out


def cmd_decode(args) -> None:
    for stage, group in stages(args.store, args.run_id, args.stage):
        dec = load_decoder(group, args.db, args.device, args.readout)
        tok = tokenizer_of(group.attrs)
        note = {'decoder': 'model.decoder (autoencoder)', 'ae_decoder': 'model.ae_decoder (frozen-encoder curriculum)',
                'blank_copy': 'blank-copy read-out (memory in slot 0, blank tokens; '
                              'first token of a chunk not predicted)'}
        print(f"== run {args.run_id} stage {stage} (step {group.attrs.get('step')}, {group.tokens.shape[0]} sequences "
              f"x {group.tokens.shape[1]} chunks x {group.tokens.shape[2]} tokens); decoder: {note[dec.kind]}")
        samples = decode_samples(dec, group, args.n, tok)
        for s in samples:
            print(f"seq {s['row']:>6}  accuracy {s['accuracy']:.4f}  ({s['correct']}/{s['targets']} tokens)")
            print(f"  original | {s['original']}")
            print(f"  decoded  | {s['decoded']}")
        if samples:
            c, t = sum(s['correct'] for s in samples), sum(s['targets'] for s in samples)
            print(f'shown: {len(samples)} sequences, token accuracy {c / max(t, 1):.4f}  '
                  f'(all sequences: python -m store.analyze info {args.run_id})\n')


# ----------------------------------------------------------------------------------------------------------- info

def bytes_per_token(attrs: dict) -> float | None:
    """Held-out UTF-8 bytes per token: the group's attribute, else (groups written before it) the run's data cache
    (meta.json beside tokenizer.json), if present."""
    if attrs.get('bytes_per_token') is not None:
        return float(attrs['bytes_per_token'])
    try:
        meta = json.loads((Path(attrs['tokenizer_path']).parent / 'meta.json').read_text())
        return float(meta['stats']['val']['bytes_per_token'])
    except (OSError, KeyError, TypeError, ValueError):
        return None


INFO_COLUMNS = [('run', 'run'), ('stage', 'stage'), ('step', 'step'), ('family', 'family'), ('decoder', 'decoder'),
                ('rows', 'rows'), ('tokens', 'tokens'), ('token_accuracy', 'token acc'),
                ('normalized_hamming', 'norm. Hamming'), ('ce', 'CE (nats)'), ('info_proportion', 'I_e'),
                ('bits_per_byte', 'bits/byte')]


def info_rows(store, run_ids, stage=None, db=None, device='cpu', limit=None, readout='auto') -> list[dict]:
    rows = []
    for run_id in run_ids:
        for name, group in stages(store, run_id, stage):
            dec = load_decoder(group, db, device, readout)
            tally = O.Tally()
            for logits, labels in iter_decoded(dec, group, limit, f'info {run_id}/{name}'):
                tally.add(logits, labels)
            a = group.attrs
            m = tally.metrics(dec.vocab, bytes_per_token(a))
            rows.append({'run': str(run_id), 'stage': name, 'step': a.get('step'), 'family': a.get('family'),
                         'decoder': dec.kind, 'memories_of': group.stored_in,
                         'rows': group.tokens.shape[0] if limit is None else min(limit, group.tokens.shape[0]),
                         'tokens': tally.tokens, 'vocab_size': dec.vocab, **m})
    return rows


def table(rows: list[dict], columns) -> str:
    """Rows of dicts as aligned columns: the first five (names) left-aligned, the numbers right-aligned."""
    def cell(v):
        return num(v) if isinstance(v, float) else '-' if v is None else str(v)
    return tables.table([name for _, name in columns], [[cell(r.get(k)) for k, _ in columns] for r in rows],
                        right=set(range(5, len(columns))))


def cmd_info(args) -> None:
    rows = info_rows(args.store, args.run_ids, args.stage, args.db, args.device, args.rows, args.readout)
    cols = list(INFO_COLUMNS)
    missing_bpb = [f"{r['run']}/{r['stage']}" for r in rows if 'bits_per_byte' not in r]
    if len(missing_bpb) == len(rows):
        cols = [c for c in cols if c[0] != 'bits_per_byte']
    if args.csv:
        keys = [k for k, _ in cols] + ['vocab_size']
        fh = sys.stdout if args.csv == '-' else open(args.csv, 'w', newline='')
        try:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction='ignore')
            w.writeheader()
            w.writerows(rows)
        finally:
            if fh is not sys.stdout:
                fh.close()
        if args.csv == '-':
            return
    print(table(rows, cols))
    print('\nDecoding from stored memories with each stage\'s own checkpoint; token acc and CE over every target '
          'token, norm. Hamming = 1 - accuracy per stored sequence (all its chunks), macro-averaged; '
          "I_e = 1 - CE / ln(V), V = the run's vocabulary size (H0 of a uniform, informationless model).")
    if missing_bpb:
        print(f"bits/byte omitted for {', '.join(missing_bpb)}: no held-out bytes-per-token in the run's data cache "
              '(meta.json beside tokenizer.json).')
    for note in readout_notes(rows):
        print(note)
    if args.csv and args.csv != '-':
        print(f'csv: {args.csv}')


def readout_notes(rows: list[dict]) -> list[str]:
    """What makes rows of one run differ or not: which read-out decoded each stage, and which stages share stored
    memories (a frozen encoder: store/memories.py references)."""
    notes = []
    for run in dict.fromkeys(r['run'] for r in rows):
        mine = [r for r in rows if r['run'] == run]
        kinds = {r['decoder'] for r in mine}
        if {'ae_decoder', 'blank_copy'} <= kinds:
            ae = ', '.join(r['stage'] for r in mine if r['decoder'] == 'ae_decoder')
            bc = ', '.join(r['stage'] for r in mine if r['decoder'] == 'blank_copy')
            notes.append(f'run {run}: {ae} decoded through the ae_decoder it trains; {bc} by the blank-copy '
                         'read-out of their own decoder (the ae_decoder does not change after its stage, so it would '
                         'repeat those numbers; --readout ae_decoder forces it)')
        shared = [r for r in mine if r.get('memories_of') and r['memories_of'] != r['stage']]
        if shared:
            notes.append(f'run {run}: ' + ', '.join(f"{r['stage']}" for r in shared) + ' store no memories of their '
                         'own: the encoder was frozen and unchanged, so they are those of '
                         + ', '.join(sorted({r['memories_of'] for r in shared}))
                         + '; rows differ only through the read-out')
    return notes


# ------------------------------------------------------------------------------------------------------- retrieve

def _sample(total: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, total), sorted; memory O(k) even for huge totals."""
    if total <= k:
        return torch.arange(total)
    if total <= 1 << 22:
        return torch.randperm(total, generator=gen)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while len(chosen) < k:
        new = torch.randint(0, total, (2 * k,), generator=gen)
        chosen = torch.cat([chosen, new])
        _, first = np.unique(chosen.numpy(), return_index=True)
        chosen = chosen[torch.from_numpy(np.sort(first))]
    return chosen[:k].sort().values


def ngram_queries(tokens: torch.Tensor, mask: torch.Tensor, n: int, mode: str, pad: int, gen: torch.Generator):
    """One query per chunk [Q, L]: a random contiguous n-gram (mode 'ngram') or n random tokens in order ('nbag')
    of the chunk's real tokens, right-padded with pad, key mask True on the query tokens."""
    q, l = tokens.shape
    out = torch.full_like(tokens, pad)
    qm = torch.zeros_like(mask)
    for i in range(q):
        real = mask[i].nonzero().flatten()
        k = min(n, len(real))
        if mode == 'ngram':
            s = int(torch.randint(0, len(real) - k + 1, (1,), generator=gen))
            pos = real[s:s + k]
        else:
            pos = real[torch.randperm(len(real), generator=gen)[:k].sort().values]
        out[i, :k] = tokens[i, pos]
        qm[i, :k] = True
    return out, qm


def retrieval(group: M.Group, query_fn, queries: int = 2048, seed: int = 0, desc: str = '', block: int = 4096) -> dict:
    """Rank of each query's own chunk among all stored chunk memories (cosine similarity), streamed.

    query_fn(tokens [Q, L], mask [Q, L], memories [Q, d], gen) -> query embeddings [Q, d]. Queries: `queries` chunks
    drawn at random (seeded; 0 = every chunk) among the chunks with at least one real token; candidates: every
    stored chunk with a real token. top-k = fraction of queries whose own chunk ranks < k (ties to the query's
    favour). Pass 1 embeds the queries, pass 2 streams the candidates; queries are processed in blocks."""
    gen = torch.Generator().manual_seed(seed)
    s, n, _ = group.tokens.shape
    total = s * n
    picked = _sample(total, queries if queries > 0 else total, gen)
    ranks, n_cand = [], None
    for b0 in range(0, len(picked), block):
        sel = picked[b0:b0 + block]
        # pass 1: the block's queries and their targets' similarity
        qs, targets, flat_ids = [], [], []
        lo, hi = int(sel[0]) // n, int(sel[-1]) // n + 1
        for start in range(lo - lo % M.ROWS, hi, M.ROWS):
            stop = min(start + M.ROWS, s)
            here = sel[(sel >= start * n) & (sel < stop * n)]
            if not len(here):
                continue
            mem, tok, msk = group.rows(start, stop)
            local = here - start * n
            fm, ft, fk = (mem.reshape(-1, mem.shape[-1])[local], tok.reshape(-1, tok.shape[-1])[local],
                          msk.bool().reshape(-1, msk.shape[-1])[local])
            keep = fk.any(-1)
            if not keep.any():
                continue
            q = F.normalize(query_fn(ft[keep], fk[keep], fm[keep], gen).float().cpu(), dim=-1)
            c = F.normalize(fm[keep].float(), dim=-1)
            qs.append(q)
            targets.append((q * c).sum(-1))
            flat_ids.append(here[keep])
        if not qs:
            continue
        q, target, ids = torch.cat(qs), torch.cat(targets), torch.cat(flat_ids)
        greater = torch.zeros(len(q), dtype=torch.long)
        count = 0
        # pass 2: every candidate, slice by slice
        for start, _stop, mem, _, msk in slices(group, desc=f'{desc} candidates'
                                                + (f' (block {b0 // block + 1})' if len(picked) > block else '')):
            c = F.normalize(mem.reshape(-1, mem.shape[-1]).float(), dim=-1)
            valid = msk.reshape(len(c), -1).any(-1)
            sim = q @ c.T
            sim[:, ~valid] = -math.inf
            own = ids - start * n
            inside = (own >= 0) & (own < len(c))
            sim[inside.nonzero().flatten(), own[inside]] = -math.inf  # the target itself is not a competitor
            greater += (sim > target[:, None]).sum(-1)
            count += int(valid.sum())
        ranks.append(greater)
        n_cand = count
    if not ranks:
        raise SpecError(f"run {group.attrs['run_id']} stage {group.attrs['stage']}", 'no stored chunk has a real token',
                        'check the store (every mask is False)')
    rank = torch.cat(ranks)
    return {'queries': len(rank), 'candidates': n_cand, 'top1': float((rank < 1).float().mean()),
            'top5': float((rank < 5).float().mean()), 'chance1': 1 / n_cand, 'chance5': min(5, n_cand) / n_cand,
            'mean_rank': float(rank.float().mean()) + 1}


def encoder_queries(dec: Decoder, n: int, mode: str):
    @torch.no_grad()
    def fn(tokens, mask, memories, gen):
        qt, qm = ngram_queries(tokens, mask, n, mode, dec.pad, gen)
        return torch.cat([dec.model.encode(qt[i:i + 1024].to(dec.device), qm[i:i + 1024].to(dec.device)).cpu()
                          for i in range(0, len(qt), 1024)])
    return fn


RETRIEVE_COLUMNS = [('run', 'run'), ('stage', 'stage'), ('step', 'step'), ('mode', 'mode'), ('n', 'n'),
                    ('queries', 'queries'), ('candidates', 'candidates'), ('top1', 'top-1'), ('chance1', 'chance@1'),
                    ('top5', 'top-5'), ('chance5', 'chance@5'), ('mean_rank', 'mean rank')]


def cmd_retrieve(args) -> None:
    rows = []
    for name, group in stages(args.store, args.run_id, args.stage):
        dec = load_decoder(group, args.db, args.device, args.readout)
        r = retrieval(group, encoder_queries(dec, args.n, args.mode), args.queries, args.seed,
                      f'retrieve {args.run_id}/{name}')
        rows.append({'run': str(args.run_id), 'stage': name, 'step': group.attrs.get('step'), 'mode': args.mode,
                     'n': args.n, **r})
    print(table(rows, RETRIEVE_COLUMNS))
    query = ('a random contiguous ' + str(args.n) + '-gram' if args.mode == 'ngram'
             else str(args.n) + ' random tokens')
    print(f'\nquery = the stage\'s encoder (model.encode) on {query} '
          f'of a stored chunk (right-padded, key-masked); candidates = every stored chunk memory; cosine similarity; '
          f'seed {args.seed}.')


# ----------------------------------------------------------------------------------------------------------- plot

def _reservoir(group: M.Group, k: int, gen: torch.Generator):
    """Up to k chunk memories drawn at random (seeded), with their chunk index: ([k, d], [k])."""
    s, n, _ = group.tokens.shape
    picked = _sample(s * n, k, gen)
    mems, chunk = [], []
    for start in range(0, s, M.ROWS):
        stop = min(start + M.ROWS, s)
        here = picked[(picked >= start * n) & (picked < stop * n)]
        if len(here):
            mem, _, _ = group.rows(start, stop)
            mems.append(mem.reshape(-1, mem.shape[-1])[here - start * n].float())
            chunk.append(here % n)
    return torch.cat(mems), torch.cat(chunk)


def position_accuracy(dec: Decoder, group: M.Group, limit=None, desc='') -> np.ndarray:
    """Token accuracy at each position within the chunk (positions without targets: NaN)."""
    correct = torch.zeros(dec.chunk_len, dtype=torch.long)
    total = torch.zeros(dec.chunk_len, dtype=torch.long)
    for logits, labels in iter_decoded(dec, group, limit, desc):
        valid = (labels != O.IGNORE).cpu()
        hit = (logits.argmax(-1).cpu() == labels.cpu()) & valid
        correct += hit.reshape(-1, dec.chunk_len).sum(0)
        total += valid.reshape(-1, dec.chunk_len).sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(total.numpy() > 0, correct.numpy() / np.maximum(total.numpy(), 1), np.nan)


def metric_rows(url: str, attrs: dict) -> list[tuple[str, int, float]]:
    """The run's metrics (none when the database records another run under this id: ids repeat across databases)."""
    db = open_db(url)
    found = db.runs(run_id=str(attrs.get('run_id')))
    if found and attrs.get('run_key') is not None and found[0].run_key not in (None, attrs.get('run_key')):
        return []
    return db.metrics(str(attrs.get('run_id')))


def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = stages(args.store, args.run_id, args.stage)
    written = []
    samples = {}
    for name, group in groups:
        mem, chunk = _reservoir(group, args.points, torch.Generator().manual_seed(args.seed))
        samples[name] = (mem, chunk)
        xy = _pca(mem)
        fig, ax = plt.subplots(figsize=(6, 5))
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=chunk.numpy(), cmap='viridis', s=6, alpha=0.7)
        fig.colorbar(sc, ax=ax, label='chunk index', ticks=sorted(set(chunk.tolist())))
        ax.set(title=f'run {args.run_id} {name}: memory PCA ({len(mem)} chunks)', xlabel='PC 1', ylabel='PC 2')
        written.append(_save(fig, out / f'{args.run_id}_{name}_pca.png'))
    if len(groups) > 1:  # all stages in one projection, colored by stage
        names = list(samples)
        allm = torch.cat([samples[k][0] for k in names])
        lab = torch.cat([torch.full((len(samples[k][0]),), i) for i, k in enumerate(names)])
        xy = _pca(allm)
        fig, ax = plt.subplots(figsize=(6, 5))
        for i, k in enumerate(names):
            ax.scatter(xy[lab == i, 0], xy[lab == i, 1], s=6, alpha=0.6, label=k)
        ax.legend(markerscale=3)
        ax.set(title=f'run {args.run_id}: memory PCA by stage', xlabel='PC 1', ylabel='PC 2')
        written.append(_save(fig, out / f'{args.run_id}_pca_stages.png'))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, group in groups:
        dec = load_decoder(group, args.db, args.device, args.readout)
        acc = position_accuracy(dec, group, args.rows, f'plot {args.run_id}/{name}')
        ax.plot(np.arange(len(acc)), acc, marker='o', label=f'{name} ({dec.kind})')
    ax.set(title=f'run {args.run_id}: decoding accuracy by position in the chunk', xlabel='position within chunk',
           ylabel='token accuracy', ylim=(0, 1))
    ax.legend()
    written.append(_save(fig, out / f'{args.run_id}_position_accuracy.png'))
    url = database_of(groups[0][1].attrs, args.db)
    rows = metric_rows(url, groups[0][1].attrs) if url else []
    if not rows:
        print(f'note: no metrics for run {args.run_id} in '
              + (display_url(url) if url else 'a run database (none given with --db, and no sacred.db beside the run '
                 'folder)') + '; metric curves skipped', file=sys.stderr)
    else:
        ends = {stage: g.attrs['step'] for stage, g in groups if g.attrs.get('step') is not None}
        written.append(str(curves([Series(f'run {args.run_id}', rows, ends)], out / f'{args.run_id}_metrics.png',
                                  f'run {args.run_id}: recorded metrics', where='plot')))
    for p in written:
        print(p)


def _pca(x: torch.Tensor) -> np.ndarray:
    x = x - x.mean(0, keepdim=True)
    q = min(2, *x.shape)
    if q < 1:
        return np.zeros((len(x), 2))
    u, s, v = torch.pca_lowrank(x, q=q, center=False, niter=4)
    xy = (x @ v[:, :q]).numpy()
    return xy if q == 2 else np.concatenate([xy, np.zeros((len(xy), 1))], 1)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------------------ cli

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m store.analyze', description=__doc__.split('\n\n')[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='command', required=True)

    def common(p, stage=True):
        p.add_argument('--store', default=DEFAULT_STORE, help=f'Zarr memory store (default {DEFAULT_STORE})')
        if stage:
            p.add_argument('--stage', help='stage name (default: every complete stage of the run)')
        p.add_argument('--db', help='run database URL: plan fallback when operative.gin is gone; plot: metric curves '
                       "(default: sqlite:///<out_dir>/sacred.db, beside the run's folder)")
        p.add_argument('--device', default='cpu', help='torch device for decoding (default cpu)')
        p.add_argument('--readout', choices=('auto', 'ae_decoder', 'blank_copy'), default='auto',
                       help='memory family: decode with the autoencoder decoder (auto when the model has one) '
                       "or by the main decoder's blank-copy read-out")
        return p

    p = common(sub.add_parser('decode', help='original vs regenerated text of stored sequences'))
    p.add_argument('run_id', metavar='RUN_ID')
    p.add_argument('-n', type=int, default=5, help='sequences to show (default 5)')
    p.set_defaults(fn=cmd_decode)

    p = common(sub.add_parser('info', help='information metrics of decoding from stored memories, one table'))
    p.add_argument('run_ids', metavar='RUN_ID', nargs='+')
    p.add_argument('--csv', metavar='FILE',
                   help="also write the table as CSV ('-': CSV on stdout instead of the table)")
    p.add_argument('--rows', type=int, help='only the first ROWS sequences of each group (default all)')
    p.set_defaults(fn=cmd_info)

    p = common(sub.add_parser('retrieve', help='n-gram / n-bag retrieval over stored memories'))
    p.add_argument('run_id', metavar='RUN_ID')
    p.add_argument('--n', type=int, default=7, help='query length in tokens (default 7, the paper\'s)')
    p.add_argument('--mode', choices=('ngram', 'nbag'), default='ngram', help='contiguous n-gram or n random tokens')
    p.add_argument('--queries', type=int, default=2048,
                   help='query chunks drawn at random (default 2048; 0 = every chunk)')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(fn=cmd_retrieve)

    p = common(sub.add_parser('plot', help='PNG figures: memory PCA, accuracy by position, metric curves'))
    p.add_argument('run_id', metavar='RUN_ID')
    p.add_argument('--out', required=True, help='folder for the PNGs')
    p.add_argument('--points', type=int, default=4000, help='chunk memories sampled for the PCA scatter (default 4000)')
    p.add_argument('--rows', type=int, help='sequences decoded for accuracy by position (default all)')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(fn=cmd_plot)
    return ap


def _check_args(args) -> None:
    for name in ('n', 'queries', 'points', 'rows'):
        v = getattr(args, name, None)
        if v is not None and (v < 0 or (v == 0 and name in ('n', 'points', 'rows'))):
            raise SpecError(f'--{name} {v}', 'must be a positive number', f'pass --{name} >= 1')
    if args.device != 'cpu':
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            raise SpecError(f'--device {args.device}', f'device not usable: {str(e).splitlines()[0]}',
                            'use --device cpu')


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    _check_args(args)
    if hasattr(args, 'run_ids'):  # ids -> the store's group names, before anything is read
        args.run_ids = [run_group(args.store, r, args.db) for r in args.run_ids]
    else:
        args.run_id = run_group(args.store, args.run_id, args.db)
    args.fn(args)


if __name__ == '__main__':
    main()
