"""Bad specs give one clear message naming the place (file:line or the -b binding) and the fix, exit code 2, no
traceback (compiler/spec.py, compiler/validate.py, `python -m compiler`). Also: include resolution and override
order.

A subprocess whose spec gets as far as the graph check imports torch (~3 s of CPU), so all of them start right after
collection and run beside the other tests (tests/conftest.py). Cases beyond the required table go through the same
entry point in process (compiler.__main__.main), which is the same code minus the process boundary."""
import atexit
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import background_run

from compiler.__main__ import main as compiler_main
from compiler.spec import SPECS_DIR, load

ROOT = SPECS_DIR.parent
S = str(SPECS_DIR)
MARK = '# <-'  # marks the line an error must point at


@dataclass
class Case:
    id: str
    text: str | None  # spec file contents; None: no file of our own
    words: tuple  # must all appear in stderr
    bindings: tuple = ()
    where: str | None = None  # expected location when not a marked line of our file
    files: tuple = ()  # files to pass instead of our own


CASES = [
    Case('unknown_configurable', f"include 'base/tiny.gin'\nPlan.family = 'clm'\nFoo.bar = 1  {MARK}\n",
         ("unknown configurable 'Foo'", 'known names', 'Stack')),
    Case('unknown_parameter', f"include '{S}/clm.gin'\n\ndecoder/Stack.n_layer = 3  {MARK}\n",
         ("'Stack' has no parameter 'n_layer'", "did you mean 'n_layers'")),
    Case('wrong_type', f"include '{S}/clm.gin'\ndecoder/Stack.n_layers = 'two'  {MARK}\nRun.seed = 1\n",
         ("Stack.n_layers = 'two'", 'not an integer')),
    Case('heads_not_dividing', f"include '{S}/clm.gin'\ndecoder/Stack.n_heads = 5  {MARK}\n",
         ('d_model 128 is not divisible by n_heads 5', 'choose n_heads')),
    Case('odd_head_dim', f"include '{S}/clm.gin'\nD_MODEL = 96\ndecoder/Stack.n_heads = 32  {MARK}\n",
         ('head dim 3 is odd', 'rotary')),
    Case('chunks_exceed_context', f"include '{S}/memory_clm.gin'\nMemory.chunk_len = 16  {MARK}\n"
         'decoder/Stack.context = 16\n',
         ('decoder sees 20 positions', '4 chunks x 16 tokens', 'context is 16')),
    Case('freeze_unknown_component', f"include '{S}/memory_clm.gin'\nclm/Stage.freeze = ['encoder.head']  {MARK}\n",
         ("freezes 'encoder.head'", "'memory' graph does not have", 'freeze one of', 'encoder.layers')),
    Case('copy_with_one_chunk', f"include '{S}/clm.gin'\nMemory.chunks = 1  {MARK}\nclm/Objective.kind = 'copy'\n",
         ("objective 'copy'", 'even number >= 2 of chunks', 'got 1')),
    Case('stage_with_zero_steps', f"include '{S}/clm.gin'\nclm/Stage.steps = 0  {MARK}\n",
         ("stage 'clm' has 0 steps", 'at least 1 step')),
    Case('undefined_macro', f"include '{S}/clm.gin'\nclm/Stage.lr = %LEARNING_RATE  {MARK}\n",
         ("undefined macro '%LEARNING_RATE'", 'define it')),
    Case('missing_include', f"# a comment\ninclude 'base/nothere.gin'  {MARK}\n",
         ("include 'base/nothere.gin' not found", 'specs/base')),
    Case('malformed_syntax', f"include 'base/tiny.gin'\ndecoder/Stack.n_layers = = 3  {MARK}\n",
         ('malformed gin',)),
    Case('autoencode_on_clm', f"include '{S}/clm.gin'\nclm/Objective.kind = 'autoencode'  {MARK}\n",
         ("objective 'autoencode' needs an encoder", "the plan is 'clm'")),
    Case('faithful_wrong_objectives', f"include '{S}/memory_clm.gin'\nclm/Stage.normalize = 'faithful'  {MARK}\n",
         ("'faithful'", 'exactly clm and one copy objective', "weighted_sum")),
    Case('init_from_bad_source', f"include '{S}/memory_clm.gin'\n"
         f"clm/Stage.init_from = {{'encoder': 'somewhere'}}  {MARK}\n",
         ("init source 'somewhere'", "'run:<run id>/<stage name>[:<component>]'")),
    Case('duplicate_stage_names', f"include 'base/tiny.gin'\nPlan.family = 'clm'\n"
         f"Plan.curriculum = [@a/Stage(), @b/Stage()]\na/Stage.name = 'warm'\nb/Stage.name = 'warm'  {MARK}\n",
         ("two curriculum stages are named 'warm'", 'unique')),
    Case('negative_noise', f"include '{S}/memory_clm.gin'\nMemory.noise = -0.1  {MARK}\n",
         ('Memory.noise = -0.1 is negative',)),
    Case('variable_slots_mixer_decoder', f"include '{S}/mixer/memory_clm.gin'\nMemory.slots = 'variable'  {MARK}\n",
         ('variable memory slots need attention', "Memory.slots = 'fixed'")),
    Case('missing_spec_file', None, ('spec file not found',), files=('specs/no_such_spec.gin',),
         where='specs/no_such_spec.gin'),
    Case('error_from_binding', None, ("stage 'clm' has -1 steps",), files=('specs/clm.gin',),
         bindings=('clm/Stage.steps = 100', 'clm/Stage.steps = -1'), where="binding -b 'clm/Stage.steps = -1'"),
]


def expected_where(case, path):
    if case.where:
        return case.where
    line = next(i for i, text in enumerate(case.text.splitlines(), 1) if MARK in text)
    return f'{path.name}:{line}'


_folder = None


def start_background():
    """Write the bad specs and start `python -m compiler` on each (see conftest.background_run). Idempotent."""
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix='bad_specs_'))
        atexit.register(shutil.rmtree, _folder, True)  # also when the tests using it are never reached
    for case in CASES:
        path = _folder / f'{case.id}.gin'
        if case.text is not None and not path.exists():
            path.write_text(case.text)
        cmd = [sys.executable, '-m', 'compiler', *(case.files or (str(path),))]
        for b in case.bindings:
            cmd += ['-b', b]
        background_run(('spec_error', case.id), cmd, cwd=ROOT, timeout=300)


@pytest.fixture(scope='module')
def results():
    start_background()
    yield {c.id: (_folder / f'{c.id}.gin', background_run(('spec_error', c.id), None).result()) for c in CASES}
    shutil.rmtree(_folder, ignore_errors=True)


def test_case_table_is_large_enough():
    assert len(CASES) >= 15
    ids = [c.id for c in CASES + EXTRA_CASES]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_spec_exits_2_with_located_message(case, results):
    path, proc = results[case.id]
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert 'Traceback' not in err and 'Traceback' not in proc.stdout
    assert proc.stdout == ''  # nothing half-printed
    assert err.startswith('error: '), err
    assert expected_where(case, path) in err.splitlines()[0], err
    for word in case.words:
        assert word in err, (word, err)
    assert '\n  fix: ' in err


# --- extra cases through the same entry point, in process --------------------------------------------------------

EXTRA_CASES = [
    Case('unknown_reference', f"include 'base/tiny.gin'\nPlan.decoder = @decoder/Stak()  {MARK}\n",
         ("unknown configurable '@decoder/Stak'", "did you mean 'Stack'")),
    Case('copy_with_odd_chunks_via_macro', f"include '{S}/memory_combined.gin'\n# the value comes through %CHUNKS\n"
         f'CHUNKS = 3  {MARK}\n',
         ("objective 'blank_copy'", 'even number', 'got 3', 'macro CHUNKS')),
    Case('error_from_macro_binding', None, ('even number', 'got 5'), files=('specs/memory_combined.gin',),
         bindings=('CHUNKS = 5',), where="binding -b 'CHUNKS = 5'"),
    Case('bad_literal', f"include '{S}/memory_clm.gin'\nMemory.slots = 'flexible'  {MARK}\n",
         ("one of 'fixed', 'variable'",)),
    Case('xformers_on_cpu', f"include '{S}/clm.gin'\nRun.device = 'cpu'\n"
         f"decoder/Stack.attention = 'xformers'  {MARK}\n",
         ('xformers has no CPU kernels', "'sdpa'")),
    Case('init_from_unknown_component', f"include '{S}/memory_clm.gin'\n"
         f"clm/Stage.init_from = {{'encoder.blocks': 'fresh'}}  {MARK}\n",
         ("initialises 'encoder.blocks'",)),
    Case('freeze_everything', f"include '{S}/clm.gin'\nclm/Stage.freeze = ['decoder']  {MARK}\n",
         ('nothing would train',)),
    Case('import_statement', f"import os  {MARK}\ninclude '{S}/clm.gin'\n", ('cannot import modules',)),
    Case('negative_weight', f"include '{S}/memory_clm.gin'\nclm/Objective.weight = -1.0  {MARK}\n",
         ('negative weight',)),
    Case('delimiter_too_long', f"include '{S}/memory_combined.gin'\nblank/Objective.delimiter = 8  {MARK}\n",
         ('delimiter tokens do not fit',)),
    Case('compression_not_dividing', f"include '{S}/memory_clm.gin'\nMemory.compression = 3  {MARK}\n",
         ('does not divide encoder d_model 128',)),
    Case('unclosed_bracket', f"include '{S}/clm.gin'\nRun.seed = 1\nclm/Stage.freeze = ['decoder.head',  {MARK}\n",
         ('malformed gin', 'EOF in multi-line statement', 'close every bracket')),
    Case('binding_malformed', None, ('malformed gin',), files=('specs/clm.gin',),
         bindings=('decoder/Stack.n_layers = (',),
         where="binding -b 'decoder/Stack.n_layers = ('"),
    Case('binding_unknown_parameter', None, ("did you mean 'chunks'",), files=('specs/clm.gin',),
         bindings=('Memory.chunk = 2',),
         where="binding -b 'Memory.chunk = 2'"),
    Case('macro_cycle', None, ("macro 'A' refers to itself: A -> B -> A",), files=('specs/clm.gin',),
         bindings=('A = %B', 'B = %A', 'Run.name = %A'), where="binding -b 'A = %B'"),
    Case('stage_containing_itself', None, ('refers to itself',), files=('specs/clm.gin',),
         bindings=('clm/Stage.objectives = [@clm/Stage()]',), where='specs/clm.gin'),
]


@pytest.mark.parametrize('case', EXTRA_CASES, ids=[c.id for c in EXTRA_CASES])
def test_more_bad_specs_in_process(case, tmp_path, capsys):
    path = tmp_path / f'{case.id}.gin'
    if case.text is not None:
        path.write_text(case.text)
    argv = [str(ROOT / f) for f in case.files] or [str(path)]
    for b in case.bindings:
        argv += ['-b', b]
    with pytest.raises(SystemExit) as e:
        compiler_main(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == '' and 'Traceback' not in out.err
    assert out.err.startswith('error: ') and '\n  fix: ' in out.err
    assert expected_where(case, path) in out.err.splitlines()[0], out.err
    for word in case.words:
        assert word in out.err, (word, out.err)


def test_include_cycle(tmp_path, capsys):
    (tmp_path / 'a.gin').write_text("include 'b.gin'\n")
    (tmp_path / 'b.gin').write_text("include 'a.gin'\n")
    with pytest.raises(SystemExit) as e:
        compiler_main([str(tmp_path / 'a.gin')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'include cycle' in err and 'a.gin -> ' in err and 'b.gin' in err


# --- include resolution and override order ----------------------------------------------------------------------

def test_includes_resolve_from_the_including_folder_first(tmp_path):
    (tmp_path / 'base').mkdir()
    (tmp_path / 'base' / 'tiny.gin').write_text(f"include '{S}/base/tiny.gin'\nD_MODEL = 64\n")
    spec = tmp_path / 'exp.gin'
    spec.write_text("include 'base/tiny.gin'\nPlan.family = 'clm'\n")
    loaded = load([spec])
    assert loaded.plan.decoder.d_model == 64  # the local base/tiny.gin won
    assert str((tmp_path / 'base' / 'tiny.gin').resolve()) in loaded.files


def test_includes_fall_back_to_specs(tmp_path):
    spec = tmp_path / 'exp.gin'
    spec.write_text("include 'base/tiny.gin'\nPlan.family = 'clm'\n")
    loaded = load([spec])
    assert loaded.plan.decoder.d_model == 128
    assert str((SPECS_DIR / 'base' / 'tiny.gin').resolve()) in loaded.files


def test_includes_relative_to_a_nested_spec(tmp_path):
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'common.gin').write_text(f"include '{S}/clm.gin'\nN_LAYERS = 3\n")
    (tmp_path / 'sub' / 'exp.gin').write_text("include '../common.gin'\n")
    assert load([tmp_path / 'sub' / 'exp.gin']).plan.decoder.n_layers == 3


def test_later_bindings_override_spec_values():
    base = load([SPECS_DIR / 'clm.gin']).plan
    assert base.curriculum[0].steps == 300 and base.decoder.n_layers == 2
    plan = load([SPECS_DIR / 'clm.gin'], ['clm/Stage.steps = 5', 'N_LAYERS = 4', 'clm/Stage.steps = 7']).plan
    assert plan.curriculum[0].steps == 7
    assert plan.decoder.n_layers == 4


def test_later_files_override_earlier_ones():
    plan = load([SPECS_DIR / 'memory_clm.gin', SPECS_DIR / 'base' / 'mixer.gin']).plan
    assert plan.decoder.kind == 'mixer' and plan.encoder.kind == 'mixer'
    assert load([SPECS_DIR / 'memory_clm.gin']).plan.decoder.kind == 'transformer'


def test_locations_follow_macros_to_their_definition(tmp_path):
    spec = tmp_path / 'exp.gin'
    spec.write_text(f"include '{S}/memory_clm.gin'\nCHUNKS = 6\n")
    loaded = load([spec])
    where = loaded.locations[('', 'Memory', 'chunks')]
    assert f'{spec.name}:2 (macro CHUNKS' in where
    assert 'tiny.gin:20' in where
    direct = load([SPECS_DIR / 'memory_clm.gin'], ['Memory.chunks = 6'])
    assert direct.locations[('', 'Memory', 'chunks')] == "binding -b 'Memory.chunks = 6'"
