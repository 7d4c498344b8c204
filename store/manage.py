"""Changing what the run database says about a run: tags and a note (`python -m store.runs tag | note`), and deleting
a run with its folder and memories (`python -m store.runs delete`). SQL databases only (SQLite, PostgreSQL).

Tags and notes live in `memspec_labels(run_id, kind, text, time)` (kind 'tag' or 'note'; a run has any number of tags
and at most one note), beside Sacred's tables; `list` and `show` print them and `list --tag` filters by them.

`delete` removes a run's rows from every table that holds them (run, artifact, runs_resources, memspec_metrics,
memspec_evaluations, memspec_labels; the experiment, host and source rows stay, other runs share them), its run
folder (only when the folder's marker names this run: run id and run key) and its group in the memory store (only
when the group's attributes carry the run's key). It refuses a run whose process is alive (its run.lock is held, or
it is RUNNING with a fresh heartbeat), holds the lock while it deletes so no resume starts meanwhile, and asks for
confirmation unless given --yes.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import sqlalchemy as sa

from compiler.errors import UserError
from store.database import STALE_AFTER, display_url, first_line, make_engine
from store.layout import MEMORY_STORE, RunFolder
from store.runref import record_of

LABELS = sa.Table(
    'memspec_labels', sa.MetaData(),
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('run_id', sa.String(24), index=True, nullable=False),
    sa.Column('kind', sa.String(8), nullable=False),  # 'tag' | 'note'
    sa.Column('text', sa.Text, nullable=False),
    sa.Column('time', sa.DateTime),
)
TAG_CHARS = set('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:+=/')
# the tables that hold rows of one run (Sacred's and ours); a table a database lacks is skipped
RUN_TABLES = ('artifact', 'runs_resources', 'memspec_metrics', 'memspec_evaluations', 'memspec_labels', 'run')


def labels(db, run_ids: list[str]) -> dict[str, dict]:
    """run -> {'tags': [...], 'note': str | None}, for every run of `run_ids` that has any."""
    if not hasattr(db, 'engine') or not run_ids:
        return {}
    try:
        if 'memspec_labels' not in sa.inspect(db.engine).get_table_names():
            return {}
        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(LABELS.c.run_id, LABELS.c.kind, LABELS.c.text)
                                .where(LABELS.c.run_id.in_([str(r) for r in run_ids])).order_by(LABELS.c.id)).all()
    except sa.exc.DBAPIError as e:
        raise UserError(db.where, f'cannot read tags and notes: {first_line(e, db.url)}',
                        'check that this is a run database written by python -m runtime.run')
    out: dict[str, dict] = {}
    for run_id, kind, text in rows:
        d = out.setdefault(str(run_id), {'tags': [], 'note': None})
        if kind == 'tag' and text not in d['tags']:
            d['tags'].append(text)
        elif kind == 'note':
            d['note'] = text
    return out


def _writable(db, what: str) -> str:
    if not hasattr(db, 'engine'):
        raise UserError(db.where, f'{what} works on SQL run databases only',
                        'record runs in sqlite:/// or postgresql:// (python -m runtime.run ... --db URL)')
    return db.url


def _write(url: str, statements, create: bool = True) -> None:
    """Run `statements(conn)` in one transaction of a writing engine (nothing changes unless all succeed); `create`:
    the labels table first, where it is missing."""
    engine = make_engine(url)
    try:
        if create:
            LABELS.create(engine, checkfirst=True)
        with engine.begin() as conn:
            statements(conn)
    except sa.exc.SQLAlchemyError as e:
        raise UserError(f'--db {display_url(url)}', f'cannot write to the run database: {first_line(e, url)}',
                        'check that the database is writable and its server runs; nothing was changed')
    finally:
        engine.dispose()


def check_tag(tag: str) -> str:
    if not tag or len(tag) > 64 or not set(tag) <= TAG_CHARS:
        raise UserError(f'tag {tag!r}', 'a tag is 1 to 64 letters, digits or _-.:+=/ (no spaces)',
                        "e.g. python -m store.runs tag 3 baseline, or lr_sweep:v2; put prose in a note")
    return tag


def cmd_tag(db, args) -> None:
    url = _writable(db, 'tag')
    run = record_of(db, args.id)
    tags = [check_tag(t) for t in args.tags]
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    def go(conn):
        mine = (LABELS.c.run_id == run.id) & (LABELS.c.kind == 'tag')
        conn.execute(LABELS.delete().where(mine & LABELS.c.text.in_(tags)))
        if not args.remove:
            conn.execute(LABELS.insert(), [{'run_id': run.id, 'kind': 'tag', 'text': t, 'time': now} for t in tags])
    _write(url, go)
    have = labels(db, [run.id]).get(run.id, {}).get('tags', [])
    print(f"run {run.id} tags: {', '.join(have) or '(none)'}")


def cmd_note(db, args) -> None:
    url = _writable(db, 'note')
    run = record_of(db, args.id)
    text = ' '.join(args.text).strip()
    if len(text) > 10_000:
        raise UserError(f'note {args.id}', f'the note is {len(text):,} characters long (at most 10,000)',
                        'keep notes short; long write-ups belong in a file next to the run')

    def go(conn):
        conn.execute(LABELS.delete().where((LABELS.c.run_id == run.id) & (LABELS.c.kind == 'note')))
        if text:
            conn.execute(LABELS.insert(), [{'run_id': run.id, 'kind': 'note', 'text': text,
                                            'time': dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)}])
    _write(url, go)
    print(f'run {run.id} note: {text}' if text else f'run {run.id}: note removed')


def label_text(marks: dict | None) -> str:
    """'[tag1, tag2] note' for list (the note cut to 40 characters)."""
    if not marks:
        return ''
    note = marks.get('note') or ''
    note = note if len(note) <= 40 else note[:39] + '…'
    return ' '.join(x for x in ((f"[{', '.join(marks['tags'])}]" if marks['tags'] else ''), note) if x)


# ------------------------------------------------------------------------------------------------ delete

def run_folder(run) -> RunFolder | None:
    """The run's folder when it exists here and its marker names this run (id and key); else None."""
    path = run.info.get('run_dir')
    if not isinstance(path, str) or not Path(path).is_dir() or Path(path).is_symlink():
        return None
    folder = RunFolder.at(path)
    owner = folder.owner() or {}
    if str(owner.get('run_id')) != run.id or owner.get('run_key') != run.run_key:
        return None
    return folder


def memory_group(run, folder: RunFolder | None) -> Path | None:
    """The run's group folder in its memory store when it is there and carries the run's key; else None."""
    setting = (run.plan.get('run') or {}).get('memory_store', '')
    if setting == 'none' or not run.run_key:
        return None
    if setting:
        store = Path(setting)
    elif folder is not None:
        store = folder.root.parent / MEMORY_STORE
    else:
        return None
    group = store / run.name
    if not group.is_dir() or group.is_symlink():
        return None
    try:
        stages = [json.loads((p / 'zarr.json').read_text()) for p in group.iterdir() if (p / 'zarr.json').is_file()]
    except (OSError, ValueError):
        return None
    keys = {(s.get('attributes') or {}).get('run_key') for s in stages if isinstance(s, dict)}
    return group if keys == {run.run_key} else None


def check_not_live(run) -> None:
    silent = run.silent_for()
    if run.status == 'RUNNING' and (silent is None or silent <= STALE_AFTER):
        raise UserError(f'delete {run.id}', 'the run is RUNNING (its heartbeat is fresh)',
                        'wait for it to finish, or stop it first; a run whose process died shows as stale in '
                        'python -m store.runs list and can be deleted')


@contextlib.contextmanager
def held(folder: RunFolder | None, run):
    """Hold the run's lock while deleting (a resume started meanwhile is refused); refuse a live run."""
    check_not_live(run)
    if folder is None or not folder.lock.is_file():
        yield
        return
    fd = os.open(folder.lock, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f'delete {run.id}', f'a process holds {folder.lock}: the run is training',
                            'wait for it to finish, or stop it first') from None
        except OSError:  # a filesystem without locks: the heartbeat check above is all there is
            pass
        yield
    finally:
        os.close(fd)


def dependents(db, run) -> list[str]:
    """Ids of other runs whose stages were initialised from this run's weights (init_from 'run:...')."""
    out = []
    for other in db.runs():
        sources = ((other.config.get('provenance') or {}).get('init_from') or {}).values()
        refs = {str(src.get('source', '')) for comps in sources if isinstance(comps, dict)
                for src in comps.values() if isinstance(src, dict)}
        if other.id != run.id and any(r.startswith((f'run:{run.id}/', f'run:{run.name}/')) for r in refs):
            out.append(other.id)
    return out


def confirmed(prompt: str, yes: bool) -> bool:
    if yes:
        return True
    print(prompt, end=' ', file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ('y', 'yes')


def plan_text(db, run, folder: RunFolder | None, group: Path | None) -> str:
    """What delete will remove, as it says before asking."""
    lines = ['will delete', f'run {run.id} ({run.status}) in {db.name}: its database rows',
             f'  run folder   {folder.root}' if folder else '  run folder   (none here that names this run; kept)',
             f'  memories     {group}' if group else '  memories     (no group of this run here)']
    later = dependents(db, run)
    if later:
        lines.append(f"  note: run(s) {', '.join(later)} were initialised from its weights; their records keep the "
                     'sha256 of what they read')
    return '\n'.join(lines)


def remove(db, url: str, run, paths: list[Path]) -> None:
    """The run's rows (one transaction), then its folders."""
    tables = set(sa.inspect(db.engine).get_table_names())

    def go(conn):
        for t in RUN_TABLES:
            if t in tables:
                conn.execute(sa.text(f'DELETE FROM {t} WHERE run_id = :r'), {'r': run.id})
    _write(url, go, create=False)
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise UserError(str(path), f'the run was deleted from the database but not this folder: '
                            f'{e.strerror or e}', f'remove {path} by hand') from None


def cmd_delete(db, args) -> None:
    url = _writable(db, 'delete')
    run = record_of(db, args.id)
    check_not_live(run)
    if not args.yes and not sys.stdin.isatty():
        raise UserError(f'delete {run.id}', 'deleting needs a confirmation and stdin is not a terminal',
                        'pass --yes to delete without asking')
    folder = run_folder(run)
    group = memory_group(run, folder)
    print(plan_text(db, run, folder, group), file=sys.stderr)
    if not confirmed(f'delete run {run.id}? [y/N]', args.yes):
        print('nothing deleted', file=sys.stderr)
        return
    with held(folder, run):
        remove(db, url, run, [p for p in (group, folder.root if folder else None) if p is not None])
    if group is not None:
        from store.memories import consolidate  # the store's index (consolidated metadata) forgets the group
        consolidate(group.parent)
    print(f'deleted run {run.id}' + (f', {folder.root}' if folder else '') + (f', {group}' if group else ''),
          file=sys.stderr)
