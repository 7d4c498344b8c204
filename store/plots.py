"""Figures of recorded metrics (PNG, PDF or SVG through matplotlib's Agg backend; no display needed)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from compiler.errors import SpecError
from store.database import RunRecord
from store.tables import spec_text


def plot(rows, run: RunRecord, out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(out)
    if not path.parent.is_dir():
        raise SpecError(f'--plot {out}', f'folder {path.parent} does not exist',
                        'create it or write the plot elsewhere')
    groups: dict[str, dict[str, tuple[list, list]]] = {}
    for name, step, value in rows:
        group = name.split('/', 1)[0] if '/' in name else 'metrics'
        xs, ys = groups.setdefault(group, {}).setdefault(name, ([], []))
        xs.append(step)
        ys.append(value)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), sharex=True, squeeze=False)
    ends = sorted(run.end_steps.items(), key=lambda kv: kv[1])
    for ax, (group, curves) in zip(axes[:, 0], groups.items()):
        for name, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker='.', label=name)
        for stage, step in ends:
            ax.axvline(step, color='grey', linestyle='--', linewidth=0.8)
            ax.annotate(stage, (step, 1.0), xycoords=('data', 'axes fraction'), rotation=90, fontsize=7,
                        ha='right', va='top', color='grey')
        ax.set_ylabel(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel('step (global; dashed lines: stage ends)')
    fig.suptitle(f'run {run.id}  {spec_text(run)}  ({run.status})')
    fig.tight_layout()
    tmp = path.with_name(f'.{path.name}.tmp{path.suffix}')
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except ValueError as e:  # unsupported format
        raise SpecError(f'--plot {out}', f'cannot write this plot: {e}', 'end the file name in .png, .pdf or .svg')
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    print(f'wrote {path} ({len({r[0] for r in rows})} metrics, {len(rows)} points)', file=sys.stderr)
