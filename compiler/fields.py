"""The field reference (docs/fields.md), generated from compiler/plan.py: every configurable, field, type, default and
meaning. `python -m compiler --fields > docs/fields.md` writes it; tests/test_fields.py checks the committed file is
current. A field's meaning is its comment in plan.py: the comment at the end of its line, else the comment lines
right above it."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing

from compiler import plan as plan_mod
from compiler.plan import CONFIGURABLES

HEADER = """# Field reference

Generated from compiler/plan.py by `python -m compiler --fields > docs/fields.md` (tests/test_fields.py checks that
this file is current; edit the comments in plan.py, not this file). Every field is bound in a spec as
`Configurable.field = value`, or `scope/Configurable.field` for one scope (`encoder/Stack.d_model = 128`,
`blank/Stage.lr = 1e-3`); compiler/validate.py checks the values together.
"""


def comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the field's comment in plan.py."""
    source = inspect.getsource(plan_mod)
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in CONFIGURABLES):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            line = lines[item.lineno - 1]
            text = line.split('  # ', 1)[1].strip() if '  # ' in line else ''
            if text.startswith(('type:', 'noqa')):  # a directive to a checker, not a meaning
                text = ''
            if not text:
                above, i = [], item.lineno - 2
                while i >= 0 and lines[i].strip().startswith('#'):
                    above.insert(0, lines[i].strip().lstrip('#').strip())
                    i -= 1
                text = ' '.join(above)
            out[(node.name, item.target.id)] = text
    return out


def type_text(tp) -> str:
    """An annotation as the reference writes it: int, float | None, 'cosine' | 'linear', list[Stage]."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return ' | '.join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return ' | '.join(type_text(a) for a in args)
    if origin is tuple:
        return f'list[{type_text(args[0])}]'
    if origin is dict:
        return f'dict[{type_text(args[0])}, {type_text(args[1])}]'
    return 'None' if tp is type(None) else getattr(tp, '__name__', str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return '(required)'
    if dataclasses.is_dataclass(value):
        return f'{type(value).__name__}()'
    if isinstance(value, tuple):
        return '[' + ', '.join(f'{type(v).__name__}()' if dataclasses.is_dataclass(v) else repr(v)
                               for v in value) + ']'
    return repr(value)


def markdown() -> str:
    notes = comments()
    out = [HEADER]
    for name, cls in CONFIGURABLES.items():
        hints = typing.get_type_hints(cls)
        doc = (cls.__doc__ or '').strip()
        out += [f'## {name}', '']
        if doc and not doc.startswith(f'{name}('):  # a dataclass without a docstring gets its signature
            out += [' '.join(doc.split()), '']
        out += ['| field | type | default | meaning |', '|---|---|---|---|']
        for f in dataclasses.fields(cls):
            if f.name == 'scope':
                continue
            meaning = notes.get((name, f.name), '').replace('|', '\\|')
            kind = type_text(hints[f.name]).replace('|', '\\|')
            out.append(f'| `{f.name}` | {kind} | `{_default(f)}` | {meaning} |')
        out.append('')
    return '\n'.join(out)
