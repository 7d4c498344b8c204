"""Plain-text output of the store's commands: aligned tables, numbers, times, spec labels, plan summaries."""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import sys
from pathlib import Path

from compiler.families import REGISTRY, family
from compiler.plan import STACK_ROLES
from store.database import RunRecord


def spec_label(path: str) -> str:
    """'/work/main/specs/mixer/autoencoder.gin' -> 'mixer/autoencoder.gin' (relative to specs/), else the file name."""
    parts = Path(path).parts
    if 'specs' in parts:
        i = len(parts) - 1 - parts[::-1].index('specs')
        if i < len(parts) - 1:
            return '/'.join(parts[i + 1:])
    return Path(path).name


def top_specs(run: RunRecord) -> list[str]:
    """The spec files given on the command line (the recorded spec_files also hold their includes)."""
    return list(run.config.get('spec_sources') or run.spec_files[:1])


def spec_text(run: RunRecord) -> str:
    return ' + '.join(spec_label(f) for f in top_specs(run)) or '?'


BOLD, RESET = '\033[1m', '\033[0m'


def fmt(v) -> str:
    if v is None:
        return 'None'
    if isinstance(v, float):
        return 'nan' if math.isnan(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return '[' + ', '.join(fmt(x) if not isinstance(x, str) else repr(x) for x in v) + ']'
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True) if v else '{}'
    return str(v)


def num(v, digits: int = 4) -> str:
    if v is None:
        return '-'
    if isinstance(v, float) and math.isnan(v):
        return 'nan'
    return f'{v:.{digits}f}' if abs(v) < 1e5 else f'{v:.4g}'


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(), marked: set = frozenset(),
          tty: bool = False, indent: str = '') -> str:
    """Plain aligned columns. `marked` cells ((row, col)) are bold on a terminal, else suffixed with '*'."""
    cells = [[str(c) for c in r] for r in rows]
    for (i, j) in marked:
        if not tty:
            cells[i][j] += '*'
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(vals, row=None):
        parts = []
        for j, v in enumerate(vals):
            pad = ' ' * (widths[j] - len(v))
            if tty and row is not None and (row, j) in marked:
                v = f'{BOLD}{v}{RESET}'
            parts.append(pad + v if j in right else v + pad)
        return (indent + '  '.join(parts)).rstrip()

    out = [line(headers), (indent + '  '.join('-' * w for w in widths)).rstrip()]
    out += [line(r, i) for i, r in enumerate(cells)]
    return '\n'.join(out)


def when(t: dt.datetime | None, seconds: bool = False) -> str:
    if t is None:
        return '-'
    return t.strftime('%Y-%m-%d %H:%M:%S' if seconds else '%Y-%m-%d %H:%M')


def duration(a, b) -> str:
    if a is None or b is None:
        return ''
    s = int((b - a).total_seconds())
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def plan_summary(plan: dict) -> list[tuple[str, str]]:
    out = [('family', str(plan.get('family')))]
    for name in STACK_ROLES:
        s = plan.get(name)
        if isinstance(s, dict):
            heads = f", {s.get('n_heads')} heads" if s.get('kind') == 'transformer' else ''
            out.append((name, f"{s.get('kind')}, d_model {s.get('d_model')}, {s.get('n_layers')} layers{heads}, "
                              f"{'causal' if s.get('causal') else 'bidirectional'}"))
    m = plan.get('memory') or {}
    if m and plan.get('family') in REGISTRY and (family(plan['family']).forms_memories
                                                 or family(plan['family']).pad_slot):
        out.append(('memory', f"{m.get('chunks')} chunks x {m.get('chunk_len')} tokens, position {m.get('position')}, "
                              f"compression {m.get('compression')}, slots {m.get('slots')}, pad {m.get('pad')}, "
                              f"decoder input {m.get('decoder_input')}"))
    d = plan.get('data') or {}
    if d:
        out.append(('data', f"{d.get('source')}, vocab {d.get('vocab_size')}, batch {d.get('batch_size')}, "
                            f"{d.get('layout')}" + (f", tokenizer {d['tokenizer']}" if d.get('tokenizer') else '')))
    r = plan.get('run') or {}
    if r:
        out.append(('run', f"name {r.get('name')}, seed {r.get('seed')}, device {r.get('device')}, "
                           f"out_dir {r.get('out_dir')}"))
    return out


def stage_line(s: dict) -> list[str]:
    objs = ', '.join(o.get('kind', '?') + (f" x{o['weight']:g}" if o.get('weight', 1.0) != 1.0 else '')
                     for o in s.get('objectives') or [])
    extra = []
    if s.get('freeze'):
        extra.append('freeze ' + ','.join(s['freeze']))
    if s.get('init_from'):
        extra.append('init ' + ','.join(f"{k.replace(':', '.')}<-{v}" for k, v in s['init_from'].items()))
    if s.get('normalize', 'weighted_sum') != 'weighted_sum':
        extra.append(f"normalize {s['normalize']}")
    return [str(s.get('name')), str(s.get('steps')),
            f"{s.get('lr'):g}" if isinstance(s.get('lr'), (int, float)) else '?', objs, '  '.join(extra)]


def metrics_table(stage_metrics: dict[str, dict[str, float]], ends: dict[str, int], indent: str = '  ') -> str:
    stages = list(stage_metrics)
    names = sorted({n for m in stage_metrics.values() for n in m})
    rows = [['(step)'] + [str(ends.get(s, '-')) for s in stages]] if ends else []
    rows += [[n] + [num(stage_metrics[s].get(n)) for s in stages] for n in names]
    return table(['metric'] + stages, rows, right=set(range(1, len(stages) + 1)), indent=indent)


def plain(v):
    """A value as JSON holds it: non-finite floats become null (JSON has no NaN), datetimes ISO text."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, 'isoformat'):
        return v.isoformat()
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def print_json(doc) -> None:
    print(json.dumps(plain(doc), indent=1))


def print_csv(headers: list[str], rows: list[list]) -> None:
    """Exact values: floats as repr (round-trip), None as an empty cell, lists and dicts as JSON."""
    def cell(v):
        if v is None:
            return ''
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, (list, dict)):
            return json.dumps(plain(v))
        return v.isoformat() if hasattr(v, 'isoformat') else str(v)
    w = csv.writer(sys.stdout, lineterminator='\n')
    w.writerow(headers)
    for r in rows:
        w.writerow([cell(v) for v in r])
