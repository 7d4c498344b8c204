"""Gin specs -> Plan, remembering where every binding came from.

We drive gin's own parser statement by statement instead of calling `gin.parse_config_files_and_bindings`,
for three reasons (all measured with gin-config 0.5.0):
- includes must resolve against the including file's folder, then `specs/` (gin only knows global
  search paths);
- every bad value must be reported at the file:line (or `-b` binding) that set it, so we keep an index
  binding-key -> location;
- gin reports an undefined macro only when it is evaluated, deep inside a call; we check them up front.

A spec means exactly what it says: after the Plan is built, gin's operative config tells which configurables were
built in which scopes, and every binding is checked against it (`_check_usage`). A binding that can only be a
mistake is an error (a scope nothing builds in and no reference names, a reference to a scope nothing is bound in, a
-b binding every instance overrides, a -b macro nothing uses); a binding that is valid but has no effect in this
particular plan (the bindings of a stage a -b dropped from the curriculum) is a warning (Spec.warnings, shown by the
compile report and recorded with the run). Unscoped bindings of spec files that scoped ones override are layering
(base/tiny.gin sets Stack.* for every stack) and stay silent, as do an included spec's bindings of a stack role
(encoder, ae_decoder) the family does not have.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
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
    warnings: list[validate.SpecWarning] = field(default_factory=list)  # legal but questionable: report and record
    unscaled_steps: tuple = ()  # each stage's steps before Run.steps_scale (the plan holds the scaled ones)

    @property
    def hash(self) -> str:
        return self.plan.hash


class _Delegate(config_parser.ParserDelegate):
    """gin's delegate, plus: unknown configurable references and macro uses are recorded, not raised."""

    def __init__(self, loader, parser_ref):
        self._loader, self._parser_ref = loader, parser_ref
        self._gin = gin.config.ParserDelegate()

    def configurable_reference(self, scoped_name, evaluate):
        scope, _, name = scoped_name.rpartition('/')
        where = self._loader.where(self._parser_ref[0]._current_location())
        if name not in self._loader.configurables:
            raise SpecError(where, f"unknown configurable {self._loader.quote('@' + scoped_name)}",
                            _suggest(name, self._loader.configurables, self._loader.included))
        self._loader.references.append(Reference(scope, name, evaluate, where))
        return self._gin.configurable_reference(scoped_name, evaluate)

    def macro(self, name):
        if name != 'gin.REQUIRED':
            self._loader.macro_uses.append((name, self._loader.where(self._parser_ref[0]._current_location())))
        return self._gin.macro(name)


@dataclass(frozen=True)
class Reference:
    """A `@scope/Name()` in the spec text (used or not): it builds a Name in `scope`."""
    scope: str
    name: str
    evaluate: bool
    where: str


def _suggest(name, known, private: bool = False) -> str:
    """'did you mean ...? known names: ...'; `private`: `name` comes from an included file, so no guess that would
    spell out what it says."""
    close = [] if private else difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ''
    return f"{hint}known names: {', '.join(sorted(known))}"


class _Loader:
    def __init__(self, configurables: dict):
        self.configurables = configurables  # name -> dataclass: what this kind of spec may bind
        self.locations: dict = {}
        self.macros: dict = {}
        self.macro_uses: list = []
        self.via_macro: dict = {}  # binding key or macro name -> the macro its value is (`x = %NAME`)
        self.files: list[str] = []
        self.label = None  # set while parsing a -b binding
        self.references: list[Reference] = []
        self.origin: dict = {}  # binding key or macro name -> 'binding' (-b), 'file' (given) or 'include'
        self._origin = 'file'
        # locations in included files: a message about them names the line, never its text (an included file may be
        # anything: a credentials file named by mistake, or on purpose)
        self.private: set[str] = set()

    @property
    def included(self) -> bool:
        return self._origin == 'include'

    def quote(self, text: str, where: str | None = None) -> str:
        """`text` of the spec quoted for a message, or a stand-in when it comes from an included file (where the
        statement at `where` is, or the text being parsed now)."""
        private = where in self.private if where is not None else self.included
        return '(text of an included file, not repeated)' if private else f"'{text}'"
    def where(self, location) -> str:
        if self.label is not None:
            return self.label
        filename, line = location[0], location[1]
        where = f'{_display(filename)}:{line}'
        if self.included:
            self.private.add(where)
        return where

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
        outer, self._origin = self._origin, 'include' if chain else 'file'
        try:
            if not self._parse(text, str(path), path.parent, chain + (path,)):
                raise SpecError(_display(path), 'the spec is empty (nothing but comments and blank lines)',
                                'write bindings or includes in it, or leave it off the command line')
        finally:
            self._origin = outer

    def parse_binding(self, binding: str):
        self.label = f"binding -b '{binding}'"
        self._origin = 'binding'
        try:
            if not self._parse(binding, None, SPECS_DIR, ()):
                raise SpecError(self.label, 'the binding is empty', "write -b 'scope/Configurable.param = value'")
        finally:
            self.label, self._origin = None, 'file'

    def _parse(self, text: str, filename, folder: Path, chain: tuple) -> int:
        """Parse and apply the statements of one text; returns how many there were (includes count, their
        contents do not)."""
        stream = io.StringIO(text)
        stream.name = filename
        ref, count = [None], 0
        try:
            parser = config_parser.ConfigParser(stream, _Delegate(self, ref))
            ref[0] = parser
            for statement in parser:
                count += 1
                self._apply(statement, folder, chain)
            return count
        except SpecError as e:  # gin appends the offending line to errors raised while it parses: drop it
            raise SpecError(e.where, e.what, e.fix) from None
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
            self.parse_file(resolve_include(st.filename, folder, where, self.included), chain)
        elif isinstance(st, config_parser.ImportStatement):
            raise SpecError(where, f'import {self.quote(st.module)}: specs cannot import modules',
                            'remove the import; the compiler registers every configurable')
        elif isinstance(st, config_parser.BlockDeclaration):
            raise SpecError(where, 'block declarations are not supported', 'write one binding per line')
        elif not st.arg_name:  # a macro definition: NAME = value
            name = f'{st.scope}/{st.selector}' if st.scope else st.selector
            self.macros[name] = where
            self.origin[name] = self._origin
            self._note_macro(name, st.value)
            gin.bind_parameter((name, 'gin.macro', 'value'), st.value)
        else:
            cls = self.configurables.get(st.selector)
            if cls is None:
                raise SpecError(where, f'unknown configurable {self.quote(st.selector)}',
                                _suggest(st.selector, self.configurables, self.included))
            params = [f.name for f in dataclasses.fields(cls) if f.name != 'scope']  # fields() skips ClassVars
            if st.arg_name not in params:
                raise SpecError(where, f"'{st.selector}' has no parameter {self.quote(st.arg_name)}",
                                _suggest(st.arg_name, params, self.included))
            self.locations[(st.scope, st.selector, st.arg_name)] = where
            self.origin[(st.scope, st.selector, st.arg_name)] = self._origin
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


def resolve_include(name: str, folder: Path, where: str, private: bool = False) -> Path:
    """The file an include names; `private`: the include is in an included file, whose text is never echoed."""
    candidates = [folder / name, SPECS_DIR / name]
    for c in candidates:
        if c.is_file():
            return c
    looked = [folder, SPECS_DIR] if private else [c.parent for c in candidates]
    shown = '(text of an included file, not repeated)' if private else f"'{name}'"
    raise SpecError(where, f"include {shown} not found (looked in {', '.join(_display(c) for c in looked)})",
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


def load(files, bindings=(), devices: int = 1) -> Spec:
    """Parse spec files and -b bindings into a validated Plan (Run.steps_scale applied). Raises SpecError on bad
    input; questionable but legal values and bindings without effect are listed in Spec.warnings. `devices`: the
    processes a run splits each batch over (the activation-memory warning is per process)."""
    loader = _parse(files, bindings, plan_mod.CONFIGURABLES)
    _check_references(loader)
    _check_complete(loader, files, bindings)
    built, locations = _construct(loader, 'Plan', bindings)
    operative = gin.operative_config_str()
    warnings = _check_usage(loader, operative, built.family)
    where = lambda owner, name: locate(locations, owner, name)  # noqa: E731
    validate.check(built, where)
    try:
        plan = plan_mod.scale_steps(built)
    except plan_mod.PlanError as e:
        raise SpecError(where(e.owner, e.name), e.message, e.fix)
    warnings += validate.warnings(plan, where, devices=devices)
    return Spec(plan, operative, loader.files, list(bindings), locations, [str(Path(f).resolve()) for f in files],
                warnings, tuple(s.steps for s in built.curriculum))


def build(root: str, configurables: dict, files, bindings=()) -> tuple[object, dict]:
    """Another kind of spec (e.g. runtime.sweep's): parse files and -b bindings that may bind `configurables` with the
    same parser and call the `root` configurable -> (what it built, binding key -> 'file:line')."""
    return _construct(_parse(files, bindings, configurables), root, bindings)


def _parse(files, bindings, configurables: dict) -> _Loader:
    """gin's config cleared, then the files and -b bindings parsed into it; macros checked."""
    gin.clear_config()
    loader = _Loader(configurables)
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise SpecError(str(f), 'spec file not found', 'check the path (specs live in specs/)')
        loader.parse_file(p)
    for b in bindings:
        loader.parse_binding(b)
    for name, where in loader.macro_uses:
        if name not in loader.macros:
            private = where in loader.private
            raise SpecError(where, f"undefined macro {loader.quote('%' + name, where)}",
                            f"define it (`{'NAME' if private else name} = ...`) or include the spec that does; "
                            + _suggest(name, loader.macros, private))
    for name, where in loader.macros.items():  # `A = %B`, `B = %A`: name the line instead of recursing
        chain = [name]
        while loader.via_macro.get(chain[-1]) in loader.macros and chain[-1] not in chain[:-1]:
            chain.append(loader.via_macro[chain[-1]])
        if len(chain) > 1 and chain[-1] == name:
            raise SpecError(where, f"macro '{name}' refers to itself: {' -> '.join(chain)}",
                            'give one of these macros a value')
    return loader


def _construct(loader: _Loader, root: str, bindings) -> tuple[object, dict]:
    """Call the root configurable; a bad value is reported at the binding that set it."""
    locations = loader.resolved_locations()
    try:
        built = gin.get_configurable(root)()
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
    return built, locations


# --- does every binding take effect? -------------------------------------------------------------------------------

_FIELD_TYPES = {name: ' '.join(str(f.type) for f in cls.__dataclass_fields__.values())
                for name, cls in plan_mod.CONFIGURABLES.items()}
# where an instance of each configurable comes from, for "no Data is built" messages
_HOME = {'Plan': 'the root', 'Stack': 'Plan.decoder = @decoder/Stack()', 'Memory': 'Plan.memory = @Memory()',
         'Data': 'Plan.data = @Data()', 'Run': 'Plan.run = @Run()', 'Stage': 'Plan.curriculum = [@name/Stage()]',
         'Objective': 'Stage.objectives = [@kind/Objective()]'}


@functools.cache
def _contains(name: str, seen=()) -> frozenset[str]:
    """The configurables an instance of `name` can build in its own scope (itself, and through its fields' unscoped
    references: a Plan builds everything, a Stage its Objectives)."""
    out = {name}
    for other in plan_mod.CONFIGURABLES:
        if other not in out and other not in seen and re.search(rf'\b{other}\b', _FIELD_TYPES[name]):
            out |= _contains(other, seen + (name,))
    return frozenset(out)


def _under(scope: str, inner: str) -> bool:
    """Does a binding in `scope` reach a call in scope `inner` (gin: every leading part of the call's scope)?"""
    return not scope or inner == scope or inner.startswith(scope + '/')


def _key_text(key) -> str:
    scope, cls, arg = key
    return f"{scope + '/' if scope else ''}{cls}.{arg}"


def _check_references(loader: _Loader) -> None:
    """`@scope/Name()` with nothing bound in `scope` builds a default Name: almost always a misspelt scope."""
    bound = {(s, c) for s, c, _ in loader.locations}
    for r in loader.references:
        if not r.scope or not r.evaluate or (r.name == 'Stack' and r.scope in plan_mod.STACK_ROLES):
            continue  # unscoped references inherit their caller's scope; a stack role may rely on Stack.* alone
        inner = _contains(r.name)
        if any(s and _under(s, r.scope) and c in inner for s, c in bound):
            continue
        scopes = sorted({s for s, c in bound if s and c == r.name})
        if r.where in loader.private:
            raise SpecError(r.where, f'a reference to {r.name} names a scope in which nothing is bound: it would build '
                            f'a default {r.name}', f"scopes with {r.name} bindings: {', '.join(scopes) or 'none'}")
        close = difflib.get_close_matches(r.scope, scopes, n=1)
        raise SpecError(r.where, f"@{r.scope}/{r.name}() names scope '{r.scope}', in which nothing is bound: it would "
                        f'build a default {r.name}',
                        (f"did you mean '@{close[0]}/{r.name}()'? " if close else '')
                        + (f"scopes with {r.name} bindings: {', '.join(scopes)}; " if scopes else '')
                        + f'or bind {r.scope}/{r.name}.<param>, or write @{r.name}() for a default {r.name}')


def _check_complete(loader: _Loader, files, bindings) -> None:
    """A plan that relies on the default family or curriculum was never intended (an include-only spec alone)."""
    where = ', '.join(_display(f) for f in files) or ', '.join(f"-b '{b}'" for b in bindings)
    if any(scope and cls == 'Plan' for scope, cls, _ in loader.locations):
        return  # `x/Plan.family`: a misspelt scope, reported at its line once the plan is built (_check_usage)
    if ('', 'Plan', 'family') not in loader.locations:
        raise SpecError(where, 'no spec binds Plan.family: the plan would silently be a default causal LM',
                        "bind Plan.family (e.g. Plan.family = 'memory'), or pass an include-only spec after a complete "
                        'one (python -m compiler specs/memory_clm.gin specs/base/mixer.gin)')
    if ('', 'Plan', 'curriculum') not in loader.locations:
        raise SpecError(where, 'no spec binds Plan.curriculum: the plan would silently train one default stage',
                        'bind Plan.curriculum = [@name/Stage()] and the stage (name/Stage.steps = ..., ...)')


def _check_usage(loader: _Loader, operative: str, family: str) -> list[validate.SpecWarning]:
    """Every binding against the instances gin built (its operative config): errors for bindings that can only be
    mistakes, warnings for bindings without effect in this plan (see the module docstring)."""
    used_values, used_macros = read_bindings(operative)
    built: dict[str, set[str]] = {}  # configurable -> scopes it was built in
    for key in used_values:
        scoped, _ = key.rsplit('.', 1)
        scope, _, cls = scoped.rpartition('/')
        built.setdefault(cls, set()).add(scope)
    if '' not in built.get('Plan', ()):  # the root is always built: an unreadable record would fail every binding
        raise RuntimeError(f"gin's operative config could not be read back:\n{operative}")
    keys = loader.locations
    unused: dict[str, list] = {}  # scope -> unused bindings in it that are valid (warnings)
    for key, where in keys.items():
        scope, cls, arg = key
        reached = [t for t in built.get(cls, ()) if _under(scope, t)]
        if any(_source_of(t, cls, arg, keys) == scope for t in reached):
            continue
        origin = loader.origin[key]
        if reached:  # every instance it reaches binds arg in a more specific scope
            if origin == 'binding':
                _shadowed(key, where, reached, keys)
            continue  # spec files layer: tiny.gin's Stack.* under decoder/Stack.* is normal
        refs = [r for r in loader.references if _under(scope, r.scope) and cls in _contains(r.name)]
        if refs:
            unused.setdefault(scope, []).append((key, where, refs[0]))
        elif cls == 'Stack' and scope in plan_mod.STACK_ROLES:
            if origin != 'include':  # a base spec configures every role a family might have
                unused.setdefault(scope, []).append((key, where, None))
        else:
            _refuse_no_effect(loader, key, where, built)
    warnings = [_unused_warning(scope, items, family) for scope, items in unused.items()]
    return _check_macros(loader, used_macros) + warnings


def _refuse_no_effect(loader: _Loader, key, where: str, built: dict) -> None:
    """A binding no built instance and no reference reaches: a misspelled scope (did you mean ...) or a configurable
    these specs never build."""
    scope, cls, arg = key
    if not scope:
        raise SpecError(where, f'{_key_text(key)} has no effect: no {cls} is built from these specs',
                        f'bind {_HOME[cls]} (a default {cls} ignores bindings), or remove the binding')
    known = sorted((built.get(cls, set()) | {r.scope for r in loader.references if cls in _contains(r.name)}
                    | (set(plan_mod.STACK_ROLES) if cls == 'Stack' else set())) - {''})
    close = difflib.get_close_matches(scope, known, n=1)
    hint = f"scopes of {cls}: {', '.join(known)}" if known else f'bind {cls}.{arg} without a scope'
    raise SpecError(where, f"{_key_text(key)} has no effect: no {cls} is built in scope '{scope}' and no "
                    f'@{scope}/...() reference names it',
                    (f"did you mean '{close[0]}/{cls}.{arg}'? " if close else '') + hint)


def _shadowed(key, where: str, reached: list, keys: dict):
    """A -b binding every instance it reaches overrides: the user meant it to take effect."""
    scope, cls, arg = key
    winners = sorted({(_source_of(t, cls, arg, keys), cls, arg) for t in reached})
    over = [f'{_key_text(k)} ({keys[k]})' for k in winners]
    example = _key_text((sorted(reached)[0], cls, arg))
    fix = (f"to scale every stage, use -b 'Run.steps_scale = 0.01' (steps and warmup multiplied); or bind each "
           f"scope, e.g. -b '{example} = ...'" if cls == 'Stage' and arg in ('steps', 'warmup')
           else f"bind it in those scopes, e.g. -b '{example} = ...'")
    raise SpecError(where, f"{_key_text(key)} has no effect: every {cls} it reaches sets {arg} in its own scope: "
                    + ', '.join(over), fix)


def _source_of(inner: str, cls: str, arg: str, keys: dict) -> str | None:
    """The scope of the binding that gives an instance built in `inner` its `arg` (gin: the longest bound leading
    part of the scope), None when none does."""
    parts = inner.split('/') if inner else []
    return next(('/'.join(parts[:i]) for i in range(len(parts), -1, -1) if ('/'.join(parts[:i]), cls, arg) in keys),
                None)


def _unused_warning(scope: str, items: list, family: str) -> validate.SpecWarning:
    """One warning for the valid bindings of one scope that take no effect in this plan."""
    keys = ', '.join(_key_text(k) for k, _, _ in items)
    n, them = ('a binding', 'it') if len(items) == 1 else (f'{len(items)} bindings', 'them')
    ref, where = items[0][2], items[0][1]
    if ref is None:
        return validate.SpecWarning(where, f"{n} without effect in this plan: the '{family}' plan has no {scope} "
                                    f'(Plan.{scope} is not set): {keys}',
                                    f'remove {them}, or set Plan.{scope} = @{scope}/Stack() in a family that uses one')
    what = (f"{n} without effect in this plan: nothing is built in scope '{scope}' (the @{ref.scope}/{ref.name}() "
            f'at {ref.where} is not part of the plan): {keys}') if scope else \
        f'{n} without effect in this plan: no {items[0][0][1]} is built: {keys}'
    return validate.SpecWarning(where, what, f'remove {them}, or put the reference back into the plan')


def _check_macros(loader: _Loader, used: dict) -> list[validate.SpecWarning]:
    """A macro no evaluated binding uses: an error on the command line (`-b 'CHUNK = 8'` for CHUNKS), a warning in a
    file unless some binding names it (that binding is then the one without effect)."""
    out = []
    named = {name for name, _ in loader.macro_uses}
    for name, where in loader.macros.items():
        if name in used:
            continue
        if loader.origin[name] == 'binding':
            users = sorted({w for n, w in loader.macro_uses if n == name})
            what = (f"macro '{name}' has no effect: no binding that uses it takes effect ({', '.join(users)})"
                    if users else f"macro '{name}' has no effect: no binding uses %{name}")
            close = difflib.get_close_matches(name, sorted(used), n=1)
            raise SpecError(where, what, (f"did you mean '{close[0]}'? " if close else '')
                            + f"macros in use: {', '.join(sorted(used)) or 'none'}; or bind the parameter itself")
        if name not in named:
            out.append(validate.SpecWarning(where, f"macro '{name}' has no effect: no binding uses %{name}",
                                            'remove it, or use it (param = %' + name + ')'))
    return out


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
