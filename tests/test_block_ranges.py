"""Block-granular freezing and init_from ('<stack>.layers.I-J'): the research code's "n16" autoencoder ran 8 trained
layers and left 8 random; with block ranges such an encoder is declared, not an accident: some blocks from a run,
the others fresh, any of them frozen. The validator checks the ranges, the cost model counts their share, the runtime
copies exactly those blocks."""
import pytest
import torch
from conftest import PROBE, TINY_PROBE, rt_argv, rt_bindings, rt_main, rt_run_dir, rt_run_ids
from safetensors.torch import load_file

from compiler import cost
from compiler.errors import SpecError
from compiler.model import build
from compiler.spec import load
from runtime.data import prepare

DEEP = ['encoder/Stack.n_layers = 4']


def test_ranges_are_checked_against_the_stack_depth():
    with pytest.raises(SpecError, match=r"freezes 'encoder.layers.2-5', but the encoder has 4 layers \(0-3\)"):
        load([PROBE], DEEP + ["probe/Stage.freeze = ['encoder.layers.2-5']"])
    with pytest.raises(SpecError, match=r"initialises 'encoder.layers.3-1', but the encoder has 4 layers"):
        load([PROBE], DEEP + ["probe/Stage.init_from = {'encoder.layers.3-1': 'fresh'}"])
    plan = load([PROBE], DEEP + ["probe/Stage.freeze = ['encoder.layers.0-1', 'encoder.embedding']"]).plan
    p = cost.params(plan)
    (stage,) = cost.stage_costs(plan)
    assert stage.frozen == p['encoder.embedding'] + p['encoder.layers'] // 2
    model = build(plan)
    from runtime.train import set_frozen
    set_frozen(model, plan.curriculum[0])
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(('encoder.layers.0.', 'encoder.layers.1.', 'encoder.embedding.'))}
    assert sum(model.get_parameter(n).numel() for n in frozen) == stage.frozen


def test_an_encoder_of_trained_and_fresh_blocks(flagship_run, rt_cache):
    out = flagship_run.out_dir
    before = rt_run_ids(out)
    src = f'run:{flagship_run.run_id}/autoencode'
    init = (f"probe/Stage.init_from = {{'encoder.embedding': '{src}', 'encoder.layers.0-1': '{src}', "
            f"'encoder.layers.2-3': '{src}:encoder.layers.0-1', 'encoder.norm': 'fresh'}}")
    argv = rt_argv(PROBE, out, rt_cache, TINY_PROBE + DEEP + [init])
    assert rt_main(argv) == 0
    (probe_id,) = rt_run_ids(out) - before
    probe = load_file(rt_run_dir(out, probe_id) / 'final.safetensors')
    source = load_file(flagship_run.run_dir / 'stages' / 'autoencode.safetensors')
    layer = lambda i: {k.split(f'encoder.layers.{i}.', 1)[1]: v for k, v in source.items()  # noqa: E731
                       if k.startswith(f'encoder.layers.{i}.')}
    for ours, theirs in ((0, 0), (1, 1), (2, 0), (3, 1)):  # blocks 2-3 read the source's blocks 0-1
        for k, v in layer(theirs).items():
            assert torch.equal(probe[f'encoder.layers.{ours}.{k}'], v), (ours, k)
    assert torch.equal(probe['encoder.embedding.weight'], source['encoder.embedding.weight'])
    plan = load([PROBE], rt_bindings(argv)).plan
    fresh = dict(build(plan, prepare(plan, progress=False).vocab_size, seed=plan.run.seed + 1000).named_parameters())
    assert torch.equal(probe['encoder.norm.weight'], fresh['encoder.norm.weight'].detach())
    assert not torch.equal(probe['encoder.norm.weight'], source['encoder.norm.weight'])  # the source's was trained
