"""The --where query language of `python -m store.runs list`: one filter per expression, over a run's record.

    scope/Configurable.param=value   as in a spec ('Memory.chunks=4', 'encoder/Stack.d_model=128',
                                     'blank/Stage.lr=1e-3'); Stage and Objective scopes are resolved through the
                                     run's operative gin
    NAME=value                       a macro of the operative gin ('LR=2e-3')
    flattened.key=value              a key of the recorded config ('plan.memory.chunks=4'; `store.runs show ID --keys`)
    '!=' negates; values compare as numbers where both are numbers (1e-3 == 0.001).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re

from compiler.errors import UserError
from compiler.plan import CONFIGURABLES, STACK_ROLES
from compiler.spec import read_bindings
from store.database import RunRecord


def operative(run: RunRecord) -> tuple[dict, dict]:
    """(bindings, macros) of the run's recorded operative gin, read with gin's own parser (compiler.spec)."""
    return read_bindings(run.config.get('operative_gin') or '')


def macros(run: RunRecord) -> dict[str, object]:
    """Macro values of the operative gin (`NAME = value`)."""
    return operative(run)[1]


def scope_names(run: RunRecord, configurable: str, field: str) -> dict[str, str]:
    """Gin scope -> value of `scope/Configurable.field` in the operative gin (e.g. 'blank' -> 'blank_copy')."""
    out = {}
    for key, value in operative(run)[0].items():
        name, _, param = key.rpartition('.')
        scope, _, cls = name.rpartition('/')
        if scope and cls == configurable and param == field and isinstance(value, str):
            out[scope.split('/')[-1]] = value
    return out


def bindings(run: RunRecord) -> dict[str, str]:
    """The run's command-line -b bindings as the user wrote them: {'scope/Configurable.param' or 'MACRO': text}."""
    out = {}
    for b in run.config.get('bindings') or []:
        key, _, value = str(b).partition('=')
        out[key.strip()] = value.strip()
    return out


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip('"\'') if text[:1] in '"\'' else text


def same(a, b) -> bool:
    """Config value a equals filter value b (1e-3 == 0.001, True == 'true', learned == 'learned')."""
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return str(a).lower() == str(b).lower()
    return a == b or str(a) == str(b)


class Where:
    """One --where filter: 'scope/Configurable.param=value', a macro ('LR=1e-3') or a flattened config key
    ('plan.memory.chunks=4'); '!=' negates."""

    def __init__(self, expr: str, place: str | None = None):
        self.expr, self.place = expr, place or f"--where '{expr}'"
        m = re.match(r'^\s*([^=!]+?)\s*(!=|==|=)\s*(.*?)\s*$', expr)
        if not m or not m.group(1):
            raise UserError(self.place, 'expected KEY=VALUE',
                            "e.g. --where Memory.chunks=4, --where 'encoder/Stack.d_model=128', --where LR=1e-3 or "
                            '--where plan.memory.chunks=4')
        self.key, self.negate, self.value = m.group(1), m.group(2) == '!=', _literal(m.group(3))
        self.kind = 'raw'
        gm = re.match(r'^(?:([\w./-]+)/)?([A-Z]\w*)\.(\w+)$', self.key)
        if gm:
            self.scope, self.cls, self.param = gm.groups()
            if self.cls not in CONFIGURABLES:
                raise UserError(self.place, f"unknown configurable '{self.cls}'",
                                f"use one of {', '.join(CONFIGURABLES)} (or a flattened key like plan.memory.chunks)")
            fields = [f.name for f in dataclasses.fields(CONFIGURABLES[self.cls]) if f.name != 'scope']
            if self.param not in fields:
                close = difflib.get_close_matches(self.param, fields, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ''
                raise UserError(self.place, f"{self.cls} has no field '{self.param}'",
                                f"{hint}{self.cls} fields: {', '.join(fields)}")
            if self.cls == 'Stack' and self.scope and self.scope.split('/')[-1] not in STACK_ROLES:
                raise UserError(self.place, f"unknown Stack scope '{self.scope}'",
                                f"use {', '.join(s + '/Stack' for s in STACK_ROLES)} or unscoped Stack (any stack)")
            self.kind = 'gin'
        elif re.match(r'^[A-Z][A-Z0-9_]*$', self.key):
            self.kind = 'macro'

    def keys(self, run: RunRecord) -> list[str]:
        """The flattened config keys of `run` this filter reads."""
        flat = run.flat
        if self.kind == 'raw':
            return [k for k in (self.key, f'plan.{self.key}') if k in flat][:1]
        if self.kind == 'macro':
            return []
        scope = (self.scope or '').split('/')[-1]
        if self.cls in ('Memory', 'Data', 'Run'):
            prefix = f'plan.{self.cls.lower()}.'
        elif self.cls == 'Plan':
            prefix = 'plan.'
        elif self.cls == 'Stack':
            stacks = [scope] if scope else list(STACK_ROLES)
            return [f'plan.{s}.{self.param}' for s in stacks if f'plan.{s}.{self.param}' in flat]
        elif self.cls == 'Stage':
            stages = run.stages
            if scope:
                name = scope_names(run, 'Stage', 'name').get(scope, scope)
                stages = [s for s in stages if s == name]
            return [k for k in (f'plan.curriculum.{s}.{self.param}' for s in stages) if k in flat]
        else:  # Objective
            kind = scope_names(run, 'Objective', 'kind').get(scope, scope) if scope else None
            pat = re.compile(r'^plan\.curriculum\.[^.]+\.objectives\.([^.]+)\.' + re.escape(self.param) + '$')
            return [k for k in flat if (m := pat.match(k)) and (kind is None or m.group(1) == kind
                                                                 or flat.get(k.rsplit('.', 1)[0] + '.kind') == kind)]
        key = prefix + self.param
        return [key] if key in flat or any(k.startswith(key + '.') for k in flat) else []

    def values(self, run: RunRecord) -> list:
        if self.kind == 'macro':
            mac = macros(run)
            return [mac[self.key]] if self.key in mac else []
        out = []
        for k in self.keys(run):
            if k in run.flat:
                out.append(run.flat[k])
            else:  # a section (Plan.encoder): compare the nested value
                out.append(_nested(run.config, k))
        return out

    def __call__(self, run: RunRecord) -> bool:
        hit = any(same(v, self.value) for v in self.values(run))
        return not hit if self.negate else hit


def _nested(config: dict, key: str):
    node = config
    for part in key.split('.'):
        node = node.get(part) if isinstance(node, dict) else None
    return node
