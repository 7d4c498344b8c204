"""Memory quantization: float8 memory stores (uint8 bit patterns, saturating), the casts of `store.analyze quantize`
(int8 per-vector absmax, float8, bfloat16) and the analysis itself against a direct recomputation."""
import numpy as np
import pytest
import torch
import zarr
from test_analyze import ae_run, cli, reference, synthetic  # noqa: F401  (ae_run: the module fixture)

from compiler import objectives as O
from store import memories as M
from store.analysis.quantize import FORMATS, cast


@pytest.mark.parametrize('dtype', ['float8_e4m3fn', 'float8_e5m2'])
def test_float8_store_round_trip_saturating(tmp_path, dtype):
    mem, _, _ = synthetic(tmp_path / 'f.zarr', rows=300, dim=8, dtype=dtype)
    raw = zarr.open_group(str(tmp_path / 'f.zarr'), mode='r')['syn/s']
    assert raw['memories'].dtype == np.uint8 and raw.attrs['storage_dtype'] == 'uint8' and raw.attrs['dtype'] == dtype
    back, _, _ = M.open_group(tmp_path / 'f.zarr', 'syn', 's').rows(0, 300)
    assert torch.equal(back, mem.to(getattr(torch, dtype)).float())
    # the bits are the format's: readable with plain torch from the uint8 array
    assert torch.equal(torch.from_numpy(raw['memories'][:]).view(getattr(torch, dtype)).float(), back)
    # beyond the format's range: the largest finite value, never NaN (which is the fill of a missing chunk)
    big = torch.finfo(getattr(torch, dtype)).max
    w = M.Writer(tmp_path / 'g.zarr', 'syn', 's', {}, (1, 1, 1, 2), dtype)
    w.append(torch.tensor([[[1e9, -1e9]]]), torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=bool))
    w.close()
    got, _, _ = M.open_group(tmp_path / 'g.zarr', 'syn', 's').rows(0, 1)
    assert got.flatten().tolist() == [big, -big]


def test_casts_follow_their_formats():
    torch.manual_seed(0)
    m = torch.randn(5, 16) * torch.tensor([1e-3, 1, 10, 300, 1e6])[:, None]
    assert torch.equal(cast(m, 'float32'), m)
    assert torch.equal(cast(m, 'bfloat16'), m.to(torch.bfloat16).float())
    q = cast(m, 'int8')
    scale = m.abs().amax(-1, keepdim=True) / 127
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127 + 1e-3
    assert ((q - m).abs() <= scale / 2 + 1e-6 * scale).all()  # round to nearest level: at most half a step off
    assert torch.equal(cast(torch.zeros(2, 4), 'int8'), torch.zeros(2, 4))
    e4 = cast(m, 'float8_e4m3fn')
    assert torch.isfinite(e4).all() and e4[-1].abs().max() == torch.finfo(torch.float8_e4m3fn).max  # saturated
    assert (cast(m, 'float8_e5m2') - m).abs()[1].max() < (e4 - m).abs()[3].max()  # coarser mantissa, wider range


def test_quantize_equals_a_direct_recomputation_and_orders_the_formats(ae_run, capsys):  # noqa: F811
    code, out, err = cli('quantize', ae_run['run_id'], '--store', ae_run['store'], capsys=capsys)
    assert code == 0, err
    model, g = reference(ae_run)
    mem, tok, msk = g.rows(0, g.tokens.shape[0])
    accs = {}
    for fmt in FORMATS:
        tally = O.Tally()
        with torch.no_grad():
            logits, labels = model.read_out(cast(mem, fmt).flatten(0, 1), tok.flatten(0, 1), msk.flatten(0, 1).bool(),
                                            O.SpecialIds(pad=0, blank=1, copy=2), 'decoder')
        tally.add(logits, labels)
        accs[fmt] = tally.metrics(g.attrs['vocab_size'])['token_accuracy']
        line = next(x for x in out.splitlines() if f' {fmt} ' in x)
        assert f'{accs[fmt]:.4f}' in line, (fmt, line)
    code, out, err = cli('quantize', ae_run['run_id'], '--store', ae_run['store'], '--formats', 'int4', capsys=capsys)
    assert code == 2 and 'invalid choice' in err
