"""The store groups a RUN names, streamed in slices of store.memories.ROWS rows, and chunks sampled from them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compiler.errors import UserError
from store import memories as M
from store.database import display_url, open_db
from store.layout import parse_name, resolve
from store.runref import folder_at, no_run


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
    """The store group RUN names: a group name as listed ('3-1a2b3c4d5e'), a run folder's path, or a run id. An id goes
    through the run database's record when --db is given (its run key names the group), else it must match one group
    of the store: ids repeat across databases, so several matches are refused with the candidates listed."""
    folder = folder_at(ref)  # a run folder's path: its name is its group's
    ref = folder.name if folder is not None else str(ref)
    names = sorted({g['run'] for g in M.listing(store)})
    if ref in names:
        return ref
    parsed = parse_name(ref)
    if parsed is None:
        if not Path(store).exists():
            return ref  # open_group reports that there is no store here
        raise no_run(ref, f'the memory store {store}', names)
    if db:
        found = open_db(db).runs(run_id=parsed[0])
        if not found:
            raise no_run(ref, display_url(db), [r.id for r in open_db(db).runs()])
        name = found[0].name
        if parsed[1] is not None and name != ref:
            raise UserError(f'run {ref}', f'run {parsed[0]} of {display_url(db)} is {name}, not {ref}',
                            f'analyse {name}, or pass the --db that recorded {ref}')
        return name
    found = resolve(names, ref, f'run {ref}', f'in {store}',
                    'or pass --db with the run database that recorded the run you mean')
    if found is None and Path(store).exists():
        raise no_run(ref, f'the memory store {store}', names)
    return found or ref


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
        raise UserError(f'{store} run {run}', 'the run has no stage groups', 'rerun the run to write its memories')
    out, torn = [], []
    for name in names:
        try:
            out.append((name, M.open_group(store, run, name)))
        except UserError as e:
            if 'half-written' not in e.what:
                raise
            torn.append(e)
    if not out:
        raise torn[0]
    for e in torn:
        print(f'note: skipping {e.where}: {e.what}', file=sys.stderr)
    return sorted(out, key=lambda sg: (sg[1].attrs.get('step', 0), sg[0]))


def sample(total: int, k: int, gen: torch.Generator) -> torch.Tensor:
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


def reservoir(group: M.Group, k: int, gen: torch.Generator):
    """Up to k chunk memories drawn at random (seeded), with their chunk index: ([k, d], [k])."""
    s, n, _ = group.tokens.shape
    picked = sample(s * n, k, gen)
    mems, chunk = [], []
    for start in range(0, s, M.ROWS):
        stop = min(start + M.ROWS, s)
        here = picked[(picked >= start * n) & (picked < stop * n)]
        if len(here):
            mem, _, _ = group.rows(start, stop)
            mems.append(mem.reshape(-1, mem.shape[-1])[here - start * n].float())
            chunk.append(here % n)
    return torch.cat(mems), torch.cat(chunk)
