"""The Zarr v3 memory store: memory embeddings of held-out sequences, per run and stage.

Layout (plain Zarr v3; readable with `zarr` alone):

    <store>/<run_id>/<stage>/memories   float32 [sequences, chunks, dim]   (bfloat16 as uint16 raw bits)
    <store>/<run_id>/<stage>/tokens     int32   [sequences, chunks, chunk_len]
    <store>/<run_id>/<stage>/mask       bool    [sequences, chunks, chunk_len]   (True = real token)

Group attributes of <run_id>/<stage> (all JSON):
    format          'memspec-memories'       version   FORMAT_VERSION
    run_id, spec_hash, stage, step, family, encoder_d_model, memory_dim, chunks, chunk_len, vocab_size
    dtype           logical dtype ('float32' or 'bfloat16'); storage_dtype: what the array holds
    tokenizer_path, checkpoint_path          where to decode from
    rows            rows written so far      complete  True only once every row is written

A killed writer leaves `complete` false (or absent): readers refuse such a group with a clear message instead of
reading torn data, and a rewrite of the same run/stage replaces it. Appends are chunk-aligned batches of ROWS.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from compiler.errors import SpecError

FORMAT = 'memspec-memories'
FORMAT_VERSION = 1
ROWS = 256  # rows per Zarr chunk; appends are whole multiples of it (except the final tail)


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _from_bits(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)


def open_root(path: str | Path) -> zarr.Group:
    """The store's root group, created if missing. Several runs may create it at once: zarr creates a group
    exclusively, so all but one get ContainsGroupError (measured: 6 writers starting together lost 2-5 of their
    groups); they then open the group the winner created."""
    for _ in range(10):
        try:
            return zarr.open_group(str(path), mode='a')
        except zarr.errors.ContainsGroupError:
            continue
    return zarr.open_group(str(path), mode='r+')


class Writer:
    """Write one run/stage group, batch by batch; `close()` marks it complete."""

    def __init__(self, path: str | Path, run_id: str, stage: str, attrs: dict, shape: tuple[int, int, int, int],
                 dtype: str = 'float32'):
        s, n, l, d = shape
        root = open_root(path)
        name = f'{run_id}/{stage}'
        if name in root:  # a rerun (e.g. after resume) or a torn group from a killed writer: replace it whole
            del root[name]
        self.group = root.require_group(name)
        self.group.update_attributes({'format': FORMAT, 'version': FORMAT_VERSION, 'run_id': str(run_id),
                                      'stage': stage, 'dtype': dtype,
                                      'storage_dtype': 'uint16' if dtype == 'bfloat16' else 'float32',
                                      'rows': 0, 'complete': False, **attrs})
        store_dtype = np.uint16 if dtype == 'bfloat16' else np.float32
        # overwrite: a writer killed while deleting an old group can leave its arrays behind without the group
        self.mem = self.group.create_array('memories', shape=(s, n, d), chunks=(ROWS, n, d), dtype=store_dtype,
                                           overwrite=True)
        self.tok = self.group.create_array('tokens', shape=(s, n, l), chunks=(ROWS, n, l), dtype=np.int32,
                                           overwrite=True)
        self.msk = self.group.create_array('mask', shape=(s, n, l), chunks=(ROWS, n, l), dtype=bool, overwrite=True)
        self.dtype, self.rows, self.total = dtype, 0, s

    def append(self, memories: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        k = len(memories)
        sl = slice(self.rows, self.rows + k)
        m = _bf16_bits(memories) if self.dtype == 'bfloat16' else memories.detach().float().numpy()
        self.mem[sl] = m
        self.tok[sl] = tokens.numpy().astype(np.int32)
        self.msk[sl] = mask.numpy()
        self.rows += k
        self.group.attrs['rows'] = self.rows  # after the data: a reader never trusts rows it cannot see

    def close(self) -> None:
        if self.rows != self.total:
            raise RuntimeError(f'wrote {self.rows} of {self.total} rows')
        self.group.attrs['complete'] = True


@torch.no_grad()
def write(path, run_id: str, stage: str, model, tokens: torch.Tensor, mask: torch.Tensor, attrs: dict,
          batch_size: int = ROWS, dtype: str = 'float32') -> int:
    """Encode every held-out sequence's chunks with `model.encode` and store them. Returns rows written."""
    s, n, l = tokens.shape
    was = model.training
    device = next(model.parameters()).device  # the model's (Run.device); tokens and memories stay on the CPU
    model.eval()
    try:
        first = model.encode(tokens[:1].reshape(n, l).to(device), mask[:1].reshape(n, l).to(device))
        w = Writer(path, run_id, stage, attrs | {'memory_dim': int(first.shape[-1])}, (s, n, l, first.shape[-1]), dtype)
        for i in range(0, s, batch_size):
            t, m = tokens[i:i + batch_size], mask[i:i + batch_size]
            mem = model.encode(t.reshape(-1, l).to(device), m.reshape(-1, l).to(device)).view(len(t), n, -1).cpu()
            w.append(mem, t, m)
        w.close()
    finally:
        model.train(was)
    return s


@dataclass
class Group:
    """A complete run/stage group, opened for reading (arrays stay on disk; slice them to stream)."""
    attrs: dict
    memories: zarr.Array
    tokens: zarr.Array
    mask: zarr.Array

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.memories[start:stop]
        mem = _from_bits(m).float() if self.attrs['dtype'] == 'bfloat16' else torch.from_numpy(np.asarray(m))
        return (mem, torch.from_numpy(np.asarray(self.tokens[start:stop])).long(),
                torch.from_numpy(np.asarray(self.mask[start:stop])))


def open_group(path, run_id: str, stage: str) -> Group:
    """Open a run/stage group; bad input (missing store, unknown run or stage, torn group, other version) ->
    SpecError."""
    path = Path(path)
    if not (path / 'zarr.json').is_file():
        raise SpecError(str(path), 'no memory store here',
                        'pass --store with the path a run wrote (default runs/memories.zarr)')
    root = zarr.open_group(str(path), mode='r')
    if str(run_id) not in root:
        raise SpecError(f'{path} run {run_id}',
                        f'run {run_id} has no memories in this store (runs: {", ".join(sorted(root.group_keys()))})',
                        'pick a run id listed, or run it first')
    run = root[str(run_id)]
    if stage not in run:
        raise SpecError(f'{path} run {run_id}', f"no stage '{stage}' (stages: {', '.join(sorted(run.group_keys()))})",
                        'pick a listed stage')
    g = run[stage]
    a = dict(g.attrs)
    if a and (a.get('format') != FORMAT or a.get('version') != FORMAT_VERSION):  # no attrs at all: killed at birth
        raise SpecError(f'{path}/{run_id}/{stage}', f"written by an incompatible version (format {a.get('format')!r} "
                        f"version {a.get('version')!r}, this tool reads {FORMAT!r} version {FORMAT_VERSION})",
                        'rewrite the memories with this version (rerun the stage) or use the matching tool version')
    if not a.get('complete'):
        total = g['memories'].shape[0] if 'memories' in g else '?'  # killed before its arrays were created
        raise SpecError(f'{path}/{run_id}/{stage}', f"half-written group: {a.get('rows', 0)} rows of {total} "
                        'were written before the writer stopped', 'resume or rerun the run to rewrite this stage')
    return Group(a, g['memories'], g['tokens'], g['mask'])


def listing(path) -> list[dict]:
    """Every run/stage group of a store with its state (complete or half-written), for reports."""
    path = Path(path)
    if not (path / 'zarr.json').is_file():
        return []
    root = zarr.open_group(str(path), mode='r')
    out = []
    for run_id in sorted(root.group_keys()):
        for stage in sorted(root[run_id].group_keys()):
            g = root[run_id][stage]
            out.append({'run_id': run_id, 'stage': stage, 'rows': g.attrs.get('rows', 0),
                        'complete': bool(g.attrs.get('complete')),
                        'shape': list(g['memories'].shape) if 'memories' in g else None})
    return out
