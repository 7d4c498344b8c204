"""`plot`: PNGs of a run's stored memories: memory PCA (per stage and across stages), decoding accuracy by position in
the chunk, and the run's recorded metric curves (store/plots.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from compiler import objectives as O
from store import memories as M
from store.analysis.groups import reservoir, stages
from store.analysis.reload import Decoder, database_of, iter_decoded, load_decoder
from store.database import display_url, open_db
from store.files import disk_error
from store.plots import Series, curves, save_figure


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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = disk_error(e, f'plot --out {out}', out, 'no plot was written')
        if err is None:
            raise
        raise err from None
    groups = stages(args.store, args.run_id, args.stage)
    written = []
    samples = {}
    for name, group in groups:
        mem, chunk = reservoir(group, args.points, torch.Generator().manual_seed(args.seed))
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
    return str(save_figure(fig, path, f'plot --out {path.parent}', dpi=100))
