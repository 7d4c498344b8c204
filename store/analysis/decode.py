"""`decode` (original vs decoded text of stored sequences) and `info` (information metrics of decoding from stored
memories), through the read-out of store/analysis/reload.py."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from compiler import objectives as O
from store import memories as M
from store import tables
from store.analysis.groups import stages
from store.analysis.reload import Decoder, decode_rows, iter_decoded, load_decoder, tokenizer_of
from store.tables import num


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False).replace('\n', '\u23ce')


def decode_samples(dec: Decoder, group: M.Group, n: int, tok) -> list[dict]:
    """The first n stored sequences: per sequence the original and decoded text (chunks joined by ' | ', only
    positions that have a target) and its token accuracy (correct / targets over all its chunks)."""
    out = []
    k = min(n, group.tokens.shape[0])
    for start in range(0, k, M.ROWS):
        mem, tokens, mask = group.rows(start, min(start + M.ROWS, k))
        logits, labels = decode_rows(dec, mem, tokens, mask.bool())
        pred = logits.argmax(-1).cpu()
        labels = labels.cpu()
        for r in range(len(tokens)):
            valid = labels[r] != O.IGNORE
            correct = int(((pred[r] == labels[r]) & valid).sum())
            total = int(valid.sum())
            orig = [_text(tok, labels[r, c][valid[c]].tolist()) for c in range(labels.shape[1])]
            got = [_text(tok, pred[r, c][valid[c]].tolist()) for c in range(labels.shape[1])]
            out.append({'row': start + r, 'original': ' | '.join(orig), 'decoded': ' | '.join(got),
                        'correct': correct, 'targets': total, 'accuracy': correct / total if total else float('nan')})
    return out


def cmd_decode(args) -> None:
    for stage, group in stages(args.store, args.run_id, args.stage):
        dec = load_decoder(group, args.db, args.device, args.readout)
        tok = tokenizer_of(group.attrs)
        note = {'decoder': 'model.decoder (autoencoder)', 'ae_decoder': 'model.ae_decoder (frozen-encoder curriculum)',
                'blank_copy': 'blank-copy read-out (memory in slot 0, blank tokens; '
                              'first token of a chunk not predicted)'}
        print(f"== run {args.run_id} stage {stage} (step {group.attrs.get('step')}, {group.tokens.shape[0]} sequences "
              f"x {group.tokens.shape[1]} chunks x {group.tokens.shape[2]} tokens); decoder: {note[dec.kind]}")
        samples = decode_samples(dec, group, args.n, tok)
        for s in samples:
            print(f"seq {s['row']:>6}  accuracy {s['accuracy']:.4f}  ({s['correct']}/{s['targets']} tokens)")
            print(f"  original | {s['original']}")
            print(f"  decoded  | {s['decoded']}")
        if samples:
            c, t = sum(s['correct'] for s in samples), sum(s['targets'] for s in samples)
            print(f'shown: {len(samples)} sequences, token accuracy {c / max(t, 1):.4f}  '
                  f'(all sequences: python -m store.analyze info {args.run_id})\n')


# ----------------------------------------------------------------------------------------------------------- info

def bytes_per_token(attrs: dict) -> float | None:
    """Held-out UTF-8 bytes per token: the group's attribute, else (groups written before it) the run's data cache
    (meta.json beside tokenizer.json), if present."""
    if attrs.get('bytes_per_token') is not None:
        return float(attrs['bytes_per_token'])
    try:
        meta = json.loads((Path(attrs['tokenizer_path']).parent / 'meta.json').read_text())
        return float(meta['stats']['val']['bytes_per_token'])
    except (OSError, KeyError, TypeError, ValueError):
        return None


INFO_COLUMNS = [('run', 'run'), ('stage', 'stage'), ('step', 'step'), ('family', 'family'), ('decoder', 'decoder'),
                ('rows', 'rows'), ('tokens', 'tokens'), ('token_accuracy', 'token acc'),
                ('normalized_hamming', 'norm. Hamming'), ('ce', 'CE (nats)'), ('info_proportion', 'I_e'),
                ('bits_per_byte', 'bits/byte')]


def info_rows(store, run_ids, stage=None, db=None, device='cpu', limit=None, readout='auto') -> list[dict]:
    rows = []
    for run_id in run_ids:
        for name, group in stages(store, run_id, stage):
            dec = load_decoder(group, db, device, readout)
            tally = O.Tally()
            for logits, labels in iter_decoded(dec, group, limit, f'info {run_id}/{name}'):
                tally.add(logits, labels)
            a = group.attrs
            m = tally.metrics(dec.vocab, bytes_per_token(a))
            rows.append({'run': str(run_id), 'stage': name, 'step': a.get('step'), 'family': a.get('family'),
                         'decoder': dec.kind, 'memories_of': group.stored_in,
                         'rows': group.tokens.shape[0] if limit is None else min(limit, group.tokens.shape[0]),
                         'tokens': tally.tokens, 'vocab_size': dec.vocab, **m})
    return rows


def table(rows: list[dict], columns) -> str:
    """Rows of dicts as aligned columns: the first five (names) left-aligned, the numbers right-aligned."""
    def cell(v):
        return num(v) if isinstance(v, float) else '-' if v is None else str(v)
    return tables.table([name for _, name in columns], [[cell(r.get(k)) for k, _ in columns] for r in rows],
                        right=set(range(5, len(columns))))


def cmd_info(args) -> None:
    rows = info_rows(args.store, args.run_ids, args.stage, args.db, args.device, args.rows, args.readout)
    cols = list(INFO_COLUMNS)
    missing_bpb = [f"{r['run']}/{r['stage']}" for r in rows if 'bits_per_byte' not in r]
    if len(missing_bpb) == len(rows):
        cols = [c for c in cols if c[0] != 'bits_per_byte']
    if args.csv:
        keys = [k for k, _ in cols] + ['vocab_size']
        fh = sys.stdout if args.csv == '-' else open(args.csv, 'w', newline='')
        try:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction='ignore')
            w.writeheader()
            w.writerows(rows)
        finally:
            if fh is not sys.stdout:
                fh.close()
        if args.csv == '-':
            return
    print(table(rows, cols))
    print('\nDecoding from stored memories with each stage\'s own checkpoint; token acc and CE over every target '
          'token, norm. Hamming = 1 - accuracy per stored sequence (all its chunks), macro-averaged; '
          "I_e = 1 - CE / ln(V), V = the run's vocabulary size (H0 of a uniform, informationless model).")
    if missing_bpb:
        print(f"bits/byte omitted for {', '.join(missing_bpb)}: no held-out bytes-per-token in the run's data cache "
              '(meta.json beside tokenizer.json).')
    for note in readout_notes(rows):
        print(note)
    if args.csv and args.csv != '-':
        print(f'csv: {args.csv}')


def readout_notes(rows: list[dict]) -> list[str]:
    """What makes rows of one run differ or not: which read-out decoded each stage, and which stages share stored
    memories (a frozen encoder: store/memories.py references)."""
    notes = []
    for run in dict.fromkeys(r['run'] for r in rows):
        mine = [r for r in rows if r['run'] == run]
        kinds = {r['decoder'] for r in mine}
        if {'ae_decoder', 'blank_copy'} <= kinds:
            ae = ', '.join(r['stage'] for r in mine if r['decoder'] == 'ae_decoder')
            bc = ', '.join(r['stage'] for r in mine if r['decoder'] == 'blank_copy')
            notes.append(f'run {run}: {ae} decoded through the ae_decoder it trains; {bc} by the blank-copy '
                         'read-out of their own decoder (the ae_decoder does not change after its stage, so it would '
                         'repeat those numbers; --readout ae_decoder forces it)')
        shared = [r for r in mine if r.get('memories_of') and r['memories_of'] != r['stage']]
        if shared:
            notes.append(f'run {run}: ' + ', '.join(f"{r['stage']}" for r in shared) + ' store no memories of their '
                         'own: the encoder was frozen and unchanged, so they are those of '
                         + ', '.join(sorted({r['memories_of'] for r in shared}))
                         + '; rows differ only through the read-out')
    return notes
