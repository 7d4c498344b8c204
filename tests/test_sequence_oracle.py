"""The research code's oracle (family sequence_oracle, compiler.model.SequenceOracleLM) in its three combination
modes: the cost model equals the built graph, the memory reads the whole sequence (the future included) while the
decoder stays causal over the tokens, each mode combines as the code does, and bad combinations are refused."""
import pytest
import torch
from test_families import IDS, SMALL, compile_family, tokens
from torch.utils.flop_counter import FlopCounterMode

from compiler import cost
from compiler import plan as P
from compiler.errors import SpecError
from compiler.model import build, meta_build
from compiler.spec import load
from runtime.train import forward

MODES = {'token': [], 'add': [], 'concat': ['decoder/Stack.d_model = 64']}


def plan_of(mode, kind='clm'):
    return compile_family('sequence_oracle', kind, f"Memory.combine = '{mode}'", *MODES[mode])


@pytest.mark.parametrize('mode', MODES)
def test_cost_model_equals_the_built_graph(mode):
    plan = plan_of(mode)
    model = build(plan)
    predicted = cost.params(plan)
    built = {c: sum(p.numel() for n, p in model.named_parameters() if n == c or n.startswith(c + '.'))
             for c in predicted}
    assert built == predicted and sum(predicted.values()) == sum(p.numel() for p in model.parameters())
    assert cost.components(plan) == model.components() == meta_build(plan).components()
    assert model.decoder.seq_len == 32 + (mode == 'token') and model.encoder.seq_len == 32
    for kind in ('clm', 'blank_copy'):
        counter = FlopCounterMode(display=False)
        x = tokens(plan)
        with torch.no_grad(), counter:
            forward(model, P.Objective(kind=kind), x, None, IDS)
        counted = sum(v for op, v in counter.get_flop_counts()['Global'].items()
                      if str(op).split('.')[1] in ('mm', 'addmm'))
        assert counted == pytest.approx(sum(cost.forward_flops(plan, kind, attention=False)) * len(x), rel=1e-9)


@pytest.mark.parametrize('mode', MODES)
def test_the_memory_reads_the_future_and_the_decoder_is_causal(mode):
    plan = plan_of(mode)
    model = build(plan).eval()
    x = tokens(plan)
    y = x.clone()
    y[:, -1, -1] = (x[:, -1, -1] + 1) % plan.data.vocab_size  # the very last token
    with torch.no_grad():
        a, b = model(x), model(y)
        assert not torch.allclose(a[:, 0, 0], b[:, 0, 0])  # position 0 already knows the end: the memory
        mem = model.memories(x)
        model.memories = lambda *_: mem  # the same memory for both: only the decoder reads the changed token
        c = model(y)
    assert torch.allclose(a[:, :, :].reshape(2, 32, -1)[:, :31], c.reshape(2, 32, -1)[:, :31], atol=1e-6)


def test_each_mode_combines_the_memory_as_the_research_code_does():
    torch.manual_seed(0)
    x = tokens(plan_of('token'))
    b, t = x.shape[0], x[0].numel()
    for mode in MODES:
        model = build(plan_of(mode)).eval()
        mem = model.memories(x)[:, 0]
        emb = model.decoder.embedding(x.reshape(b, t))
        seq = {'token': torch.cat([mem[:, None], emb], 1),
               'concat': torch.cat([mem[:, None].expand(-1, t, -1), emb], -1),
               'add': emb + mem[:, None]}[mode]
        with torch.no_grad():
            want = model.decoder.head(model.decoder(embeds=seq)[:, -t:])
            got = model(x).reshape(b, t, -1)
        assert torch.allclose(got, want, atol=1e-5), mode
    concat = build(plan_of('concat'))
    assert concat.decoder.embedding.weight.shape[1] == 64 - 32 and concat.memory.proj is None


def test_bad_combinations_are_refused_at_their_binding():
    with pytest.raises(SpecError, match="Memory.combine = 'add' has no meaning for family 'memory'"):
        load(['specs/memory_clm.gin'], SMALL + ["Memory.combine = 'add'"])
    with pytest.raises(SpecError, match='the decoder width 32 holds the memory'):
        compile_family('sequence_oracle', 'clm', "Memory.combine = 'concat'")
    with pytest.raises(SpecError, match="concatenates the encoder's hidden state as it is"):
        compile_family('sequence_oracle', 'clm', "Memory.combine = 'concat'", 'decoder/Stack.d_model = 64',
                       'Memory.compression = 2')


def test_the_shipped_specs_compile_and_the_default_keeps_other_plans_hashes():
    assert load(['specs/oracle_memory.gin']).plan.family == 'sequence_oracle'
    assert 'combine' not in load(['specs/oracle.gin']).plan.to_dict()['memory']
