"""The checkpoint format, the file writes a kill must not tear, and the lock that keeps one process per run.

checkpoint.pt is a dict of tensors and plain values (model and optimizer state, data position, RNG state, the stage
and step, the stage-end summary, the plan hash), written with torch.save and read back with
torch.load(weights_only=True), which refuses anything but tensors and plain containers: a crafted checkpoint cannot
run code when it is loaded (its sha256 file would not stop that: whoever can write one can write both). It is
written atomically (temporary file, then rename), with its sha256 in checkpoint.pt.sha256 beside it, checked on resume.

Every file a run writes goes through atomic_write, which also gives it the permissions the umask allows (mkstemp
creates 0600, which would keep other users from resuming or generating from the run), and turns a write that
failed in a library's own writer (torch.save reports a full disk as RuntimeError 'unexpected pos', safetensors as
SafetensorError) into the OSError it stands for, asking the filesystem whether it is full.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch

from compiler.checkpoint import sha256_file  # noqa: F401  (its home; checkpoints and tests use it here)
from compiler.errors import SpecError

FULL_BELOW = 1 << 20  # bytes free under which a failed write is a full disk


def file_mode() -> int:
    """The mode a plain open() would give a new file under this process's umask."""
    try:  # Linux shows the umask; reading it there changes nothing, not even for a moment
        with open('/proc/self/status') as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere it can only be read by setting it: set it back at once
        os.umask(mask)
    return 0o666 & ~mask


def _human(n: int) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if n < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return str(n)


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_report(folder: Path) -> str:
    """'the filesystem at /mnt/x (0 B free of 2.0 MiB)': which disk a path is on and how full it is."""
    try:
        usage = shutil.disk_usage(mount_point(folder))
        return f'the filesystem at {mount_point(folder)} ({_human(usage.free)} free of {_human(usage.total)})'
    except OSError:
        return f'the filesystem of {folder}'


class WriteFailed(OSError):
    """A write that failed for lack of space or an I/O error; str() is the whole message for the user."""

    def __init__(self, code: int, path: Path, detail: str = ''):
        super().__init__(code, os.strerror(code), str(path))
        self.message = (f'cannot write {path}: {os.strerror(code)}{f" ({detail})" if detail else ""}, on '
                        f'{disk_report(Path(path).parent)}')

    def __str__(self) -> str:
        return self.message


_LIBRARY_WRITE_ERRORS = ('unexpected pos', 'PytorchStreamWriter', 'inline_container', 'iostream error', 'I/O error',
                         'Error while serializing')


def write_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError a failed write of `path` stands for (None: not a write failure). A full disk is recognised by the
    filesystem's free space, since torch.save does not say ENOSPC."""
    if isinstance(e, OSError):
        code, detail = e.errno, ''
    elif any(s in str(e) for s in _LIBRARY_WRITE_ERRORS):
        m = re.search(r'os error (\d+)', str(e))
        code, detail = (int(m.group(1)) if m else None), str(e).strip().splitlines()[0]
    else:
        return None
    try:
        full = shutil.disk_usage(Path(path).parent).free < FULL_BELOW
    except OSError:
        full = False
    if code in (errno.ENOSPC, errno.EDQUOT) or full:
        return WriteFailed(errno.ENOSPC if full or code == errno.ENOSPC else code, path)
    if isinstance(e, OSError):
        return None  # a plain OSError (permission, folder removed) already says what happened
    return WriteFailed(code or errno.EIO, path, detail)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a kill leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except WriteFailed:
        raise  # a nested write (checkpoint.pt.sha256 inside checkpoint.pt's) already named its file
    except Exception as e:
        err = write_error(e, path)  # asked before the temporary is removed: it holds what filled the disk
        if err is not None and err is not e:
            raise err from None
        if isinstance(e, OSError) and e.filename == tmp:  # name the file the user knows, not '.checkpoint.pt.x1y2'
            e.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


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


CHECKPOINT_KEYS = {'model', 'optimizer', 'scheduler', 'data', 'stage', 'step', 'spec_hash', 'rng', 'summary'}


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
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: the error says more
            warnings.simplefilter('ignore')
            state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: unpickling fails in many ways)
        if isinstance(e, pickle.UnpicklingError) and 'Weights only load failed' in str(e):
            raise SpecError(where, f'the checkpoint {path} holds objects other than tensors and plain values, which '
                                   'memspec never writes; it was not loaded (loading it could run code)',
                            f'delete {path} and {side.name} to start run {run_id} again from its first step, or '
                            'start a new run; do not resume from checkpoints of unknown origin')
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise SpecError(where, f'cannot read the checkpoint {path}: {type(e).__name__}: {first}', fix)
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if missing:
        raise SpecError(where, f"{path} is not a memspec checkpoint (it lacks {', '.join(missing)})", fix)
    return state


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes a kill interrupted (.checkpoint.pt.XXXX and the like: atomic_write's
    temporaries are the only hidden files of a run folder)."""
    for p in list(run_dir.glob('.*')) + list(run_dir.glob('stages/.*')):
        if p.is_file():
            p.unlink(missing_ok=True)


def check_writable(folder: Path, where: str, setting: str = 'Run.out_dir') -> None:
    """Refuse an output folder the run could not write, before anything is recorded (exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.write-test.')
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SpecError(where, f'cannot write to {folder}: {e.strerror or e}',
                        f'choose a folder this user can write ({setting}), or make this one writable')


# ------------------------------------------------------------------------------------------------ the run lock

class RunBusy(Exception):
    """Another live process holds the run's lock; `holder` is what it wrote into the lock file."""

    def __init__(self, holder: dict):
        super().__init__(holder)
        self.holder = holder


class LocksUnsupported(Exception):
    """The filesystem of the run folder does not implement flock (some network filesystems)."""


def read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or '{}')
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """An exclusive fcntl.flock on the run folder's lock file, held while a process trains the run. The OS releases
    it when the process dies, kill -9 included, so a live run can never be resumed a second time, and the lock of a
    dead one is free. The holder writes its pid, host and start time into the file for the message others get."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self) -> RunLock:
        """-> self, holding the lock; RunBusy when a live process holds it, LocksUnsupported when the filesystem
        cannot lock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(read_holder(self.path)) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...
            os.close(fd)
            raise LocksUnsupported(e.strerror or str(e)) from None
        self.previous = read_holder(self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                  'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}).encode(), 0)
        self.fd = fd
        return self

    def give_back(self) -> None:
        """Release without having run: the previous holder's note is put back (it names the process to wait for)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(self.previous).encode(), 0)
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
