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
stopped resumably and starts the rest. Logs: <Run.out_dir>/sweeps/<sweep_id>/<member>.log.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import gin

from compiler import plan as plan_mod
from compiler.errors import SpecError, cli, either
from compiler.spec import SPECS_DIR, build, load, locate, read_bindings
from store import database
from store.layout import RunFolder
from store.tables import duration, fmt, table

ROOT = Path(__file__).resolve().parent.parent
SEED_KEY = 'Run.seed'
REFERENCE = re.compile(r'run:@([^/\s\'"]*)/([A-Za-z0-9_.-]*)')  # 'run:@ae/autoencode:encoder' -> ('ae', 'autoencode')
GRID_KEY = re.compile(r'^[A-Za-z0-9_./-]+$')  # [scope/]Configurable.param or MACRO: one binding, nothing else
EXECUTORS = ('local', 'slurm', 'submitit-local')
SLURM_MINUTES = 24 * 60  # submitit-local's time limit (submitit's own default of 2 minutes would stop real runs)


# ------------------------------------------------------------------------------------------------ the sweep spec

_SCOPE = field(default='', compare=False, repr=False)


@dataclass(frozen=True)
class Trial(plan_mod._PlanPart):  # the Plan's dataclass base: gin scope recorded, lists frozen, fields type-checked
    """One kind of member: spec files plus bindings, run once per seed and grid point."""
    specs: tuple[str, ...] = ()
    bindings: tuple[str, ...] = ()  # after Sweep.bindings, before the grid point and the seed
    grid: dict[str, list | tuple] = field(default_factory=dict)  # binding key or macro -> values
    name: str = ''  # '' = the gin scope (`@probe/Trial()` -> 'probe')
    scope: str = _SCOPE


@dataclass(frozen=True)
class Sweep(plan_mod._PlanPart):
    """Trials, each run once per seed: named runs grouped in the database under the sweep's name."""
    name: str = ''  # '' = the sweep file's name
    seeds: tuple[int, ...] = ()  # () = each spec's own Run.seed
    trials: tuple[Trial, ...] = ()
    bindings: tuple[str, ...] = ()  # given to every member
    scope: str = _SCOPE


CONFIGURABLES = {'Sweep': Sweep, 'Trial': Trial}
_registered = []


def _register() -> None:
    """Make Sweep and Trial gin configurables, once per process. Lazily: `python -m runtime.sweep` executes this file
    as __main__ and then imports it as runtime.sweep (see main), and gin refuses a second registration."""
    if not _registered:
        for name, cls in CONFIGURABLES.items():
            gin.external_configurable(cls, name, denylist=['scope'])
        _registered.append(True)


@dataclass
class Layout:
    """A sweep as written, with where each of its values came from (for messages)."""
    sweep: Sweep
    where: dict  # (trial name or '', field) -> 'file:line' or the flag that set it
    folder: Path  # where relative Trial.specs are also looked for

    def at(self, trial: str, name: str) -> str:
        return self.where.get((trial, name)) or self.where.get(('', name)) or f'Sweep.{name}'


def load_sweep(path: str, bindings=()) -> Layout:
    """A sweep spec file (+ -b bindings of Sweep/Trial) -> Layout. SpecError at the line of anything wrong."""
    _register()
    sweep, locations = build('Sweep', CONFIGURABLES, [path], bindings)

    def where(owner, name):
        return locate(locations, owner, name)

    if not sweep.name:
        sweep = dataclasses.replace(sweep, name=default_name(path))
    named = {}
    for t in sweep.trials:
        name = t.name or t.scope
        if not name:
            raise SpecError(where(sweep, 'trials'), 'a trial has no name',
                            'scope it (@ae/Trial()) or bind Trial.name')
        if name in named:
            raise SpecError(where(t, 'specs'), f"two trials are named '{name}'",
                            'give every trial its own scope or name')
        named[name] = t
    scopes = {t.scope for t in sweep.trials}
    picked = where(sweep, 'trials').startswith('binding -b')  # -b 'Sweep.trials=[...]' may leave trials out
    for (scope, cls, _), line in locations.items():  # `prbe/Trial.specs = ...`: bound, but no such trial
        if cls == 'Trial' and scope and scope not in scopes and not picked:
            raise SpecError(line, f"'{scope or 'Trial'}' is not a trial of this sweep (trials: {', '.join(named)})",
                            f'add @{scope}/Trial() to Sweep.trials or fix the scope')
    spots = {('', f): where(sweep, f) for f in ('name', 'seeds', 'trials', 'bindings')}
    for n, t in named.items():
        spots.update({(n, f): where(t, f) for f in ('specs', 'bindings', 'grid', 'name')})
    trials = tuple(dataclasses.replace(t, name=n) for n, t in named.items())
    return Layout(dataclasses.replace(sweep, trials=trials), spots, Path(path).resolve().parent)


def default_name(path: str) -> str:
    """A sweep (or --sweep trial) named after its file: 'specs/my-probes.gin' -> 'my_probes'."""
    return re.sub(r'\W', '_', Path(path).stem)


def grid_sweep(specs: list[str], flags: list[str]) -> Layout:
    """`python -m runtime.run SPEC --sweep 'Memory.chunks=[4,8]' --sweep 'Run.seed=[0,1]'`: a one-trial sweep named
    after the first spec; Run.seed values become the sweep's seeds."""
    grid, seeds, where = {}, (), {}
    for text in flags:
        flag = f"--sweep '{text}'"
        keys, macros = read_bindings(text)
        pairs = list(keys.items()) + list(macros.items())
        if len(pairs) != 1 or not isinstance(pairs[0][1], (list, tuple)) or not pairs[0][1]:
            raise SpecError(flag, 'a sweep flag is one binding key and a list of its values',
                            "write --sweep 'Memory.chunks=[4,8,16]' (repeat --sweep for more keys)")
        key, values = pairs[0]
        if key in grid or (key == SEED_KEY and seeds):
            raise SpecError(flag, f"'{key}' is swept twice", 'give each key one --sweep flag with all its values')
        if key == SEED_KEY:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise SpecError(flag, f'seeds are integers, not {fmt(values)}', "write --sweep 'Run.seed=[0,1,2]'")
            seeds, where[('', 'seeds')] = tuple(values), flag
        else:
            grid[key], where[('', 'grid')] = list(values), ' '.join(filter(None, [where.get(('', 'grid')), flag]))
    name = default_name(specs[0])
    where[('', 'specs')] = where[('', 'trials')] = ' '.join(specs)
    sweep = Sweep(name=name, seeds=seeds, trials=(Trial(specs=tuple(specs), grid=grid, name=name),))
    return Layout(sweep, where, Path.cwd())


# ------------------------------------------------------------------------------------------------ expansion

@dataclass
class Member:
    """One run of a sweep: a trial at one seed and grid point."""
    trial: str
    axis_seed: int | None  # the Sweep.seeds value (None: the sweep does not vary seeds)
    point: dict  # grid key -> value
    index: int  # 1-based position of the grid point in the trial's grid (0: no grid)
    specs: list[str]
    bindings: list[str]  # runtime.run -b, dependencies still written run:@<trial>/
    origin: dict  # binding -> where in the sweep it came from
    deps: dict = field(default_factory=dict)  # trial -> the Member it reads
    spec: object = None  # compiler.spec.Spec, compiled with stand-in ids for the dependencies
    seed: int = 0  # the Run.seed it trains with
    hash: str = ''
    run_id: str | None = None
    run_name: str | None = None  # '<id>-<key>' (store/layout.py): what init_from and --resume name, unambiguously
    resume: str | None = None  # the run this invocation continues
    before: bool = False  # completed in an earlier invocation: not run again
    status: str = 'PENDING'
    note: str = ''
    start: dt.datetime | None = None
    stop: dt.datetime | None = None

    @property
    def label(self) -> str:
        return f'{self.trial}-seed{self.seed}' + (f'-{self.index}' if self.point else '')

    @property
    def grid_text(self) -> str:
        return ', '.join(f'{k}={fmt(v)}' for k, v in self.point.items()) or '-'

    def describe(self) -> str:
        return f"trial '{self.trial}' (seed {self.seed}" + (f', {self.grid_text})' if self.point else ')')

    def key(self) -> tuple:
        return self.trial, self.seed, _canonical(self.point)

    def resolved(self, placeholder: bool = False) -> list[str]:
        """The bindings with each run:@<trial>/ replaced by the run name of that dependency (or a stand-in that
        compiles, for the check before anything runs)."""
        ids = {t: (f'sweep.{t}' if placeholder else d.run_name) for t, d in self.deps.items()}
        return [REFERENCE.sub(lambda m: f'run:{ids[m.group(1)]}/{m.group(2)}', b) for b in self.bindings]


def _canonical(point: dict) -> str:
    return json.dumps(stored(point), sort_keys=True)


def stored(obj):
    """How a sweep entry is recorded in the Sacred config, whose keys may not contain '.' (runtime.run records
    every config this way): {'Memory.chunk_len': 8} -> {'Memory:chunk_len': 8}, tuples as lists."""
    if isinstance(obj, dict):
        return {str(k).replace('.', ':'): stored(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [stored(v) for v in obj]
    return obj


def _binding(key: str, value) -> str:
    return f'{key} = {value!r}'


def _spec_path(name: str, folder: Path, where: str) -> str:
    for c in (Path(name), folder / name, SPECS_DIR / name):
        if c.is_file():
            return str(c.resolve())
    raise SpecError(where, f"spec '{name}' not found (looked in ., {folder} and specs/)",
                    'fix the path in Trial.specs: relative to the current folder, the sweep file or specs/')


def expand(layout: Layout, extra: list[str]) -> list[Member]:
    """Every member of the sweep, in an order where dependencies come first, each compiled once (with stand-in ids
    for its dependencies). `extra`: -b bindings given to every member (after the trials' own, before grid and seed).
    Raises SpecError, located in the sweep, on anything that would stop a member."""
    sweep = layout.sweep
    if not plan_mod.NAME.match(sweep.name):  # the names that become file names: as for Stage.name
        raise SpecError(layout.at('', 'name'), f'sweep name {sweep.name!r} is not an identifier',
                        "use letters, digits and '_' (it names the sweep's log folder)")
    if not sweep.trials:
        raise SpecError(layout.at('', 'trials'), 'the sweep has no trials',
                        'list them: Sweep.trials = [@ae/Trial(), @probe/Trial()]')
    if len(set(sweep.seeds)) != len(sweep.seeds):
        raise SpecError(layout.at('', 'seeds'), f'Sweep.seeds lists a seed twice: {list(sweep.seeds)}',
                        'list every seed once')
    trials = {t.name: t for t in sweep.trials}
    swept = {SEED_KEY} if sweep.seeds else set()
    for t in sweep.trials:
        _check_trial(t, layout, trials, sweep)
        swept |= set(t.grid)
    for b in extra:  # the sweep's axes come last and would silently win over a -b that sets them
        for key in [k for names in read_bindings(b) for k in names]:
            if key in swept:
                raise SpecError(f"binding -b '{b}'", f"'{key}' is what the sweep varies",
                                'drop this binding (the sweep sets it for every member)')
    order = _trial_order(trials, layout)
    members: list[Member] = []
    for name in order:
        t = trials[name]
        keys = list(t.grid)
        points = [dict(zip(keys, values)) for values in itertools.product(*(t.grid[k] for k in keys))]
        for seed in sweep.seeds or (None,):
            for index, point in enumerate(points, start=1 if keys else 0):
                origin = {b: layout.at('', 'bindings') for b in sweep.bindings}
                origin.update({b: layout.at(name, 'bindings') for b in t.bindings})
                bindings = [*sweep.bindings, *t.bindings, *extra]
                for k, v in point.items():
                    bindings.append(_binding(k, v))
                    origin[bindings[-1]] = layout.at(name, 'grid')
                if seed is not None:
                    bindings.append(_binding(SEED_KEY, seed))
                    origin[bindings[-1]] = layout.at('', 'seeds')
                specs = [_spec_path(s, layout.folder, layout.at(name, 'specs')) for s in t.specs]
                members.append(Member(name, seed, point, index, specs, bindings, origin))
    by_trial: dict[str, list[Member]] = {}
    for m in members:
        by_trial.setdefault(m.trial, []).append(m)
        for dep in sorted({d for b in m.bindings for d, _ in REFERENCE.findall(b)}):
            m.deps[dep] = _match(m, by_trial[dep], trials, layout)
        m.spec = compile_member(m, placeholder=True)
        m.seed, m.hash = m.spec.plan.run.seed, m.spec.hash
    for m in members:
        _check_stages(m, layout)
    _check_grid_effect(by_trial, trials, layout)
    out_dirs = {m.spec.plan.run.out_dir for m in members}
    if len(out_dirs) > 1:
        raise SpecError(layout.at('', 'trials'), f'the members write to different Run.out_dir: {sorted(out_dirs)}',
                        "give every trial the same Run.out_dir (e.g. -b \"Run.out_dir='runs'\"): a dependency is read "
                        'from the dependent\'s out_dir and the sweep records into one database')
    return members


def _check_trial(t: Trial, layout: Layout, trials: dict, sweep: Sweep) -> None:
    if not plan_mod.NAME.match(t.name):
        raise SpecError(layout.at(t.name, 'name'), f'trial name {t.name!r} is not an identifier',
                        "use letters, digits and '_' (it names log files and dependencies)")
    if not t.specs:
        raise SpecError(layout.at(t.name, 'specs'), f"trial '{t.name}' has no specs",
                        f"bind {t.name}/Trial.specs = ['specs/...gin']")
    for key, values in t.grid.items():
        where = layout.at(t.name, 'grid')
        if not GRID_KEY.match(key):
            raise SpecError(where, f"grid key {key!r} of trial '{t.name}' is not a binding name",
                            "use '[scope/]Configurable.param' or a MACRO, e.g. {'Memory.chunks': [4, 8]}")
        if key == SEED_KEY and sweep.seeds:
            raise SpecError(where, f"trial '{t.name}' varies Run.seed, which Sweep.seeds already varies",
                            'list the seeds in Sweep.seeds only')
        if not isinstance(values, (list, tuple)) or not values:
            raise SpecError(where, f"grid key '{key}' of trial '{t.name}' has no list of values",
                            f"write {{'{key}': [value, ...]}}")
        if len({_canonical({'v': v}) for v in values}) != len(values):
            raise SpecError(where, f"grid key '{key}' of trial '{t.name}' lists a value twice: {fmt(list(values))}",
                            'list every value once')
    for b in t.bindings + sweep.bindings:
        for dep, _ in REFERENCE.findall(b):
            if dep not in trials:
                known = ', '.join(trials)
                raise SpecError(layout.at(t.name if b in t.bindings else '', 'bindings'),
                                f"'run:@{dep}/' names no trial of this sweep (trials: {known})",
                                "depend on a trial of the sweep by its name: 'run:@<trial>/<stage>'")


def _trial_order(trials: dict, layout: Layout) -> list[str]:
    """Trials with their dependencies first; a cycle is refused at the bindings that close it."""
    deps = {n: sorted({d for b in (*t.bindings, *layout.sweep.bindings) for d, _ in REFERENCE.findall(b)})
            for n, t in trials.items()}
    order, state = [], {}

    def visit(n, path):
        state[n] = 'open'
        for d in deps[n]:
            if state.get(d) == 'open':
                cycle = path[path.index(d):] + [d]
                raise SpecError(layout.at(n, 'bindings'), f"dependency cycle: {' -> '.join(cycle)}",
                                'a trial cannot read (through run:@...) a trial that reads it')
            if d not in state:
                visit(d, path + [d])
        state[n] = 'done'
        order.append(n)

    for n in trials:
        if n not in state:
            visit(n, [n])
    return order


def _match(m: Member, candidates: list[Member], trials: dict, layout: Layout) -> Member:
    """The member of a dependency that `m` reads: the same seed, and the same values of the grid keys both vary."""
    dep = candidates[0].trial
    own, theirs = set(trials[m.trial].grid), set(trials[dep].grid)
    if theirs - own:
        raise SpecError(layout.at(m.trial, 'bindings'),
                        f"trial '{m.trial}' reads trial '{dep}', which varies {', '.join(sorted(theirs - own))} and "
                        f"'{m.trial}' does not: which '{dep}' run each '{m.trial}' run reads is ambiguous",
                        f"give '{m.trial}' the same grid keys (and values), or take them out of '{dep}'")
    found = [c for c in candidates if c.axis_seed == m.axis_seed
             and all(_canonical({'v': c.point[k]}) == _canonical({'v': m.point[k]}) for k in theirs)]
    if not found:
        point = ', '.join(f'{k}={fmt(m.point[k])}' for k in sorted(theirs))
        raise SpecError(layout.at(m.trial, 'grid'), f"trial '{m.trial}' at {point} reads trial '{dep}', which has no "
                        'run at these values', f"give '{dep}' the same grid values as '{m.trial}'")
    return found[0]


def compile_member(m: Member, placeholder: bool = False):
    """compiler.spec.load of the member; its SpecError names the sweep line that made the offending binding."""
    bindings = m.resolved(placeholder)
    origin = {r: m.origin[b] for r, b in zip(bindings, m.bindings) if b in m.origin}
    try:
        return load(m.specs, bindings)
    except SpecError as e:
        flag = next((b for b in bindings if e.where.startswith(f"binding -b '{b}'")), None)
        where = f'{origin[flag]} ({e.where})' if flag in origin else e.where
        fix = e.fix if flag is None or flag in origin else (  # a -b of the command line: it goes to every member
            f'{e.fix}; a -b binding is given to every member: for some trials only, put it in their Trial.bindings')
        raise SpecError(where, f'{m.describe()}: {e.what}', fix)


def _check_stages(m: Member, layout: Layout) -> None:
    for b in m.bindings:
        for trial, stage in REFERENCE.findall(b):
            stages = m.deps[trial].spec.plan.stage_names
            if stage not in stages:
                raise SpecError(m.origin.get(b, f"binding -b '{b}'"),
                                f"'run:@{trial}/{stage}': trial '{trial}' has no stage '{stage}'",
                                f"name one of its stages: {', '.join(stages)}")


def _check_grid_effect(by_trial: dict, trials: dict, layout: Layout) -> None:
    """Different values of a grid key must make different plans (1 and 1.0 for a float field do not; nor do values of
    a binding the compiler accepts with a warning that it has no effect): else two members are the same run."""
    for name, members in by_trial.items():
        for key in trials[name].grid:
            seen: dict = {}
            for m in members:
                rest = (m.axis_seed, _canonical({k: v for k, v in m.point.items() if k != key}))
                seen.setdefault(rest, {}).setdefault(m.hash, []).append(m.point[key])
            for hashes in seen.values():
                same = next((vs for vs in hashes.values() if len(vs) > 1), None)
                if same:
                    raise SpecError(layout.at(name, 'grid'), f"grid key '{key}' of trial '{name}': "
                                    f'{either(fmt(v) for v in same)} give the same plan',
                                    'list values that make different plans (each grid point is its own run)')


# ------------------------------------------------------------------------------------------------ the record

def records(url: str, name: str | None = None, sweep_id: str | None = None) -> list[database.RunRecord]:
    """The runs of the sweep called `name` (and of one invocation of it, `sweep_id`) in the database, oldest first."""
    db = database.open_db(url)
    try:
        runs = db.runs()
    finally:
        if hasattr(db, 'engine'):
            db.engine.dispose()  # no pooled connection left open on the file the members write
    return [r for r in runs if r.config.get('sweep') and (name is None or r.config['sweep'].get('name') == name)
            and (sweep_id is None or r.config['sweep'].get('sweep_id') == sweep_id)]


def _identity(r: database.RunRecord) -> tuple:
    s = r.config.get('sweep') or {}
    return s.get('trial'), s.get('seed'), json.dumps(s.get('grid') or {}, sort_keys=True)


def prior(m: Member, recorded: list[database.RunRecord]) -> database.RunRecord | None:
    """The recorded run a rerun continues from: a COMPLETED one of the same plan, else the latest of that plan."""
    same = [r for r in recorded if _identity(r) == m.key() and r.config.get('spec_hash') == m.hash]
    done = [r for r in same if r.status == 'COMPLETED']
    return (done or same or [None])[-1]


def resumable(run: database.RunRecord | None, out_dir: str) -> bool:
    """Did the run stop where `--resume` continues it: INTERRUPTED, RUNNING with a stale heartbeat (its process was
    killed), or FAILED with a checkpoint?"""
    if run is None:
        return False
    silent = run.silent_for()
    return run.status == 'INTERRUPTED' or (silent is not None and silent >= database.STALE_AFTER) or (
        run.status == 'FAILED' and RunFolder(out_dir, run.id, run.run_key).checkpoint.is_file())


def member_config(text: str | None) -> dict | None:
    """runtime.run --sweep-member JSON: what a member records as its config entry `sweep`."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SpecError('--sweep-member', 'not a JSON object', 'leave this option to python -m runtime.sweep')
    return stored(value)


# ------------------------------------------------------------------------------------------------ execution

def run_member(argv: list[str], env: dict, log: str, cwd: str, shown: str) -> dict:
    """One member: `python -m runtime.run ARGV` with its output in LOG. A plain module-level function, so submitit can
    pickle it and run it on a Slurm node (or in its local executor)."""
    start = time.time()
    with open(log, 'a') as out:
        out.write(f'$ {shown}\n')
        out.flush()
        code = subprocess.run([sys.executable, '-m', 'runtime.run', *argv], cwd=cwd, env={**os.environ, **env},
                              stdout=out, stderr=subprocess.STDOUT).returncode
    return {'code': code, 'start': start, 'stop': time.time()}


class LocalProcesses:
    """--jobs N `python -m runtime.run` processes at once on this machine."""

    def __init__(self, jobs: int):
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.threads = max(1, _cores() // jobs)

    def start(self, *args):
        return self.pool.submit(run_member, *args)

    def close(self):
        self.pool.shutdown(wait=False)


class Submitit:
    """One submitit job per member: Slurm, or submitit's LocalExecutor (the same code path without Slurm). A thread per
    job in flight waits on its result, so the driver waits on concurrent.futures like the local executor's."""

    def __init__(self, cluster: str, folder: Path, params: dict, jobs: int, threads: int):
        import submitit
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        self.executor.update_parameters(**params)
        self.waiters = ThreadPoolExecutor(max_workers=jobs)
        self.threads = threads

    def start(self, *args):
        return self.waiters.submit(lambda job: job.result(), self.executor.submit(run_member, *args))

    def close(self):
        self.waiters.shutdown(wait=False)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def executor_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--jobs', type=int, default=1, help='members running (or queued on Slurm) at once (default 1)')
    ap.add_argument('--executor', choices=EXECUTORS, default='local',
                    help='local: python -m runtime.run processes here; slurm: one submitit job per member; '
                    "submitit-local: submitit's local executor (the Slurm code path without Slurm)")
    ap.add_argument('--slurm-time', type=int, metavar='MINUTES', help='time limit of each member (Slurm: required)')
    ap.add_argument('--slurm-partition', help='Slurm partition')
    ap.add_argument('--gpus-per-node', type=int, help='GPUs of each member')
    ap.add_argument('--cpus-per-task', type=int, help='CPU cores of each member (Slurm; also its thread count)')
    ap.add_argument('--mem-gb', type=float, help='memory of each member')
    ap.add_argument('--slurm-param', action='append', default=[], metavar='KEY=VALUE',
                    help="any other submitit Slurm parameter, e.g. --slurm-param account=lab --slurm-param qos=high")


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
            raise SpecError(given[0], 'this option is for sweeps', "add --sweep 'KEY=[values]' or drop the option")
        return
    if args.resume is not None:
        raise SpecError('--sweep', 'a sweep cannot be resumed by run id',
                        'rerun the same command: completed members are skipped and stopped ones resumed')
    sys.exit(execute(grid_sweep(args.specs, args.sweep), args.binding, args))


def _executor(args, folder: Path):
    if args.jobs < 1:
        raise SpecError(f'--jobs {args.jobs}', 'needs at least one job', 'give --jobs 1 or more')
    if args.executor == 'local':
        return LocalProcesses(args.jobs)
    import submitit
    cluster = 'slurm' if args.executor == 'slurm' else 'local'
    if cluster == 'slurm' and args.slurm_time is None:
        raise SpecError('--executor slurm', "no time limit: submitit's default would stop every member after 5 min",
                        'give --slurm-time MINUTES')
    if cluster == 'slurm' and shutil.which('sbatch') is None:
        raise SpecError('--executor slurm', 'sbatch is not on PATH: this machine cannot submit Slurm jobs',
                        'run the sweep on a Slurm login node, or use --executor local')
    params = {'timeout_min': args.slurm_time or SLURM_MINUTES, 'gpus_per_node': args.gpus_per_node,
              'cpus_per_task': args.cpus_per_task, 'mem_gb': args.mem_gb, 'slurm_partition': args.slurm_partition,
              'name': 'memspec'}
    valid = submitit.SlurmExecutor._valid_parameters()
    for item in args.slurm_param:
        key, eq, value = item.partition('=')
        if not eq or key not in valid:
            raise SpecError(f'--slurm-param {item}', f"not a submitit Slurm parameter: '{key}'",
                            f"write KEY=VALUE with KEY one of: {', '.join(sorted(valid))}")
        params[f'slurm_{key}'] = int(value) if value.isdigit() else value
    threads = (args.cpus_per_task or 1) if cluster == 'slurm' else max(1, _cores() // args.jobs)
    return Submitit(cluster, folder / 'submitit', params, args.jobs, threads)


def split_bindings(bindings: list[str]) -> tuple[list[str], list[str]]:
    """-b of `runtime.sweep`: bindings of Sweep/Trial change the sweep spec, every other one goes to each member."""
    sweep, members = [], []
    for b in bindings:
        keys = read_bindings(b)[0]
        to_sweep = keys and all(k.rsplit('.', 1)[0].rsplit('/', 1)[-1] in CONFIGURABLES for k in keys)
        (sweep if to_sweep else members).append(b)
    return sweep, members


def execute(layout: Layout, extra: list[str], args) -> int:
    """Expand and check the sweep, then run its members; print the table. -> exit code (0: every member completed,
    1: not all did, 130: interrupted)."""
    from runtime import record
    members = expand(layout, extra)
    out_dir = Path(members[0].spec.plan.run.out_dir)
    url = args.db or database.default_url(str(out_dir))
    sweep_id = f"{layout.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder = out_dir / 'sweeps' / sweep_id
    pool = _executor(args, folder)
    obs = record.observer(url)  # the database answers (else exit 2) and has its tables before any member starts
    if hasattr(obs, 'engine'):
        obs.engine.dispose()
    folder.mkdir(parents=True, exist_ok=True)
    driver = Driver(layout.sweep.name, sweep_id, url, args, folder, pool, records(url, layout.sweep.name))
    print(f'sweep {sweep_id}: {len(members)} members, {args.executor} executor, {args.jobs} at once, '
          f'{pool.threads} thread(s) each\nlogs in {folder}', flush=True)
    try:
        driver.run(members)
    finally:
        pool.close()
    text = summary(members)
    (folder / 'summary.txt').write_text(text + '\n')
    db = '' if url == database.DEFAULT_DB else f' --db {database.display_url(url)}'
    started = any(m.run_id and not (m.before or m.resume) for m in members)  # what `status SWEEP_ID` lists
    print(f'\nsweep {sweep_id} ({layout.sweep.name})\n\n{text}\n\nlogs      {folder}\n'
          f'database  {database.display_url(url)}'
          + (f'  (python -m runtime.sweep status {sweep_id}{db})' if started else ''))
    for m in members:
        if m.status in ('FAILED', 'REFUSED', 'INTERRUPTED'):
            print(f'  {m.label} {m.status}: see {folder / (m.label + ".log")}')
    if any(m.status == 'INTERRUPTED' for m in members):
        return 130
    return int(any(m.status != 'COMPLETED' for m in members))


class Driver:
    """Submits members whose dependencies completed, at most --jobs at a time, and collects their outcome."""

    def __init__(self, name: str, sweep_id: str, url: str, args, folder: Path, pool, recorded: list):
        self.name, self.sweep_id, self.url, self.args, self.folder, self.pool = name, sweep_id, url, args, folder, pool
        self.recorded = recorded  # the sweep's runs before this invocation
        self.env = {'OMP_NUM_THREADS': str(pool.threads), 'MKL_NUM_THREADS': str(pool.threads),
                    'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
                    'HF_HUB_OFFLINE': os.environ.get('HF_HUB_OFFLINE', '1'),
                    'HF_DATASETS_OFFLINE': os.environ.get('HF_DATASETS_OFFLINE', '1')}
        self.bar = None

    def run(self, members: list[Member]) -> None:
        from tqdm import tqdm
        pending, running = list(members), {}
        self.members = members
        self.bar = tqdm(total=len(members), desc=f'sweep {self.name}', unit='run', file=sys.stderr)
        try:
            while pending or running:
                for m in list(pending):
                    if len(running) >= self.args.jobs:
                        break
                    failed = [d for d in m.deps.values() if d.status not in ('COMPLETED', 'PENDING')]
                    if failed:
                        pending.remove(m)
                        self.finish(m, 'SKIPPED', f'({failed[0].label} did not complete)')
                    elif all(d.status == 'COMPLETED' for d in m.deps.values()):
                        pending.remove(m)
                        future = self.start(m)
                        if future is not None:
                            running[future] = m
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        self.collect(running.pop(f), f)
        except KeyboardInterrupt:  # members got the same SIGINT: they record INTERRUPTED and leave a resume point
            self.bar.write('interrupted: waiting for the running members to record INTERRUPTED ...', file=sys.stderr)
            for f, m in running.items():
                self.collect(m, f)
            for m in pending:
                m.status = 'NOT STARTED'
        finally:
            self.bar.close()

    def finish(self, m: Member, status: str, note: str = '') -> None:
        m.status, m.note = status, note
        self.bar.update(1)
        self.bar.set_postfix(failed=sum(x.status not in ('COMPLETED', 'PENDING') for x in self.members))
        run = f' (run {m.run_id})' if m.run_id else ''
        self.bar.write(f'{m.label}: {status}{run}' + (f' {note}' if note else ''), file=sys.stderr)

    def start(self, m: Member):
        """Compile the member with its dependencies' run ids, then skip, resume or start it. -> a future or None."""
        try:
            spec = compile_member(m)
        except SpecError as e:  # checked with stand-in ids before anything ran; a real id cannot break it
            self.finish(m, 'REFUSED', str(e).splitlines()[0])
            return None
        m.hash = spec.hash
        before = prior(m, self.recorded)
        if before is not None:
            m.run_id, m.run_name = before.id, before.name
        if before is not None and before.status == 'COMPLETED':
            m.start, m.stop, m.before = before.start, before.stop, True
            self.finish(m, 'COMPLETED', '(recorded before: skipped)')
            return None
        silent = None if before is None else before.silent_for()
        if silent is not None and silent < database.STALE_AFTER:
            self.finish(m, 'RUNNING', f'(in another process, its last heartbeat {database.span(silent)} ago: not '
                                      'started here; rerun the sweep once it ended)')
            return None
        argv = [*m.specs]
        for b in m.resolved():
            argv += ['-b', b]
        if self.args.db:
            argv += ['--db', self.args.db]
        if resumable(before, spec.plan.run.out_dir):
            m.resume = before.name
            argv += ['--resume', before.name]
        else:
            m.run_id = m.run_name = None
        entry = {'name': self.name, 'sweep_id': self.sweep_id, 'trial': m.trial, 'seed': m.seed,
                 'grid': stored(m.point)}
        argv += ['--sweep-member', json.dumps(entry)]
        shown = shlex.join(['python', '-m', 'runtime.run',
                            *[database.display_url(a) if a == self.args.db else a for a in argv]])
        return self.pool.start(argv, self.env, str(self.folder / f'{m.label}.log'), os.getcwd(), shown)

    def collect(self, m: Member, future) -> None:
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001  (a submitit job that died: its own log says why)
            self.finish(m, 'FAILED', f'(the job failed: {database.first_line(e)})')
            return
        m.start, m.stop = (dt.datetime.fromtimestamp(result[k]) for k in ('start', 'stop'))
        code = result['code']
        if m.run_id is None:  # a new run: the id it was recorded under
            found = [r for r in records(self.url, self.name, self.sweep_id) if _identity(r) == m.key()]
            if found:
                m.run_id, m.run_name = found[-1].id, found[-1].name
        status = {0: 'COMPLETED', 2: 'REFUSED', 130: 'INTERRUPTED'}.get(code, 'FAILED')
        self.finish(m, status, '' if code in (0, 2, 130) else f'(exit {code})')


def summary(members: list[Member]) -> str:
    """The table of a sweep's members; wall = the member's process here, or its recorded run when it was not run."""
    rows = [[m.trial, str(m.seed), m.grid_text, m.run_id or '-', m.status + ' (before)' * m.before
             + ' (resumed)' * bool(m.resume and m.status == 'COMPLETED'), duration(m.start, m.stop) or '-']
            for m in members]
    return table(['trial', 'seed', 'grid', 'run', 'status', 'wall'], rows, right={1, 3, 5})


# ------------------------------------------------------------------------------------------------ status

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
        raise SpecError(f'sweep {target}', f'no run of this sweep in {database.display_url(url)}',
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
    ap = argparse.ArgumentParser(prog='python -m runtime.sweep', description=__doc__.split('\n\n')[1],
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


if __name__ == '__main__':
    from runtime.sweep import main as sweep_main  # the importable module: submitit pickles run_member by reference
    sweep_main()
