"""Building blocks (compiler/blocks.py, compiler/memory.py): causality of every causal block and backend, the
masked mixer's functional mask and its heads, declared depths of built families, unroll windows."""
import pytest
import torch
import torch.nn.functional as F

from compiler import model as M
from compiler import plan as P
from compiler.attention import xformers_problem
from compiler.blocks import MaskedTokenConv, Stack
from compiler.families import needs_ae_decoder
from compiler.memory import MemoryModule, unroll_index
from compiler.spec import SPECS_DIR, load

VOCAB, L, D = 50, 10, 32

BACKENDS = ['sdpa', 'auto'] + (['xformers'] if torch.cuda.is_available()
                               and xformers_problem(torch.device('cuda', 0)) is None else [])
CAUSAL_CONFIGS = (
    [pytest.param(dict(kind='mixer', mixer_kernel=k), id=f'mixer-k{k}') for k in (1, 4, 8)]
    + [pytest.param(dict(kind='mixer', mixer_kernel=k, mixer_heads=4), id=f'mixer-4heads-k{k}') for k in (1, 4)]
    + [pytest.param(dict(kind='transformer', attention=b), id=f'transformer-{b}') for b in BACKENDS]
    + [pytest.param(dict(kind='transformer', attention='sdpa', n_kv_heads=2), id='transformer-gqa')]
)


def stack_cfg(**kw):
    base = dict(d_model=D, n_layers=2, n_heads=4, causal=True)
    base.update(kw)
    return P.Stack(**base)


def make_stack(cfg, seq_len=L, seed=0):
    torch.manual_seed(seed)
    stack = Stack(cfg, VOCAB, seq_len)
    M.init_weights(stack)
    return stack.eval()


def device_for(cfg):
    return 'cuda' if cfg.attention == 'xformers' else 'cpu'


@pytest.mark.parametrize('t', [0, 3, L - 1])
@pytest.mark.parametrize('kw', CAUSAL_CONFIGS)
def test_causal_blocks_do_not_look_ahead(kw, t):
    cfg = stack_cfg(**kw)
    dev = device_for(cfg)
    stack = make_stack(cfg).to(dev)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, L), generator=g)
    perturbed = tokens.clone()
    perturbed[:, t] = (tokens[:, t] + 1 + torch.arange(3)) % VOCAB
    with torch.no_grad():
        a, b = stack(tokens.to(dev)).cpu(), stack(perturbed.to(dev)).cpu()
    tol = 1e-5 if dev == 'cuda' else 1e-6
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=tol, rtol=0)
    assert (a[:, t] - b[:, t]).abs().amax(-1).min() > 1e-4  # position t itself does see the change


@pytest.mark.parametrize('kw', [dict(kind='mixer', mixer_kernel=4), dict(kind='mixer', mixer_heads=4),
                                dict(kind='transformer', attention='sdpa')],
                         ids=['mixer', 'mixer-4heads', 'transformer'])
def test_bidirectional_blocks_do_look_ahead(kw):
    """Control for the causality test: the same check must fail when the stack is not causal."""
    stack = make_stack(stack_cfg(causal=False, **kw))
    tokens = torch.randint(0, VOCAB, (2, L))
    perturbed = tokens.clone()
    perturbed[:, 5] = (tokens[:, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = stack(tokens), stack(perturbed)
    assert (a[:, :5] - b[:, :5]).abs().amax() > 1e-4


def test_multihead_mixer_heads_differ():
    h, dh = 4, D // 4
    torch.manual_seed(0)
    conv = MaskedTokenConv(stack_cfg(kind='mixer', mixer_heads=h, mixer_kernel=3), L)
    w = conv.weight.detach().view(h, L, L, 3)
    for i in range(h):
        for j in range(i + 1, h):
            assert not torch.allclose(w[i], w[j]), f'heads {i} and {j} share their convolution weights'
    with torch.no_grad():
        conv.bias.normal_()  # distinct per-head biases too
        conv.proj_in.weight.copy_(torch.eye(D))
        conv.proj_out.weight.copy_(torch.eye(D))
        x_head = torch.randn(2, L, dh)
        x = x_head.repeat(1, 1, h)  # every head gets the same input slice ...
        y = conv(x)
    outs = y.view(2, L, h, dh)
    for i in range(h):  # ... and each head computes its own masked convolution of it
        ref = F.conv1d(x_head, conv.weight[i * L:(i + 1) * L] * conv.mask[:L], conv.bias[i * L:(i + 1) * L],
                       padding='same')
        torch.testing.assert_close(outs[:, :, i], ref, atol=1e-6, rtol=0)
        for j in range(i + 1, h):
            assert (outs[:, :, i] - outs[:, :, j]).abs().amax() > 1e-3


def test_multihead_mixer_output_depends_on_head_assignment():
    """Swapping two heads' convolutions changes the output (heads are not interchangeable copies)."""
    torch.manual_seed(0)
    conv = MaskedTokenConv(stack_cfg(kind='mixer', mixer_heads=4), L)
    x = torch.randn(2, L, D)
    with torch.no_grad():
        y = conv(x)
        w = conv.weight.view(4, L, L, 1).clone()
        conv.weight.copy_(w[[1, 0, 2, 3]].reshape_as(conv.weight))
        y_swapped = conv(x)
    assert (y - y_swapped).abs().amax() > 1e-3


@pytest.mark.parametrize('heads', [1, 4])
def test_mixer_mask_is_functional(heads):
    """An optimizer step may move the masked-out (upper-triangular) entries of `weight`; masking happens in
    forward, so the output stays causal and the stored weight is never overwritten by the mask."""
    torch.manual_seed(0)
    conv = MaskedTokenConv(stack_cfg(kind='mixer', mixer_heads=heads, mixer_kernel=4), L)
    upper = ~torch.ones(L, L, dtype=torch.bool).tril()
    upper_h = upper.repeat(heads, 1)
    before = conv.weight.detach().clone()
    assert before[upper_h].abs().sum() > 0  # init filled the masked entries; masking did not zero them
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    x = torch.randn(4, L, D)
    conv(x).pow(2).mean().backward()
    assert conv.weight.grad[upper_h].abs().max() == 0  # no gradient through masked entries
    opt.step()
    after = conv.weight.detach()
    assert not torch.equal(after[upper_h], before[upper_h])  # weight decay moved them ...
    assert after[upper_h].abs().sum() > 0  # ... and nothing zeroed them
    assert not torch.equal(after[~upper_h], before[~upper_h])  # the causal entries trained
    with torch.no_grad():
        conv.weight[upper_h] = 1e3  # even huge masked-out entries change nothing
        y = conv(x)
        x2 = x.clone()
        x2[:, 6:] += 5.0
        y2 = conv(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], atol=1e-5, rtol=0)
    assert (y[:, 6] - y2[:, 6]).abs().max() > 1e-3
    assert conv.weight[upper_h].eq(1e3).all()


DEPTH_SPECS = ['clm.gin', 'full_context.gin', 'autoencoder.gin', 'memory_clm.gin', 'no_memory.gin', 'oracle.gin',
               'recurrent.gin', 'information_probe.gin', 'frozen_encoder_curriculum.gin',
               'mixer/clm.gin', 'mixer/autoencoder.gin', 'mixer/memory_clm.gin', 'mixer/frozen_encoder_curriculum.gin']


@pytest.mark.parametrize('enc_layers,dec_layers', [(1, 3), (4, 2)])
@pytest.mark.parametrize('spec', DEPTH_SPECS)
def test_built_depth_is_declared_depth(spec, enc_layers, dec_layers):
    plan = load([SPECS_DIR / spec], [f'encoder/Stack.n_layers = {enc_layers}', f'decoder/Stack.n_layers = {dec_layers}',
                                     'D_MODEL = 16', 'VOCAB = 32']).plan
    assert plan.decoder.n_layers == dec_layers
    model = M.build(plan)
    stacks = {'decoder': (model.decoder, dec_layers)}
    if plan.family in ('autoencoder', 'probe', 'memory', 'oracle'):
        assert plan.encoder.n_layers == enc_layers
        stacks['encoder'] = (model.encoder, enc_layers)
    if needs_ae_decoder(plan):
        stacks['ae_decoder'] = (model.ae_decoder, dec_layers)  # Plan.ae_decoder unset: same as the decoder
    for name, (stack, n) in stacks.items():
        assert len(stack.layers) == n, name
        assert stack.cfg.n_layers == n, name
        # every layer holds its own parameters (no silently shared or skipped block)
        ids = {id(p) for layer in stack.layers for p in layer.parameters()}
        assert len(ids) == n * len(list(stack.layers[0].parameters())), name
    if 'encoder' not in stacks:
        assert not hasattr(model, 'encoder')


def test_every_layer_is_used_in_forward():
    """A built layer that forward skipped would stay random (docs/science.md: departures from the research code):
    each layer must run."""
    stack = make_stack(stack_cfg(n_layers=5))
    calls = []
    for i, layer in enumerate(stack.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    stack(torch.randint(0, VOCAB, (1, L)))
    assert calls == [0, 1, 2, 3, 4]


def test_unroll_index_golden():
    expected = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 1], [1, 2]])
    assert torch.equal(unroll_index(length=6, d=4), expected)
    assert unroll_index(5, 8).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7]]


def test_decoder_input_repeat_and_unroll():
    torch.manual_seed(0)
    mem = torch.randn(3, 4)
    repeat = MemoryModule(P.Memory(decoder_input='repeat'), 4, 4, former=True, unroll=False, pad=False)
    out = repeat.decoder_input(mem, 6)
    assert out.shape == (3, 6, 4)
    for t in range(6):
        assert torch.equal(out[:, t], mem)
    unroll = MemoryModule(P.Memory(decoder_input='unroll'), 4, 4, former=True, unroll=True, pad=False)
    out = unroll.decoder_input(mem, 6)
    assert out.shape == (3, 6, 4)
    windows = mem[:, [[0, 1], [1, 2], [2, 3], [3, 0], [0, 1], [1, 2]]]  # [3, 6, 2]
    torch.testing.assert_close(out, windows @ unroll.unroll.weight.T + unroll.unroll.bias, atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 0], out[:, 1])  # positions differ (unlike repeat)
    torch.testing.assert_close(out[:, 0], out[:, 4], atol=0, rtol=0)  # period d


def test_bidirectional_mixer_ignores_what_sits_in_padding():
    """A bidirectional mixer encoder must not read padded positions: their content cannot change real outputs."""
    import torch

    from compiler import plan as P
    from compiler.blocks import Stack
    torch.manual_seed(0)
    stack = Stack(P.Stack(d_model=16, n_layers=2, kind='mixer', causal=False, mixer_kernel=4), vocab=50,
                  seq_len=8).eval()
    tokens = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False
    other = tokens.clone()
    other[:, 5:] = torch.randint(0, 50, (2, 3))
    a, b = stack(tokens, key_mask=mask), stack(other, key_mask=mask)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(stack(tokens)[:, :5], stack(other)[:, :5], atol=1e-6)  # without the mask it would leak


KV_CONFIGS = ([pytest.param(dict(attention=b), id=b) for b in BACKENDS]
              + [pytest.param(dict(attention='sdpa', n_kv_heads=2), id='gqa')])


@pytest.mark.parametrize('kw', KV_CONFIGS)
def test_kv_cache_decoding_matches_full_forward(kw):
    """Prefill 6 positions, then feed 1, 2 and 1 more through the cache: every output equals the full causal
    forward over all 10 positions at that position, and the cache holds exactly what it was given."""
    from compiler.blocks import KVCache
    cfg = stack_cfg(**kw)
    dev = device_for(cfg)
    stack = make_stack(cfg).to(dev)
    tokens = torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(3)).to(dev)
    cache = KVCache(cfg, 2, L, device=dev)
    assert cache.nbytes == 2 * cfg.n_layers * 2 * L * cfg.kv_heads * (D // cfg.n_heads) * 4
    with torch.no_grad():
        full = stack(tokens)
        parts = [stack(tokens[:, a:b], cache=cache) for a, b in ((0, 6), (6, 7), (7, 9), (9, 10))]
    assert cache.length == L
    tol = 1e-5 if dev == 'cuda' else 1e-6
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=tol, rtol=1e-5)
    with pytest.raises(ValueError, match='KV cache full'):
        stack(tokens[:, :1], cache=cache)


@pytest.mark.parametrize('kw', [dict(kind='transformer', attention='sdpa'), dict(kind='transformer', causal=False),
                                dict(kind='mixer', mixer_kernel=4)], ids=['causal', 'bidirectional', 'mixer'])
@pytest.mark.parametrize('pad', [False, True], ids=['unpadded', 'left-padded'])
def test_keep_last_equals_slicing_the_full_output(kw, pad):
    """The last block computes only the kept positions; they must equal the full forward's last positions."""
    cfg = stack_cfg(**kw)
    stack = make_stack(cfg)
    tokens = torch.randint(0, VOCAB, (3, L), generator=torch.Generator().manual_seed(4))
    km = None
    if pad:
        km = torch.ones(3, L, dtype=torch.bool)
        km[1, :3] = km[2, :5] = False
    with torch.no_grad():
        full = stack(tokens, key_mask=km)
        for keep in (1, 4, L):
            torch.testing.assert_close(stack(tokens, key_mask=km, keep_last=keep), full[:, -keep:],
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('position', ['last', 'second_last'])
def test_memories_read_the_same_hidden_state_as_a_full_encoder_pass(position):
    """Family.encode skips the encoder's last-block work nobody reads; the memories must not change, with
    right padding too (the read position then differs per row)."""
    from compiler.memory import select_position
    plan = load([SPECS_DIR / 'autoencoder.gin'], [f"Memory.position = '{position}'"]).plan
    model = M.build(plan, vocab=VOCAB).eval()
    tokens = torch.randint(0, VOCAB, (4, plan.memory.chunk_len), generator=torch.Generator().manual_seed(5))
    for km in (None, torch.arange(plan.memory.chunk_len)[None] < torch.tensor([[8], [5], [3], [6]])):
        with torch.no_grad():
            ref = model.memory.project(select_position(model.encoder(tokens, key_mask=km), km, position))
            torch.testing.assert_close(model.encode(tokens, km), ref, atol=1e-6, rtol=1e-5)
