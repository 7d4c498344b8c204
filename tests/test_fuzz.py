"""Spec fuzzing: random mutations of every shipped spec (and of the base specs it includes) never produce a
traceback. Either the spec compiles, or `python -m compiler` prints one clear message (`error: <where>: <what>` and
`  fix: <how>`) and exits 2; and either way it is cheap (compilation builds the graph on the meta device only).

Mutations: deleted, duplicated or truncated lines, values swapped between bindings, values replaced by wrong types,
unknown or undefined names, huge, tiny or negative numbers, broken includes (missing, a folder, a cycle, a binary
file), syntax garbage and non-UTF-8 bytes, in the top-level spec or in any file it includes, plus mutated -b bindings.
A second fuzzer misspells the scopes of bindings and @references (and of -b bindings): those must compile or be
refused with exactly one located message.

The examples run in process through compiler.__main__.main (the CLI minus the process boundary); a few fixed
mutations that once produced tracebacks also run as real `python -m compiler` subprocesses, started in the
background after collection (tests/conftest.py).

Bounded for CI: MEMSPEC_FUZZ_EXAMPLES examples (default 200) in a derandomized order (the same examples every run);
MEMSPEC_FUZZ_RANDOM=1 explores new ones
(`MEMSPEC_FUZZ_EXAMPLES=3000 MEMSPEC_FUZZ_RANDOM=1 pytest tests/test_fuzz.py`)."""
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import background_run
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from compiler.__main__ import main as compiler_main
from compiler.errors import SpecError
from compiler.plan import CONFIGURABLES
from compiler.spec import SPECS_DIR

ROOT = SPECS_DIR.parent
EXAMPLES = int(os.environ.get('MEMSPEC_FUZZ_EXAMPLES', '200'))
RANDOM = os.environ.get('MEMSPEC_FUZZ_RANDOM', '') not in ('', '0')
# CPU seconds of this process (not wall time, which a busy machine stretches): a spec must compile cheaply (the
# slowest shipped spec takes ~1 s); only a blow-up (exponential expansion, a runaway loop) comes near this bound
SLOW = 60.0

# top-level specs (what a user passes), and everything under specs/ (what a mutation may touch through includes)
TOP = sorted(str(p.relative_to(SPECS_DIR)) for p in SPECS_DIR.rglob('*.gin') if p.parent.name != 'base')
ALL = sorted(str(p.relative_to(SPECS_DIR)) for p in SPECS_DIR.rglob('*.gin'))
INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")
BINDING = re.compile(r'^\s*([^#=\s][^=]*?)\s*=\s*(.*?)\s*$')

WRONG_VALUES = [
    "'two'", 'None', 'True', 'False', '[]', '[1, 2]', '{}', "{'encoder': 'fresh'}", "{1: 2}", '(1, 2)',
    '@encoder/Stack()', '@Stack', '@Foo()', '@Memory()', '@clm/Objective()', '[@clm/Stage()]',
    '[@clm/Stage(), @clm/Stage()]', '[@nothere/Stage()]', '%UNDEFINED', '%D_MODEL', '%LR', '%FROZEN',
    '0', '1', '2', '3', '-1', '-7', '1000000000', '999999999', '999999998', '2147483648', '9223372036854775808',
    '-9223372036854775809', '9' * 40, '-' + '9' * 40, '1e999', '-1e999', '1e-300', '0.5', '-0.5', '0.0',
    "'autoencode'", "'blank_copy'", "'retrieval'", "'mixer'", "'xformers'", "'cuda'", "'faithful'", "'variable'",
    "'second_last'", "'repeat'", "'bfloat16'", "'run:0/autoencode'", "'run:0/x:decoder'", "'llama:/nonexistent'",
    "'hub:nothing'", "''", "'none'", "['encoder']", "['decoder', 'encoder']", "['encoder.layers']", "['nothing']",
    '"unterminated', '[1, 2', "'a' 'b'", '= 3', 'gin.REQUIRED', '%gin.REQUIRED',
]
NAMES = sorted(CONFIGURABLES) + ['Foo', 'stack', 'Plan.', 'encoder/Stack.d_modle', 'Stage.stepz', 'a b',
                                 'x/y/z/Stack.d_model', 'Stack.scope', '/Stack.d_model', 'Stack..d_model', 'D_MODEL',
                                 'CHUNKS', 'gin.macro']
GARBAGE = ['=', '[', ']', '(', ')', "'", '"""', '@', '%', '/', '\\', '\t', '\x00', '\u00e9\u4e2d', '# ', 'import os',
           'include', "include 'base/tiny.gin'", 'Stack.d_model = = 1', 'a b c', 'Stack.', '.d_model = 1',
           'scope//Stack.d_model = 1', 'x/y/Stack.d_model=1', 'Plan.family = ', 'Stack.d_model: 1', '{', 'lambda: 1',
           'Stack.d_model = 1; Stack.n_layers = 2', '\\\n', 'gin.enter_interactive_mode()', 'macro = %macro']
BROKEN_INCLUDES = ['nothere.gin', 'base', 'base/', '', '.', '/dev/null', '/nonexistent/x.gin', '../../README.md',
                   'base/nothere.gin', '__SELF__', '__BINARY__', '__PARENT__']

value = st.one_of(st.sampled_from(WRONG_VALUES), st.integers(-2 ** 70, 2 ** 70).map(str),
                  st.floats(allow_nan=False).map(repr), st.text(max_size=8).map(repr))


def includes(folder: Path, rel: str, seen=None) -> list[str]:
    """rel and every spec it includes (transitively), as paths relative to folder (the copied specs/)."""
    seen = [] if seen is None else seen
    if rel in seen:
        return seen
    seen.append(rel)
    path = folder / rel
    for line in path.read_text().splitlines():
        m = INCLUDE.match(line)
        if m:
            for base in (path.parent, folder):
                target = (base / m.group(1)).resolve()
                if target.is_file() and target.is_relative_to(folder):
                    includes(folder, str(target.relative_to(folder)), seen)
                    break
    return seen


def _swap_values(draw, lines: list[str], bindings: list[int]) -> None:
    a, b = draw(st.sampled_from(bindings)), draw(st.sampled_from(bindings))
    (ka, va), (kb, vb) = BINDING.match(lines[a]).groups(), BINDING.match(lines[b]).groups()
    lines[a], lines[b] = f'{ka} = {vb}', f'{kb} = {va}'


def _renamed(draw, line: str) -> str:
    """A binding line with its key replaced by another name, a typo of itself, or another scope."""
    key, val = BINDING.match(line).groups()
    how = draw(st.sampled_from(['name', 'typo', 'scope']))
    if how == 'name':
        key = draw(st.sampled_from(NAMES))
    elif how == 'typo' and key:
        j = draw(st.integers(0, len(key) - 1))
        key = key[:j] + draw(st.sampled_from(['', 'x', '_', '.', '/', ' '])) + key[j + 1:]
    else:
        key = f"{draw(st.sampled_from(['nothere', 'encoder', 'decoder', 'a/b', '']))}/{key.rsplit('/', 1)[-1]}"
    return f'{key} = {val}'


def _include_target(draw, rel: str) -> str:
    target = draw(st.sampled_from(BROKEN_INCLUDES + ALL))
    if target == '__SELF__':
        return Path(rel).name
    if target == '__PARENT__':  # a cycle through another file: include a spec that includes this one
        return '../frozen_encoder_curriculum.gin' if '/' in rel else 'mixer/frozen_encoder_curriculum.gin'
    return '__binary__.gin' if target == '__BINARY__' else target


def _garbage(draw, lines: list[str], i: int) -> None:
    junk = draw(st.one_of(st.sampled_from(GARBAGE), st.text(max_size=12)))
    where = draw(st.sampled_from(['line', 'prefix', 'suffix']))
    if where == 'line' or not lines:
        lines.insert(i, junk)
    elif where == 'prefix':
        lines[i] = junk + lines[i]
    else:
        lines[i] = lines[i] + junk


def _cut(draw, op: str, out: str) -> str | bytes:
    """The text cut short ('truncate'), or its bytes with an invalid UTF-8 sequence inserted ('bytes')."""
    if op == 'truncate':
        return out[:draw(st.integers(0, len(out)))]
    raw = out.encode()
    j = draw(st.integers(0, len(raw)))
    return raw[:j] + draw(st.sampled_from([b'\xff', b'\xc3(', b'\x00', b'\x80\x80'])) + raw[j:]


def mutate(draw, text: str, rel: str) -> str | bytes:
    lines = text.splitlines()
    op = draw(st.sampled_from(['delete', 'duplicate', 'swap', 'value', 'value', 'value', 'rename', 'include',
                               'garbage', 'truncate', 'bytes', 'append']))
    i = draw(st.integers(0, max(0, len(lines) - 1)))
    bindings = [k for k, line in enumerate(lines) if BINDING.match(line) and not line.lstrip().startswith('include')]
    if op == 'delete' and lines:
        del lines[i]
    elif op == 'duplicate' and lines:
        lines.insert(i, lines[i])
    elif op == 'swap' and len(bindings) >= 2:
        _swap_values(draw, lines, bindings)
    elif op == 'value' and bindings:
        k = draw(st.sampled_from(bindings))
        lines[k] = f'{BINDING.match(lines[k]).group(1)} = {draw(value)}'
    elif op == 'rename' and bindings:
        k = draw(st.sampled_from(bindings))
        lines[k] = _renamed(draw, lines[k])
    elif op == 'include':
        lines.insert(i, f"include '{_include_target(draw, rel)}'")
    elif op == 'garbage':
        _garbage(draw, lines, i)
    elif op in ('truncate', 'bytes'):
        return _cut(draw, op, '\n'.join(lines))
    elif op == 'append':
        lines.append(f'{draw(st.sampled_from(NAMES))} = {draw(value)}')
    return '\n'.join(lines) + '\n'


def fuzz(examples: int):
    """The fuzzers' hypothesis settings: `examples` cases, reproducible unless MEMSPEC_FUZZ_RANDOM is set."""
    return settings(max_examples=examples, deadline=None, derandomize=not RANDOM, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@contextlib.contextmanager
def spec_copy():
    """A scratch copy of specs/ that mutations may damage: -> its folder."""
    with tempfile.TemporaryDirectory(prefix='memspec-fuzz-') as tmp:
        folder = Path(tmp) / 'specs'
        shutil.copytree(SPECS_DIR, folder)
        yield folder


def compile_cli(argv: list[str]) -> tuple[int, str, str, float]:
    """compiler.__main__.main(argv) in process -> (exit code, stdout, stderr, CPU seconds). Any exception other than
    SystemExit propagates: that is the traceback a user would have seen."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            compiler_main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue(), time.process_time() - t0


def assert_clear_outcome(code: int, out: str, err: str, seconds: float) -> None:
    assert seconds < SLOW, f'took {seconds:.1f} CPU s: compilation must stay cheap (or refuse the spec)'
    if code == 0:
        assert out.strip(), 'compiled but printed no plan'
        return
    assert code == 2, f'exit {code}, stderr:\n{err}'
    assert 'Traceback' not in err, err
    assert err.startswith('error: ') and err.count('\n  fix: ') == 1, f'not one clear message:\n{err}'


@fuzz(EXAMPLES)
@given(data=st.data())
def test_mutated_specs_compile_or_exit_2_with_one_message(data):
    top = data.draw(st.sampled_from(TOP), label='spec')
    with spec_copy() as folder:
        (folder / '__binary__.gin').write_bytes(bytes(range(256)))
        files = includes(folder, top)
        for _ in range(data.draw(st.integers(1, 3), label='mutations')):
            rel = data.draw(st.sampled_from(files), label='file')
            path = folder / rel
            try:
                text = path.read_text()
            except UnicodeDecodeError:  # an earlier mutation wrote bytes
                text = path.read_bytes().decode('utf-8', 'replace')
            new = mutate(data.draw, text, rel)
            (path.write_bytes if isinstance(new, bytes) else path.write_text)(new)
            note(f'--- {rel}\n{new!r}')
        argv = [str(folder / top)]
        extra = data.draw(st.sampled_from([None, None, None, 'base/mixer.gin', 'base/paper_scale.gin']), label='extra')
        if extra:
            argv.append(str(folder / extra))
        for _ in range(data.draw(st.integers(0, 2), label='bindings')):
            key = data.draw(st.sampled_from(['D_MODEL', 'N_LAYERS', 'N_HEADS', 'CHUNKS', 'CHUNK_LEN', 'VOCAB', 'BATCH',
                                             'decoder/Stack.n_kv_heads', 'encoder/Stack.d_model', 'Memory.compression',
                                             'Stack.mixer_heads', 'Stack.ffn_hidden', 'Stack.context', 'Run.seed',
                                             'Data.val_fraction', 'Objective.ngram'] + NAMES))
            argv += ['-b', f'{key} = {data.draw(value)}']
        note(f'argv: {argv}')
        code, out, err, seconds = compile_cli(argv)
        event('compiled' if code == 0
              else f"refused: {re.sub(r'[^a-z ]', '', err.split(': ', 2)[-1].split(chr(10))[0])[:30]}")
        assert_clear_outcome(code, out, err, seconds)


# ------------------------------------------------------------------------- misspelt scopes and @references (issue 13)
# A scope typo used to compile silently into another experiment. Now each must compile (the typo hit something
# without effect, e.g. a scope another binding also sets) or be refused with exactly one message located at a
# file:line, a -b binding, or the field left at its default that the typo unbound.
SCOPED = re.compile(r'^(\s*)([A-Za-z_][\w/]*)/([A-Z][A-Za-z]*\.\w+\s*=.*)$')  # scope/Configurable.param = value
REFERENCE = re.compile(r'@([A-Za-z_][\w/]*)/([A-Z][A-Za-z]*)\(')  # @scope/Name(
SCOPES = ['encoder', 'decoder', 'ae_decoder', 'clm', 'blank', 'copy', 'combined', 'autoencode', 'ae', 'probe']
LOCATED = re.compile(r"^error: (\S+\.gin:\d+|binding -b '.*?'|[\w/]+\.\w+ \(default\)|[^:\n]+\.gin \(macro )")


def misspell(draw, scope: str) -> str:
    """A typo of a scope name: a letter dropped, doubled, swapped or replaced, another known scope, or none."""
    how = draw(st.sampled_from(['drop', 'double', 'swap', 'replace', 'other', 'none']), label='typo')
    i = draw(st.integers(0, max(0, len(scope) - 2)), label='at')
    if how == 'drop' and len(scope) > 1:
        return scope[:i] + scope[i + 1:]
    if how == 'double':
        return scope[:i] + scope[i] + scope[i:]
    if how == 'swap' and len(scope) > 1:
        return scope[:i] + scope[i + 1] + scope[i] + scope[i + 2:]
    if how == 'replace':
        return scope[:i] + draw(st.sampled_from('aeiouxz_'), label='letter') + scope[i + 1:]
    if how == 'other':
        return draw(st.sampled_from(SCOPES), label='other')
    return ''


def mutate_scope(draw, text: str) -> str | None:
    """Misspell the scope of one scoped binding or one @scope/Name() reference; None when the text has neither."""
    lines = text.splitlines()
    sites = [(k, 'binding', None) for k, line in enumerate(lines) if SCOPED.match(line)]
    sites += [(k, 'reference', m) for k, line in enumerate(lines) for m in REFERENCE.finditer(line)]
    if not sites:
        return None
    k, kind, m = draw(st.sampled_from(sites), label='site')
    if kind == 'binding':
        indent, scope, rest = SCOPED.match(lines[k]).groups()
        new = misspell(draw, scope)
        lines[k] = f"{indent}{new + '/' if new else ''}{rest}"
    else:
        new = misspell(draw, m.group(1))
        lines[k] = f"{lines[k][:m.start()]}@{new + '/' if new else ''}{m.group(2)}({lines[k][m.end():]}"
    note(f'{kind} scope {m.group(1) if m else SCOPED.match(text.splitlines()[k]).group(2)!r} -> {new!r}: {lines[k]}')
    return '\n'.join(lines) + '\n'


SCOPED_BINDINGS = [('Stack', 'n_layers', '3'), ('Stack', 'causal', 'True'), ('Stage', 'steps', '7'),
                   ('Stage', 'lr', '1e-3'), ('Objective', 'weight', '0.5'), ('Objective', 'kind', "'clm'")]


# complete specs: those whose includes bind Plan.family (paper/mixer.gin and the like are include-only, refused alone)
COMPLETE = [t for t in TOP if any('Plan.family' in (SPECS_DIR / f).read_text() for f in includes(SPECS_DIR, t))]


@fuzz(max(1, EXAMPLES // 2))
@given(data=st.data())
def test_misspelt_scopes_and_references_compile_or_exit_2_with_one_located_message(data):
    top = data.draw(st.sampled_from(COMPLETE), label='spec')
    with spec_copy() as folder:
        files = includes(folder, top)
        for _ in range(data.draw(st.integers(1, 2), label='mutations')):
            rel = data.draw(st.sampled_from(files), label='file')
            new = mutate_scope(data.draw, (folder / rel).read_text())
            if new is not None:
                (folder / rel).write_text(new)
        argv = [str(folder / top)]
        if data.draw(st.booleans(), label='binding'):
            cls, param, value = data.draw(st.sampled_from(SCOPED_BINDINGS), label='scoped')
            scope = misspell(data.draw, data.draw(st.sampled_from(SCOPES), label='scope'))
            argv += ['-b', f"{scope + '/' if scope else ''}{cls}.{param} = {value}"]
        note(f'argv: {argv}')
        code, out, err, seconds = compile_cli(argv)
        event('compiled' if code == 0 else f"refused: {re.sub(r'[^a-z ]', '', err.split(': ', 2)[-1])[:30]}")
        assert_clear_outcome(code, out, err, seconds)
        if code == 2:
            assert err.count('error: ') == 1 and LOCATED.match(err), f'not located:\n{err}'


# ------------------------------------------------------------------------------ regressions found by the fuzzer
# Each once gave a traceback (or ran for minutes) instead of a message. In process here; as subprocesses below.
FOUND = {
    'huge_d_model': (['specs/memory_clm.gin', '-b', 'D_MODEL = 1000000000'], 'parameters'),
    'huge_vocab': (['specs/clm.gin', '-b', 'Data.vocab_size = 1000000000000'], 'parameters'),
    'beyond_int64': (['specs/memory_clm.gin', '-b', f"CHUNK_LEN = {'9' * 30}"], 'too large'),
    'negative_kv_heads': (['specs/memory_clm.gin', '-b', 'decoder/Stack.n_kv_heads = -1'],
                          'n_kv_heads must be >= 1, got -1'),
    'odd_d_model': (['specs/clm.gin', '-b', 'D_MODEL = 129'], 'odd'),
    'huge_odd_d_model_heads': (['specs/clm.gin', '-b', 'D_MODEL = 999999998'], 'not divisible by n_heads'),
    'too_many_layers': (['specs/clm.gin', '-b', 'N_LAYERS = 100000'], 'n_layers must be in [1, 1024], got 100000'),
}


@pytest.mark.parametrize('case', sorted(FOUND))
def test_fuzzer_findings_in_process(case):
    argv, needle = FOUND[case]
    code, out, err, seconds = compile_cli(argv)
    assert code == 2, (code, err)
    assert needle in err, err
    assert_clear_outcome(code, out, err, seconds)


SUBPROCESS = ['huge_d_model', 'negative_kv_heads', 'odd_d_model', 'too_many_layers']


def start_background():
    for case in SUBPROCESS:
        background_run(('fuzz', case), [sys.executable, '-m', 'compiler', *FOUND[case][0]], cwd=ROOT, timeout=600)


@pytest.mark.parametrize('case', SUBPROCESS)
def test_fuzzer_findings_as_subprocesses_print_no_traceback(case):
    start_background()  # no-op when already started after collection
    r = background_run(('fuzz', case), None).result()
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith('error: ') and FOUND[case][1] in r.stderr, r.stderr[-3000:]
    assert r.stdout == ''


def test_a_spec_error_is_the_only_exception_load_raises():
    """compiler.spec.load, the library entry point, raises SpecError (never anything else) for the findings."""
    from compiler.spec import load
    for _case, (argv, _) in FOUND.items():
        bindings = [argv[i + 1] for i, a in enumerate(argv) if a == '-b']
        with pytest.raises(SpecError):
            load([argv[0]], bindings)
