"""The Zarr v3 memory store: memory embeddings of held-out sequences, per run and stage.

Layout (plain Zarr v3; readable with `zarr` alone and opened directly by `xarray.open_zarr` / `open_datatree`;
<run> is the run's name `<id>-<key>`, store/layout.py):

    <store>/<run>/<stage>/memories   float32 (sequence, chunk, dim)        (bfloat16 / float8 as raw bits: BITS)
    <store>/<run>/<stage>/tokens     int32   (sequence, chunk, position)
    <store>/<run>/<stage>/mask       bool    (sequence, chunk, position)   (True = real token)

Every array names its dimensions (Zarr v3 `dimension_names`) and carries attributes saying what it holds
(`long_name`, `units`, `description`: ARRAY_ATTRS). The store's root holds consolidated metadata (every group and
array in one zarr.json, what xarray reads first), refreshed after each append and when a group is closed; writers
sharing a store take turns refreshing it (a lock on the store's folder). memspec's own readers never trust it: they read
each group's own metadata.

Group attributes of <run>/<stage> (all JSON):
    format          'memspec-memories'       version   FORMAT_VERSION
    run_id, run_key, spec_hash, stage, step, family, encoder_d_model, memory_dim, chunks, chunk_len, vocab_size
    dtype           logical dtype (Run.memory_dtype: 'float32', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2');
                    storage_dtype: what the array holds (uint16 / uint8 bit patterns for the types Zarr lacks)
    tokenizer_path, checkpoint_path          where to decode from (the run folder's tokenizer.json and stage weights)
    bytes_per_token UTF-8 bytes per token of the held-out text (bits per byte)
    encoder_sha256  sha256 of the weights that form memories (compiler.model.encoder_sha256)
    rows            rows written so far      complete  True only once every row is written
    memories_from   (references only) the stage of the same run whose arrays hold these memories

Shared memories (version 3). A stage whose encoder has the same weights as the previous stage's (a frozen encoder:
the same encoder_sha256) would store the same memories again; its group instead holds only attributes, with
`memories_from` naming the stage group that has the arrays (never another reference). Readers follow it
(`open_group`); a user of plain zarr or xarray opens `<run>/<memories_from>`. The frozen-encoder curriculum stores its
memories once instead of four times.

Integrity (version 2). Every chunk ends with a crc32c checksum (zarr's crc32c codec after zstd), so a damaged chunk
fails to decode instead of decoding to other numbers; every chunk is written, even one that equals the fill value,
and the fill values cannot occur in real data (memories NaN, tokens -1), so a missing chunk is found by listing the
chunks against the row count and reads as detectable fill. Readers report the run, stage and rows that are
damaged (UserError, exit 2). Version 1 stores (no checksums, zero fill) and version 2 stores (no dimension names, no
consolidated metadata, no references) are still read; a missing memories chunk is found in version 1 too.

A killed writer leaves `complete` false (or absent): readers refuse such a group with a clear message instead of
reading torn data, and a rewrite of the same run/stage replaces it (never a group of another run: the run key must
match). Appends are chunk-aligned batches of ROWS.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from compiler.errors import UserError
from store.files import atomic_write, refuse_link
from store.layout import check_stage_name, parse_name
from store.memory_checks import REPAIR, check_attrs, matching

FORMAT = 'memspec-memories'
FORMAT_VERSION = 3  # 3: dimension names, array attributes, consolidated metadata, shared memories (memories_from)
READABLE_VERSIONS = (1, 2, 3)
ROWS = 256  # rows per Zarr chunk; appends are whole multiples of it (except the final tail)
# Logical dtypes Zarr has no type for, stored as their bit patterns: (torch dtype, storage dtype, fill = a NaN's
# bits). float8 memories are written saturating (clamped to the format's largest finite value), so the fill (NaN)
# never stands for real data.
BITS = {'bfloat16': (torch.bfloat16, np.uint16, 0x7FC0)}
if hasattr(torch, 'float8_e4m3fn'):  # torch >= 2.1
    BITS |= {'float8_e4m3fn': (torch.float8_e4m3fn, np.uint8, 0x7F), 'float8_e5m2': (torch.float8_e5m2, np.uint8, 0x7F)}
FILL = {'memories': float('nan'), 'tokens': -1, 'mask': False}
ARRAYS = ('memories', 'tokens', 'mask')
DIMS = {'memories': ('sequence', 'chunk', 'dim'), 'tokens': ('sequence', 'chunk', 'position'),
        'mask': ('sequence', 'chunk', 'position')}
ARRAY_ATTRS = {
    'memories': {'long_name': 'memory embedding', 'units': '1',
                 'description': "the run's encoder state of each chunk after memory formation (the memory the "
                                'decoder reads), one per chunk of each held-out sequence'},
    'tokens': {'long_name': 'token id', 'units': 'token id',
               'description': "the chunk's tokens, ids of the run's tokenizer (group attribute tokenizer_path); "
                              '-1 = never written'},
    'mask': {'long_name': 'real-token mask', 'units': '1',
             'description': 'True where the position holds a real token, False where it is padding'},
}
BIT_NOTES = {'bfloat16': 'bfloat16 bit patterns stored as uint16: float32 = (bits.astype(uint32) << 16).view(float32)',
             'float8_e4m3fn': 'float8 e4m3fn bit patterns stored as uint8 (torch.float8_e4m3fn, ml_dtypes)',
             'float8_e5m2': 'float8 e5m2 bit patterns stored as uint8 (torch.float8_e5m2, ml_dtypes)'}


def stored(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Memories as the array of a `dtype` group holds them: float32, or the bit patterns of BITS (float8 saturating)."""
    if dtype not in BITS:
        return x.detach().float().numpy()
    tdtype, storage, _ = BITS[dtype]
    x = x.detach().float()
    if storage is np.uint8:
        big = torch.finfo(tdtype).max
        x = x.clamp(-big, big)
    return x.contiguous().to(tdtype).view(torch.int16 if storage is np.uint16 else torch.uint8).numpy().view(storage)


def _from_bits(a: np.ndarray, dtype: str = 'bfloat16') -> torch.Tensor:
    tdtype, storage, _ = BITS[dtype]
    if storage is np.uint16:
        return torch.from_numpy(a.astype(np.uint16).view(np.int16).copy()).view(tdtype)
    return torch.from_numpy(a.astype(np.uint8).copy()).view(tdtype)


def open_root(path: str | Path) -> zarr.Group:
    """The store's root group, created if missing. Several runs may create it at once: zarr creates a group
    exclusively, so all but one get ContainsGroupError (measured: 6 writers starting together lost 2-5 of their
    groups); they then open the group the winner created. The consolidated metadata is not used: it may lag."""
    for _ in range(10):
        try:
            return zarr.open_group(str(path), mode='a', use_consolidated=False)
        except zarr.errors.ContainsGroupError:
            continue
    return zarr.open_group(str(path), mode='r+', use_consolidated=False)


def fresh_group(path, run: str, stage: str, attrs: dict) -> zarr.Group:
    """An empty group <run>/<stage> with the format's attributes and `attrs`: a rerun (e.g. after a resume) or a torn
    group of a killed writer is replaced whole, a group of another run (another run key) never."""
    check_stage_name(stage, f'Stage.name {stage!r}')
    root = open_root(path)
    name = f'{run}/{stage}'
    if name in root:
        owner = _attrs(_node(root, name)).get('run_key')
        if owner is not None and owner != attrs.get('run_key'):
            raise UserError(f'{path}/{name}', f'the group belongs to another run (run key {owner}, this run '
                            f"{attrs.get('run_key')})", 'give the run its own Run.memory_store')
        del root[name]
    group = root.require_group(name)
    group.update_attributes({'format': FORMAT, 'version': FORMAT_VERSION,
                             'run_id': str(attrs.get('run_id', (parse_name(run) or (run,))[0])), 'stage': stage,
                             'rows': 0, 'complete': False, **attrs})
    return group


class Writer:
    """Write one run/stage group, batch by batch; `close()` marks it complete. The store's consolidated metadata is
    refreshed after every append and at the close."""

    def __init__(self, path: str | Path, run: str, stage: str, attrs: dict, shape: tuple[int, int, int, int],
                 dtype: str = 'float32'):
        s, n, l, d = shape
        self.path = Path(path)
        for folder in (self.path / run, self.path / run / stage):  # zarr writes through links: refuse planted ones
            refuse_link(folder)
        if dtype != 'float32' and dtype not in BITS:  # a float8 plan read by a torch without float8 types
            raise UserError(f'Run.memory_dtype = {dtype!r}', f'this torch ({torch.__version__}) has no {dtype}',
                            "use Run.memory_dtype = 'bfloat16' or 'float32'")
        store_dtype = BITS[dtype][1] if dtype in BITS else np.float32
        self.group = fresh_group(path, run, stage, {'dtype': dtype, 'storage_dtype': np.dtype(store_dtype).name,
                                                    **attrs})

        def array(key, shape, dtype, fill, note=None):
            # overwrite: a writer killed while deleting an old group can leave its arrays behind without the group
            return self.group.create_array(key, shape=shape, chunks=(ROWS, *shape[1:]), dtype=dtype, fill_value=fill,
                                           compressors=[ZstdCodec(level=0), Crc32cCodec()],
                                           config={'write_empty_chunks': True}, overwrite=True,
                                           dimension_names=DIMS[key],
                                           attributes=ARRAY_ATTRS[key] | ({'storage': note} if note else {}))
        self.mem = array('memories', (s, n, d), store_dtype, BITS[dtype][2] if dtype in BITS else FILL['memories'],
                         BIT_NOTES.get(dtype))
        self.tok = array('tokens', (s, n, l), np.int32, FILL['tokens'])
        self.msk = array('mask', (s, n, l), bool, FILL['mask'])
        self.dtype, self.rows, self.total = dtype, 0, s

    def append(self, memories: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        k = len(memories)
        sl = slice(self.rows, self.rows + k)
        self.mem[sl] = stored(memories, self.dtype)
        self.tok[sl] = tokens.numpy().astype(np.int32)
        self.msk[sl] = mask.numpy()
        self.rows += k
        self.group.attrs['rows'] = self.rows  # after the data: a reader never trusts rows it cannot see
        consolidate(self.path)

    def close(self) -> None:
        if self.rows != self.total:
            raise RuntimeError(f'wrote {self.rows} of {self.total} rows')
        self.group.attrs['complete'] = True
        consolidate(self.path)


def shared_source(path, run: str, previous: str, digest: str, attrs: dict, rows: int) -> Group | None:
    """The group of stage `previous` (or the one it references) when it holds the memories this stage would write:
    complete, written by the same encoder weights (`digest`), same rows, shapes and dtype. None otherwise."""
    try:
        prev = open_group(path, run, previous)
    except UserError:  # absent (Run.memory_store was off), half-written or damaged: write a copy
        return None
    a = prev.attrs
    same = (a.get('encoder_sha256') == digest and a.get('rows') == rows and a.get('dtype') == attrs.get('dtype')
            and all(a.get(k) == attrs.get(k) for k in ('chunks', 'chunk_len', 'run_key', 'spec_hash')))
    return prev if same else None


def reference(path, run: str, stage: str, source: Group, attrs: dict) -> None:
    """Group <run>/<stage> as a reference to `source`'s arrays (module doc: shared memories), complete at once."""
    group = fresh_group(path, run, stage, attrs | {'memory_dim': int(source.memories.shape[-1]),
                                                   'storage_dtype': str(source.memories.dtype),
                                                   'memories_from': source.stored_in})
    group.update_attributes({'rows': source.attrs['rows'], 'complete': True})
    consolidate(path)


def write(path, run: str, stage: str, batches, shape: tuple[int, int, int, int], attrs: dict,
          dtype: str = 'float32', previous: str | None = None, progress: str | None = None) -> int:
    """Store the memories of every held-out sequence in group <run>/<stage>. `batches` yields (memories [b, N, d],
    tokens [b, N, L], mask [b, N, L]) in row order, `shape` is (rows, N, L, d); the caller encodes (Graph.encode_rows
    in runtime/trainer.py): the store only writes arrays. attrs['encoder_sha256'] names the weights that formed them
    (compiler.model.encoder_sha256); when stage `previous` was written by the same weights, its arrays are referenced
    instead and `batches` is never started, so nothing is encoded. `progress`: the description of a progress bar
    (None: none). Returns the rows the group holds."""
    s = shape[0]
    attrs = attrs | {'dtype': dtype}
    source = None if previous is None else shared_source(path, run, previous, attrs.get('encoder_sha256'), attrs, s)
    if source is not None:
        reference(path, run, stage, source, attrs)
        return s
    w = Writer(path, run, stage, attrs | {'memory_dim': int(shape[-1])}, shape, dtype)
    with tqdm(total=s, desc=progress, unit='rows', dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
              disable=progress is None) as bar:
        for mem, t, m in batches:
            w.append(mem, t, m)
            bar.update(len(t))
    w.close()
    return s


@contextlib.contextmanager
def _turn(path: Path):
    """Exclusive use of the store's consolidated metadata among the processes writing the store: a flock on the
    store's folder itself (a file in it would be a stray member to zarr). Where the filesystem has no locks, writers
    go without: the next refresh repairs what a lost one missed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def consolidate(path) -> None:
    """Refresh the consolidated metadata of the store's root (what xarray and zarr read first): the zarr.json of
    every run group, stage group and array, as zarr's consolidate_metadata lays them out. Nodes whose zarr.json is
    unreadable (a killed writer, damage) are left out instead of failing the writer. Written atomically (temporary
    file, rename), one writer at a time, each from what is on disk when its turn comes, so the last refresh has
    seen every earlier write."""
    path = Path(path)
    with _turn(path):
        for stale in path.glob('.zarr.json.*.tmp'):  # a writer killed mid-refresh (temporaries are made in turn)
            stale.unlink(missing_ok=True)
        root = _json(path / 'zarr.json')
        if root is None:
            return
        flat = {}
        for run in sorted(p for p in path.iterdir() if p.is_dir()):
            for node in [run] + sorted(p for p in run.iterdir() if p.is_dir()):
                flat |= _node_metadata(path, node, arrays=node != run)
        root['consolidated_metadata'] = {'kind': 'inline', 'must_understand': False, 'metadata': flat}
        text = json.dumps(root, indent=2, allow_nan=True)  # a temporary of its own (O_EXCL), never a planted link
        atomic_write(path / 'zarr.json', lambda tmp: Path(tmp).write_text(text), prefix='.zarr.json.', suffix='.tmp')


def _node_metadata(path: Path, node: Path, arrays: bool) -> dict:
    """key -> zarr.json of a group (its consolidated metadata emptied) and, `arrays`, of the arrays in it; unreadable
    nodes are left out."""
    meta = _json(node / 'zarr.json')
    if not isinstance(meta, dict):
        return {}
    key = node.relative_to(path).as_posix()
    if meta.get('node_type') == 'group':
        meta['consolidated_metadata'] = {'kind': 'inline', 'must_understand': False, 'metadata': {}}
    out = {key: meta}
    for array in sorted(p for p in node.iterdir() if p.is_dir()) if arrays else []:
        a = _json(array / 'zarr.json')
        if isinstance(a, dict) and a.get('node_type') == 'array':
            out[f'{key}/{array.name}'] = a
    return out


def _node(root, name):
    try:
        return root[name]
    except Exception:  # noqa: BLE001  (torn by a kill: no metadata)
        return None


def check_store(path) -> None:
    """A store a run is about to write into must be readable (UserError: its root metadata is damaged)."""
    if (Path(path) / 'zarr.json').is_file():
        _keys(_open_read(Path(path)), path)


def _attrs(node) -> dict:
    try:
        return dict(node.attrs)
    except Exception:  # noqa: BLE001  (damaged metadata: the callers report it)
        return {}


def _first(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class Group:
    """A complete run/stage group, opened for reading (arrays stay on disk; slice them to stream). Reads go through
    `rows`, which turns a chunk that fails its checksum or reads as fill into a UserError naming the rows."""
    attrs: dict
    memories: zarr.Array
    tokens: zarr.Array
    mask: zarr.Array
    where: str = ''
    stored_in: str = ''  # the stage group whose arrays these are (another stage's, for a reference)

    def _fill(self, mem: np.ndarray, tok: np.ndarray) -> bool:
        if self.attrs.get('version', 1) < 2:  # version 1 filled with zeros, which real data holds too
            return False
        dtype = self.attrs.get('dtype', 'float32')
        gone = (mem == BITS[dtype][2]) if dtype in BITS else np.isnan(mem)
        return bool(gone.any() or (tok == FILL['tokens']).any())

    def raw(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored arrays of rows [start, stop), verified."""
        try:
            out = (np.asarray(self.memories[start:stop]), np.asarray(self.tokens[start:stop]),
                   np.asarray(self.mask[start:stop]))
        except Exception as e:  # noqa: BLE001  (a damaged chunk fails in the codec: checksum, zstd, size)
            why = 'its crc32c checksum does not match' if 'checksum' in str(e) else _first(e)
            raise damaged(self.where, start, stop, f'a chunk is corrupt ({why})')
        if self._fill(out[0], out[1]):
            raise damaged(self.where, start, stop, 'they read as fill values: a chunk is missing')
        return out

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, t, k = self.raw(start, stop)
        dtype = self.attrs['dtype']
        mem = _from_bits(m, dtype).float() if dtype in BITS else torch.from_numpy(m)
        return mem, torch.from_numpy(t).long(), torch.from_numpy(k)


def damaged(where: str, start: int, stop: int, why: str) -> UserError:
    chunk = f'rows {start}-{stop - 1}' if stop - start > 1 else f'row {start}'
    return UserError(where, f'the stored memories are damaged: {chunk} cannot be read: {why}',
                     REPAIR)


def missing_chunks(group, array: str, rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of `array` whose chunk file is absent (a local store)."""
    a = group[array]
    folder = Path(str(group.store.root)) / group.path / array
    return [(i * ROWS, min((i + 1) * ROWS, rows)) for i in range(-(-rows // ROWS))
            if not (folder / a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))).is_file()]


def _verify(g, attrs: dict, where: str) -> None:
    """Metadata and chunk listing against the recorded row count, before any row is read."""
    rows = attrs.get('rows')
    try:
        arrays = {k: g[k] for k in ARRAYS}
        shapes = {k: a.shape[0] for k, a in arrays.items()}
    except Exception as e:  # noqa: BLE001  (a missing or garbled zarr.json of an array)
        raise UserError(where, f'the stored memories are damaged: array metadata unreadable ({_first(e)})',
                        REPAIR)
    if len(set(shapes.values())) != 1 or rows != shapes['memories']:
        raise UserError(where, f'the stored memories are damaged: {rows} rows were recorded at write but the arrays '
                        f'hold {shapes}', REPAIR)
    checked = ARRAYS if attrs.get('version', 1) >= 2 else ('memories',)  # version 1 skipped chunks of zeros
    gone = {k: missing_chunks(g, k, rows) for k in checked}
    gone = {k: v for k, v in gone.items() if v}
    if gone:
        first = min(r for v in gone.values() for r in v)
        detail = '; '.join(f"{k}: rows {', '.join(f'{a}-{b - 1}' for a, b in v)}" for k, v in gone.items())
        raise damaged(where, first[0], first[1], f'chunks are missing ({detail})')


def open_group(path, run: str, stage: str) -> Group:
    """Open a run/stage group (`run`: the group name, '<id>-<key>'); bad input (missing store, unknown run or
    stage, torn group, other version, damaged metadata or chunks) -> UserError."""
    path = Path(path)
    if not (path / 'zarr.json').is_file():
        raise UserError(str(path), 'no memory store here',
                        'pass --store with the path a run wrote (default runs/memories.zarr)')
    root = _open_read(path)
    run = str(run)
    if run not in _keys(root, path):
        raise UserError(f'{path} run {run}',
                        f'run {run} has no memories in this store (runs: {", ".join(sorted(_keys(root, path)))})',
                        'pick a run listed, or run it first')
    where = f'{path}/{run}'
    try:
        node = root[run]
        stages = sorted(node.group_keys())
    except Exception as e:  # noqa: BLE001
        raise UserError(where, f'the stored memories are damaged: zarr.json of stage {_unreadable(path / run)} is '
                        f'unreadable ({_first(e)})',
                        REPAIR)
    if stage not in stages:
        raise UserError(f'{path} run {run}', f"no stage '{stage}' (stages: {', '.join(stages)})",
                        'pick a listed stage')
    where = f'{path}/{run}/{stage}'
    try:
        g = node[stage]
        a = dict(g.attrs)
    except Exception as e:  # noqa: BLE001  (a garbled zarr.json)
        raise UserError(where, f'the stored memories are damaged: group metadata unreadable ({_first(e)})',
                        REPAIR)
    if a and (a.get('format') != FORMAT or a.get('version') not in READABLE_VERSIONS):  # no attrs: killed at birth
        raise UserError(where, f"written by an incompatible version (format {a.get('format')!r} "
                        f"version {a.get('version')!r}, this tool reads {FORMAT!r} versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))})",
                        'rewrite the memories with this version (rerun the stage) or use the matching tool version')
    check_attrs(a, stage, where)
    if not a.get('complete'):
        try:
            total = g['memories'].shape[0] if 'memories' in g else '?'  # killed before its arrays were created
        except Exception:  # noqa: BLE001
            total = '?'
        raise UserError(where, f"half-written group: {a.get('rows', 0)} rows of {total} "
                        'were written before the writer stopped', 'resume or rerun the run to rewrite this stage')
    where = f"{path} run {run} stage {stage}"
    if a.get('memories_from') is not None:
        return _follow(path, run, stage, a, where)
    _verify(g, a, where)
    return matching(Group(a, g['memories'], g['tokens'], g['mask'], where, stage))


def _follow(path: Path, run: str, stage: str, a: dict, where: str) -> Group:
    """A reference group (module doc: shared memories) -> its own attributes over the arrays of the stage it names."""
    src = a['memories_from']
    try:
        check_stage_name(src, where)
        source = open_group(path, run, src)
    except UserError as e:
        raise UserError(where, f"its memories are those of stage {src!r}, which cannot be read: {e.what}", e.fix)
    if source.attrs.get('memories_from') is not None or source.memories.shape[0] != a.get('rows'):
        raise UserError(where, f"the stored memories are damaged: it refers to stage {src!r}, which "
                        + ('is a reference itself' if source.attrs.get('memories_from') is not None else
                           f"holds {source.memories.shape[0]} rows, not the {a.get('rows')} recorded here"), REPAIR)
    return matching(Group(a, source.memories, source.tokens, source.mask, f'{where} (memories of stage {src})', src))


def _unreadable(folder: Path) -> str:
    """Whose zarr.json under a group folder cannot be read ("'blank_copy'", ...): zarr's own error names none."""
    bad = []
    for child in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else [folder]:
        try:
            meta = json.loads((child / 'zarr.json').read_text())
            garbled = not isinstance(meta, dict) or not isinstance(meta.get('attributes', {}), dict)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            garbled = True
        if garbled:
            bad.append(f'{folder.name!r} itself' if child == folder else f'{child.name!r}')
    return ', '.join(bad) or 'a member'


def _open_read(path: Path) -> zarr.Group:
    """The root for reading, through each node's own metadata (the consolidated copy may lag a writer)."""
    try:
        return zarr.open_group(str(path), mode='r', use_consolidated=False)
    except Exception as e:  # noqa: BLE001  (a garbled root zarr.json)
        raise UserError(str(path), f'the memory store is damaged: its zarr.json is unreadable ({_first(e)})',
                        'restore the store from a backup')


def _keys(root, path) -> list[str]:
    try:
        return list(root.group_keys())
    except Exception as e:  # noqa: BLE001  (a run group's zarr.json garbled)
        raise UserError(str(path), f'the memory store is damaged: zarr.json of {_unreadable(Path(path))} is unreadable '
                        f'({_first(e)})', "restore the store from a backup, or remove that run's group")


def _stage_entry(root, path: Path, run: str, stage: str) -> dict:
    """One stage group's listing entry; a damaged group is listed with why instead of failing the whole listing."""
    entry = {'run': run, 'run_id': (parse_name(run) or (run,))[0], 'run_key': None, 'stage': stage, 'rows': 0,
             'complete': False, 'shape': None}
    try:
        g = root[run][stage]
        a = dict(g.attrs)
        check_attrs(a, stage, f'{path}/{run}/{stage}')
        if 'memories' in g:  # a reference group's arrays are its source's, checked there
            matching(Group(a, g['memories'], g['tokens'], g['mask'], f'{path}/{run}/{stage}', stage))
        entry.update(run_id=str(a.get('run_id', entry['run_id'])), run_key=a.get('run_key'),
                     rows=a.get('rows', 0), complete=bool(a.get('complete')),
                     shape=list(g['memories'].shape) if 'memories' in g else None)
        if a.get('memories_from') is not None:
            entry['memories_from'] = a['memories_from']
    except UserError as e:
        entry['damaged'] = e.what.removeprefix('the stored memories are damaged: ')
    except Exception as e:  # noqa: BLE001
        entry['damaged'] = _first(e)
    return entry


def listing(path) -> list[dict]:
    """Every run/stage group of a store with its state (complete, half-written, or damaged metadata), for reports:
    {'run': group name, 'run_id', 'run_key', 'stage', 'rows', 'complete', 'shape'} (+ 'damaged': why; a reference
    group + 'memories_from': the stage whose arrays it reads, and their shape)."""
    path = Path(path)
    if not (path / 'zarr.json').is_file():
        return []
    root = _open_read(path)
    out = []
    for run in sorted(_keys(root, path)):
        try:
            stages = sorted(root[run].group_keys())
        except Exception as e:  # noqa: BLE001
            out.append({'run': run, 'run_id': (parse_name(run) or (run,))[0], 'run_key': None, 'stage': None,
                        'rows': 0, 'complete': False, 'shape': None, 'damaged': _first(e)})
            continue
        out.extend(_stage_entry(root, path, run, stage) for stage in stages)
    shapes = {(e['run'], e['stage']): e['shape'] for e in out}
    for e in out:  # a reference has the shape of the arrays it refers to
        if e.get('memories_from') is not None:
            e['shape'] = shapes.get((e['run'], e['memories_from']))
    return out
