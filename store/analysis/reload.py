"""The plan and the weights that wrote a group of stored memories, and the read-out that decodes them.

The plan comes from the run folder's operative.gin, else from the run's Sacred config (--db, default
<out_dir>/sacred.db), checked against the group's spec_hash; the weights are the group's stage checkpoint, loaded
through compiler.load (checked against the sha256 the run recorded when its database is at hand). Decoding is the
graph's own read-out (Graph.read_out via compiler.load.Loaded): the store hands it arrays and gets logits back.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler import load
from compiler import plan as P
from compiler.errors import UserError
from compiler.families import REGISTRY, family, needs_ae_decoder
from compiler.spec import load as load_spec
from store import memories as M
from store.analysis.groups import slices
from store.database import default_url, display_url, recorded_run
from store.layout import RunFolder, run_name

LOGITS_BUDGET = 1 << 25  # floats of logits per model micro-batch (128 MiB in float32)


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
    spec = load_spec([str(path)])
    return spec.plan, spec.hash


def _plan_from_sacred(url: str, run_id: str, run_key: str | None):
    run = recorded_run(url, run_id)
    if run is None:
        raise LookupError(f'run {run_id} is not in {display_url(url)}')
    if run_key is not None and run.run_key != run_key:  # another database's run with the same id
        raise LookupError(f'run {run_id} of {display_url(url)} is {run.name}, not the run that wrote these memories '
                          f'(key {run_key})')
    plan = load.plan_from_dict(run.config['plan'], f'run {run_id} of {display_url(url)}', 'rerun the run')
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
        except (UserError, LookupError, KeyError, TypeError, ValueError, P.PlanError) as e:
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
    raise UserError(f'run {run_id} ({folder})', 'cannot rebuild the plan that wrote these memories'
                    + (f" ({'; '.join(tried)})" if tried
                       else ' (no operative.gin in the run folder and no Sacred database)'),
                    'keep the run folder next to the store, or pass --db with the database the run was recorded in')


@dataclass
class Decoder:
    """The model that wrote a group (compiler.load.Loaded), and how its memories are decoded."""
    loaded: load.Loaded
    kind: str  # 'decoder' (autoencoder/probe), 'ae_decoder' (memory family), 'blank_copy' (memory family)
    pad: int
    blank: int
    vocab: int
    chunk_len: int

    @property
    def shifted(self) -> bool:
        return self.kind == 'blank_copy'

    def logits_of(self, mem, tokens, mask):
        """Stored memories [M, d] of M chunks (+ their tokens and mask [M, L]) -> (logits [M, L, V], labels [M, L])."""
        return self.loaded.read_out(mem, tokens, mask, self.pad, self.blank, self.kind)


def _check_group(group: M.Group, plan: P.Plan, where: str) -> None:
    """The stored arrays have the widths and the chunk layout of the plan's model."""
    a, d_mem = group.attrs, plan.decoder.d_model  # memories are projected to the decoder's width
    stored = group.memories.shape[-1]
    if int(a.get('memory_dim', stored)) != d_mem or stored != d_mem:
        raise UserError(where, f"checkpoint does not match the stored widths: memory_dim {a.get('memory_dim')} "
                        f'(arrays {stored}) but the model forms {d_mem}-wide memories',
                        'decode with the run that wrote the store')
    if (int(a['chunks']), int(a['chunk_len'])) != (plan.memory.chunks, plan.memory.chunk_len) \
            or tuple(group.tokens.shape[1:]) != (plan.memory.chunks, plan.memory.chunk_len):
        raise UserError(where, f"stored chunks x chunk_len {tuple(group.tokens.shape[1:])} do not match the plan's "
                        f'{plan.memory.chunks} x {plan.memory.chunk_len}', 'decode with the run that wrote the store')


def _kind(plan: P.Plan, stage, readout: str, where: str) -> str:
    """The read-out: the family record's for this stage, or the one --readout forces where the graph has it."""
    kind = family(plan).readout(plan, stage)
    if readout != 'auto' and readout != kind:
        if kind == 'decoder' or (readout == 'ae_decoder' and not needs_ae_decoder(plan)):
            raise UserError(f'--readout {readout}', f"{where}: the '{plan.family}' model "
                            f"{'has no ae_decoder' if readout == 'ae_decoder' else 'has no memory slots to read from'}",
                            f"use --readout auto (here: {kind})")
        kind = readout
    if kind == 'blank_copy' and plan.memory.chunks < 2:
        raise UserError(where, 'a memory model with 1 chunk has no memory slot to decode from',
                        'analyse a run with chunks >= 2')
    return kind


def _recorded_sha256(attrs: dict, db: str | None) -> str | None:
    """The sha256 the run's database recorded for the group's stage weights (None: no database at hand)."""
    url = database_of(attrs, db)
    try:
        run = recorded_run(url, str(attrs['run_id'])) if url else None
    except UserError:
        return None
    if run is None or run.run_key not in (None, attrs.get('run_key')):
        return None
    ref = ((run.info.get('weights') or {}).get('stages') or {}).get(attrs.get('stage'))
    return ref.get('sha256') if isinstance(ref, dict) else None


def load_decoder(group: M.Group, db: str | None = None, device: str = 'cpu', readout: str = 'auto') -> Decoder:
    """The run's model rebuilt from its plan and the group's stage checkpoint (compiler.load), checked against the
    stored widths."""
    a = group.attrs
    where = f"run {_label(a)} stage {a['stage']}"
    missing = [k for k in ('checkpoint_path', 'vocab_size', 'chunks', 'chunk_len', 'spec_hash') if a.get(k) is None]
    if missing:
        raise UserError(where, f"the group lacks the attribute(s) {', '.join(missing)} needed to rebuild its model "
                        '(not written by runtime.run?)', 'analyse groups a training run wrote')
    plan = load_plan(a, db)
    if family(plan).readout(plan) is None:
        raise UserError(where, f"family '{plan.family}' has no memory decoder to analyse",
                        'analyse a run of a family that stores memories: '
                        + ', '.join(f.name for f in REGISTRY.values() if f.stores_memories))
    ck = Path(a['checkpoint_path'])
    if not ck.is_file():
        raise UserError(where, f'stage checkpoint {ck} not found', 'keep the run folder where the run wrote it')
    _check_group(group, plan, where)
    kind = _kind(plan, a.get('stage'), readout, where)
    vocab = int(a['vocab_size'])
    loaded = load.load(plan, ck, where=where, fix='decode with the run that wrote the store', vocab_size=vocab,
                       sha256=_recorded_sha256(a, db), device=device)
    ids = a.get('special_ids') or {}
    return Decoder(loaded, kind, int(ids.get('<pad>', 0)), int(ids.get('<blank>', 0)), vocab, plan.memory.chunk_len)


def decode_rows(dec: Decoder, mem, tokens, mask):
    """Rows [B, N, ...] -> (logits [B, N, L, V], labels [B, N, L]); model micro-batches bounded by LOGITS_BUDGET."""
    b, n, l = tokens.shape
    step = max(1, LOGITS_BUDGET // (l * dec.vocab))
    fm, ft, fk = mem.reshape(b * n, -1), tokens.reshape(b * n, l), mask.reshape(b * n, l)
    parts = [dec.logits_of(fm[i:i + step], ft[i:i + step], fk[i:i + step]) for i in range(0, b * n, step)]
    logits = torch.cat([p[0] for p in parts]).view(b, n, l, -1)
    return logits, torch.cat([p[1] for p in parts]).view(b, n, l)


def iter_decoded(dec: Decoder, group: M.Group, limit: int | None = None, desc: str = ''):
    """Stream (logits, labels) over the group, slice by slice (logits never held for more than one micro-batch)."""
    b, n, l = group.tokens.shape
    step = max(1, LOGITS_BUDGET // (n * l * dec.vocab))
    for _, _, mem, tok, msk in slices(group, limit, desc):
        for i in range(0, len(tok), step):
            yield decode_rows(dec, mem[i:i + step], tok[i:i + step], msk[i:i + step])


def tokenizer_of(attrs: dict):
    """The run's tokenizer: the copy in its run folder, else the tokenizer_path the group names (groups written
    before run folders held a copy point into the data cache)."""
    from tokenizers import Tokenizer
    copy = RunFolder.at(run_folder(attrs)).tokenizer if attrs.get('checkpoint_path') else None
    p = str(copy) if copy is not None and copy.is_file() else attrs.get('tokenizer_path')
    if not p or not Path(p).is_file():
        raise UserError(f"run {_label(attrs)} stage {attrs['stage']}", f'tokenizer {p} not found',
                        "keep the run folder (it holds tokenizer.json) or the run's data cache (Data.cache_dir) where "
                        'the run wrote them')
    return Tokenizer.from_file(p)
