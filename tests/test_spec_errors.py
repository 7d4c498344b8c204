"""Bad specs give one clear message naming the place (file:line or the -b binding) and the fix, exit code 2, no
traceback (compiler/spec.py, compiler/validate.py, `python -m compiler`). Also: include resolution and override
order.

EXACT is the table of silent typos and out-of-range values (issue 13: a spec means exactly what it says): each case
runs the real CLI and must print exactly its message.

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
import torch
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
         ("stage 'clm': Stage.steps must be >= 1, got 0", 'at least 1 step')),
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
         ('Memory.noise must be >= 0, got -0.1',)),
    Case('variable_slots_mixer_decoder', f"include '{S}/mixer/memory_clm.gin'\nMemory.slots = 'variable'  {MARK}\n",
         ('variable memory slots need attention', "Memory.slots = 'fixed'")),
    Case('missing_spec_file', None, ('spec file not found',), files=('specs/no_such_spec.gin',),
         where='specs/no_such_spec.gin'),
    Case('error_from_binding', None, ("stage 'clm': Stage.steps must be >= 1, got -1",), files=('specs/clm.gin',),
         bindings=('clm/Stage.steps = 100', 'clm/Stage.steps = -1'), where="binding -b 'clm/Stage.steps = -1'"),
]


def expected_where(case, path):
    if case.where:
        return case.where
    line = next(i for i, text in enumerate(case.text.splitlines(), 1) if MARK in text)
    return f'{path.name}:{line}'


_folder = None


def _bad_spec_folder() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix='bad_specs_'))
        atexit.register(shutil.rmtree, _folder, True)  # also when the tests using it are never reached
    return _folder


def start_background():
    """Write the bad specs and start the CLI on each (see conftest.background_run). Idempotent."""
    _bad_spec_folder()
    start_exact()
    for case in CASES:
        path = _folder / f'{case.id}.gin'
        if case.text is not None and not path.exists():
            path.write_text(case.text)
        cmd = [sys.executable, '-m', 'compiler', *(case.files or (str(path),))]
        for b in case.bindings:
            cmd += ['-b', b]
        background_run(('spec_error', case.id), cmd, cwd=ROOT, timeout=600)


@pytest.fixture(scope='module')
def results():
    start_background()
    yield {c.id: (_folder / f'{c.id}.gin', background_run(('spec_error', c.id), None).result()) for c in CASES}


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


# --- silent typos and out-of-range values: exact messages from the real CLI ----------------------------------------

@dataclass
class Exact:
    id: str
    text: str | None  # spec file contents ({spec} in `message` is its path); None: no file of our own
    message: str  # the whole of stderr
    files: tuple = ()  # files to pass instead of our own
    bindings: tuple = ()
    runtime: bool = False  # python -m runtime.run (checks only the runtime can make), else python -m compiler


SCALE = ("to scale every stage, use -b 'Run.steps_scale = 0.01' (steps and warmup multiplied); or bind each scope, "
         "e.g. -b 'autoencode/Stage.steps = ...'")
NAME_FIX = "use letters, digits and underscores, not starting with a digit, at most 64 characters (e.g. 'blank_copy')"
STAGE_FILE = 'it names the stage weights file (stages/<name>.safetensors) and memory-store group'
_FLAGSHIP_LINES = {ln.split('/')[0]: i for i, ln in enumerate(
    (ROOT / 'specs/frozen_encoder_curriculum.gin').read_text().splitlines(), 1) if '/Stage.steps =' in ln}
FLAGSHIP_STEPS = ', '.join(f'{s}/Stage.steps (specs/frozen_encoder_curriculum.gin:{_FLAGSHIP_LINES[s]})'
                           for s in ('autoencode', 'blank', 'combined', 'copy'))
NO_CUDA = f"torch {torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no usable GPU'}"
CUDA_FIX = "use Run.device = 'auto' (CUDA when available, else CPU) or 'cpu'"


def _msg(where, what, fix):
    return f'error: {where}: {what}\n  fix: {fix}\n'


def _b(binding):
    return f"binding -b '{binding}'"


EXACT = [
    # bindings that silently did nothing: misspelt scopes, references and macros, overridden -b bindings
    Exact('file_scope_typo', f"include '{S}/frozen_encoder_curriculum.gin'\nencodr/Stack.kind = 'mixer'\n",
          _msg('{spec}:2', "encodr/Stack.kind has no effect: no Stack is built in scope 'encodr' and no "
               '@encodr/...() reference names it',
               "did you mean 'encoder/Stack.kind'? scopes of Stack: ae_decoder, decoder, encoder")),
    Exact('binding_scope_typo', None,
          _msg(_b('encodr/Stack.n_layers = 2'), "encodr/Stack.n_layers has no effect: no Stack is built in scope "
               "'encodr' and no @encodr/...() reference names it",
               "did you mean 'encoder/Stack.n_layers'? scopes of Stack: ae_decoder, decoder, encoder"),
          files=('specs/clm.gin',), bindings=('encodr/Stack.n_layers = 2',)),
    Exact('objective_scope_typo', f"include '{S}/memory_combined.gin'\nblnk/Objective.weight = 0.5\n",
          _msg('{spec}:2', "blnk/Objective.weight has no effect: no Objective is built in scope 'blnk' and no "
               '@blnk/...() reference names it',
               "did you mean 'blank/Objective.weight'? scopes of Objective: blank, clm, combined")),
    Exact('reference_scope_typo', f"include '{S}/memory_combined.gin'\n"
          'combined/Stage.objectives = [@clm/Objective(), @blnk/Objective()]\n',
          _msg('{spec}:2', "@blnk/Objective() names scope 'blnk', in which nothing is bound: it would build a default "
               'Objective', "did you mean '@blank/Objective()'? scopes with Objective bindings: blank, clm; or bind "
               'blnk/Objective.<param>, or write @Objective() for a default Objective')),
    Exact('binding_reference_typo', None,
          _msg(_b('Plan.curriculum = [@autoencode/Stage(), @blnk/Stage()]'), "@blnk/Stage() names scope 'blnk', in "
               'which nothing is bound: it would build a default Stage', "did you mean '@blank/Stage()'? scopes with "
               'Stage bindings: autoencode, blank, combined, copy; or bind blnk/Stage.<param>, or write @Stage() for '
               'a default Stage'),
          files=('specs/frozen_encoder_curriculum.gin',),
          bindings=('Plan.curriculum = [@autoencode/Stage(), @blnk/Stage()]',)),
    Exact('shadowed_steps', None,
          _msg(_b('Stage.steps = 5'), 'Stage.steps has no effect: every Stage it reaches sets steps in its own scope: '
               + FLAGSHIP_STEPS, SCALE),
          files=('specs/frozen_encoder_curriculum.gin',), bindings=('Stage.steps = 5',)),
    Exact('shadowed_lr', None,
          _msg(_b('Stage.lr = 1e-3'), 'Stage.lr has no effect: every Stage it reaches sets lr in its own scope: '
               'clm/Stage.lr (specs/memory_clm.gin:8)', "bind it in those scopes, e.g. -b 'clm/Stage.lr = ...'"),
          files=('specs/memory_clm.gin',), bindings=('Stage.lr = 1e-3',)),
    Exact('macro_typo', None,
          _msg(_b('CHUNK = 8'), "macro 'CHUNK' has no effect: no binding uses %CHUNK",
               "did you mean 'CHUNKS'? macros in use: BATCH, CHUNKS, CHUNK_LEN, D_MODEL, KIND, N_HEADS, N_LAYERS, "
               'VOCAB; or bind the parameter itself'),
          files=('specs/clm.gin',), bindings=('CHUNK = 8',)),
    Exact('parameter_typo', None,
          _msg(_b('Memory.chunk = 2'), "'Memory' has no parameter 'chunk'", "did you mean 'chunks'? known names: "
               'chunk_len, chunks, combine, compression, decoder_input, noise, pad, position, slots'),
          files=('specs/clm.gin',), bindings=('Memory.chunk = 2',)),
    Exact('configurable_typo', f"include '{S}/clm.gin'\nStak.d_model = 64\n",
          _msg('{spec}:2', "unknown configurable 'Stak'",
               "did you mean 'Stack'? known names: Backbone, Data, Lora, Memory, Objective, Plan, Run, Stack, Stage")),
    Exact('data_never_built', "Plan.family = 'clm'\nPlan.curriculum = [@s/Stage()]\ns/Stage.name = 's'\n"
          'Data.vocab_size = 4096\n',
          _msg('{spec}:4', 'Data.vocab_size has no effect: no Data is built from these specs',
               'bind Plan.data = @Data() (a default Data ignores bindings), or remove the binding')),
    Exact('empty_spec', '', _msg('{spec}', 'the spec is empty (nothing but comments and blank lines)',
                                 'write bindings or includes in it, or leave it off the command line')),
    Exact('comments_only_spec', '# a spec\n\n   # nothing else\n',
          _msg('{spec}', 'the spec is empty (nothing but comments and blank lines)',
               'write bindings or includes in it, or leave it off the command line')),
    Exact('include_only_spec', None,
          _msg('specs/base/mixer.gin', 'no spec binds Plan.family: the plan would silently be a default causal LM',
               "bind Plan.family (e.g. Plan.family = 'memory'), or pass an include-only spec after a complete one "
               '(python -m compiler specs/memory_clm.gin specs/base/mixer.gin)'),
          files=('specs/base/mixer.gin',)),
    Exact('no_curriculum', f"include '{S}/base/tiny.gin'\nPlan.family = 'clm'\n",
          _msg('{spec}', 'no spec binds Plan.curriculum: the plan would silently train one default stage',
               'bind Plan.curriculum = [@name/Stage()] and the stage (name/Stage.steps = ..., ...)')),
    # values out of range: finite, integer bounds, intervals, identifiers
    Exact('lr_infinite', None, _msg(_b('clm/Stage.lr = 1e999'), "stage 'clm': Stage.lr = inf is not a finite number",
                                    'use e.g. 1e-3'),
          files=('specs/clm.gin',), bindings=('clm/Stage.lr = 1e999',)),
    Exact('noise_infinite', f"include '{S}/memory_clm.gin'\nMemory.noise = -1e999\n",
          _msg('{spec}:2', 'Memory.noise = -inf is not a finite number',
               'use 0 (off) or a positive amplitude such as 0.0625')),
    Exact('norm_eps_infinite', None,
          _msg(_b('Stack.norm_eps = 1e999'), 'decoder Stack.norm_eps = inf is not a finite number',
               'use the default 1e-6'),
          files=('specs/clm.gin',), bindings=('Stack.norm_eps = 1e999',)),
    Exact('seed_negative', None, _msg(_b('Run.seed = -1'), 'Run.seed must be in [0, 4294967295], got -1',
                                      'use a seed in [0, 4294967295]'),
          files=('specs/clm.gin',), bindings=('Run.seed = -1',)),
    Exact('seed_too_large', None, _msg(_b('Run.seed = 4294967296'),
                                       'Run.seed must be in [0, 4294967295], got 4294967296',
                                       'use a seed in [0, 4294967295]'),
          files=('specs/clm.gin',), bindings=('Run.seed = 4294967296',)),
    Exact('stage_name_path', f"include '{S}/clm.gin'\nclm/Stage.name = '../../x'\n",
          _msg('{spec}:2', f"Stage.name = '../../x' is not an identifier, and {STAGE_FILE}", NAME_FIX)),
    Exact('stage_name_empty', None, _msg(_b("clm/Stage.name = ''"),
                                         f"Stage.name = '' is not an identifier, and {STAGE_FILE}", NAME_FIX),
          files=('specs/clm.gin',), bindings=("clm/Stage.name = ''",)),
    Exact('stage_name_absolute', None, _msg(_b("clm/Stage.name = '/abs'"),
                                            f"Stage.name = '/abs' is not an identifier, and {STAGE_FILE}", NAME_FIX),
          files=('specs/clm.gin',), bindings=("clm/Stage.name = '/abs'",)),
    Exact('run_name_space', None, _msg(_b("Run.name = 'my run'"), "Run.name = 'my run' is not an identifier, and it "
                                       'labels the run record and its reports', NAME_FIX),
          files=('specs/clm.gin',), bindings=("Run.name = 'my run'",)),
    Exact('val_fraction_one', None, _msg(_b('Data.val_fraction = 1.0'), 'Data.val_fraction must be in (0, 1), got 1.0',
                                         'use e.g. 0.05'),
          files=('specs/clm.gin',), bindings=('Data.val_fraction = 1.0',)),
    Exact('min_lr_ratio_above_one', None,
          _msg(_b('clm/Stage.min_lr_ratio = 1.5'), "stage 'clm': Stage.min_lr_ratio must be in [0, 1], got 1.5",
               'use a fraction of Stage.lr such as 0.1'),
          files=('specs/clm.gin',), bindings=('clm/Stage.min_lr_ratio = 1.5',)),
    Exact('temperature_zero', None,
          _msg(_b('clm/Objective.temperature = 0'),
               "stage 'clm' objective 'clm': Objective.temperature must be > 0, got 0.0", 'use e.g. 0.02'),
          files=('specs/clm.gin',), bindings=('clm/Objective.temperature = 0',)),
    Exact('warmup_negative', None, _msg(_b('clm/Stage.warmup = -1'), "stage 'clm': Stage.warmup must be >= 0, got -1",
                                        'use 0 (no warmup) or a positive step count'),
          files=('specs/clm.gin',), bindings=('clm/Stage.warmup = -1',)),
    Exact('eval_every_zero', None, _msg(_b('Stage.eval_every = 0'), "stage 'clm': Stage.eval_every must be >= 1, got 0",
                                        'use e.g. 100'),
          files=('specs/clm.gin',), bindings=('Stage.eval_every = 0',)),
    Exact('max_documents_zero', None, _msg(_b('Data.max_documents = 0'), 'Data.max_documents must be >= 1, got 0',
                                           'use None (every document) or a positive count'),
          files=('specs/clm.gin',), bindings=('Data.max_documents = 0',)),
    Exact('context_zero', None, _msg(_b('decoder/Stack.context = 0'), 'decoder Stack.context must be >= 1, got 0',
                                     'use None (any length) or the positions the stack supports'),
          files=('specs/clm.gin',), bindings=('decoder/Stack.context = 0',)),
    Exact('steps_scale_zero', None, _msg(_b('Run.steps_scale = 0'), 'Run.steps_scale must be > 0, got 0.0',
                                         'use e.g. 0.01 for a smoke test, 1 for the spec as written'),
          files=('specs/clm.gin',), bindings=('Run.steps_scale = 0',)),
    Exact('stage_batch_size_zero', None,
          _msg(_b('clm/Stage.batch_size = 0'), "stage 'clm': Stage.batch_size must be >= 1, got 0",
               'use a positive number of rows, or None (Data.batch_size)'),
          files=('specs/clm.gin',), bindings=('clm/Stage.batch_size = 0',)),
    Exact('stage_weights_unknown_kind', None,
          _msg(_b("clm/Stage.weights = {'copy': 0.5}"),
               "Stage.weights weighs 'copy', which stage 'clm' does not train (its objectives: clm)",
               'weigh one of: clm, or add a copy objective to the stage'),
          files=('specs/clm.gin',), bindings=("clm/Stage.weights = {'copy': 0.5}",)),
    Exact('stage_weights_negative', None,
          _msg(_b("clm/Stage.weights = {'clm': -1}"), "Stage.weights gives 'clm' weight -1 in stage 'clm'",
               'use a weight >= 0'),
          files=('specs/clm.gin',), bindings=("clm/Stage.weights = {'clm': -1}",)),
    Exact('all_weights_zero', None, _msg(_b('clm/Objective.weight = 0'),
                                         "stage 'clm': every objective has weight 0: nothing would train",
                                         'give at least one objective a positive weight'),
          files=('specs/clm.gin',), bindings=('clm/Objective.weight = 0',)),
    # only the runtime knows the machine: an unavailable device is refused before anything is recorded
    Exact('device_cuda_binding', None,
          _msg(_b("Run.device = 'cuda'"), f"Run.device = 'cuda' but CUDA is not available here ({NO_CUDA})", CUDA_FIX),
          files=('specs/clm.gin',), bindings=("Run.device = 'cuda'",), runtime=True),
    Exact('device_cuda_file', f"include '{S}/clm.gin'\nRun.device = 'cuda'\n",
          _msg('{spec}:2', f"Run.device = 'cuda' but CUDA is not available here ({NO_CUDA})", CUDA_FIX), runtime=True),
]


def _exact_cmd(case: Exact, path: Path) -> list[str]:
    # -W: sacred's import warns about pkg_resources, which is not the message under test
    cmd = [sys.executable, '-W', 'ignore::UserWarning', '-m', 'runtime.run' if case.runtime else 'compiler',
           *(case.files or (str(path),))]
    for b in case.bindings:
        cmd += ['-b', b]
    if case.runtime:  # a run folder of its own, which must not appear
        cmd += ['-b', f"Run.out_dir = '{path.with_suffix('')}_runs'"]
    return cmd


def start_exact():
    folder = _bad_spec_folder()
    for case in EXACT:
        if case.runtime and torch.cuda.is_available():
            continue  # the device exists: nothing to refuse
        path = folder / f'{case.id}.gin'
        if case.text is not None and not path.exists():
            path.write_text(case.text)
        background_run(('spec_exact', case.id), _exact_cmd(case, path), cwd=ROOT, timeout=600)


def test_exact_table_is_large_enough_and_covers_both_kinds():
    ids = [c.id for c in EXACT]
    assert len(ids) == len(set(ids)) and len(EXACT) >= 25
    assert any(c.files for c in EXACT) and any(c.text for c in EXACT) and any(c.bindings for c in EXACT)


@pytest.mark.parametrize('case', EXACT, ids=[c.id for c in EXACT])
def test_silent_typos_and_out_of_range_values_exit_2_with_their_exact_message(case):
    if case.runtime and torch.cuda.is_available():
        pytest.skip('CUDA is available here: the device is not refused')
    start_exact()  # no-op when already started after collection
    path = _bad_spec_folder() / f'{case.id}.gin'
    proc = background_run(('spec_exact', case.id), None).result()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr == case.message.replace('{spec}', str(path))
    assert 'Traceback' not in proc.stdout and (case.runtime or proc.stdout == '')
    if case.runtime:
        assert not path.with_suffix('').with_name(f'{case.id}_runs').exists()  # nothing recorded, no folder


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
         ("objective 'clm': Objective.weight must be >= 0, got -1.0",)),
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

CLM_STAGE = "Plan.family = 'clm'\nPlan.curriculum = [@s/Stage()]\ns/Stage.name = 's'\n"

def test_includes_resolve_from_the_including_folder_first(tmp_path):
    (tmp_path / 'base').mkdir()
    (tmp_path / 'base' / 'tiny.gin').write_text(f"include '{S}/base/tiny.gin'\nD_MODEL = 64\n")
    spec = tmp_path / 'exp.gin'
    spec.write_text(f"include 'base/tiny.gin'\n{CLM_STAGE}")
    loaded = load([spec])
    assert loaded.plan.decoder.d_model == 64  # the local base/tiny.gin won
    assert str((tmp_path / 'base' / 'tiny.gin').resolve()) in loaded.files


def test_includes_fall_back_to_specs(tmp_path):
    spec = tmp_path / 'exp.gin'
    spec.write_text(f"include 'base/tiny.gin'\n{CLM_STAGE}")
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
