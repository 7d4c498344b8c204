"""SQLite run database files: which file a URL names, reading one without changing anything (also from a read-only
folder), and refusing a file that belongs to another program before anything is written to it.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from compiler.errors import UserError
from store.urls import display_url

SQLITE_HEADER = b'SQLite format 3\x00'
# Sacred's SqlObserver tables (sacred.observers.sql_bases); memspec's own are memspec_*
SACRED_TABLES = frozenset({'artifact', 'dependency', 'experiment', 'experiments_dependencies',
                           'experiments_repositories', 'experiments_sources', 'host', 'repository', 'resource', 'run',
                           'runs_resources', 'source'})


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for other databases, in-memory SQLite and unparsable URLs."""
    if not url.startswith('sqlite'):
        return None
    try:
        db = sa.engine.make_url(url).database
    except (sa.exc.ArgumentError, ValueError):
        return None
    return None if not db or db == ':memory:' or db.startswith('file:') else Path(db)


def connect_readonly(path: Path, where: str) -> sqlite3.Connection:
    """A read-only connection that never creates or changes anything. A WAL database in a read-only folder cannot
    be opened with mode=ro (SQLite wants to create its -shm file); when no -wal file holds changes, the main file is
    the whole database and is read as immutable."""
    uri = f'file:{quote(str(path.resolve()))}'
    try:
        con = sqlite3.connect(f'{uri}?mode=ro', uri=True, timeout=10)
        con.execute('SELECT COUNT(*) FROM sqlite_master').fetchall()
        return con
    except sqlite3.OperationalError as e:
        if 'unable to open' not in str(e) and 'readonly' not in str(e):
            raise
        wal = path.with_name(path.name + '-wal')
        if wal.is_file() and wal.stat().st_size > 0:
            raise UserError(where, f'{path} cannot be read here: its folder is read-only and {wal.name} holds changes '
                            'not yet in the main file (SQLite needs to write beside it to read them)',
                            f'copy {path.name}, {wal.name} and {path.name}-shm together to a writable folder and '
                            'point --db there') from None
        return sqlite3.connect(f'{uri}?immutable=1', uri=True, timeout=10)


def check_own_database(url: str) -> None:
    """Refuse, before anything is written to it, an existing SQLite file that is not a run database: memspec would
    add its tables to another program's database and switch it to WAL. A file is a run database when it is empty
    or SQLite holding only Sacred's and memspec's tables."""
    path = sqlite_file(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    where = f'--db {display_url(url)}'
    with open(path, 'rb') as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise UserError(where, f'{path} is not a SQLite database (nothing was written to it)',
                            'point --db at a run database, or at a file that does not exist yet')
    try:
        con = connect_readonly(path, where)
        try:
            tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(where, f'cannot read {path}: {e} (nothing was written to it)',
                        'point --db at a run database, or at a file that does not exist yet') from None
    foreign = sorted(t for t in tables if t not in SACRED_TABLES and not t.startswith(('memspec_', 'sqlite_')))
    if foreign:
        shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        raise UserError(where, f'{path} belongs to another program: it holds tables no run database has ({shown}); '
                        'nothing was written to it', 'record runs in their own file, e.g. --db sqlite:///runs/sacred.db')
