"""Figures of recorded metrics (PNG, PDF or SVG through matplotlib's Agg backend; no display needed): the one home of
metric curves, for `python -m store.runs metrics ... --plot` and `python -m store.analyze plot`.

One panel per metric kind (the part of a name after its last '.' or '/': loss, ce, token_accuracy, info_proportion,
lr, grad_norm, tokens_per_s, ...), so numbers of one unit share an axis. One run: each metric has its colour (the
panel's legend names them). Several runs: each run has its colour (the same in every panel; a figure-wide legend names
them, with the grid values that tell the runs apart) and each metric of a panel its line style and shade of that
colour (the panel's legend names them), so 30 curves stay tellable apart. A curve of few points (an eval metric
logged at stage ends only, a value logged once) carries markers, so a single point is visible. Stage ends are
vertical lines: grey and labelled when the runs share them, else thin lines in each run's colour.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import UserError
from store.files import atomic_write, disk_error

# panel order and titles; kinds not listed follow in name order, titled by their name
KINDS = {'loss': 'loss (nats)', 'ce': 'cross-entropy (nats)', 'token_accuracy': 'token accuracy',
         'top1_accuracy': 'top-1 accuracy', 'info_proportion': 'I_e = 1 - CE / ln V',
         'normalized_hamming': 'normalized Hamming distance', 'bits_per_byte': 'bits per byte',
         'lr': 'learning rate', 'grad_norm': 'gradient norm (before clipping)', 'tokens_per_s': 'training tokens / s'}
STYLES = ['-', '--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)), (0, (3, 1, 1, 1)),
          (0, (10, 3)), (0, (2, 2, 6, 2))]
MARKERS = ['', 's', '^', 'v', 'D', 'x', '+']  # not 'o': that one marks the first patterns' curves of few points
FEW = 30  # a curve of at most this many points is drawn with markers
SHADES = (0.0, 0.4, 0.6, 0.25, 0.5)  # how far a run's i-th metric of a panel mixes the run's colour with white


@dataclass
class Series:
    """One run's curves: rows (name, step, value), its stage ends {stage: step} and its legend label."""
    label: str
    rows: list
    ends: dict = field(default_factory=dict)


def kind(name: str) -> str:
    """'eval/clm.ce' -> 'ce', 'train/loss' -> 'loss', 'train/grad_norm' -> 'grad_norm'."""
    return name.rsplit('/', 1)[-1].rsplit('.', 1)[-1]


def metric(name: str) -> str:
    """The name without its kind, what a line style stands for: 'eval/clm.ce' -> 'eval/clm', 'train/loss' ->
    'train'."""
    k = kind(name)
    return name[:-len(k) - 1] if len(name) > len(k) else name


def colours(n: int) -> list:
    """n colours told apart at a glance: tab10 up to 10 runs, tab20 up to 20, then evenly spaced hues."""
    import matplotlib
    if n <= 10:
        return [matplotlib.colormaps['tab10'](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps['tab20'](i) for i in range(n)]
    return [matplotlib.colormaps['hsv'](i / n) for i in range(n)]


def style(i: int) -> dict:
    """The i-th metric's line: a dash pattern, then (past the patterns) the patterns again with a marker."""
    return {'linestyle': STYLES[i % len(STYLES)], 'marker': MARKERS[(i // len(STYLES)) % len(MARKERS)],
            'markersize': 3}


def save_figure(fig, path: Path, where: str, **kwargs) -> Path:
    """Write a figure atomically (a temporary file, then a rename) and close it: a file format matplotlib does not
    know, a full or read-only disk -> one message (UserError), nothing half-written."""
    import matplotlib.pyplot as plt
    path = Path(path)
    try:  # a temporary of its own (never a planted link); savefig picks the format from its suffix, the path's
        atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs), prefix=f'.{path.name}.', suffix=path.suffix)
    except ValueError as e:  # unsupported format
        raise UserError(where, f'cannot write this plot: {e}', 'end the file name in .png, .pdf or .svg') from None
    except OSError as e:
        err = disk_error(e, where, path, 'no plot was written')
        if err is None:
            raise
        raise err from None
    finally:
        plt.close(fig)
    return path


def shade(colour, i: int) -> tuple:
    """The run's colour for its i-th metric of a panel: the colour itself, then lighter mixes with white."""
    f = SHADES[i % len(SHADES)]
    r, g, b = colour[:3]
    return (r + (1 - r) * f, g + (1 - g) * f, b + (1 - b) * f, 1.0)


def line(i: int, j: int, n_runs: int, run_colour, metric_colour, points: int) -> dict:
    """How run i's metric j (index within its panel) is drawn: one run: the metric's colour, solid; several: the
    run's colour shaded and the metric's dash pattern. Markers where the curve has few points."""
    kw = {'color': metric_colour, 'linestyle': '-', 'marker': '', 'markersize': 3} if n_runs == 1 else \
        {'color': shade(run_colour, j), **style(j)}
    if points <= FEW and not kw['marker']:
        kw['marker'] = 'o'
    return kw


def curves(series: list[Series], out, title: str, where: str = '--plot') -> Path:
    """Write the figure of `series` to `out` (atomically: a temporary file, then a rename); -> the path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(out)
    if not path.parent.is_dir():
        raise UserError(f'{where} {out}', f'folder {path.parent} does not exist',
                        'create it or write the plot elsewhere')
    found = {kind(name) for s in series for name, _, _ in s.rows}
    kinds = [k for k in KINDS if k in found] + sorted(found - set(KINDS))
    if not kinds:
        raise UserError(f'{where} {out}', 'no metric values to plot', 'pick metrics that were recorded (--name)')
    colour = dict(zip(range(len(series)), colours(len(series))))
    shared_ends = all(s.ends == series[0].ends for s in series)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 2.9 * len(kinds) + 0.6), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], kinds):
        _panel(ax, k, series, colour, shared_ends)
    axes[-1, 0].set_xlabel('step (global' + ('; dashed lines: stage ends)' if shared_ends and series[0].ends
                                             else '; vertical lines: stage ends)'))
    if len(series) > 1:
        fig.legend([Line2D([], [], color=colour[i], linewidth=2) for i in range(len(series))],
                   [s.label for s in series], loc='upper center', ncol=min(len(series), 4), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0 - 0.25 / fig.get_figheight()), frameon=False)
    fig.suptitle(title, y=1.0 - 0.02 / fig.get_figheight() if len(series) == 1 else 1.0)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.35 + 0.18 * ((len(series) + 3) // 4 - 1)) / fig.get_figheight()
                           if len(series) > 1 else 1))
    save_figure(fig, path, f'{where} {out}')
    points = sum(len(s.rows) for s in series)
    print(f'wrote {path} ({len(series)} run{"s" if len(series) > 1 else ""}, {len(kinds)} panels, {points} points)',
          file=sys.stderr)
    return path


def _panel(ax, k: str, series: list[Series], colour: dict, shared_ends: bool) -> None:
    """One panel: the metrics of kind `k` of every run (one run: a colour per metric; several: the run's colour,
    shaded, and a line style per metric; markers on curves of few points), stage ends."""
    from matplotlib.lines import Line2D
    names = sorted({metric(n) for s in series for n, _, _ in s.rows if kind(n) == k})
    metric_colours = colours(len(names))
    for i, s in enumerate(series):
        by_name: dict[str, tuple[list, list]] = {}
        for name, step, value in s.rows:
            if kind(name) == k:
                xs, ys = by_name.setdefault(metric(name), ([], []))
                xs.append(step)
                ys.append(value)
        for m, (xs, ys) in by_name.items():
            j = names.index(m)
            ax.plot(xs, ys, linewidth=1.2, label=f'{s.label} | {m}',
                    **line(i, j, len(series), colour[i], metric_colours[j], len(xs)))
        if not shared_ends:
            for step in s.ends.values():
                ax.axvline(step, color=colour[i], linewidth=0.6, alpha=0.35)
    if shared_ends:
        for stage, step in sorted(series[0].ends.items(), key=lambda kv: kv[1]):
            ax.axvline(step, color='grey', linestyle='--', linewidth=0.8)
            ax.annotate(stage, (step, 1.0), xycoords=('data', 'axes fraction'), rotation=90, fontsize=7,
                        ha='right', va='top', color='grey')
    ax.set_ylabel(KINDS.get(k, k), fontsize=8)
    ax.grid(alpha=0.3)
    keys = [Line2D([], [], color=metric_colours[j], linestyle='-') if len(series) == 1 else
            Line2D([], [], color=shade((0.0, 0.0, 0.0), j), **style(j)) for j in range(len(names))]
    ax.legend(keys, names, fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), title='metric', title_fontsize=7)
