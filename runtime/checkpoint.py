"""The checkpoint format and the file writes a kill must not tear.

checkpoint.pt is a dict of tensors and plain values (model and optimizer state, data position, RNG state, the stage
and step, the stage-end summary, the plan hash), written with torch.save and read back with
torch.load(weights_only=True), which refuses anything but tensors and plain containers. It is written atomically
(temporary file, then rename), with its sha256 in checkpoint.pt.sha256 beside it, checked on resume.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from compiler.errors import SpecError


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a kill leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:  # name the file the user knows (disk full: 'checkpoint.pt', not '.checkpoint.pt.x1y2')
            e.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


_digests: dict[str, str] = {}  # checkpoint path -> sha256 of what this process wrote or verified there


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + '.sha256')


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save(state) to `path` atomically, and its sha256 to `path`.sha256. The digest file is replaced first
    and also names the digest of the checkpoint being replaced, so a kill between the two renames leaves a pair that
    still verifies (the old checkpoint, listed as previous)."""
    side, new = _sidecar(path), []

    def write(tmp):
        torch.save(state, tmp)
        new.append(sha256_file(tmp))
        old = _digests.get(str(path)) or (sha256_file(path) if path.is_file() else None)
        text = f'{new[0]}  {path.name}\n' + (f'# previous {old}\n' if old and old != new[0] else '')
        atomic_write(side, lambda p: Path(p).write_text(text))

    atomic_write(path, write)
    _digests[str(path)] = new[0]


def load_checkpoint(path: Path, where: str, run_id: str) -> dict:
    """A checkpoint for --resume, verified against its sha256 file: a damaged one is a bad resume target (exit 2)."""
    side = _sidecar(path)
    fix = (f'restore {path.name} from a backup, or delete {path} and {side.name} to start run {run_id} again from its '
           'first step (same id and record), or start a new run')
    if side.is_file():
        digest = sha256_file(path)
        known = [w for w in side.read_text().split() if len(w) == 64]
        if digest not in known:
            raise SpecError(where, f'the checkpoint {path} is damaged: its sha256 {digest[:16]}... '
                                   f'is not the one in {side.name}', fix)
        _digests[str(path)] = digest
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: unpickling fails in many ways)
        raise SpecError(where, f'cannot read the checkpoint {path}: '
                               f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}', fix)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes a kill interrupted (.checkpoint.pt.XXXX and the like)."""
    names = ('.checkpoint.pt.', '.final.safetensors.')
    for p in list(run_dir.glob('.*')) + list(run_dir.glob('stages/.*.safetensors.*')):
        if p.is_file() and (p.parent.name == 'stages' or p.name.startswith(names)):
            p.unlink(missing_ok=True)


def check_writable(folder: Path, where: str) -> None:
    """Refuse an output folder the run could not write, before anything is recorded (exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.write-test.')
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SpecError(where, f'cannot write to {folder}: {e.strerror or e}',
                        'choose a folder this user can write (Run.out_dir)')
