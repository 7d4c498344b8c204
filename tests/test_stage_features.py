"""Per-stage settings of the curriculum: Stage.batch_size (the batch stream is cut per stage; cost model, loader and
checkpoint follow), Stage.weights (one objective weighs differently in two stages)."""
import torch
from conftest import FLAGSHIP, TINY_FLAGSHIP, rt_argv, rt_main, rt_run_dir, rt_run_ids

from compiler import cost
from compiler import objectives as O
from compiler.spec import load
from runtime.examples import Batches, TensorExamples

STAGE_BATCHES = ['autoencode/Stage.batch_size = 8', 'blank/Stage.batch_size = 2', 'copy/Stage.batch_size = 6']


def test_stage_weights_override_the_objective_weight_in_that_stage_only():
    spec = load([FLAGSHIP], ["copy/Stage.weights = {'blank_copy': 0.25, 'clm': 2.0}"])
    by_stage = {s.name: {o.kind: o.weight for o in s.objectives} for s in spec.plan.curriculum}
    assert by_stage['copy'] == {'copy': 0.5, 'blank_copy': 0.25, 'clm': 2.0}
    assert by_stage['blank_copy'] == {'blank_copy': 0.5, 'clm': 1.0}  # the same gin scopes, untouched
    assert by_stage['combined'] == {'clm': 1.0, 'copy': 0.5, 'blank_copy': 0.5}
    copy = spec.plan.curriculum[2]
    losses = {'copy': torch.tensor(1.0), 'blank_copy': torch.tensor(2.0), 'clm': torch.tensor(3.0)}
    assert O.combine(losses, copy).item() == 0.5 * 1 + 0.25 * 2 + 2.0 * 3
    # the weights are in the plan (and its hash); a plan without them keeps the hash it had before the field existed
    assert load([FLAGSHIP]).plan.to_dict()['curriculum'][2].keys() == spec.plan.to_dict()['curriculum'][2].keys() - \
        {'weights'}
    assert load([FLAGSHIP]).hash != spec.hash
    assert type(spec.plan).from_dict(spec.plan.to_dict()) == spec.plan


def test_stage_batch_size_reaches_the_cost_model():
    plan = load([FLAGSHIP], STAGE_BATCHES).plan
    base = load([FLAGSHIP]).plan
    rows = [plan.batch_rows(s) for s in plan.curriculum]
    assert rows == [8, 2, 6, base.data.batch_size]
    tokens = plan.memory.chunks * plan.memory.chunk_len
    per_stage = [c.train_flops_per_token for c in cost.stage_costs(plan)]
    assert cost.training_flops(plan) == sum(s.steps * r * tokens * f
                                            for s, r, f in zip(plan.curriculum, rows, per_stage))
    acts = {c.name: c.activation_bytes for c in cost.stage_costs(plan)}
    assert acts['autoencode'] == cost.activation_bytes(plan, 8, plan.curriculum[0].freeze)


def test_batches_resize_keeps_the_stream_and_cuts_it_anew():
    x = torch.arange(10).view(10, 1, 1)
    m = torch.ones_like(x, dtype=torch.bool)
    a = Batches(TensorExamples(x, m), 4, seed=3)
    whole = torch.cat([next(a)[0] for _ in range(6)]).flatten()  # 24 examples of the stream
    b = Batches(TensorExamples(x, m), 4, seed=3)
    got = []
    for size, steps in ((4, 1), (2, 3), (6, 1), (4, 2)):
        b.resize(size)
        got += [next(b)[0] for _ in range(steps)]
    assert [len(t) for t in got] == [4, 2, 2, 2, 6, 4, 4]
    assert torch.equal(torch.cat(got).flatten(), whole)


def test_a_curriculum_trains_each_stage_on_its_own_batch_and_checkpoints_with_it(tmp_path, rt_cache, monkeypatch):
    import runtime.trainer as R
    seen = []
    real = R.forward_backward

    def spy(step, inner, tokens, mask, *a, **kw):  # the trainer's one train step: what rows each step trains on
        seen.append((inner.stage.name, tokens.shape[0]))
        return real(step, inner, tokens, mask, *a, **kw)

    monkeypatch.setattr(R, 'forward_backward', spy)
    out = tmp_path / 'runs'
    assert rt_main(rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP + STAGE_BATCHES)) == 0
    assert seen == [('autoencode', 8)] * 3 + [('blank_copy', 2)] * 3 + [('copy', 6)] * 2 + [('combined', 4)] * 2
    (run_id,) = rt_run_ids(out)
    ck = torch.load(rt_run_dir(out, run_id) / 'checkpoint.pt', weights_only=True)
    assert ck['data']['batch_size'] == 4  # the last stage's rows (Data.batch_size, BATCH = 4)


def test_a_run_with_stage_batches_killed_mid_curriculum_resumes_to_the_uninterrupted_weights(tmp_path, rt_cache):
    """Killed in its second stage (batch 2, after an autoencode stage of batch 8) and resumed: the data position is
    restored in that stage's rows, and the run ends where the uninterrupted one does."""
    import subprocess
    import sys

    from conftest import ROOT, rt_env
    from safetensors.torch import load_file
    from test_runtime import KILLER, RESUME
    out_a, out_b = tmp_path / 'a', tmp_path / 'b'
    argv_a, argv_b = (rt_argv(FLAGSHIP, o, rt_cache, RESUME + STAGE_BATCHES) for o in (out_a, out_b))
    killed = subprocess.run([sys.executable, '-c', KILLER, *argv_b], cwd=ROOT, env=rt_env(), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode < 0, killed.stderr[-2000:]
    (b_id,) = rt_run_ids(out_b)
    ck = torch.load(rt_run_dir(out_b, b_id) / 'checkpoint.pt', weights_only=True)
    assert ck['stage'] == 1 and ck['data']['batch_size'] == 2  # inside blank_copy, its own rows
    assert rt_main(argv_b + ['--resume', b_id]) == 0
    assert rt_main(argv_a) == 0
    (a_id,) = rt_run_ids(out_a)
    fa, fb = (load_file(rt_run_dir(o, i) / 'final.safetensors') for o, i in ((out_a, a_id), (out_b, b_id)))
    assert fa.keys() == fb.keys() and all(torch.allclose(fa[k], fb[k], rtol=0, atol=1e-6) for k in fa)
