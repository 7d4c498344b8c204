"""Every value of a plan is checked and every binding takes effect (issue 13; compiler/validate.py, compiler/spec.py):
each numeric field of each Plan dataclass has a range and refuses a value outside it, names are identifiers,
Run.steps_scale scales a whole curriculum, questionable values and bindings without effect are warnings (shown by
the compile report, printed and recorded by the runtime), shipped specs compile with none, and the compile report
shows objectives as the plan holds them. The exit-2 messages of the real CLI are in tests/test_spec_errors.py."""
import dataclasses
import json
import sqlite3
import typing

import pytest
import torch
from conftest import FLAGSHIP, PRETRAINED, pretrained_bindings, rt_argv, rt_main

from compiler import cost, validate
from compiler import plan as P
from compiler.__main__ import main as compiler_main
from compiler.errors import SpecError
from compiler.spec import SPECS_DIR, load

ROOT = SPECS_DIR.parent
CLASSES = [P.Stack, P.Memory, P.Objective, P.Stage, P.Data, P.Run, P.Plan]
# where a -b binding reaches one instance of each class, on specs/memory_clm.gin (encoder, decoder, one stage)
SCOPE = {P.Stack: 'decoder/', P.Memory: '', P.Objective: 'clm/', P.Stage: 'clm/', P.Data: '', P.Run: ''}
LABEL = {P.Stack: 'decoder ', P.Memory: '', P.Objective: "stage 'clm' objective 'clm': ", P.Stage: "stage 'clm': ",
         P.Data: '', P.Run: ''}


def numeric(cls, name) -> type | None:
    """int or float when the field holds a number (optionally None), else None."""
    tp = typing.get_type_hints(cls)[name]
    kinds = {a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)}
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in (int, float) else None


NUMERIC = [(cls, f.name) for cls in CLASSES for f in dataclasses.fields(cls) if numeric(cls, f.name)]


def test_every_numeric_field_of_every_plan_dataclass_has_a_rule():
    assert len(NUMERIC) >= 30  # the walk found the fields
    for cls in CLASSES:
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(validate.RULES[cls]) == {n for c, n in NUMERIC if c is cls}, cls.__name__
        assert set(validate.RULES[cls]) <= fields


def out_of_range(cls, name) -> list:
    """Values just outside the field's range (and inf for floats), as gin text and as the value the plan holds."""
    rule, kind = validate.RULES[cls][name], numeric(cls, name)
    out = []
    if rule.lo is not None:
        out.append(kind(rule.lo) if rule.lo_open else kind(rule.lo - 1))
    if rule.hi is not None:
        out.append(kind(rule.hi) if rule.hi_open else kind(rule.hi + 1))
    return out + ([float('inf')] if kind is float else [])


@pytest.mark.parametrize('cls,name', NUMERIC, ids=[f'{c.__name__}.{n}' for c, n in NUMERIC])
def test_every_numeric_field_refuses_values_out_of_its_range(cls, name):
    rule = validate.RULES[cls][name]
    assert rule.accepts((rule.lo + rule.hi) / 2 if rule.hi is not None else rule.lo + 1)
    values = out_of_range(cls, name)
    assert values
    for v in values:
        binding = f"{SCOPE[cls]}{cls.__name__}.{name} = {'1e999' if v == float('inf') else repr(v)}"
        with pytest.raises(SpecError) as e:
            load([SPECS_DIR / 'memory_clm.gin'], [binding])
        assert e.value.where == f"binding -b '{binding}'"
        finite = f'{LABEL[cls]}{cls.__name__}.{name} = inf is not a finite number'
        assert e.value.what == (finite if v == float('inf') else
                                f'{LABEL[cls]}{cls.__name__}.{name} must be {rule.describe()}, got {v!r}')
        assert e.value.fix == rule.fix


@pytest.mark.parametrize('cls', [P.Stage, P.Run])
@pytest.mark.parametrize('name', ['../../x', '', '/abs', 'a b', '1st', 'a.b', 'x' * 65, 'é'])
def test_names_used_as_file_and_group_names_must_be_identifiers(cls, name):
    binding = f'{SCOPE[cls]}{cls.__name__}.name = {name!r}'
    with pytest.raises(SpecError, match=f'{cls.__name__}.name = .* is not an identifier') as e:
        load([SPECS_DIR / 'memory_clm.gin'], [binding])
    assert e.value.where == f"binding -b '{binding}'"


def test_identifier_names_up_to_64_characters_are_accepted():
    plan = load([SPECS_DIR / 'memory_clm.gin'], [f"clm/Stage.name = '{'s' * 64}'", "Run.name = '_run_2'"]).plan
    assert plan.stage_names == ('s' * 64,) and plan.run.name == '_run_2'


# --- Run.steps_scale ------------------------------------------------------------------------------------------------

def stages(plan):
    return [(s.steps, s.warmup, s.eval_every) for s in plan.curriculum]


def test_steps_scale_multiplies_steps_and_warmup_and_caps_eval_every():
    base = load([SPECS_DIR / FLAGSHIP.split('/')[-1]])
    assert stages(base.plan) == [(800, 30, 100), (900, 30, 100), (200, 0, 100), (300, 0, 100)]
    small = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'], ['Run.steps_scale = 0.01'])
    assert stages(small.plan) == [(8, 0, 8), (9, 0, 9), (2, 0, 2), (3, 0, 3)]
    assert small.plan.run.steps_scale == 0.01 and small.unscaled_steps == (800, 900, 200, 300)
    assert small.hash != base.hash and small.warnings == []
    tiny = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'], ['Run.steps_scale = 1e-9'])
    assert stages(tiny.plan) == [(1, 0, 1)] * 4  # at least one step
    big = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'], ['Run.steps_scale = 2.5'])
    assert stages(big.plan) == [(2000, 75, 100), (2250, 75, 100), (500, 0, 100), (750, 0, 100)]


def test_steps_scale_is_applied_once(tmp_path):
    spec = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'], ['Run.steps_scale = 0.01'])
    assert P.Plan.from_dict(json.loads(json.dumps(spec.plan.to_dict()))) == spec.plan  # a recorded plan
    op = tmp_path / 'operative.gin'  # a run folder's operative.gin holds the factor and the unscaled steps
    op.write_text(spec.operative)
    assert load([op]).hash == spec.hash


def test_an_integer_in_a_float_field_is_the_same_plan():
    a, b = load([SPECS_DIR / 'clm.gin'], ['clm/Stage.lr = 1.0']), load([SPECS_DIR / 'clm.gin'], ['clm/Stage.lr = 1'])
    assert b.plan.curriculum[0].lr == 1.0 and type(b.plan.curriculum[0].lr) is float and a.hash == b.hash


def test_steps_scale_1_leaves_the_plan_as_written():
    a = load([SPECS_DIR / 'clm.gin'])
    b = load([SPECS_DIR / 'clm.gin'], ['Run.steps_scale = 1'])
    assert a.plan == b.plan and a.hash == b.hash and P.scale_steps(a.plan) is a.plan


def test_steps_scale_beyond_int64_is_refused_at_the_factor():
    with pytest.raises(SpecError, match='beyond the limit 2\\*\\*63') as e:
        load([SPECS_DIR / 'clm.gin'], ['Run.steps_scale = 1e300'])
    assert e.value.where == "binding -b 'Run.steps_scale = 1e300'"


# --- warnings ---------------------------------------------------------------------------------------------------

def warnings_of(files, bindings=(), **kw) -> list[str]:
    return [str(w) for w in load([SPECS_DIR / f for f in files], bindings, **kw).warnings]


def test_questionable_stage_values_are_warnings_at_their_bindings():
    assert warnings_of(['clm.gin'], ['clm/Stage.steps = 10', 'clm/Stage.lr = 2.0', 'clm/Stage.micro_batch = 32']) == [
        "specs/clm.gin:13: stage 'clm': warmup 20 is longer than the stage (10 steps): the learning rate never "
        'reaches Stage.lr = 2\n  fix: shorten the warmup or lengthen the stage (Run.steps_scale scales both)',
        "clm/Stage.eval_every (default): stage 'clm': eval_every 100 is more than its 10 steps: only the stage-end "
        'evaluation runs\n  fix: set eval_every <= 10',
        "binding -b 'clm/Stage.lr = 2.0': stage 'clm': learning rate 2 is >= 1, where AdamW diverges\n"
        '  fix: use e.g. 1e-3',
        "binding -b 'clm/Stage.micro_batch = 32': stage 'clm': micro_batch 32 is not smaller than the batch (32 rows): "
        'it has no effect\n  fix: use fewer rows, or None']


def test_an_enormous_vocabulary_is_a_warning():
    assert warnings_of(['clm.gin'], ['VOCAB = 1000000']) == [
        "binding -b 'VOCAB = 1000000' (macro VOCAB, used at specs/base/tiny.gin:24): Data.vocab_size = 1000000 is "
        'beyond 262144, larger than the vocabularies of current language models\n'
        '  fix: use e.g. 8192 (paper scale) or 32000']


def test_activation_memory_beyond_the_machine_is_one_warning_per_plan():
    spec = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'])
    where = lambda owner, name: f'{type(owner).__name__}.{name}'  # noqa: E731
    need = {s.name: s.activation_bytes for s in cost.stage_costs(spec.plan)}
    assert validate.warnings(spec.plan, where, memory=max(need.values())) == []
    (w,) = validate.warnings(spec.plan, where, memory=min(need.values()))
    assert w.where == 'Data.batch_size' and "stage 'autoencode'; 32 rows" in w.what
    assert f'is more than the {min(need.values()) / 2 ** 30:.1f} GiB of RAM of this machine' in w.what
    assert 'Stage.micro_batch' in w.fix and '--devices N' in w.fix
    # the batch split over 4 processes, or micro-batches of 8 rows, need a quarter: within the same memory
    assert validate.warnings(spec.plan, where, memory=max(need.values()) // 4 + 1, devices=4) == []
    small = load([SPECS_DIR / 'frozen_encoder_curriculum.gin'], ['Stage.micro_batch = 8'])
    assert validate.warnings(small.plan, where, memory=max(need.values()) // 4 + 1) == []
    assert validate.machine_memory() > 2 ** 30


def test_bindings_of_a_stage_dropped_from_the_curriculum_are_warnings():
    w = warnings_of(['frozen_encoder_curriculum.gin'], ['Plan.curriculum = [@autoencode/Stage(), @copy/Stage()]'])
    lines = (SPECS_DIR / 'frozen_encoder_curriculum.gin').read_text().splitlines()
    line = {text.split(' =')[0]: i for i, text in enumerate(lines, 1) if ' = ' in text}  # first line of each binding
    spec = 'specs/frozen_encoder_curriculum.gin'
    ref = line['Plan.curriculum']
    assert w == [
        f"{spec}:{line['blank/Stage.name']}: 6 bindings without effect in this plan: nothing is built in scope "
        f"'blank' (the @blank/Stage() at {spec}:{ref} is not part of the plan): "
        'blank/Stage.name, blank/Stage.steps, blank/Stage.lr, blank/Stage.warmup, blank/Stage.freeze, '
        'blank/Stage.objectives\n  fix: remove them, or put the reference back into the plan',
        f"{spec}:{line['combined/Stage.name']}: 5 bindings without effect in this plan: nothing is built in scope "
        f"'combined' (the @combined/Stage() at {spec}:{ref} is not part of the plan): "
        'combined/Stage.name, combined/Stage.steps, combined/Stage.lr, combined/Stage.freeze, '
        'combined/Stage.objectives\n  fix: remove them, or put the reference back into the plan']
    # the copy stage still uses the clm objective, so clm/Objective.kind has its effect
    w = warnings_of(['frozen_encoder_curriculum.gin'], ['Plan.curriculum = [@autoencode/Stage()]'])
    assert any("nothing is built in scope 'clm'" in x and 'clm/Objective.kind' in x for x in w), w


def test_a_stack_role_the_family_lacks_warns_when_asked_for_and_is_silent_in_a_base_spec(tmp_path):
    assert warnings_of(['clm.gin']) == []  # base/tiny.gin's encoder/Stack.causal: layering
    assert warnings_of(['clm.gin'], ['encoder/Stack.n_layers = 4']) == [
        "binding -b 'encoder/Stack.n_layers = 4': a binding without effect in this plan: the 'clm' plan has no "
        'encoder (Plan.encoder is not set): encoder/Stack.n_layers\n'
        '  fix: remove it, or set Plan.encoder = @encoder/Stack() in a family that uses one']
    own = tmp_path / 'mine.gin'
    own.write_text(f"include '{SPECS_DIR}/clm.gin'\nencoder/Stack.n_layers = 4\n")
    assert len(load([own]).warnings) == 1  # the user's own spec, not a base spec


def test_an_unused_macro_is_a_warning_in_a_file(tmp_path):
    own = tmp_path / 'mine.gin'
    own.write_text(f"include '{SPECS_DIR}/clm.gin'\nLR = 5e-4\n")
    assert [str(w) for w in load([own]).warnings] == [
        f"{own}:2: macro 'LR' has no effect: no binding uses %LR\n  fix: remove it, or use it (param = %LR)"]


def test_an_unscoped_file_binding_that_every_stage_overrides_is_layering():
    assert warnings_of(['paper/clm.gin'], devices=8) == []  # Stage.lr = 2e-4 under clm/Stage.lr = 2e-4


# include-only specs: a complete spec includes them or they are passed after one (their headers say which)
FRAGMENTS = ['base/large_corpus.gin', 'base/memory.gin', 'base/mixer.gin', 'base/paper_scale.gin', 'base/tiny.gin',
             'paper/fineweb.gin', 'paper/mixer.gin', 'paper/scale.gin']
# specs/sweeps/ holds sweep specs (Sweep and Trial, not a Plan): tests/test_sweep.py expands every one
COMPLETE = sorted(f for f in (str(p.relative_to(SPECS_DIR)) for p in SPECS_DIR.rglob('*.gin'))
                  if f not in FRAGMENTS and not f.startswith('sweeps/'))
COMBINED = [('memory_clm.gin', 'base/mixer.gin'), ('frozen_encoder_curriculum.gin', 'base/mixer.gin'),
            ('paper/frozen_encoder_curriculum.gin', 'paper/mixer.gin'), ('memory_clm.gin', 'base/paper_scale.gin'),
            ('memory_clm.gin', 'base/large_corpus.gin')]


@pytest.mark.parametrize('files', [(f,) for f in COMPLETE] + COMBINED, ids=lambda f: '+'.join(f))
def test_shipped_specs_compile_with_no_warning(files, request):
    """Paper-scale specs run under torchrun on 8 devices (their header): each process holds an eighth of the
    batch's activations (13.5 GiB for paper/autoencoder.gin). specs/pretrained/ compile against tiny models of their
    architectures (the hub models are not downloaded)."""
    devices = 8 if any('paper' in f for f in files) else 1
    bindings = pretrained_bindings(files[0], request.getfixturevalue('tiny_models')) if files[0] in PRETRAINED else []
    assert warnings_of(files, bindings, devices=devices) == []


def test_include_only_specs_are_refused_alone():
    assert len(COMPLETE) == 31  # 23, the 5 of specs/pretrained, oracle_memory.gin, paper/oracle_memory.gin and
    # frozen_encoder_visible.gin
    for f in FRAGMENTS:
        with pytest.raises(SpecError, match='no spec binds Plan.family'):
            load([SPECS_DIR / f])


# --- the compile report -----------------------------------------------------------------------------------------

def compile_report(capsys, *argv) -> str:
    compiler_main([str(ROOT / argv[0]), *argv[1:]])
    return capsys.readouterr().out


def test_the_report_shows_objectives_as_the_plan_holds_them(capsys):
    argv = ('specs/memory_combined.gin', '-b', 'combined/Stage.objectives = [@clm/Objective(), @clm/Objective(), '
            '@blank/Objective()]', '-b', 'blank/Objective.weight = 0.25')
    r = json.loads(compile_report(capsys, *argv, '--json'))
    assert r['curriculum'][0]['objectives'] == [['clm', 1.0], ['clm', 1.0], ['blank_copy', 0.25]]
    assert '1*clm + 1*clm + 0.25*blank_copy' in compile_report(capsys, *argv)


def test_the_report_lists_warnings_and_the_step_scaling(capsys):
    argv = ('specs/frozen_encoder_curriculum.gin', '-b', 'Run.steps_scale = 0.01', '-b', 'autoencode/Stage.lr = 3')
    r = json.loads(compile_report(capsys, *argv, '--json'))
    assert r['steps_scale'] == 0.01 and [c['unscaled_steps'] for c in r['curriculum']] == [800, 900, 200, 300]
    assert r['warnings'] == [{'where': "binding -b 'autoencode/Stage.lr = 3'",
                              'what': "stage 'autoencode': learning rate 3 is >= 1, where AdamW diverges",
                              'fix': 'use e.g. 1e-3'}]
    text = compile_report(capsys, *argv)
    assert ('steps x 0.01 (Run.steps_scale; warmup scaled too, eval_every capped at the steps): autoencode 800 -> 8, '
            'blank_copy 900 -> 9, copy 200 -> 2, combined 300 -> 3') in text
    assert text.endswith("\n\nwarning: binding -b 'autoencode/Stage.lr = 3': stage 'autoencode': learning rate 3 is "
                         ">= 1, where AdamW diverges\n  fix: use e.g. 1e-3\n")
    plain = json.loads(compile_report(capsys, 'specs/frozen_encoder_curriculum.gin', '--json'))
    assert plain['warnings'] == [] and plain['steps_scale'] == 1.0
    assert 'warning' not in compile_report(capsys, 'specs/frozen_encoder_curriculum.gin')


def test_devices_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        compiler_main([str(SPECS_DIR / 'clm.gin'), '--devices', '0'])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        'python -m compiler: error: argument --devices: 0 is out of range: give an integer between 1 and 1048576')


# --- the run record ---------------------------------------------------------------------------------------------

def test_a_run_records_its_warnings_in_the_sacred_config(flagship_run):
    expected = [str(w) for w in load([FLAGSHIP], flagship_run.bindings).warnings]
    assert len(expected) == 2  # TINY_FLAGSHIP: 3-step stages under 30 warmup steps
    con = sqlite3.connect(flagship_run.db)
    try:
        (config,), = con.execute('SELECT config FROM run WHERE run_id = ?', (flagship_run.run_id,)).fetchall()
    finally:
        con.close()
    assert json.loads(config)['warnings'] == expected


def test_a_run_prints_its_warnings_once_at_start(tmp_path, rt_cache, capsys):
    argv = rt_argv(FLAGSHIP, tmp_path / 'runs', rt_cache, ['autoencode/Stage.steps = 3'], ['--resume', '999'])
    assert rt_main(argv) == 2  # refused after the start: the warnings came first
    err = capsys.readouterr().err
    warnings = load([FLAGSHIP], ['autoencode/Stage.steps = 3']).warnings
    assert len(warnings) == 2  # warmup 30 and eval_every 100 beyond the 3 steps
    for w in warnings:
        assert err.count(f'warning: {w}\n') == 1
    assert err.count('warning: ') == 2 and err.index('warning: ') < err.index('error: --resume 999')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_run_device_cuda_trains_on_the_gpu_and_its_checkpoint_loads_on_the_cpu(tmp_path, rt_cache):
    from conftest import TINY_FLAGSHIP
    out = tmp_path / 'runs'
    assert rt_main(rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP + ["Run.device = 'cuda'"])) == 0
    from safetensors.torch import load_file
    (folder,) = out.glob('0-*')
    state = torch.load(folder / 'checkpoint.pt', weights_only=True)
    assert 'cuda_rng' in state and state['rng'].device.type == 'cpu'
    shards = {k: v for f in sorted((folder / state['shards']['dir']).glob('*.safetensors'))
              for k, v in load_file(f, device='cpu').items()}  # safetensors: device-free on disk
    assert any(k.startswith('model.') for k in shards) and all(t.device.type == 'cpu' for t in shards.values())
