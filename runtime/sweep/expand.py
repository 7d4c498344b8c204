"""Expansion: a sweep spec -> its members (one per trial, seed and grid point), dependencies resolved by name,
each compiled once before anything runs, every problem located in the sweep file."""
from __future__ import annotations

import datetime as dt
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from compiler import plan as plan_mod
from compiler.errors import SpecError, either
from compiler.spec import SPECS_DIR, load, read_bindings
from runtime.sweep.spec import SEED_KEY, Layout, Sweep, Trial, did_you_mean
from store.tables import fmt

REFERENCE = re.compile(r'run:@([^/\s\'"]*)/([A-Za-z0-9_.-]*)')  # 'run:@ae/autoencode:encoder' -> ('ae', 'autoencode')
GRID_KEY = re.compile(r'^[A-Za-z0-9_./-]+$')  # [scope/]Configurable.param or MACRO: one binding, nothing else

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

    tag: str = ''  # the grid point in file names (_name_logs)

    @property
    def label(self) -> str:
        """What the member's log is called: trial, seed and grid values."""
        return f'{self.trial}-seed{self.seed}' + (f'-{self.tag}' if self.point else '')

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
    _check_sweep(layout)
    trials = {t.name: t for t in sweep.trials}
    for t in sweep.trials:
        _check_trial(t, layout, trials, sweep)
    _check_extra(extra, sweep)
    members = [m for name in _trial_order(trials, layout) for m in _trial_members(trials[name], layout, extra)]
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
    _name_logs(members)
    return members


def _check_sweep(layout: Layout) -> None:
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


def _check_extra(extra: list[str], sweep: Sweep) -> None:
    """The sweep's axes come last and would silently win over a -b that sets them."""
    swept = ({SEED_KEY} if sweep.seeds else set()).union(*(t.grid for t in sweep.trials))
    for b in extra:
        for key in [k for names in read_bindings(b) for k in names]:
            if key in swept:
                raise SpecError(f"binding -b '{b}'", f"'{key}' is what the sweep varies",
                                'drop this binding (the sweep sets it for every member)')


def _trial_members(t: Trial, layout: Layout, extra: list[str]) -> list[Member]:
    """A trial's members: one per seed and grid point, with their bindings and where each came from."""
    keys, sweep = list(t.grid), layout.sweep
    points = [dict(zip(keys, values)) for values in itertools.product(*(t.grid[k] for k in keys))]
    specs = [_spec_path(s, layout.folder, layout.at(t.name, 'specs')) for s in t.specs]
    members = []
    for seed in sweep.seeds or (None,):
        for index, point in enumerate(points, start=1 if keys else 0):
            origin = {b: layout.at('', 'bindings') for b in sweep.bindings}
            origin.update({b: layout.at(t.name, 'bindings') for b in t.bindings})
            bindings = [*sweep.bindings, *t.bindings, *extra]
            axes = [(k, v, layout.at(t.name, 'grid')) for k, v in point.items()]
            for k, v, where in axes + ([(SEED_KEY, seed, layout.at('', 'seeds'))] if seed is not None else []):
                bindings.append(_binding(k, v))
                origin[bindings[-1]] = where
            members.append(Member(t.name, seed, point, index, list(specs), bindings, origin))
    return members


LOG_NAME = re.compile(r'[^A-Za-z0-9._=,+-]')  # what else a grid value holds becomes '_' in its log's name


def _name_logs(members: list[Member]) -> None:
    """Each member's log is named by its trial, seed and grid values ('probe-seed0-Memory.chunk_len=8'); where two
    values read the same once made file-safe, or the name would be too long, the grid point's index is used."""
    for m in members:
        text = ','.join(f"{k.replace('/', '.')}={v if isinstance(v, str) else fmt(v)}" for k, v in m.point.items())
        m.tag = LOG_NAME.sub('_', text)
    seen: dict[str, list[Member]] = {}
    for m in members:
        seen.setdefault(m.label, []).append(m)
    for same in seen.values():
        for m in same if len(same) > 1 or len(same[0].label) > 120 else []:
            m.tag = f'point{m.index}'


def _check_trial(t: Trial, layout: Layout, trials: dict, sweep: Sweep) -> None:
    if not plan_mod.NAME.match(t.name):
        raise SpecError(layout.at(t.name, 'name'), f'trial name {t.name!r} is not an identifier',
                        "use letters, digits and '_' (it names log files and dependencies)")
    if not t.specs:
        raise SpecError(layout.at(t.name, 'specs'), f"trial '{t.name}' has no specs",
                        f"bind {t.name}/Trial.specs = ['specs/...gin']")
    _check_grid(t, layout, sweep)
    for b in t.bindings + sweep.bindings:
        for dep, _ in REFERENCE.findall(b):
            if dep not in trials:
                known = ', '.join(trials)
                raise SpecError(layout.at(t.name if b in t.bindings else '', 'bindings'),
                                f"'run:@{dep}/' names no trial of this sweep (trials: {known})",
                                f"{did_you_mean(dep, trials)}depend on a trial of the sweep by its name: "
                                "'run:@<trial>/<stage>'")


def _check_grid(t: Trial, layout: Layout, sweep: Sweep) -> None:
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
