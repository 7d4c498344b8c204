"""Files memspec writes into run folders, memory stores and sweep folders: atomically, with the permissions the
umask gives, never through a symbolic link someone else planted, and with a failed write reported as what it is.

atomic_write writes a temporary file made with O_EXCL (mkstemp: never an existing file or link) and renames it over
the target: a kill leaves the old file or the new one, never half of one, and the rename replaces a link instead of
writing through it. A link at the target or as the folder itself is refused anyway (exit 2, one message): memspec
makes no links, so one there was planted, and writing past it would hide that. mkstemp creates 0600, which would keep
other users from resuming or generating from a run, so the file gets the mode a plain open() would give. A write that
failed in a library's own writer (torch.save reports a full disk as RuntimeError 'unexpected pos', safetensors as
SafetensorError) becomes the OSError it stands for, the filesystem asked whether it is full.

The store's commands write files a user keeps (exports, plots): a folder a library wrote is settled (`settle`: every
file gets the umask's mode, safetensors creates 0600 files) before it is moved into place, and a full or read-only
disk there is one message (`disk_error`) instead of a traceback.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from compiler.errors import UserError

FULL_BELOW = 1 << 20  # bytes free under which a failed write is a full disk
# errors that mean "this disk or folder cannot take the file", not a bug
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


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


def refuse_link(path: Path, what: str = 'write') -> None:
    """UserError when `path` is a symbolic link: memspec makes none in the folders it writes, so one there was planted
    (and writing through it would change whatever it points at)."""
    if os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = '?'
        raise UserError(str(path), f'is a symbolic link (to {target}), which memspec never makes; it does not '
                        f'{what} through one', 'remove the link (and find out who made it), then run the command again')


def atomic_write(path: Path, write, prefix: str | None = None, suffix: str = '') -> None:
    """write(tmp_path) then rename: a kill leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path.parent)
    refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f'.{path.name}.', suffix=suffix)
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


def check_writable(folder: Path, where: str, setting: str = 'Run.out_dir') -> None:
    """Refuse an output folder the run could not write, before anything is recorded (exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.write-test.')
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(where, f'cannot write to {folder}: {e.strerror or e}',
                        f'choose a folder this user can write ({setting}), or make this one writable')


def settle(folder: Path) -> None:
    """Give every file under `folder` the umask's mode (a library may have created it 0600)."""
    mode = file_mode()
    for p in [folder, *folder.rglob('*')]:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def disk_error(e: BaseException, where: str, path: Path | str, what: str = 'nothing was written') -> UserError | None:
    """The message for a write that failed because of the disk or the folder (full, read-only, no permission), or
    None for any other failure. safetensors reports a full disk as its own SafetensorError with the OS text."""
    code = getattr(e, 'errno', None)
    if code is None and type(e).__name__ == 'SafetensorError':
        text = str(e).lower()
        code = errno.ENOSPC if 'no space' in text else errno.EROFS if 'read-only' in text else \
            errno.EACCES if 'permission' in text else errno.EIO
    if code not in DISK_ERRORS:
        return None
    fix = {errno.ENOSPC: 'free space on that disk', errno.EDQUOT: 'free space within your quota',
           errno.EFBIG: 'write to a filesystem that takes larger files',
           errno.EIO: 'check the disk (an I/O error)'}.get(code, 'write to a folder you can write to')
    return UserError(where, f'cannot write {path}: {os.strerror(code)}; {what}', f'{fix}, then run the command again')
