"""Gin specs -> Plan, remembering where every binding came from.

We drive gin's own parser statement by statement instead of calling `gin.parse_config_files_and_bindings`,
for three reasons (all measured with gin-config 0.5.0):
- includes must resolve against the including file's folder, then `specs/` (gin only knows global
  search paths);
- every bad value must be reported at the file:line (or `-b` binding) that set it, so we keep an index
  binding-key -> location;
- gin reports an undefined macro only when it is evaluated, deep inside a call; we check them up front.
"""
from __future__ import annotations

import difflib
import importlib.util  # noqa: F401  (gin's include machinery needs it imported; see docs/design.md)
import io
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import gin
from gin import config_parser

from compiler import plan as plan_mod
from compiler import validate
from compiler.errors import SpecError

SPECS_DIR = Path(__file__).resolve().parent.parent / 'specs'


@dataclass
class Spec:
    """A loaded spec: the Plan, the operative gin text and where each binding came from."""
    plan: plan_mod.Plan
    operative: str
    files: list[str]
    bindings: list[str]
    locations: dict = field(default_factory=dict)  # (scope, configurable, arg) -> 'file:line'
    sources: list[str] = field(default_factory=list)  # the spec files given (files adds their includes)

    @property
    def hash(self) -> str:
        return self.plan.hash


class _Delegate(config_parser.ParserDelegate):
    """gin's delegate, plus: unknown configurable references and macro uses are recorded, not raised."""

    def __init__(self, loader, parser_ref):
        self._loader, self._parser_ref = loader, parser_ref
        self._gin = gin.config.ParserDelegate()

    def configurable_reference(self, scoped_name, evaluate):
        name = scoped_name.rsplit('/', 1)[-1]
        if name not in plan_mod.CONFIGURABLES:
            where = self._loader.where(self._parser_ref[0]._current_location())
            raise SpecError(where, f"unknown configurable '@{scoped_name}'", _suggest(name, plan_mod.CONFIGURABLES))
        return self._gin.configurable_reference(scoped_name, evaluate)

    def macro(self, name):
        if name != 'gin.REQUIRED':
            self._loader.macro_uses.append((name, self._loader.where(self._parser_ref[0]._current_location())))
        return self._gin.macro(name)


def _suggest(name, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ''
    return f"{hint}known names: {', '.join(sorted(known))}"


class _Loader:
    def __init__(self):
        self.locations: dict = {}
        self.macros: dict = {}
        self.macro_uses: list = []
        self.via_macro: dict = {}  # binding key or macro name -> the macro its value is (`x = %NAME`)
        self.files: list[str] = []
        self.label = None  # set while parsing a -b binding

    def where(self, location) -> str:
        if self.label is not None:
            return self.label
        filename, line = location[0], location[1]
        return f'{_display(filename)}:{line}'

    def parse_file(self, path: Path, chain: tuple = ()):
        path = path.resolve()
        if path in chain:
            cycle = ' -> '.join(_display(p) for p in chain + (path,))
            raise SpecError(_display(chain[-1]), f'include cycle: {cycle}', 'remove one of the include statements')
        self.files.append(str(path))
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise SpecError(_display(path), 'spec is not UTF-8 text', 'save the spec as UTF-8')
        self._parse(text, str(path), path.parent, chain + (path,))

    def parse_binding(self, binding: str):
        self.label = f"binding -b '{binding}'"
        try:
            self._parse(binding, None, SPECS_DIR, ())
        finally:
            self.label = None

    def _parse(self, text: str, filename, folder: Path, chain: tuple):
        stream = io.StringIO(text)
        stream.name = filename
        ref = [None]
        try:
            parser = config_parser.ConfigParser(stream, _Delegate(self, ref))
            ref[0] = parser
            for statement in parser:
                self._apply(statement, folder, chain)
        except SyntaxError as e:
            where = self.label or f'{_display(e.filename or filename)}:{e.lineno}'
            raise SpecError(where, f'malformed gin: {_token_free(e.msg)}',
                            'write bindings as `scope/Configurable.param = value`')
        except tokenize.TokenError as e:  # e.g. an unclosed bracket at the end of the text: not a SyntaxError
            msg, (line, _) = e.args
            token = getattr(ref[0], '_current_token', None)  # the last good token: where the open statement is
            where = self.label or f'{_display(filename)}:{token.start[0] if token else line}'
            raise SpecError(where, f'malformed gin: {msg}', 'close every bracket and quote')

    def _apply(self, st, folder: Path, chain: tuple):
        where = self.where(st.location) if hasattr(st, 'location') else self.label
        if isinstance(st, config_parser.IncludeStatement):
            if self.label:
                raise SpecError(where, 'include is not allowed in a -b binding',
                                'pass the file as an extra spec argument')
            self.parse_file(resolve_include(st.filename, folder, where), chain)
        elif isinstance(st, config_parser.ImportStatement):
            raise SpecError(where, f'import {st.module!r}: specs cannot import modules',
                            'remove the import; the compiler registers every configurable')
        elif isinstance(st, config_parser.BlockDeclaration):
            raise SpecError(where, 'block declarations are not supported', 'write one binding per line')
        elif not st.arg_name:  # a macro definition: NAME = value
            name = f'{st.scope}/{st.selector}' if st.scope else st.selector
            self.macros[name] = where
            self._note_macro(name, st.value)
            gin.bind_parameter((name, 'gin.macro', 'value'), st.value)
        else:
            cls = plan_mod.CONFIGURABLES.get(st.selector)
            if cls is None:
                raise SpecError(where, f"unknown configurable '{st.selector}'",
                                _suggest(st.selector, plan_mod.CONFIGURABLES))
            params = [f for f in cls.__dataclass_fields__ if f != 'scope']
            if st.arg_name not in params:
                raise SpecError(where, f"'{st.selector}' has no parameter '{st.arg_name}'",
                                _suggest(st.arg_name, params))
            self.locations[(st.scope, st.selector, st.arg_name)] = where
            self._note_macro((st.scope, st.selector, st.arg_name), st.value)
            gin.bind_parameter((st.scope, st.selector, st.arg_name), st.value)

    def _note_macro(self, key, value):
        if isinstance(value, gin.config.ConfigurableReference) and value.selector == 'gin.macro' and value.evaluate:
            self.via_macro[key] = '/'.join(value.scopes)
        else:
            self.via_macro.pop(key, None)

    def resolved_locations(self) -> dict:
        """Locations with `Memory.chunks = %CHUNKS` traced to where CHUNKS got its (last) value, so an error names
        the line the user wrote (e.g. `CHUNKS = 3` in their spec or a -b binding), not the shared base spec."""
        out = dict(self.locations)
        for key, where in self.locations.items():
            name, seen = self.via_macro.get(key), set()
            while name in self.via_macro and name not in seen:  # NAME = %OTHER
                seen.add(name)
                name = self.via_macro[name]
            if name in self.macros and self.macros[name] != where:
                out[key] = f'{self.macros[name]} (macro {name}, used at {where})'
        return out


def _token_free(msg: str) -> str:
    """gin's parse error without the text it quotes: an included file that is not a spec (a credentials file, say)
    must not be echoed. What kind of token is wrong is kept, the token is not."""
    if 'Failed to parse token' in msg:
        return 'a value is not a Python literal (number, quoted string, list, dict, True, False or None)'
    return re.sub(r'\s*Got (\w+) = .*', r' Got a token of type \1.', msg.splitlines()[0] if msg else msg)


def resolve_include(name: str, folder: Path, where: str) -> Path:
    candidates = [folder / name, SPECS_DIR / name]
    for c in candidates:
        if c.is_file():
            return c
    raise SpecError(where,
                    f"include '{name}' not found (looked in {', '.join(_display(c.parent) for c in candidates)})",
                    'fix the path: includes resolve from the including spec\'s folder, then from specs/')


def _display(path) -> str:
    p = Path(str(path))
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def locate(spec_locations: dict, owner, name: str) -> str:
    """Where did `owner.name` get its value? Most specific scope first (gin's resolution order)."""
    cls = type(owner).__name__
    parts = owner.scope.split('/') if owner.scope else []
    for i in range(len(parts), -1, -1):
        key = ('/'.join(parts[:i]), cls, name)
        if key in spec_locations:
            return spec_locations[key]
    scoped = f'{owner.scope}/' if owner.scope else ''
    return f'{scoped}{cls}.{name} (default)'


def load(files, bindings=()) -> Spec:
    """Parse spec files and -b bindings into a validated Plan. Raises SpecError on bad input."""
    gin.clear_config()
    loader = _Loader()
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise SpecError(str(f), 'spec file not found', 'check the path (specs live in specs/)')
        loader.parse_file(p)
    for b in bindings:
        loader.parse_binding(b)
    for name, where in loader.macro_uses:
        if name not in loader.macros:
            raise SpecError(where, f"undefined macro '%{name}'",
                            f"define it (`{name} = ...`) or include the spec that does; "
                            + _suggest(name, loader.macros))
    for name, where in loader.macros.items():  # `A = %B`, `B = %A`: name the line instead of recursing
        chain = [name]
        while loader.via_macro.get(chain[-1]) in loader.macros and chain[-1] not in chain[:-1]:
            chain.append(loader.via_macro[chain[-1]])
        if len(chain) > 1 and chain[-1] == name:
            raise SpecError(where, f"macro '{name}' refers to itself: {' -> '.join(chain)}",
                            'give one of these macros a value')
    locations = loader.resolved_locations()
    try:
        built = gin.get_configurable('Plan')()
    except plan_mod.PlanError as e:
        raise SpecError(locate(locations, e.owner, e.name), e.message, e.fix)
    except RecursionError:  # `X = %X`, or `s/Stage.objectives = [@s/Stage()]`: gin evaluates it forever
        raise SpecError(', '.join(_display(f) for f in loader.files) or ', '.join(f"-b '{b}'" for b in bindings),
                        'a binding refers to itself (a macro or @configurable whose value contains itself)',
                        'break the cycle: a macro cannot use itself and a Stage cannot contain a Stage')
    except RuntimeError as e:
        if 'Required bindings' in str(e) or 'REQUIRED' in str(e):
            raise SpecError(_required_location(loader, e), f'a required value was not set: {str(e).splitlines()[0]}',
                            "bind it in the spec or on the command line, e.g. -b 'scope/Configurable.param = value'")
        raise
    spec = Spec(built, gin.operative_config_str(), loader.files, list(bindings), locations,
                [str(Path(f).resolve()) for f in files])
    validate.check(built, lambda owner, name: locate(locations, owner, name))
    return spec


def _required_location(loader, err) -> str:
    text = str(err)
    for where in loader.locations.values():
        if where in text:
            return where
    return ', '.join(loader.files) or 'spec'


class _AsText(config_parser.ParserDelegate):
    """Parses references as their text: '@scope/Name()' and '%MACRO' (nothing is looked up or bound)."""

    def configurable_reference(self, scoped_name, evaluate):
        return f"@{scoped_name}{'()' if evaluate else ''}"

    def macro(self, name):
        return f'%{name}'


def read_bindings(text: str) -> tuple[dict[str, object], dict[str, object]]:
    """The bindings and macros of flat gin text (a recorded operative config, a -b binding), with gin's own parser:
    ({'scope/Configurable.param': value}, {'NAME': value}); references stay text ('@clm/Objective()', '%LR').
    For reading records: nothing is bound, and text that does not parse gives empty dicts."""
    stream = io.StringIO(text)
    stream.name = None
    bindings, macros = {}, {}
    try:
        for st in config_parser.ConfigParser(stream, _AsText()):
            if not isinstance(st, config_parser.BindingStatement):
                continue
            name = f'{st.scope}/{st.selector}' if st.scope else st.selector
            if st.arg_name:
                bindings[f'{name}.{st.arg_name}'] = st.value
            else:
                macros[name] = st.value
    except (SyntaxError, tokenize.TokenError):
        return {}, {}
    return bindings, macros
