"""Attention backends (compiler/attention.py) agree with the naive reference; backend selection on CPU."""
import pytest
import torch

from compiler.attention import attend, dense_mask, naive_attention, resolve_backend, xformers_problem
from compiler.errors import SpecError

B, T, H, D = 3, 7, 4, 8
# xformers runs only on CUDA, and only with the torch its wheel was built for
XFORMERS = torch.cuda.is_available() and xformers_problem(torch.device('cuda', 0)) is None


def qkv(kv_heads=H, t=T, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, H, D, generator=g)
    k = torch.randn(B, t, kv_heads, D, generator=g)
    v = torch.randn(B, t, kv_heads, D, generator=g)
    return q.to(device), k.to(device), v.to(device)


def key_masks(t=T):
    """None, right padding and left padding with a different number of pads per row (row 0 unpadded)."""
    right = torch.ones(B, t, dtype=torch.bool)
    right[1, -2:] = False
    right[2, -4:] = False
    left = torch.ones(B, t, dtype=torch.bool)
    left[1, :2] = False
    left[2, :4] = False
    return {'none': None, 'right': right, 'left': left}


def loop_reference(q, k, v, causal, key_mask):
    """Independent of dense_mask: one query at a time, softmax over the keys it may see."""
    rep = q.shape[2] // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i in range(q.shape[1]):
                keys = [j for j in range(k.shape[1]) if (not causal or j <= i) and (key_mask is None or key_mask[b, j])]
                if not keys:  # a padding query that sees no real key attends to itself (output unused)
                    keys = [i]
                kk, vv = k[b, keys, h // rep], v[b, keys, h // rep]
                w = (kk @ q[b, i, h] / D ** 0.5).softmax(-1)
                out[b, i, h] = w @ vv
    return out


@pytest.mark.parametrize('kv_heads', [H, 2, 1], ids=['mha', 'gqa2', 'mqa'])
@pytest.mark.parametrize('pad', ['none', 'right', 'left'])
@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_sdpa_matches_naive(causal, pad, kv_heads):
    q, k, v = qkv(kv_heads)
    km = key_masks()[pad]
    ref = naive_attention(q, k, v, causal=causal, key_mask=km)
    out = attend(q, k, v, causal=causal, key_mask=km, backend='sdpa')
    assert out.shape == (B, T, H, D)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('pad', ['none', 'right', 'left'])
@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_naive_matches_loop_reference(causal, pad):
    """The reference itself is checked against a per-query loop that does not use dense_mask."""
    q, k, v = qkv(kv_heads=2)
    km = key_masks()[pad]
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal, key_mask=km),
                               loop_reference(q, k, v, causal, km), atol=1e-5, rtol=0)


def test_real_queries_ignore_padded_keys():
    """Changing the values of padded keys changes no real query's output."""
    q, k, v = qkv()
    km = key_masks()['right']
    out = attend(q, k, v, causal=False, key_mask=km, backend='sdpa')
    v2 = v.clone()
    v2[~km] += 100.0
    out2 = attend(q, k, v2, causal=False, key_mask=km, backend='sdpa')
    torch.testing.assert_close(out[km], out2[km], atol=1e-6, rtol=0)
    assert not torch.allclose(out, attend(q, k, v2, causal=False, key_mask=None, backend='sdpa'))


def test_dense_mask_shapes_and_values():
    m = dense_mask(3, 3, True, None, 'cpu')
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert dense_mask(3, 3, False, None, 'cpu') is None
    km = torch.tensor([[False, True, True]])
    m = dense_mask(3, 3, True, km, 'cpu')[0, 0]
    # the padding query 0 sees nothing real, so it sees itself; real queries never see key 0
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_auto_picks_sdpa_on_cpu():
    assert resolve_backend('auto', torch.device('cpu')) == 'sdpa'
    assert resolve_backend('sdpa', torch.device('cpu')) == 'sdpa'
    q, k, v = qkv()
    torch.testing.assert_close(attend(q, k, v, causal=True, backend='auto'),
                               attend(q, k, v, causal=True, backend='sdpa'), atol=0, rtol=0)


def test_xformers_on_cpu_is_a_spec_error():
    with pytest.raises(SpecError) as e:
        resolve_backend('xformers', torch.device('cpu'))
    msg = str(e.value)
    assert "Stack.attention = 'xformers'" in msg
    assert 'cannot run on this cpu device' in msg and 'no kernels for cpu tensors' in msg
    assert "'sdpa'" in e.value.fix and "'auto'" in e.value.fix
    q, k, v = qkv()
    with pytest.raises(SpecError, match='xformers'):
        attend(q, k, v, causal=True, backend='xformers')


@pytest.mark.skipif(not XFORMERS, reason='xformers kernels need CUDA and a matching torch')
@pytest.mark.parametrize('kv_heads', [H, 2])
@pytest.mark.parametrize('pad', ['none', 'right', 'left'])
@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_xformers_matches_naive_and_sdpa_on_cuda(causal, pad, kv_heads):
    assert resolve_backend('auto', torch.device('cuda')) == 'xformers'
    q, k, v = qkv(kv_heads, t=13, device='cuda')  # 13: an odd length exercises the padded bias storage
    km = key_masks(13)[pad]
    km = None if km is None else km.cuda()
    ref = naive_attention(q, k, v, causal=causal, key_mask=km)
    out = attend(q, k, v, causal=causal, key_mask=km, backend='xformers')
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, attend(q, k, v, causal=causal, key_mask=km, backend='sdpa'), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('backend', ['sdpa'] + (['xformers'] if XFORMERS else []))
@pytest.mark.parametrize('t_q', [1, 3, T])
@pytest.mark.parametrize('pad', ['none', 'left'])
def test_fewer_queries_are_the_last_positions(t_q, pad, backend):
    """KV-cache decoding and keep_last pass only the last t_q queries: each must see exactly the keys the same
    position sees in the full computation (causal masking aligned bottom-right, not sdpa's top-left)."""
    dev = 'cuda' if backend == 'xformers' else 'cpu'
    q, k, v = qkv(2, device=dev)
    km = key_masks()[pad]
    km = None if km is None else km.to(dev)
    full = loop_reference(q.cpu(), k.cpu(), v.cpu(), True, None if km is None else km.cpu())
    out = attend(q[:, -t_q:], k, v, causal=True, key_mask=km, backend=backend)
    torch.testing.assert_close(out.cpu(), full[:, -t_q:], atol=1e-4 if dev == 'cuda' else 1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or XFORMERS, reason='needs CUDA where xformers cannot run')
def test_auto_falls_back_to_sdpa_where_xformers_imports_but_cannot_run():
    """Seen on torch 2.11 with xformers 0.0.35 (built for 2.10): it imports, then has no kernels."""
    assert resolve_backend('auto', torch.device('cuda')) == 'sdpa'
    with pytest.raises(SpecError, match='cannot run on this cuda device'):
        resolve_backend('xformers', torch.device('cuda'))
