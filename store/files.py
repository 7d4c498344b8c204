"""How the store's commands write files a user keeps (exports, plots): with the permissions the umask gives, and a
full or read-only disk as one message instead of a traceback.

Libraries write some files themselves with their own modes (safetensors creates 0600 files), so a folder written
for the user is settled (`settle`) before it is moved into place: every file gets the mode a plain open() gives.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from compiler.errors import SpecError

# errors that mean "this disk or folder cannot take the file", not a bug
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def file_mode() -> int:
    """The mode a plain open() gives a new file under this process's umask."""
    try:  # Linux shows the umask; reading it there changes nothing, not even for a moment
        with open('/proc/self/status') as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere it can only be read by setting it: set it back at once
        os.umask(mask)
    return 0o666 & ~mask


def settle(folder: Path) -> None:
    """Give every file under `folder` the umask's mode (a library may have created it 0600)."""
    mode = file_mode()
    for p in [folder, *folder.rglob('*')]:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def disk_error(e: BaseException, where: str, path: Path | str, what: str = 'nothing was written') -> SpecError | None:
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
    return SpecError(where, f'cannot write {path}: {os.strerror(code)}; {what}', f'{fix}, then run the command again')
