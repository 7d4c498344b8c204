"""The runtime's train step in every parallel mode and precision (runtime/step.py, runtime/distributed.py) and the
sharded checkpoint (runtime/sharded.py), on the CPU: two gloo processes (torch.multiprocessing.spawn) against one.

DDP and FSDP2 must give the parameters one process gives on the same global batches (fp32, 1e-5): a curriculum with
a frozen decoder, then a frozen encoder, multi-objective stages and gradient accumulation (micro-batches of one row,
gradients synchronised on the last only). FSDP on gloo would sum where it should average (gloo's AVG) without
runtime.distributed.shard's SUM-then-divide: this comparison is what would catch it."""
import json
import socket

import parallel_worker as W
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compiler import plan as P
from compiler.model import build
from compiler.spec import SPECS_DIR, load
from runtime import distributed as D
from runtime import step as S
from runtime.train import optimizer, stage_loss

CURRICULUM = ['autoencode/Stage.steps=2', 'blank/Stage.steps=2', 'copy/Stage.steps=1', 'combined/Stage.steps=2',
              'Stage.micro_batch=1']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(spec, bindings, out, save_at=None, run_dir=None):
    mp.spawn(W.main, args=(2, spec, bindings, str(out), free_port(), save_at, run_dir), nprocs=2)
    return load_file(str(out))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_two_processes_train_like_one(parallel, tmp_path):
    bindings = CURRICULUM + [f"Run.parallel = '{parallel}'"]
    one = W.train(W.plan_of('frozen_encoder_curriculum.gin', bindings)).state_dict()
    two = spawn('frozen_encoder_curriculum.gin', bindings, tmp_path / 'two.safetensors')
    assert max_diff(one, two) < 1e-5
    start = build(W.plan_of('frozen_encoder_curriculum.gin', bindings)).state_dict()
    assert max_diff(start, two) > 1e-3  # it trained


def test_fsdp_checkpoint_resumes_in_one_process_on_the_same_trajectory(tmp_path):
    """A sharded checkpoint written by two FSDP ranks mid-stage (model shards and AdamW moments) is read by one
    process (another world size, no process group), which continues to the weights the two ranks reached."""
    bindings = ['combined/Stage.steps=4', 'Stage.micro_batch=1', "Run.parallel = 'fsdp'"]
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    two = spawn('memory_combined.gin', bindings, tmp_path / 'two.safetensors', (0, 2), str(run_dir))
    resume = json.loads((run_dir / 'resume.json').read_text())
    files = sorted(p.name for p in (run_dir / resume['shards']['dir']).iterdir())
    assert files == ['shard-00001-model-00001-of-00001.safetensors', 'shard-00002-model-00001-of-00001.safetensors']
    assert sorted(resume['shards']['files']) == files
    assert not list(run_dir.glob('.checkpoint.shards.*'))  # the temporary folder was renamed
    one = W.train(W.plan_of('memory_combined.gin', bindings), resume=resume, run_dir=str(run_dir)).state_dict()
    assert max_diff(one, two) < 1e-5


def test_single_process_resume_from_the_sharded_checkpoint_is_exact(tmp_path):
    bindings = ['combined/Stage.steps=4']
    plan = W.plan_of('memory_combined.gin', bindings)
    straight = W.train(plan).state_dict()
    W.train(plan, save_at=(0, 2), run_dir=str(tmp_path))
    resume = json.loads((tmp_path / 'resume.json').read_text())
    resumed = W.train(plan, resume=resume, run_dir=str(tmp_path)).state_dict()
    assert max_diff(straight, resumed) == 0


def test_a_checkpoint_before_the_first_update_keeps_the_optimizer_fresh(tmp_path):
    """A resume point taken before a stage's first update (Ctrl-C or SIGTERM in its first step) has no optimizer
    state: writing it must not give the live optimizer one, and reading it must not make one up (DCP's
    get_state_dict initialises an empty optimizer with a zero-gradient step, which would shift AdamW's bias
    correction), so the resumed step equals the uninterrupted one."""
    from runtime import sharded
    plan = W.plan_of('memory_combined.gin')
    stage = plan.curriculum[0]
    models = [build(plan) for _ in range(2)]
    opts = [optimizer(list(m.parameters()), stage) for m in models]
    manifest = sharded.save(tmp_path, models[0], opts[0][0], 0, 1)
    assert not opts[0][0].state and all(p.grad is None for p in models[0].parameters())
    sharded.load(tmp_path, manifest, models[1], opts[1][0])
    assert not opts[1][0].state
    for model, (opt, sched) in zip(models, opts):
        step = S.TrainStep(model, W.IDS)
        step.stage = stage
        scaler = S.grad_scaler(torch.device('cpu'), 'fp32')
        S.forward_backward(step, step, W.batch(plan, 0, 0), None, scaler)
        S.optimizer_step(opt, sched, scaler, list(model.parameters()))
    assert max_diff(models[0].state_dict(), models[1].state_dict()) == 0


def test_a_damaged_or_missing_shard_is_refused_naming_it(tmp_path):
    from compiler.errors import SpecError
    from runtime import sharded
    W.train(W.plan_of('memory_combined.gin', ['combined/Stage.steps=2']), save_at=(0, 1), run_dir=str(tmp_path))
    manifest = json.loads((tmp_path / 'resume.json').read_text())['shards']
    sharded.verify(tmp_path, manifest, 'where', 'fix')
    (shard,) = (tmp_path / manifest['dir']).iterdir()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(SpecError, match=f'the checkpoint shard {shard} is damaged'):
        sharded.verify(tmp_path, manifest, 'where', 'fix')
    shard.unlink()
    with pytest.raises(SpecError, match=f'the checkpoint shard {shard} is missing'):
        sharded.verify(tmp_path, manifest, 'where', 'fix')


def test_prune_keeps_only_the_committed_shards(tmp_path):
    from runtime import sharded
    for name in ('a', 'b'):
        (tmp_path / sharded.SHARDS / name).mkdir(parents=True)
    (tmp_path / f'.{sharded.SHARDS}.c').mkdir()
    sharded.prune(tmp_path, {'dir': f'{sharded.SHARDS}/b', 'files': {}})
    assert [p.name for p in (tmp_path / sharded.SHARDS).iterdir()] == ['b']
    assert not (tmp_path / f'.{sharded.SHARDS}.c').exists()


# bf16 keeps 8 mantissa bits: a relative error of ~2**-9 per rounding. Over 6 training steps of the tiny model the
# losses of fp32 and bf16 runs from the same weights on the same batches stay within 2e-2 (measured: below 5e-3)
BF16_TOLERANCE = 2e-2


def test_bf16_autocast_trains_within_a_stated_tolerance_of_fp32():
    plan = W.plan_of('memory_combined.gin', ['combined/Stage.steps=6'])
    losses = {}
    for precision in ('fp32', 'bf16'):
        losses[precision] = []
        W.train(plan, precision=precision, losses_out=losses[precision])
    assert len(losses['bf16']) == 6
    diffs = [abs(a - b) for a, b in zip(losses['fp32'], losses['bf16'])]
    assert max(diffs) < BF16_TOLERANCE, diffs
    assert losses['bf16'] != losses['fp32']  # autocast did change the numerics
    assert losses['fp32'][-1] < losses['fp32'][0] and losses['bf16'][-1] < losses['bf16'][0]


def test_bf16_step_runs_its_matmuls_in_bf16_over_fp32_weights():
    plan = W.plan_of('memory_combined.gin')
    model = build(plan)
    step = S.TrainStep(model, W.IDS, 'bf16')
    step.stage = plan.curriculum[0]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, o.dtype)))
             for m in model.decoder.layers[0].children()]  # attention and MLP: their products are bf16
    loss, losses, _ = step(W.batch(plan, 0, 0))
    for h in hooks:
        h.remove()
    assert {d for name, d in seen if name in ('Attention', 'SwiGLU')} == {torch.bfloat16}, seen
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())


def test_fp16_scaler_skips_an_overflowing_step_and_recovers():
    """An inf in a gradient (what an fp16 overflow gives): the update is skipped (weights and AdamW state untouched)
    and the scale halves; the next step updates the weights and keeps the lowered scale."""
    plan = W.plan_of('memory_combined.gin')
    model = build(plan)
    step = S.TrainStep(model, W.IDS, 'fp16')
    stage = step.stage = plan.curriculum[0]
    device = torch.device('cpu')
    scaler = S.grad_scaler(device, 'fp16')
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, stage)
    scale = scaler.get_scale()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    S.forward_backward(step, step, W.batch(plan, 0, 0), None, scaler)
    params[3].grad[0] = float('inf')
    norm = S.optimizer_step(opt, sched, scaler, params)
    assert not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # fused AdamW creates its state and takes the skip inside its kernel: nothing counted, nothing accumulated
    assert all(float(st['step']) == 0 and not st['exp_avg'].any() for st in opt.state.values())
    assert scaler.get_scale() == scale / 2
    opt.zero_grad(set_to_none=True)
    S.forward_backward(step, step, W.batch(plan, 0, 1), None, scaler)
    norm = S.optimizer_step(opt, sched, scaler, params)
    assert torch.isfinite(norm) and scaler.get_scale() == scale / 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp32_step_is_the_plain_step_bit_for_bit():
    """Run.precision = 'fp32' (the default): the TrainStep with its disabled scaler computes exactly what the
    objectives' loss and AdamW compute without it."""
    plan = W.plan_of('memory_combined.gin')
    a, b = build(plan), build(plan)
    stage = plan.curriculum[0]
    step = S.TrainStep(a, W.IDS)
    step.stage = stage
    opt_a, sched_a = optimizer(list(a.parameters()), stage)
    opt_b, sched_b = optimizer(list(b.parameters()), stage)
    scaler = S.grad_scaler(torch.device('cpu'), 'fp32')
    for k in range(2):
        tokens = W.batch(plan, 0, k)
        S.forward_backward(step, step, tokens, None, scaler)
        S.optimizer_step(opt_a, sched_a, scaler, list(a.parameters()))
        stage_loss(b, stage, tokens, None, W.IDS)[0].backward()
        torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
        opt_b.step()
        sched_b.step()
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_activation_checkpointing_keeps_names_and_gradients():
    plan = W.plan_of('memory_combined.gin', ['Run.activation_checkpointing = True'])
    plain, ckpt = build(plan), build(plan)
    D.checkpoint_blocks(ckpt)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    for model in (plain, ckpt):
        step = S.TrainStep(model, W.IDS)
        step.stage = plan.curriculum[0]
        step(W.batch(plan, 0, 0))[0].backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_new_run_settings_leave_existing_plan_hashes_alone():
    spec = SPECS_DIR / 'memory_clm.gin'
    default = load([spec])
    assert not {'precision', 'parallel', 'activation_checkpointing'} & set(default.plan.to_dict()['run'])
    for binding, value in (("Run.precision = 'bf16'", 'bf16'), ("Run.parallel = 'fsdp'", 'fsdp'),
                           ('Run.activation_checkpointing = True', True)):
        other = load([spec], [binding])
        assert other.hash != default.hash
        key = binding.split('.')[1].split(' ')[0]
        assert other.plan.to_dict()['run'][key] == value
        assert P.Plan.from_dict(other.plan.to_dict()) == other.plan
    assert P.Plan.from_dict(default.plan.to_dict()).run.precision == 'fp32'


def test_cost_model_activation_bytes_follow_precision_and_checkpointing():
    from compiler import cost
    spec = SPECS_DIR / 'memory_clm.gin'
    fp32, bf16 = (load([spec], [f"Run.precision = '{p}'"]).plan for p in ('fp32', 'bf16'))
    assert cost.activation_bytes(bf16, 8) * 2 == cost.activation_bytes(fp32, 8)
    deep, ac = (load([spec], ['N_LAYERS = 8'] + b).plan for b in ([], ['Run.activation_checkpointing = True']))
    assert cost.activation_bytes(ac, 8) < cost.activation_bytes(deep, 8) / 2  # each block keeps its input only


def test_validator_warns_where_a_precision_is_slow_on_the_chosen_device():
    spec = SPECS_DIR / 'memory_clm.gin'
    for precision, what in (('bf16', 'bf16 autocast on the CPU is often slower than fp32'),
                            ('fp16', 'fp16 autocast on the CPU has fast kernels only with AVX512-FP16')):
        (w,) = [w for w in load([spec], [f"Run.precision = '{precision}'", "Run.device = 'cpu'"]).warnings
                if 'precision' in w.what]
        assert w.what.startswith(f"Run.precision = '{precision}' with Run.device = 'cpu': {what}")
        assert w.fix.startswith("use Run.precision = 'fp32' on the CPU")
    assert not [w for w in load([spec], ["Run.device = 'cpu'"]).warnings if 'precision' in w.what]
