"""The sha256 of a file, by which runs, exports and data caches reference the files they read and write. Kept free
of torch so that hashing a file never loads it (store/layout.py, runtime/data.py)."""
from __future__ import annotations

import hashlib


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()
