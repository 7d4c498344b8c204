"""The lock that keeps one process per run: an exclusive flock on the run folder's run.lock."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from compiler.errors import UserError
from store.files import file_mode, refuse_link


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
        try:  # O_NOFOLLOW: a link planted as run.lock must not make the holder's note overwrite what it points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(self.path, 'lock a run')
            raise
        if os.fstat(fd).st_nlink > 1:  # a hard link to another file: truncating it would truncate that file
            os.close(fd)
            raise UserError(str(self.path), 'is a hard link to another file, which memspec never makes; it does '
                            'not lock a run through one', 'remove it (and find out who made it), then run again')
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
