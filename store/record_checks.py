"""A run's record as read from a database is checked like a spec before anything reads it (store/database.py
builds every RunRecord through `checked`): a row changed outside memspec, or by another program, has its damaged
fields named (RunRecord.damaged) instead of crashing a reader.
"""
from __future__ import annotations

import json

STATUSES = ('COMPLETED', 'FAILED', 'INTERRUPTED', 'RUNNING', 'TIMEOUT', 'QUEUED')

# What the readers use of a run's recorded config and info, and the type each must have: a row changed outside
# memspec (or by another program) is checked like a spec before anything reads it (RunRecord.damaged).
SHAPES = {
    'config': {'plan': dict, 'operative_gin': str, 'spec_hash': str, 'spec_files': list, 'spec_sources': list,
               'bindings': list, 'warnings': list, 'provenance': dict, 'sweep': dict, 'seed': int},
    'info': {'run_key': str, 'run_dir': str, 'stages': dict, 'weights': dict, 'data': dict, 'resumes': list,
             'host': dict},
}
ITEMS = {('config', 'spec_files'): str, ('config', 'spec_sources'): str, ('config', 'bindings'): str,
         ('config', 'warnings'): str, ('info', 'stages'): dict, ('info', 'resumes'): dict}
MAX_DEPTH = 64  # deeper JSON is no config memspec wrote (a plan is < 10 levels), and would exhaust recursion


def _depth_exceeds(value, limit: int = MAX_DEPTH) -> bool:
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            todo += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            todo += [(x, d + 1) for x in v]
    return False


def type_name(v) -> str:
    return {dict: 'an object', list: 'a list', str: 'a string', bool: 'true/false', type(None): 'null'}.get(
        type(v), 'a number' if isinstance(v, (int, float)) else type(v).__name__)


def _as_object(column: str, value, damaged: list[str]) -> dict | None:
    """The column's JSON object, or None (named in `damaged`) when it is not one."""
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except (TypeError, ValueError, RecursionError):
            damaged.append(f'{column} (not JSON)')
            return None
    if not isinstance(value, dict):
        damaged.append(f'{column} ({type_name(value)}, not an object)')
        return None
    if _depth_exceeds(value):
        damaged.append(f'{column} (nested deeper than {MAX_DEPTH} levels)')
        return None
    return value


def _field_damage(column: str, key: str, v) -> str | None:
    """Why a known field does not have its recorded type, or None."""
    want, item = SHAPES[column][key], ITEMS.get((column, key))
    if not isinstance(v, want) or isinstance(v, bool) and want is int:
        return f'{column}.{key} ({type_name(v)}, not {type_name(want())})'
    if item is not None and not all(isinstance(x, item) for x in (v.values() if isinstance(v, dict) else v)):
        return f'{column}.{key} (holds items that are not {type_name(item())})'
    return None


def checked(column: str, value, damaged: list[str]) -> dict:
    """A run's `column` ('config' or 'info') as recorded: a JSON object whose known keys have their types. What is
    not is left out and named in `damaged` ('info.stages (a number, not an object)')."""
    if value is None or value == '':
        return {}
    value = _as_object(column, value, damaged)
    if value is None:
        return {}
    out = dict(value)
    for key in SHAPES[column]:
        why = None if out.get(key) is None else _field_damage(column, key, out[key])
        if why is not None:
            damaged.append(why)
            del out[key]
    stages = out.get('stages') or {}
    if not all(isinstance(x.get('end_step', 0), int) and not isinstance(x.get('end_step'), bool)
               for x in stages.values()):
        damaged.append(f'{column}.stages (an end_step that is not a whole number)')
        del out['stages']
    return out
