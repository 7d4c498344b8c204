"""The training step (runtime/train.py) and Run.compile: one compiled graph per (stage, objective) covering example,
embedding, encoder, memories, decoder, head and loss; equal to eager; no recompiles within a stage; no host reads
inside (non-finite losses are watched on the device and read only where the trainer reads the host anyway)."""
import os

import pytest
import torch

from compiler import model as M
from compiler import objectives as O
from compiler import plan as P
from compiler.spec import SPECS_DIR, load
from runtime import step as S
from runtime import train as T

SMALL = ('D_MODEL = 32', 'VOCAB = 64')  # tiny widths; the shipped 4 chunks x 8 tokens stay


def build(spec, *bindings):
    plan = load([SPECS_DIR / spec], SMALL + bindings).plan
    return plan, M.build(plan)


def batch(plan, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, plan.data.vocab_size, (b, plan.memory.chunks, plan.memory.chunk_len), generator=g)


IDS = O.SpecialIds(pad=0, blank=1, copy=2)


def test_compiled_step_trains_like_eager_and_compiles_once_per_stage_and_objective(tmp_path, capsys, monkeypatch):
    """Run.compile = True (runtime.train.compile_step) changes speed, not results: the same losses, accuracies and
    gradients of every parameter as eager, two steps in a row; the second step, on another batch, runs without
    recompiling anything (static shapes per stage); parameter names are untouched (checkpoints stay
    interchangeable); each new (stage, objective) step is reported with its compile time and the inductor cache,
    which is <cache_dir>/inductor and persists on disk."""
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    plan, eager = build('memory_combined.gin')  # clm + blank copy: two objectives, two compiled steps
    _, compiled = build('memory_combined.gin')
    T.compile_step(compiled, tmp_path)
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str((tmp_path / 'inductor').resolve())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    stage = plan.curriculum[0]
    for model in (eager, compiled):
        T.set_frozen(model.train(), stage)
    for i, tokens in enumerate((batch(plan, b=4, seed=1), batch(plan, b=4, seed=2))):
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            stance = torch.compiler.set_stance('fail_on_recompile' if i and model is compiled else 'default')
            with stance:
                loss, losses, accs = S.accumulate(model, stage, tokens, None, IDS)
            results.append((loss, losses, accs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (l0, k0, a0, g0), (l1, k1, a1, g1) = results
        torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
        assert k0.keys() == k1.keys() == a0.keys() == a1.keys() == {'clm', 'blank_copy'}
        for k in k0:
            torch.testing.assert_close(k1[k], k0[k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a1[k], a0[k], atol=0, rtol=0)
        assert g0.keys() == g1.keys() and len(g0) == len(list(eager.parameters()))
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-4, msg=n)
    err = capsys.readouterr().err
    assert err.count('Run.compile: stage ') == 1, err
    assert f"Run.compile: stage {stage.name}, clm, blank_copy on (4, 4, 8): compiled in " in err
    assert f"inductor cache {(tmp_path / 'inductor').resolve()}: " in err
    assert any(p.is_file() for p in (tmp_path / 'inductor').rglob('*'))


def test_compile_step_keeps_an_inductor_cache_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'mine'))
    T.compile_step(build('memory_clm.gin')[1], tmp_path / 'project')
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path / 'mine')


STEP_CASES = [('frozen_encoder_curriculum.gin', (), kind) for kind in ('autoencode', 'blank_copy', 'copy', 'clm')] + [
    ('memory_clm.gin', ("Memory.slots = 'variable'", 'Memory.noise = 0.1'), 'clm'), ('no_memory.gin', (), 'clm'),
    ('oracle.gin', (), 'clm'), ('autoencoder.gin', (), 'autoencode'), ('clm.gin', (), 'clm'),
    ('recurrent.gin', (), 'clm'), ('mixer/memory_clm.gin', (), 'clm')]


@pytest.mark.parametrize('padded', [False, True], ids=['packed', 'padded'])
@pytest.mark.parametrize('spec,bindings,kind', STEP_CASES, ids=[f'{c[0]}-{c[2]}' for c in STEP_CASES])
def test_training_step_traces_into_one_graph(spec, bindings, kind, padded):
    """The compiled region of Run.compile (runtime.train.objective_loss: example, embedding, encoder, memories,
    decoder, head, cross-entropy) is one graph for every family and objective, with or without padding: no graph
    break, so nothing in it reads a tensor on the host (no .item(), bool() or data-dependent shape)."""
    plan, model = build(spec, *bindings)
    tokens = batch(plan)
    mask = None
    if padded:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[0, :, 5:] = False
    ex = torch._dynamo.explain(T.objective_loss)(model.train(), P.Objective(kind=kind), tokens, mask, IDS)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]


def test_divergence_watch_raises_with_the_first_non_finite_losses_only_when_checked():
    watch = T.DivergenceWatch(P.Stage(lr=0.5))
    watch.check()  # nothing added yet
    watch.add(torch.tensor(1.0), {'clm': torch.tensor(1.0)})
    watch.check()
    watch.add(torch.tensor(float('nan')), {'clm': torch.tensor(float('nan'))})  # no exception yet: no host read
    watch.add(torch.tensor(float('inf')), {'clm': torch.tensor(3.0)})
    watch.add(torch.tensor(2.0), {'clm': torch.tensor(2.0)})  # a finite step later does not hide it
    with pytest.raises(T.Divergence, match=r"^loss became nan \(\{'clm': nan\}\); lower Stage.lr \(now 0.5\) or add "
                                           r'warmup$'):
        watch.check()


def test_padding_is_decided_on_the_host_before_the_step():
    mask = torch.ones(2, 4, 8, dtype=torch.bool)
    assert T.padding(None) is None and T.padding(mask) is None  # packed data: the unmasked paths
    mask[1, 2, 5:] = False
    assert T.padding(mask) is mask
