"""Reproduce the paper's claims at CPU scale, as specs, recorded in Sacred.

    python benchmarks/paper_claims.py                    # run the whole suite (~40 min on 2 cores), then report
    python benchmarks/paper_claims.py --report-only      # regenerate paper_claims.md and the PNGs from the database
    python benchmarks/paper_claims.py --only probe_T_ae  # (re)run some experiments, by label prefix

Every experiment is a shipped spec plus bindings; its Run.name is its label, so the report is built from the
Sacred database alone (latest COMPLETED run per label). Thresholds for the verdicts are fixed below, before
any result is seen, and never tuned per claim (docs/science.md: the claims are about orderings and gaps).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from runtime.record import make_engine  # noqa: E402

# Verdict thresholds (stated up front). ">>": at least 2x and at least +0.20 absolute token accuracy.
# "~": within 0.05 absolute token accuracy. CLM-loss margin: combined within 5 % of clm-only.
MUCH_RATIO, MUCH_ABS, SIMILAR_ABS, CLM_MARGIN = 2.0, 0.20, 0.05, 0.05

KINDS = {'T': [], 'M': ['specs/base/mixer.gin']}
CAUSAL_ENCODER = ['encoder/Stack.causal = True', "Memory.position = 'second_last'"]  # its last position never trained
FAITHFUL = ["probe/Stage.freeze = ['encoder.layers', 'encoder.norm']"]  # research code: fresh trainable embedding


def experiments() -> list[tuple[str, list[str], list[str], list[str]]]:
    """(label, spec files, bindings, requires) in run order. `run:@label/stage:comp` is resolved to a run id."""
    ex = []
    for k, extra in KINDS.items():
        ex += [
            (f'src_{k}_clm', ['specs/clm.gin', *extra], ['CHUNK_LEN = 8'], []),
            (f'src_{k}_ae', ['specs/autoencoder.gin', *extra], [], []),
            (f'mem_{k}_clm', ['specs/memory_clm.gin', *extra], [], []),
            (f'mem_{k}_combined', ['specs/memory_combined.gin', *extra], [], []),
        ]
        probe = ['specs/information_probe.gin', *extra]
        sources = {'untrained': ([], None), 'causal': (CAUSAL_ENCODER, f'src_{k}_clm/clm:decoder'),
                   'ae': ([], f'src_{k}_ae/autoencode'), 'memclm': ([], f'mem_{k}_clm/clm'),
                   'memcombined': ([], f'mem_{k}_combined/combined')}
        for name, (b, src) in sources.items():
            init = [f"probe/Stage.init_from = {{'encoder': 'run:@{src}'}}"] if src else []
            ex.append((f'probe_{k}_{name}', probe, b + init, [src.split('/')[0]] if src else []))
            if k == 'T' and name in ('causal', 'ae'):
                faithful_init = [f"probe/Stage.init_from = {{'encoder': 'run:@{src}', 'encoder.embedding': 'fresh'}}"]
                ex.append((f'probe_{k}_{name}_faithful', probe, b + FAITHFUL + faithful_init, [src.split('/')[0]]))
    ex += [
        ('cmp_copy', ['specs/memory_combined.gin'], ["blank/Objective.kind = 'copy'"], []),
        ('cmp_blank', ['specs/memory_combined.gin'], ['combined/Stage.objectives = [@blank/Objective()]'], []),
        ('cmp_curriculum', ['specs/frozen_encoder_curriculum.gin'], [], []),
        ('cmp_curriculum_trainable', ['specs/frozen_encoder_curriculum.gin'], ['FROZEN = []'], []),
        ('cmp_no_memory', ['specs/no_memory.gin'], [], []),
        ('cmp_full_context', ['specs/full_context.gin'], [], []),
        ('cmp_recurrent', ['specs/recurrent.gin'], [], []),
    ]
    return ex


# ------------------------------------------------------------------------------------------------ the database

def latest_runs(url: str) -> dict[str, dict]:
    """label -> {'run_id', 'summary' (stage -> metrics at the stage end), 'stages', 'duration'} of the latest
    COMPLETED run with that Run.name."""
    out = {}
    eng = make_engine(url)
    with eng.connect() as c:
        rows = c.execute(sa.text('SELECT run_id, config, info, start_time, stop_time FROM run '
                                 "WHERE status = 'COMPLETED' ORDER BY id")).fetchall()
        for run_id, config, info, start, stop in rows:
            cfg, inf = json.loads(config), json.loads(info or '{}')
            label = cfg['plan']['run']['name']
            stages = [s['name'] for s in cfg['plan']['curriculum']]
            ends = {s: v['end_step'] for s, v in inf.get('stages', {}).items()}
            metrics = c.execute(sa.text('SELECT name, step, value FROM memspec_metrics '
                                        'WHERE run_id = :r AND name LIKE :p'),
                                {'r': run_id, 'p': 'eval/%'}).fetchall()
            summary = {s: {} for s in stages}
            for name, step, value in metrics:
                for s in stages:
                    if ends.get(s) == step:
                        summary[s][name[len('eval/'):]] = value
            curve = c.execute(sa.text('SELECT step, value FROM memspec_metrics '
                                      "WHERE run_id = :r AND name = 'train/loss' ORDER BY step"),
                              {'r': run_id}).fetchall()
            start, stop = (dt.datetime.fromisoformat(t) if isinstance(t, str) else t for t in (start, stop))
            dur = (stop - start).total_seconds() if start and stop else None
            out[label] = {'run_id': run_id, 'summary': summary, 'stages': stages, 'curve': curve, 'duration': dur,
                          'start': start, 'stop': stop,
                          'final': summary[stages[-1]]}
    eng.dispose()  # no pooled connections left open on the database the next run writes to
    return out


def run_experiment(label, files, bindings, runs_dir: Path, url: str, known: dict) -> None:
    resolved = []
    for b in bindings:  # 'run:@label/stage' -> 'run:<id>/stage'
        while 'run:@' in b:
            i = b.index('run:@') + len('run:@')
            ref = b[i:].split('/', 1)[0]
            b = b[:i - 1] + known[ref]['run_id'] + b[i + len(ref):]
        resolved.append(b)
    cmd = [sys.executable, '-m', 'runtime.run', *files, '--db', url, '-b', f"Run.name = '{label}'",
           '-b', f"Run.out_dir = '{runs_dir}'"]
    for b in resolved:
        cmd += ['-b', b]
    t0 = time.time()
    print(f'--- {label}: {" ".join(files)} {" ".join(resolved)}', flush=True)
    resume_args = []
    for attempt in range(3):
        proc = subprocess.run(cmd + resume_args, cwd=ROOT,
                              env=dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1'),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # a run that stopped resumably (the database stopped answering) continues the same trajectory
        resume = re.search(r'continue it with --resume (\S+)', proc.stdout)
        if proc.returncode != 1 or not resume or attempt == 2:
            break
        print(f'    stopped resumably ({proc.stdout.strip().splitlines()[-1][:200]}); resuming run {resume.group(1)}',
              flush=True)
        resume_args = ['--resume', resume.group(1)]
    if proc.returncode:
        print(proc.stdout[-4000:])
        raise SystemExit(f'{label} failed (exit {proc.returncode})')
    print(f'    done in {time.time() - t0:.0f} s', flush=True)


# ------------------------------------------------------------------------------------------------ the report

def _fmt(x, nd=3):
    return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{nd}f}'


def much(a, b) -> bool:
    return a >= MUCH_RATIO * b and a - b >= MUCH_ABS


def report(runs: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def probe(label):
        r = runs.get(label)
        return r['final'] if r else {}

    lines = ['# Paper claims at CPU scale', '',
             'Generated by `python benchmarks/paper_claims.py` from the Sacred database alone '
             '(`--report-only` regenerates it). Scale: the shipped tiny specs (d128, 2+2 layers, 4 chunks x 8 tokens, '
             'byte-level BPE of 1024 on the embedded corpus); the paper used d512-1024 and 512 tokens, so '
             'absolute numbers differ: the claims are about ordering and gaps.', '',
             f'Verdict rules, fixed before running: ">>" = at least {MUCH_RATIO:g}x and +{MUCH_ABS:.2f} '
             'token accuracy; '
             f'"~" = within {SIMILAR_ABS:.2f}; CLM-loss margin {CLM_MARGIN:.0%}. I_e = 1 - CE / ln(vocab).', '']
    for k, kind in (('T', 'transformer'), ('M', 'masked mixer')):
        lines += [f'## Information probes ({kind}): frozen encoder, fresh decoder regenerates the chunk', '',
                  '| encoder probed | probe CE | I_e | token accuracy | normalized Hamming | run |',
                 '|---|---|---|---|---|---|']
        for name, desc in (('ae', 'autoencoder'), ('causal', 'causal LM'), ('untrained', 'untrained'),
                           ('memclm', 'memory model, clm only'), ('memcombined', 'memory model, clm + blank copy'),
                           ('ae_faithful', 'autoencoder (faithful: fresh trainable embedding)'),
                           ('causal_faithful', 'causal LM (faithful: fresh trainable embedding)')):
            label = f'probe_{k}_{name}'
            if label not in runs:
                continue
            m = probe(label)
            lines.append(f"| {desc} | {_fmt(m.get('autoencode.ce'))} | {_fmt(m.get('autoencode.info_proportion'))} | "
                         f"{_fmt(m.get('autoencode.token_accuracy'))} | "
                         f"{_fmt(m.get('autoencode.normalized_hamming'))} | {runs[label]['run_id']} |")
        lines.append('')

    lines += ['## Memory models (transformer): copy, blank copy and next-token loss on held-out data', '',
              '| model | copy acc | blank-copy acc | clm loss | fraction of memory benefit recovered | run |',
             '|---|---|---|---|---|---|']
    l_nomem = runs.get('cmp_no_memory', {}).get('final', {}).get('clm.ce')
    l_full = runs.get('cmp_full_context', {}).get('final', {}).get('clm.ce')
    rows = [('mem_T_clm', 'clm only'), ('cmp_copy', 'clm + copy'), ('mem_T_combined', 'clm + blank copy (combined)'),
            ('cmp_blank', 'blank copy only'), ('cmp_curriculum', 'frozen-encoder curriculum'),
            ('cmp_curriculum_trainable', 'curriculum, trainable encoder'), ('cmp_no_memory', 'no memory (control)'),
            ('cmp_full_context', 'full context (baseline)'), ('cmp_recurrent', 'recurrent memory transformer')]
    for label, desc in rows:
        if label not in runs:
            continue
        m = runs[label]['final']
        ce = m.get('clm.ce')
        frac = (l_nomem - ce) / (l_nomem - l_full) if None not in (ce, l_nomem, l_full) and l_nomem != l_full else None
        lines.append(f"| {desc} | {_fmt(m.get('copy.token_accuracy'))} | {_fmt(m.get('blank_copy.token_accuracy'))} | "
                     f"{_fmt(ce)} | {_fmt(frac, 2)} | {runs[label]['run_id']} |")
    lines += ['', 'Fraction of memory benefit recovered = (L_nomem - L_x) / (L_nomem - L_full), with L the held-out '
              'clm loss of the no-memory control and of the full-context transformer '
             '(the memory-free upper bound here).', '']

    # claims
    lines += ['## Claims', '', '| claim | measurement | supported |', '|---|---|---|']

    def acc(label, key='autoencode.token_accuracy'):
        return runs.get(label, {}).get('final', {}).get(key)

    for k, kind in (('T', 'transformer'), ('M', 'mixer')):
        ae, ca, un = acc(f'probe_{k}_ae'), acc(f'probe_{k}_causal'), acc(f'probe_{k}_untrained')
        if None not in (ae, ca, un):
            ok = much(ae, ca) and much(ae, un) and abs(ca - un) <= SIMILAR_ABS
            lines.append(f'| {kind}: autoencoder >> causal ~ untrained information | '
                         f'probe accuracy {ae:.3f} vs {ca:.3f} vs {un:.3f} '
                         f'| {"yes" if ok else "no"} |')
    clm_only = acc('mem_T_clm', 'copy.token_accuracy')
    for label, desc in (('mem_T_combined', 'combined'), ('cmp_curriculum', 'curriculum')):
        c = acc(label, 'copy.token_accuracy')
        b, b0 = acc(label, 'blank_copy.token_accuracy'), acc('mem_T_clm', 'blank_copy.token_accuracy')
        if None not in (c, clm_only, b, b0):
            ok = much(c, clm_only) or much(b, b0)
            lines.append(f'| {desc} copy accuracy >> clm-only memory model | '
                         f'copy {c:.3f} vs {clm_only:.3f}, blank copy {b:.3f} vs {b0:.3f} '
                         f'| {"yes" if ok else "no"} |')
    ce_c, ce_0 = acc('mem_T_combined', 'clm.ce'), acc('mem_T_clm', 'clm.ce')
    if None not in (ce_c, ce_0):
        ok = ce_c <= ce_0 * (1 + CLM_MARGIN)
        lines.append(f'| combined clm loss within {CLM_MARGIN:.0%} of clm-only | '
                     f'{ce_c:.3f} vs {ce_0:.3f} ({(ce_c / ce_0 - 1):+.1%}) '
                     f'| {"yes" if ok else "no"} |')
    total = sum(r['duration'] or 0 for r in runs.values())
    starts, stops = [r['start'] for r in runs.values() if r['start']], [r['stop'] for r in runs.values() if r['stop']]
    wall = (max(stops) - min(starts)).total_seconds() if starts and stops else 0
    lines += ['', f'Recorded run time of the {len(runs)} runs: {total / 60:.1f} min; '
              'suite wall time (first start to last '
              f'stop in the database, process starts and data loading included): {wall / 60:.1f} min.', '']

    # figures
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (k, kind) in zip(axes, (('T', 'transformer'), ('M', 'masked mixer'))):
        names = [n for n in ('ae', 'causal', 'untrained', 'memclm', 'memcombined', 'ae_faithful', 'causal_faithful')
                 if f'probe_{k}_{n}' in runs]
        ax.bar(names, [acc(f'probe_{k}_{n}') for n in names], color='tab:blue')
        ax.set_title(f'probe token accuracy ({kind})')
        ax.tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(out / 'probes.png', dpi=120)
    plt.close(fig)
    labels = [(label, desc) for label, desc in rows if label in runs]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [acc(lb, 'copy.token_accuracy') or 0 for lb, _ in labels], 0.4, label='copy')
    ax.bar([i + 0.2 for i in x], [acc(lb, 'blank_copy.token_accuracy') or 0 for lb, _ in labels], 0.4,
           label='blank copy')
    ax.set_xticks(list(x), [d for _, d in labels], rotation=25, ha='right')
    ax.set_ylabel('held-out token accuracy')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'memory_models.png', dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, desc in labels:
        steps, vals = zip(*runs[label]['curve']) if runs[label]['curve'] else ((), ())
        ax.plot(steps, vals, label=desc, lw=1)
    ax.set_xlabel('step')
    ax.set_ylabel('train loss (stage mixture)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / 'training_curves.png', dpi=120)
    plt.close(fig)
    lines += ['![probes](probes.png)', '', '![memory models](memory_models.png)', '',
              '![training curves](training_curves.png)', '']
    text = '\n'.join(lines)
    (out / 'paper_claims.md').write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='benchmarks/results/paper_claims', help='report folder (markdown + PNGs)')
    ap.add_argument('--runs', default='runs/paper_claims', help='run folders')
    ap.add_argument('--db', help='Sacred database URL (default sqlite:///<runs>/sacred.db)')
    ap.add_argument('--report-only', action='store_true', help='only regenerate the report from the database')
    ap.add_argument('--only', nargs='*', help='run only experiments whose label starts with one of these')
    ap.add_argument('--rerun', action='store_true', help='run experiments that already have a completed run')
    args = ap.parse_args()
    runs_dir = (ROOT / args.runs).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    url = args.db or f'sqlite:///{runs_dir / "sacred.db"}'
    t0 = time.time()
    if not args.report_only:
        exists = not url.startswith('sqlite') or Path(url[len('sqlite:///'):]).exists()
        known = latest_runs(url) if exists else {}
        for label, files, bindings, _ in experiments():
            if args.only and not any(label.startswith(p) for p in args.only):
                continue
            if label in known and not args.rerun:
                print(f'--- {label}: run {known[label]["run_id"]} already completed')
                continue
            run_experiment(label, files, bindings, runs_dir, url, known)
            known = latest_runs(url)  # later experiments may initialise from this one
        print(f'suite wall time {(time.time() - t0) / 60:.1f} min')
    text = report(latest_runs(url), ROOT / args.out)
    print(text)


if __name__ == '__main__':
    main()
