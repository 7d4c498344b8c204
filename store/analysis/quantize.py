"""`quantize`: how much of what a memory holds survives a lower precision. Every stored memory is cast to a format
and back to float32, then decoded by the run's own read-out (store/analysis/reload.py), against the memories as
stored (float32 unless the run stored them in Run.memory_dtype). The research code measured its oracle this way with
float8 e4m3 / e5m2 casts (oracle_memory_evaluation.py); an information probe's run gives its probe accuracy.

Formats: bfloat16; float8_e4m3fn and float8_e5m2 (torch's float8 types, cast saturating: values beyond the
format's largest finite value become that value, where a plain cast makes them NaN or inf); int8 with per-vector
absmax scaling (each memory m becomes round(m * 127 / max|m|) in [-127, 127], times max|m| / 127 back: one float32
scale per memory, i.e. 8 + 32 / d bits per value).
"""
from __future__ import annotations

import torch

from compiler import objectives as O
from store.analysis.decode import table
from store.analysis.groups import slices, stages
from store.analysis.reload import LOGITS_BUDGET, decode_rows, load_decoder

FLOAT8 = ('float8_e4m3fn', 'float8_e5m2')
FORMATS = ('float32', 'bfloat16', *(f for f in FLOAT8 if hasattr(torch, f)), 'int8')
BITS = {'float32': 32, 'bfloat16': 16, 'float8_e4m3fn': 8, 'float8_e5m2': 8, 'int8': 8}


def cast(mem: torch.Tensor, fmt: str) -> torch.Tensor:
    """Memories [..., d] through `fmt` and back to float32 (see the module docstring for each format's rule)."""
    mem = mem.float()
    if fmt == 'float32':
        return mem
    if fmt == 'int8':
        scale = mem.abs().amax(-1, keepdim=True) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero memory stays zero
        return (mem / safe).round().clamp(-127, 127) * safe
    dtype = getattr(torch, fmt)
    if fmt in FLOAT8:
        big = torch.finfo(dtype).max
        mem = mem.clamp(-big, big)
    return mem.to(dtype).float()


def quantize_rows(store, run_id: str, stage=None, formats=FORMATS, db=None, device='cpu', limit=None,
                  readout='auto') -> list[dict]:
    """One row per stage and format: decoding metrics of the cast memories, and their change against float32."""
    out = []
    formats = ('float32', *(f for f in formats if f != 'float32'))  # the baseline every change is measured against
    for name, group in stages(store, run_id, stage):
        dec = load_decoder(group, db, device, readout)
        tallies = {f: O.Tally() for f in formats}
        b, n, l = group.tokens.shape
        step = max(1, LOGITS_BUDGET // (n * l * dec.vocab))
        for _, _, mem, tok, msk in slices(group, limit, f'quantize {run_id}/{name}'):
            for i in range(0, len(tok), step):
                for f, tally in tallies.items():
                    tally.add(*decode_rows(dec, cast(mem[i:i + step], f), tok[i:i + step], msk[i:i + step]))
        base = tallies['float32'].metrics(dec.vocab)
        for f, tally in tallies.items():
            m = tally.metrics(dec.vocab)
            out.append({'run': str(run_id), 'stage': name, 'format': f, 'bits': BITS[f], 'decoder': dec.kind,
                        'stored_as': group.attrs.get('dtype', 'float32'), 'tokens': tally.tokens, **m,
                        **({'accuracy_change': m['token_accuracy'] - base['token_accuracy'],
                            'ce_change': m['ce'] - base['ce']} if base and m else {})})
    return out


COLUMNS = [('run', 'run'), ('stage', 'stage'), ('format', 'format'), ('decoder', 'decoder'), ('stored_as', 'stored'),
           ('bits', 'bits'), ('tokens', 'tokens'), ('token_accuracy', 'token acc'), ('accuracy_change', 'vs fp32'),
           ('ce', 'CE (nats)'), ('ce_change', 'CE vs fp32')]


def cmd_quantize(args) -> None:
    rows = quantize_rows(args.store, args.run_id, args.stage, tuple(args.formats), args.db, args.device, args.rows,
                         args.readout)
    print(table(rows, COLUMNS))
    print('\nEach stored memory cast to the format and back, then decoded by the stage\'s own read-out; token acc and '
          'CE over every target token. int8: per-vector absmax scaling; float8: saturating casts.')
