"""Model families (compiler/model.py): chunk isolation, padding invariance, one batched encoder call, Llama
checkpoint equivalence, parameter counts against the cost model and the CLI report, component lists."""
import json
import sys

import pytest
import torch
from conftest import background_run

from compiler import cost
from compiler import model as M
from compiler import plan as P
from compiler.__main__ import main as compiler_main
from compiler.blocks import Stack
from compiler.errors import UserError
from compiler.llama import load_llama
from compiler.spec import SPECS_DIR, load

ROOT = SPECS_DIR.parent
SMALL = ('D_MODEL = 32', 'VOCAB = 64')  # tiny widths; the shipped 4 chunks x 8 tokens stay


def build(spec, *bindings, seed=0):
    plan = load([SPECS_DIR / spec], SMALL + bindings).plan
    return plan, M.build(plan, seed=seed).eval()


def batch(plan, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, plan.data.vocab_size, (b, plan.memory.chunks, plan.memory.chunk_len), generator=g)


def perturb_chunk(tokens, c, vocab):
    out = tokens.clone()
    out[:, c] = (tokens[:, c] + 1 + torch.arange(tokens.shape[-1])) % vocab
    return out


def changed(a, b):
    return (a - b).abs().amax().item() > 1e-4


MEMORY_CASES = [pytest.param('memory_clm.gin', (), id='memory-fixed'),
                pytest.param('memory_clm.gin', ("Memory.slots = 'variable'",), id='memory-variable'),
                pytest.param('mixer/memory_clm.gin', (), id='mixer-memory-fixed')]
NO_MEMORY_CASES = [pytest.param('no_memory.gin', (), id='no_memory-fixed'),
                   pytest.param('no_memory.gin', ("Memory.slots = 'variable'",), id='no_memory-variable'),
                   pytest.param('mixer/no_memory.gin', (), id='mixer-no_memory-fixed')]


@pytest.mark.parametrize('spec,bindings', MEMORY_CASES)
def test_memory_model_chunk_isolation(spec, bindings):
    """Chunk c reaches later chunks only through its memory; earlier chunks never see it; the last chunk forms
    no memory, so perturbing it changes only itself."""
    plan, model = build(spec, *bindings)
    tokens = batch(plan)
    n = plan.memory.chunks
    with torch.no_grad():
        base = model(tokens)
        for c in range(n):
            out = model(perturb_chunk(tokens, c, plan.data.vocab_size))
            torch.testing.assert_close(out[:, :c], base[:, :c], atol=1e-6, rtol=0)
            assert changed(out[:, c], base[:, c])
            for later in range(c + 1, n):
                assert changed(out[:, later], base[:, later]), f'chunk {c} did not reach chunk {later} via memory'


@pytest.mark.parametrize('spec,bindings', NO_MEMORY_CASES)
def test_no_memory_chunks_are_independent(spec, bindings):
    plan, model = build(spec, *bindings)
    tokens = batch(plan)
    with torch.no_grad():
        base = model(tokens)
        for c in range(plan.memory.chunks):
            out = model(perturb_chunk(tokens, c, plan.data.vocab_size))
            others = [i for i in range(plan.memory.chunks) if i != c]
            torch.testing.assert_close(out[:, others], base[:, others], atol=1e-6, rtol=0)
            assert changed(out[:, c], base[:, c])


def pad_rows(tokens, k, side, pad_id=0, seed=5):
    """[B, T] -> [B, T+k] with k padding tokens (random junk ids, to prove they are masked) and the key mask."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randint(0, 40, (tokens.shape[0], k), generator=g)
    mask = torch.ones(tokens.shape[0], tokens.shape[1] + k, dtype=torch.bool)
    if side == 'right':
        mask[:, tokens.shape[1]:] = False
        return torch.cat([tokens, junk], 1), mask
    mask[:, :k] = False
    return torch.cat([junk, tokens], 1), mask


@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
@pytest.mark.parametrize('side', ['left', 'right'])
def test_transformer_stack_padding_invariance(side, causal):
    torch.manual_seed(0)
    stack = Stack(P.Stack(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, causal=causal, attention='sdpa'), 40, 0,
                  head=True)
    M.init_weights(stack)
    tokens = torch.randint(0, 40, (3, 9))
    padded, mask = pad_rows(tokens, 4, side)
    with torch.no_grad():
        ref = stack(tokens)
        out = stack(padded, key_mask=mask)
        no_mask = stack(padded)
    torch.testing.assert_close(out[mask].view(3, 9, -1), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(stack.head(out[mask]), stack.head(ref.reshape(27, -1)), atol=1e-5, rtol=0)
    if side == 'left' or not causal:  # control: without the key mask the padding does leak in
        assert changed(no_mask[mask].view(3, 9, -1), ref)


@pytest.mark.parametrize('spec', ['clm.gin', 'mixer/clm.gin'])
def test_clm_family_right_padding(spec):
    """Right padding: logits on real tokens do not depend on what the padded tail holds. This holds for mixers
    too, but only on the right: a mixer's token-mixing weights are tied to absolute positions, so left padding
    moves every real token to another position and changes its output (left padding is not supported there)."""
    plan, model = build(spec)
    tokens = batch(plan, b=3)
    t = tokens.shape[-1]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 0, t - 5:] = False
    mask[2, 0, t - 11:] = False
    other = torch.where(mask, tokens, torch.randint(3, plan.data.vocab_size, tokens.shape))
    with torch.no_grad():
        a, b = model(tokens, mask), model(other, mask)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-6, rtol=0)
    assert changed(a[~mask], b[~mask])


def test_clm_family_left_and_right_padding_agree():
    """A transformer CLM gives the same logits to r real tokens whether they are left- or right-padded."""
    plan, model = build('clm.gin')
    t, r = plan.memory.chunk_len, 20
    real = batch(plan)[:, :, :r]
    junk = torch.randint(3, 60, (2, 1, t - r))
    right, left = torch.cat([real, junk], -1), torch.cat([junk, real], -1)
    rmask = torch.zeros_like(right, dtype=torch.bool)
    rmask[..., :r] = True
    lmask = rmask.flip(-1)
    with torch.no_grad():
        a, b = model(right, rmask), model(left, lmask)
    torch.testing.assert_close(a[..., :r, :], b[..., t - r:, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize('slots', ['fixed', 'variable'])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_memory_model_padding_invariance(side, slots):
    """Padding inside chunks: memories come from the last real token, and the decoder's logits on real tokens
    equal those of the unpadded chunks."""
    plan, model = build('memory_clm.gin', f"Memory.slots = '{slots}'")
    n, l, r = plan.memory.chunks, plan.memory.chunk_len, 5
    real = batch(plan)[..., :r]
    junk = torch.randint(3, 60, (2, n, l - r))
    mask = torch.zeros(2, n, l, dtype=torch.bool)
    if side == 'right':
        padded = torch.cat([real, junk], -1)
        mask[..., :r] = True
        sl = slice(0, r)
    else:
        padded = torch.cat([junk, real], -1)
        mask[..., l - r:] = True
        sl = slice(l - r, l)
    with torch.no_grad():
        torch.testing.assert_close(model.memories(padded, mask), model.memories(real), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(padded, mask)[:, :, sl], model(real), atol=1e-5, rtol=0)


def test_memory_positions_with_ragged_right_padding():
    """Every chunk its own amount of right padding: each memory equals the encoding of the unpadded chunk."""
    plan, model = build('memory_clm.gin')
    tokens = batch(plan)
    lengths = [[8, 3, 6, 2], [5, 8, 2, 7]]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for b, row in enumerate(lengths):
        for c, r in enumerate(row):
            mask[b, c, :r] = True
    junk = torch.where(mask, tokens, torch.randint(3, 60, tokens.shape))
    with torch.no_grad():
        mem = model.memories(junk, mask)
        for b, row in enumerate(lengths):
            for c, r in enumerate(row[:-1]):
                ref = model.encode(tokens[b:b + 1, c, :r])
                torch.testing.assert_close(mem[b, c], ref[0], atol=1e-5, rtol=0)
        # the memory is the last *real* token's state, not the last position's
        unmasked = model.memories(junk, None)
        assert changed(unmasked[0, 1], mem[0, 1])


@pytest.mark.parametrize('spec,bindings', [('memory_clm.gin', ()), ('memory_clm.gin', ("Memory.slots = 'variable'",)),
                                           ('oracle.gin', ()), ('mixer/memory_clm.gin', ())])
def test_all_chunks_encoded_in_one_call(spec, bindings):
    plan, model = build(spec, *bindings)
    tokens = batch(plan, b=3)
    calls = {'encoder': [], 'decoder': []}
    for name in calls:
        stack = getattr(model, name)
        original = stack.forward

        def counted(*args, _orig=original, _name=name, **kwargs):
            x = args[0] if args else kwargs.get('embeds', kwargs.get('tokens'))
            calls[_name].append(tuple(x.shape[:2]))
            return _orig(*args, **kwargs)
        stack.forward = counted
    with torch.no_grad():
        model(tokens)
    n, l = plan.memory.chunks, plan.memory.chunk_len
    assert len(calls['encoder']) == 1 and len(calls['decoder']) == 1, calls
    expected_enc = (3, n * l) if plan.family == 'oracle' else (3 * (n - 1), l)  # all chunks as one batch
    assert calls['encoder'][0] == expected_enc
    slots = n - 1 if plan.memory.slots == 'variable' else n
    assert calls['decoder'][0] == (3 * n, slots + l)
    with torch.no_grad():
        model(tokens, torch.ones_like(tokens, dtype=torch.bool))
    assert len(calls['encoder']) == 2 and len(calls['decoder']) == 2


@pytest.mark.parametrize('spec,bindings', [('memory_clm.gin', ()), ('memory_clm.gin', ("Memory.slots = 'variable'",)),
                                           ('no_memory.gin', ()), ('oracle.gin', ()), ('recurrent.gin', ()),
                                           ('full_context.gin', ()), ('mixer/memory_clm.gin', ())])
def test_first_chunk_decodes_only_the_later_chunks(spec, bindings):
    """forward(first_chunk=k) == forward()[:, k:] (copy objectives skip the unsupervised first half), and the
    chunked decoder then runs on only B * (N - k) rows."""
    plan, model = build(spec, *bindings)
    tokens = batch(plan, b=3)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 2, 5:] = False
    n = plan.memory.chunks
    with torch.no_grad():
        full = model(tokens, mask)
        for k in (1, n // 2, n - 1):
            part = model(tokens, mask, first_chunk=k)
            assert part.shape == (3, n - k, plan.memory.chunk_len, plan.data.vocab_size)
            torch.testing.assert_close(part, full[:, k:], atol=1e-5, rtol=0)
    if plan.family in ('memory', 'no_memory', 'oracle'):
        rows = []
        original = model.decoder.forward
        model.decoder.forward = lambda *a, **kw: rows.append(kw['embeds'].shape[0]) or original(*a, **kw)
        with torch.no_grad():
            model(tokens, first_chunk=n // 2)
        assert rows == [3 * (n - n // 2)]


# --- Llama checkpoint equivalence -----------------------------------------------------------------------------

LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=100, rms_norm_eps=1e-6, rope_theta=1e4, attn_implementation='eager', tie_word_embeddings=False)


def llama_stack_cfg(**kw):
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, causal=True, rope_theta=1e4,
                norm_eps=1e-6, attention='sdpa')
    base.update(kw)
    return P.Stack(**base)


@pytest.fixture(scope='module')
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():  # non-trivial norm weights, so their mapping is tested too
        for name, p in hf.named_parameters():
            if 'norm' in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return hf


def test_llama_equivalence(hf_llama):
    stack = Stack(llama_stack_cfg(), 100, 0, head=True)
    load_llama(stack, hf_llama.state_dict(), 'tiny-llama')
    stack.eval()
    torch.manual_seed(3)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        hf_out = hf_llama(input_ids=ids, output_hidden_states=True)
        hf_hidden = hf_llama.model(input_ids=ids).last_hidden_state
        ours = stack(ids)
        logits = stack.head(ours)
    torch.testing.assert_close(ours, hf_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, hf_out.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=0)
    # right padding with an attention mask: real positions agree too
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        hf_masked = hf_llama(input_ids=ids, attention_mask=mask.long()).logits
        ours_masked = stack.head(stack(ids, key_mask=mask))
    torch.testing.assert_close(ours_masked[mask], hf_masked[mask], atol=1e-5, rtol=0)


def test_llama_base_model_without_head(hf_llama):
    """A LlamaModel state dict (no lm_head, no 'model.' prefix) loads into a head-less Stack."""
    stack = Stack(llama_stack_cfg(), 100, 0, head=False)
    load_llama(stack, hf_llama.model.state_dict())
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(stack(ids), hf_llama.model(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)


def test_llama_tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(**{**LLAMA, 'tie_word_embeddings': True})).eval()
    state = {k: v for k, v in hf.state_dict().items() if k != 'lm_head.weight'}
    stack = Stack(llama_stack_cfg(), 100, 0, head=True)
    load_llama(stack, state)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(stack.head(stack(ids)), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kw,words', [(dict(n_layers=3), 'lacks'), (dict(n_layers=1), 'no place'),
                                      (dict(n_kv_heads=4), 'k_proj'), (dict(ffn_hidden=96), 'gate_proj')])
def test_mismatched_llama_checkpoint_is_a_spec_error(hf_llama, kw, words):
    stack = Stack(llama_stack_cfg(**kw), 100, 0, head=True)
    before = {k: v.clone() for k, v in stack.state_dict().items()}
    with pytest.raises(UserError, match=words) as e:
        load_llama(stack, hf_llama.state_dict(), 'tiny-llama')
    assert e.value.where == 'tiny-llama'
    for k, v in stack.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k]), k


def test_mismatched_vocabulary_is_a_spec_error(hf_llama):
    stack = Stack(llama_stack_cfg(), 90, 0, head=True)
    with pytest.raises(UserError, match='embedding.weight'):
        load_llama(stack, hf_llama.state_dict())


# --- parameter counts and components ---------------------------------------------------------------------------

SHIPPED = sorted(str(p.relative_to(SPECS_DIR))
                 for p in list(SPECS_DIR.glob('*.gin')) + list(SPECS_DIR.glob('mixer/*.gin')))


def test_shipped_spec_list():
    assert 'memory_clm.gin' in SHIPPED and 'mixer/frozen_encoder_curriculum.gin' in SHIPPED and len(SHIPPED) >= 17


def counts(model, components):
    return {c: sum(p.numel() for _, p in M.parameters_of(model, c)) for c in components}


@pytest.mark.parametrize('spec', SHIPPED)
def test_parameter_counts_match_cost_model_and_report(spec, capsys):
    plan = load([SPECS_DIR / spec]).plan
    model = M.build(plan)
    predicted = cost.params(plan)
    assert sum(p.numel() for p in model.parameters()) == sum(predicted.values())
    assert counts(model, predicted) == predicted
    # the components the cost model lists cover every parameter exactly once
    names = [n for n, _ in model.named_parameters()]
    owners = {n: [c for c in predicted if n == c or n.startswith(c + '.')] for n in names}
    assert all(len(o) == 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) != 1}
    # what `python -m compiler SPEC --json` prints (same entry point, in process)
    compiler_main([str(SPECS_DIR / spec), '--json'])
    report = json.loads(capsys.readouterr().out)
    assert report['components'] == counts(model, report['components'])
    assert report['parameters'] == sum(p.numel() for p in model.parameters())
    for stage, row in zip(plan.curriculum, report['curriculum']):
        frozen = sum(n for c, n in predicted.items() if cost.is_frozen(c, stage.freeze))
        assert row['frozen'] == frozen and row['trainable'] == report['parameters'] - frozen
    # the frozen component list
    assert model.components() == cost.components(plan)
    assert set(predicted) <= set(model.components())


CLI_SPECS = ['mixer/frozen_encoder_curriculum.gin']  # every component kind; all specs run in process above


def start_background():
    """`python -m compiler SPEC --json` in real subprocesses, started after collection (tests/conftest.py)."""
    for spec in CLI_SPECS:
        background_run(('json', spec), [sys.executable, '-m', 'compiler', f'specs/{spec}', '--json'], cwd=ROOT,
                       timeout=600)


@pytest.mark.parametrize('spec', CLI_SPECS)
def test_cli_json_subprocess_counts(spec):
    start_background()
    proc = background_run(('json', spec), None).result()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    model = M.build(load([SPECS_DIR / spec]).plan)
    assert report['components'] == counts(model, report['components'])
    assert report['parameters'] == sum(p.numel() for p in model.parameters())


def test_components_follow_the_graph():
    plan = load([SPECS_DIR / 'frozen_encoder_curriculum.gin']).plan
    comps = cost.components(plan)
    assert comps == ['encoder', 'encoder.embedding', 'encoder.layers', 'encoder.norm', 'memory', 'memory.unroll',
                     'memory.pad', 'decoder', 'decoder.embedding', 'decoder.layers', 'decoder.norm', 'decoder.head',
                     'ae_decoder', 'ae_decoder.layers', 'ae_decoder.norm', 'ae_decoder.head']
    assert cost.components(load([SPECS_DIR / 'clm.gin']).plan) == [
        'decoder', 'decoder.embedding', 'decoder.layers', 'decoder.norm', 'decoder.head']


def test_build_is_seeded_and_leaves_global_rng_alone():
    plan = load([SPECS_DIR / 'memory_clm.gin'], SMALL).plan
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = M.build(plan), M.build(plan), M.build(plan, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


FLOP_CASES = [('clm.gin', 'clm'), ('full_context.gin', 'copy'), ('memory_clm.gin', 'clm'),
              ('memory_clm.gin', 'blank_copy'),
              ('frozen_encoder_curriculum.gin', 'autoencode'), ('no_memory.gin', 'clm'), ('oracle.gin', 'clm'),
              ('recurrent.gin', 'clm'), ('autoencoder.gin', 'autoencode'), ('mixer/memory_clm.gin', 'clm'),
              ('mixer/autoencoder.gin', 'autoencode'), ('autoencoder.gin', 'autoencode', 'Memory.compression = 4'),
              ('memory_clm.gin', 'clm', 'encoder/Stack.d_model = 32', "Memory.position = 'second_last'")]


@pytest.mark.parametrize('case', FLOP_CASES,
                         ids=[f'{c[0]}-{c[1]}' + ('-variant' if len(c) > 2 else '') for c in FLOP_CASES])
def test_cost_model_counts_the_matmul_work_the_graph_does(case):
    """The cost model (what MFU and runtime estimates are computed from) against torch's own FLOP counter on
    the built graph: every matrix product and token convolution of one forward pass. Attention scores are
    left out on both sides (sdpa's CPU kernels count differently)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec, objective, *extra = case
    from compiler import objectives as O
    from runtime.train import forward
    plan, model = build(spec, 'D_MODEL = 64', 'VOCAB = 256', *extra)
    tokens = batch(plan)
    ids = O.SpecialIds(pad=0, blank=2, copy=3)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model, P.Objective(kind=objective), tokens, None, ids)
    counted = sum(v for op, v in counter.get_flop_counts()['Global'].items()
                  if str(op).split('.')[1] in ('mm', 'addmm', 'convolution'))
    expected = sum(cost.forward_flops(plan, objective, attention=False)) * tokens.shape[0]
    assert counted == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('micro', [1, 2, 3])
def test_micro_batches_accumulate_the_gradients_of_the_whole_batch(micro):
    """Stage.micro_batch changes how a step is cut, not what it computes: with packed rows (equal supervised tokens
    per row) the accumulated gradients and the reported loss equal one pass over the whole batch, also when the
    last micro-batch is smaller (micro = 3 of 4 rows)."""
    import dataclasses

    from compiler import objectives as O
    from runtime.step import accumulate
    plan, model = build('memory_combined.gin')
    tokens, ids = batch(plan, b=4), O.SpecialIds(pad=0, blank=1, copy=2)
    whole = dataclasses.replace(plan.curriculum[0], micro_batch=None)
    results = []
    for stage in (whole, dataclasses.replace(whole, micro_batch=micro)):
        model.zero_grad(set_to_none=True)
        loss, losses, _ = accumulate(model.train(), stage, tokens, None, ids)
        results.append((loss, losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, k0, g0), (l1, k1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    assert k0.keys() == k1.keys() == {'clm', 'blank_copy'}
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-4, msg=n)


def test_micro_batch_is_refused_for_retrieval_and_below_one():
    with pytest.raises(UserError, match='micro_batch must be >= 1'):
        load([SPECS_DIR / 'memory_clm.gin'], SMALL + ('clm/Stage.micro_batch = 0',))
    with pytest.raises(UserError, match='negatives are the other rows'):
        load([SPECS_DIR / 'memory_clm.gin'], SMALL + ('clm/Stage.micro_batch = 2', "clm/Objective.kind = 'retrieval'"))
