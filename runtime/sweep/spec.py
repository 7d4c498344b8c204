"""The sweep spec: the gin configurables `Sweep` and `Trial`, read from a sweep file (load_sweep) or from
`runtime.run --sweep` flags (grid_sweep), with where each value came from, for messages."""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import gin

from compiler import plan as plan_mod
from compiler.errors import SpecError
from compiler.spec import build, locate, read_bindings
from store.tables import fmt

SEED_KEY = 'Run.seed'

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
    """Make Sweep and Trial gin configurables, once per process (gin refuses a second registration), and only when a
    sweep is read: a plain run never sees them."""
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
                            f'{did_you_mean(scope, named)}add @{scope}/Trial() to Sweep.trials or fix the scope')
    spots = {('', f): where(sweep, f) for f in ('name', 'seeds', 'trials', 'bindings')}
    for n, t in named.items():
        spots.update({(n, f): where(t, f) for f in ('specs', 'bindings', 'grid', 'name')})
    trials = tuple(dataclasses.replace(t, name=n) for n, t in named.items())
    return Layout(dataclasses.replace(sweep, trials=trials), spots, Path(path).resolve().parent)


def did_you_mean(name: str, known) -> str:
    """"did you mean 'probe'? " for a misspelled trial name ('' when nothing is close)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ''


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


def split_bindings(bindings: list[str]) -> tuple[list[str], list[str]]:
    """-b of `runtime.sweep`: bindings of Sweep/Trial change the sweep spec, every other one goes to each member."""
    sweep, members = [], []
    for b in bindings:
        keys = read_bindings(b)[0]
        to_sweep = keys and all(k.rsplit('.', 1)[0].rsplit('/', 1)[-1] in CONFIGURABLES for k in keys)
        (sweep if to_sweep else members).append(b)
    return sweep, members
