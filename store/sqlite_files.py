"""SQLite run database files: which file a URL names, reading one without changing anything (also from a read-only
folder), and refusing a file that belongs to another program before anything is written to it.

A database file is only ever opened through SQLite, never with open(): closing any descriptor of a file drops every
POSIX lock this process holds on it, SQLite's included (SQLite defers closing its own descriptors while it holds
locks; Python's open() does not). A process that read the header of its own WAL database that way lost the shared lock
of its open connection; the next process to close its last connection then took the database for unused,
checkpointed and deleted the -wal file, and every later commit of the first process went to the deleted file: runs of
concurrent members vanished, tables included, and sweep claims went unseen (a member ran twice).
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from compiler.errors import UserError
from store.urls import display_url

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
    the whole database and is read as immutable; only in a read-only folder, as an immutable connection takes no locks
    and would read a file that another process writes as whatever its pages hold at that moment. A file that is not
    SQLite raises sqlite3.DatabaseError (not_a_database)."""
    uri = f'file:{quote(str(path.resolve()))}'
    try:
        return _answering(sqlite3.connect(f'{uri}?mode=ro', uri=True, timeout=10))
    except sqlite3.OperationalError as e:
        if 'unable to open' not in str(e) and 'readonly' not in str(e):
            raise
        wal = path.with_name(path.name + '-wal')
        if wal.is_file() and wal.stat().st_size > 0:
            raise UserError(where, f'{path} cannot be read here: its folder is read-only and {wal.name} holds changes '
                            'not yet in the main file (SQLite needs to write beside it to read them)',
                            f'copy {path.name}, {wal.name} and {path.name}-shm together to a writable folder and '
                            'point --db there') from None
        if os.access(path.parent, os.W_OK):  # not a read-only folder: a writer may be at work, read it properly
            raise
        return sqlite3.connect(f'{uri}?immutable=1', uri=True, timeout=10)


def _answering(con: sqlite3.Connection) -> sqlite3.Connection:
    """The connection once it read the schema (SQLite opens the file lazily); closed when it cannot."""
    try:
        con.execute('SELECT COUNT(*) FROM sqlite_master').fetchall()
        return con
    except BaseException:
        con.close()
        raise


def check_own_database(url: str) -> None:
    """Refuse, before anything is written to it, an existing SQLite file that is not a run database: memspec would
    add its tables to another program's database and switch it to WAL. A file is a run database when it is empty
    or SQLite holding only Sacred's and memspec's tables."""
    path = sqlite_file(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    where = f'--db {display_url(url)}'
    try:
        con = connect_readonly(path, where)
        try:
            tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        what = f'{path} is not a SQLite database' if not_a_database(e) else f'cannot read {path}: {e}'
        raise UserError(where, f'{what} (nothing was written to it)',
                        'point --db at a run database, or at a file that does not exist yet') from None
    foreign = sorted(t for t in tables if t not in SACRED_TABLES and not t.startswith(('memspec_', 'sqlite_')))
    if foreign:
        shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        raise UserError(where, f'{path} belongs to another program: it holds tables no run database has ({shown}); '
                        'nothing was written to it', 'record runs in their own file, e.g. --db sqlite:///runs/sacred.db')


def not_a_database(e: Exception) -> bool:
    """Is this error (sqlite3's, or SQLAlchemy's around it) SQLite finding no SQLite header in the file?"""
    e = getattr(e, 'orig', None) or e
    return getattr(e, 'sqlite_errorcode', None) == sqlite3.SQLITE_NOTADB
