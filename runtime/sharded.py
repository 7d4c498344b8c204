"""The tensors of a resume point, sharded: torch.distributed.checkpoint (DCP) writes each rank's part of the model
and optimizer state (FSDP shards; replicated tensors once, split among the ranks) as safetensors files
(HuggingFaceStorageWriter with save_distributed: every file carries its tensors' offsets in its header), and reads
them back into any world size and any parallel mode (get_state_dict / set_state_dict reshard on load). Nothing in
it is unpickled: DCP's default storage pickles its metadata, safetensors headers are JSON.

One format for every run: a single process writes and reads the same files through DCP's no-process-group mode.
A resume point is written atomically: the ranks write into a hidden temporary folder of the run folder, rank 0 then
renames it to checkpoint.shards/<name> and returns its manifest (the name and every file's sha256), which the
trainer commits inside checkpoint.pt (written atomically, runtime/checkpoint.py): a kill at any moment leaves the
previous checkpoint.pt and the shards it names. Folders no checkpoint.pt names (a kill between rename and commit,
superseded ones) are removed (prune).
"""
from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path

import torch

from compiler.digest import sha256_file
from compiler.errors import SpecError

SHARDS = 'checkpoint.shards'  # in the run folder


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes one process when no process group exists: that is the intended mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*torch.distributed is disabled.*')
        warnings.filterwarnings('ignore', message='.*assuming the intent is to.*')
        yield


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def state_tensors(model: torch.nn.Module, opt=None) -> dict:
    """{'model.<name>': tensor, 'optim.<flattened key>': ...}: the model's (possibly sharded) state and the optimizer's
    tensors (moments and step counts; its hyperparameters come from the plan and the schedule's state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if opt is None:
        msd, osd = get_model_state_dict(model, options=_options()), {}
    else:
        fresh = not opt.state  # before the stage's first update: get_state_dict would make up a state (below)
        msd, osd = get_state_dict(model, opt, options=_options())
        if fresh:
            _forget_made_up_state(opt)
            osd = {}
    return {**{f'model.{k}': v for k, v in msd.items()},
            **{f'optim.{k}': v for k, v in osd.items() if isinstance(v, torch.Tensor)}}


def _forget_made_up_state(opt, keep=()) -> None:
    """get_state_dict and set_state_dict give an optimizer without state one, by an update with zero gradients at
    learning rate 0 (step 1, zero moments). Where the run had none (before the stage's first update, or a parameter
    no objective reached), that state would change the next real update (AdamW's bias correction): drop it for
    every parameter not in `keep`."""
    for group in opt.param_groups:
        for p in group['params']:
            if p not in keep:
                opt.state.pop(p, None)


def _name(world: int) -> str:
    """A fresh folder name, rank 0's, the same on every rank."""
    name = [f'{time.time_ns():x}']
    if world > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def save(run_dir: Path, model: torch.nn.Module, opt, rank: int, world: int) -> dict | None:
    """Every rank writes its part; -> the manifest on rank 0 ({'dir': 'checkpoint.shards/<name>', 'files': {file:
    sha256}}), None on the others. A failed write removes the temporary folder and raises."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save
    name = _name(world)
    tmp = run_dir / f'.{SHARDS}.{name}'
    try:
        writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
        try:
            with _quiet():
                dcp_save(state_tensors(model, opt), storage_writer=writer)
        except CheckpointException as e:  # a BaseException wrapping each rank's error: the first one, as a write error
            raise _write_error(next(iter(e.failures.values()))[0], run_dir / SHARDS / name) from None
        if rank:
            return None
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        final = run_dir / SHARDS / name
        final.parent.mkdir(exist_ok=True)
        tmp.rename(final)
        return {'dir': f'{SHARDS}/{name}', 'files': files}
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_error(e: BaseException, path: Path) -> BaseException:
    """A failed shard write as runtime.checkpoint reports writes: a full disk named with the disk, an OSError as is."""
    from store.files import write_error
    err = write_error(e, path) if isinstance(e, Exception) else None
    return err if err is not None else e


def prune(run_dir: Path, keep: dict | None) -> None:
    """Remove the shard folders the committed checkpoint does not name, and temporaries of interrupted writes."""
    keep_dir = None if keep is None else (run_dir / keep['dir']).resolve()
    for p in list((run_dir / SHARDS).glob('*')) + list(run_dir.glob(f'.{SHARDS}.*')):
        if p.is_dir() and p.resolve() != keep_dir:
            shutil.rmtree(p, ignore_errors=True)


def verify(run_dir: Path, manifest: dict, where: str, fix: str) -> None:
    """Every shard file the manifest names is there with its sha256 (exit 2 otherwise, before anything runs)."""
    folder = run_dir / manifest['dir']
    for name, digest in manifest['files'].items():
        path = folder / name
        if not path.is_file():
            raise SpecError(where, f'the checkpoint shard {path} is missing', fix)
        if sha256_file(path) != digest:
            raise SpecError(where, f'the checkpoint shard {path} is damaged: its sha256 is not the one checkpoint.pt '
                                   'records', fix)


def load(run_dir: Path, manifest: dict, model: torch.nn.Module, opt=None) -> None:
    """Read a resume point's tensors into `model` (and `opt`), whatever world size and parallel mode wrote them.
    Every model tensor must be in the checkpoint. Optimizer state is read for the parameters that have some there
    (a parameter no objective of the stage reached has none, in the run that wrote it and here)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_optimizer_state_dict
    reader = HuggingFaceStorageReader(str(run_dir / manifest['dir']))
    stored = set(reader.read_metadata().state_dict_metadata)
    if opt is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        msd, osd = get_model_state_dict(model, options=_options()), {}
    else:
        msd, osd = get_state_dict(model, opt, options=_options())
    missing = sorted(k for k in msd if f'model.{k}' not in stored)
    if missing:
        raise SpecError(f'checkpoint {run_dir / manifest["dir"]}', f'it lacks {missing[:3]}'
                        f'{"..." if len(missing) > 3 else ""} of this model',
                        'resume with the spec the run was started with')
    target = {f'model.{k}': v for k, v in msd.items()}
    target.update({f'optim.{k}': v for k, v in osd.items() if isinstance(v, torch.Tensor) and f'optim.{k}' in stored})
    with _quiet():
        dcp_load(target, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, {k[len('model.'):]: v for k, v in target.items() if k.startswith('model.')},
                         options=_options())
    if opt is not None:
        osd.update({k[len('optim.'):]: v for k, v in target.items() if k.startswith('optim.')})
        set_optimizer_state_dict(model, opt, osd, options=_options())
        names = {k[len('optim.state.'):].rsplit('.', 1)[0] for k in stored if k.startswith('optim.state.')}
        had = {p for n, p in model.named_parameters() if n in names}
        _forget_made_up_state(opt, had)
