"""python -m runtime.sweep run SWEEP.gin [-b BINDING ...] [--jobs N] [--executor local|slurm|submitit-local] [--db URL]
python -m runtime.sweep status SWEEP.gin|SWEEP_ID [-b BINDING ...] [--db URL]

A sweep is a spec too: a gin file binding two configurables, `Sweep` and `Trial` (specs/sweeps/probes.gin):

    Sweep.name = 'probes'
    Sweep.seeds = [0, 1, 2]                     # every trial runs once per seed (Run.seed = s)
    Sweep.trials = [@ae/Trial(), @probe/Trial()]
    ae/Trial.specs = ['specs/autoencoder.gin']
    probe/Trial.specs = ['specs/information_probe.gin']
    probe/Trial.bindings = ["probe/Stage.init_from = {'encoder': 'run:@ae/autoencode'}"]
    probe/Trial.grid = {'Memory.chunk_len': [8, 16]}   # one run per combination of the grid's values

A trial is named after its gin scope (or Trial.name). `run:@<trial>/<stage>[:<component>]` in a binding is a
dependency by name: the run of that trial with the same seed (and the same values of the grid keys both trials vary);
the dependent starts once it completed. `python -m runtime.run SPEC --sweep 'Memory.chunks=[4,8]'` is a one-trial
sweep of the same kind. Every member is compiled (compiler.spec.load) before anything runs: one bad member refuses
the whole sweep (exit 2).

Members are `python -m runtime.run` processes recorded in one database with the config entry
`sweep = {name, sweep_id, trial, seed, grid}`, run by concurrent.futures (local processes, --jobs at once) or by
submitit (Slurm, or its local executor). A rerun skips members that COMPLETED with the same plan, resumes those that
stopped resumably and starts the rest. Each member is claimed in the database before it starts (claims.py), so
two drivers of the same sweep never start one member twice. Logs: <Run.out_dir>/sweeps/<sweep_id>/<member>.log,
named by trial, seed and grid values ('probe-seed0-Memory.chunk_len=8.log').
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from compiler.args import Parser
from compiler.errors import UserError, cli
from runtime.sweep.driver import execute, summary
from runtime.sweep.executors import executor_options
from runtime.sweep.expand import compile_member, expand
from runtime.sweep.record import _identity, prior, records
from runtime.sweep.spec import grid_sweep, load_sweep, split_bindings
from store import database
from store.tables import duration, fmt, table


def add_options(ap: argparse.ArgumentParser) -> None:
    """runtime.run's sweep options: --sweep KEY=[...] and how the members run."""
    ap.add_argument('--sweep', action='append', default=[], metavar="'KEY=[V,...]'",
                    help="run every combination of these values as a sweep, e.g. --sweep 'Memory.chunks=[4,8,16]' "
                    "--sweep 'Run.seed=[0,1]' (python -m runtime.sweep --help)")
    executor_options(ap)


def run_requested(args) -> None:
    """runtime.run: with --sweep, run the grid as a sweep and exit; without, refuse the options only a sweep reads."""
    if not args.sweep:
        defaults = argparse.ArgumentParser()
        executor_options(defaults)
        given = [a.option_strings[0] for a in defaults._actions if a.dest != 'help'
                 and getattr(args, a.dest) != a.default]
        if given:
            raise UserError(given[0], 'this option is for sweeps', "add --sweep 'KEY=[values]' or drop the option")
        return
    if args.resume is not None:
        raise UserError('--sweep', 'a sweep cannot be resumed by run id',
                        'rerun the same command: completed members are skipped and stopped ones resumed')
    sys.exit(execute(grid_sweep(args.specs, args.sweep), args.binding, args))


def status(target: str, bindings: list[str], db: str | None) -> str:
    """The members of a sweep spec (latest record of each) or of one sweep invocation (by its id)."""
    if target.endswith('.gin') or Path(target).is_file():
        sweep_b, member_b = split_bindings(bindings)
        layout = load_sweep(target, sweep_b)
        members = expand(layout, member_b)
        url = db or database.default_url(members[0].spec.plan.run.out_dir)
        recorded = records(url, layout.sweep.name)
        for m in members:
            if all(d.run_name for d in m.deps.values()):
                m.hash = compile_member(m).hash
            before = prior(m, recorded) or next((r for r in reversed(recorded) if _identity(r) == m.key()), None)
            if before is None:
                m.status = 'not started'
                continue
            m.run_id, m.run_name, m.start, m.stop = before.id, before.name, before.start, before.stop
            m.status = before.status if before.config.get('spec_hash') == m.hash else f'{before.status} (other plan)'
        return f'sweep {layout.sweep.name} in {database.display_url(url)}\n\n{summary(members)}'
    url = db or database.DEFAULT_DB
    found = records(url, sweep_id=target)
    trials = list(dict.fromkeys(r.config['sweep'].get('trial') for r in found))
    found.sort(key=lambda r: (trials.index(r.config['sweep'].get('trial')), str(r.config['sweep'].get('seed'))))
    if not found:
        raise UserError(f'sweep {target}', f'no run of this sweep in {database.display_url(url)}',
                        'give the sweep id the driver printed (or the sweep spec) and the --db it recorded in')
    rows = []
    for r in found:
        s = r.config['sweep']
        grid = ', '.join(f"{k.replace(':', '.')}={fmt(v)}" for k, v in (s.get('grid') or {}).items()) or '-'
        rows.append([str(s.get('trial')), str(s.get('seed')), grid, r.id, r.status, duration(r.start, r.stop) or '-'])
    return (f"sweep {target} ({found[0].config['sweep'].get('name')}) in {database.display_url(url)}\n\n"
            + table(['trial', 'seed', 'grid', 'run', 'status', 'wall'], rows, right={1, 3, 5}))


@cli
def main(argv=None):
    ap = Parser(prog='python -m runtime.sweep', description=__doc__.split('\n\n')[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='run the members of a sweep spec (skipping those already completed)')
    run.add_argument('sweep', help='sweep spec (gin file binding Sweep and Trial)')
    run.add_argument('-b', '--binding', action='append', default=[],
                     help="Sweep/Trial bindings change the sweep (-b 'Sweep.seeds=[0]'); any other binding is given "
                     "to every member (-b \"Run.out_dir='runs/x'\")")
    run.add_argument('--db', help='observer database URL (default sqlite:///<Run.out_dir>/sacred.db)')
    executor_options(run)
    st = sub.add_parser('status', help='members of a sweep with their status and run ids')
    st.add_argument('target', metavar='SWEEP.gin|SWEEP_ID')
    st.add_argument('-b', '--binding', action='append', default=[], help='as for run (with a sweep spec)')
    st.add_argument('--db', help='database URL (default: the sweep\'s, or sqlite:///runs/sacred.db for an id)')
    args = ap.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    if args.command == 'status':
        print(status(args.target, args.binding, args.db))
        return
    sweep_b, member_b = split_bindings(args.binding)
    sys.exit(execute(load_sweep(args.sweep, sweep_b), member_b, args))
