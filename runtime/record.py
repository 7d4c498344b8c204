"""Recording runs with Sacred.

- SQLite file (default `runs/sacred.db`) or PostgreSQL URL: Sacred's SqlObserver, which keeps no metrics, so
  metrics go to one extra table, `memspec_metrics`, in the same database (plain SQL can join it to Sacred's
  `run` table on run_id).
- MongoDB URL: Sacred's MongoObserver, which stores metrics itself.
- `--resume ID` re-attaches to the existing run row instead of creating a second one.
- Several runs may start at once on one database: run ids are unique (an id taken by a concurrent run is retried
  with the next one), and the tables are created once whoever comes first.
- A database that goes away mid-run: metric rows are kept in memory and retried; before each checkpoint `sync()`
  must get them all in, or it raises RecordingLost and the run stops without writing that checkpoint, so the last
  checkpoint's metrics are all recorded and `--resume` replays (and records) everything after it.
- Run ids count 0, 1, 2, ... per database. Sacred's SqlObserver numbers a new run `1 + the primary key of the newest
  row`, and the first row's key is 1 although its run id is 0, so its ids went 0, 2, 3, ...; `next_run_id` counts
  from the recorded run ids instead.
- Captured output (Sacred's `captured_out`): what the run printed, tqdm's carriage-return redraws collapsed
  (sacred.utils.apply_backspaces_and_linefeeds); a resumed run keeps what the earlier processes captured before it.
- Sacred imports pkg_resources, whose deprecation warning would greet every command: `import_sacred` silences that
  one warning where sacred is first imported, and nothing else.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import time
import warnings
from pathlib import Path
from threading import Lock, RLock

import sqlalchemy as sa

from compiler.errors import UserError
from store.database import METRICS, display_url, first_line, make_engine
from store.sqlite_files import check_own_database


def import_sacred():
    """Import sacred without the pkg_resources deprecation warning its import triggers (sacred 0.8.7's
    dependencies.py imports pkg_resources; setuptools < 81 is pinned for it). Only that warning is filtered, and only
    during this import: pkg_resources warns when it is first imported, which is here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
        import sacred
        import sacred.observers  # noqa: F401  (the observers import the rest of sacred)
    return sacred


import_sacred()
from sacred.observers import SqlObserver  # noqa: E402  (after the filtered import above)

RESUMED = '\n--- resumed ---\n'  # between the output of the processes of a resumed run in captured_out


class RecordingLost(RuntimeError):
    """The run database stopped answering mid-run; what was not recorded is still replayable from the checkpoint."""


def _retry(action, attempts: int = 8):
    """Run `action` (e.g. CREATE TABLE IF NOT EXISTS) that may race with another process doing the same: PostgreSQL
    answers a concurrent CREATE TABLE with a unique violation on pg_type, SQLite with 'table already exists'."""
    for attempt in range(attempts):
        try:
            return action()
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))


class ResumableSqlObserver(SqlObserver):
    """SqlObserver that continues an existing run row when Sacred is given its id (resume), and records the
    metrics Sacred's SqlObserver drops."""

    def __init__(self, url: str):
        try:
            if url.startswith('sqlite:///'):
                Path(url[len('sqlite:///'):]).parent.mkdir(parents=True, exist_ok=True)
            engine = make_engine(url)
            with engine.connect():
                pass
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (any connection failure is the user's URL)
            raise UserError(f'--db {display_url(url)}', f'cannot open the run database: {first_line(e, url)}',
                            'check the URL (sqlite:///path.db or postgresql://user@host/db) and that the server runs')
        from sqlalchemy.orm import sessionmaker
        # SqlObserver.__init__ would open its own engine without our SQLite settings; set up what it sets, but
        # with ONE session for both of Sacred's threads. Sacred's thread-local sessions let the heartbeat thread
        # change the run row that lives in the main thread's session; the likely cause (not proven) of runs whose
        # metric writes all timed out with 'database is locked' while nothing was committed for minutes. Now
        # every event holds self.lock (reentrant: Sacred's save() takes it too) and nothing is expired on
        # commit, so no attribute access reloads behind the lock's back.
        self.engine, self.session = engine, sessionmaker(bind=engine, expire_on_commit=False)()
        self.priority, self.run, self.lock = 40, None, RLock()
        _retry(lambda: METRICS.create(engine, checkfirst=True))
        self.metrics_engine = engine
        self.url = url
        self.pending: list[dict] = []  # metric rows not yet in the database (it did not answer)
        self.lost: Exception | None = None  # the last database failure since the last successful sync
        self.metrics_lock = Lock()
        self.initial_info: dict = {}  # written with a new run row, in the same INSERT (the run key)
        self.earlier_out = ''  # captured_out of the processes before a resume

    def _add_event(self, *args, **kwargs):
        with self.lock:
            return self._add_or_continue(*args, **kwargs)

    def _add_or_continue(self, ex_info, command, host_info, config, meta_info, _id, status, **kwargs):
        from sacred.observers.sql_bases import Base, Run
        _retry(lambda: Base.metadata.create_all(self.engine))
        existing = self.session.query(Run).filter_by(run_id=str(_id)).first() if _id is not None else None
        if existing is None:
            # two runs starting together pick the same next id and one insert violates the unique run_id; roll
            # back and pick again (it then sees the other run's row)
            for attempt in range(50):
                try:
                    return super()._add_event(ex_info, command, host_info, config, meta_info,
                                              next_run_id(self.session) if _id is None else _id, status,
                                              info=json.dumps(self.initial_info), **kwargs)
                except sa.exc.IntegrityError:
                    self.session.rollback()
                    if _id is not None or attempt == 49:
                        raise
                    time.sleep(random.uniform(0.005, 0.05))
        self.run = existing
        self.earlier_out = (existing.captured_out or '') + RESUMED if existing.captured_out else ''
        self.run.status, self.run.stop_time, self.run.fail_trace = status, None, None
        self.save()
        return _id

    def _lose(self, error: Exception) -> None:
        self.lost = error
        try:
            with self.lock:
                self.session.rollback()
        except Exception:  # noqa: BLE001  (the connection is gone; nothing to roll back)
            pass

    def log_metrics(self, metrics_by_name, info):
        """Called by Sacred's heartbeat thread and before each checkpoint. Never raises: rows the database does not
        take stay pending for the next call (and `sync`)."""
        rows = [{'run_id': str(self.run.run_id), 'name': name, 'step': int(step), 'value': float(value), 'time': ts}
                for name, m in metrics_by_name.items()
                for step, value, ts in zip(m['steps'], m['values'], m['timestamps'])]
        with self.metrics_lock:
            self.pending.extend(rows)
            try:
                self._write_pending()
            except sa.exc.SQLAlchemyError as e:
                self.lost = e

    def _write_pending(self) -> None:
        if self.pending:
            with self.metrics_engine.begin() as conn:
                conn.execute(METRICS.insert(), self.pending)
            self.pending = []

    def sync(self) -> None:
        """Before a checkpoint: every metric logged so far must be in the database, else RecordingLost."""
        with self.metrics_lock:
            try:
                self._write_pending()
                if self.lost is not None:  # it failed earlier (a heartbeat): does it answer again?
                    with self.metrics_engine.connect() as conn:
                        conn.execute(sa.text('SELECT 1'))
            except sa.exc.SQLAlchemyError as e:
                self.lost = e
                cause = first_line(e, self.url)
                raise RecordingLost(f'the run database {display_url(self.url)} stopped answering ({cause}); '
                                    f'{len(self.pending)} metric rows are not recorded yet') from e
            self.lost = None

    # Status and artifact events must not raise once the database is gone: Sacred would print their traceback.
    def _quietly(self, event, *args, **kwargs) -> None:
        if self.run is None:  # the run never started (its row was not written)
            return
        try:
            with self.lock:
                event(*args, **kwargs)
        except sa.exc.SQLAlchemyError as e:
            self._lose(e)

    def heartbeat_event(self, info, captured_out, beat_time, result):
        self._quietly(super().heartbeat_event, info, self.earlier_out + (captured_out or ''), beat_time, result)

    def completed_event(self, stop_time, result):
        self._quietly(super().completed_event, stop_time, result)

    def interrupted_event(self, interrupt_time, status):
        self._quietly(super().interrupted_event, interrupt_time, status)

    def failed_event(self, fail_time, fail_trace):
        if self.lost is None:
            self._quietly(super().failed_event, fail_time, fail_trace)

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        """Replaces an artifact of the same name: a resumed run adds its artifacts again after a kill that came
        after some of them were recorded."""
        def replace():
            for old in [a for a in self.run.artifacts if a.filename == name]:
                self.run.artifacts.remove(old)
                self.session.delete(old)
            super(ResumableSqlObserver, self).artifact_event(name, filename, metadata, content_type)
        self._quietly(replace)

    def forget_after(self, run_id: str, step: int) -> None:
        """On resume: drop metrics logged after the checkpoint, so replayed steps are not recorded twice."""
        with self.metrics_engine.begin() as conn:
            conn.execute(METRICS.delete().where(METRICS.c.run_id == str(run_id), METRICS.c.step > step))


def next_run_id(session) -> int:
    """The id of a new run: one more than the largest numeric run id recorded, 0 in an empty database."""
    from sacred.observers.sql_bases import Run
    ids = [int(r) for (r,) in session.query(Run.run_id).all() if str(r).isdigit()]
    return max(ids) + 1 if ids else 0


def observer(url: str):
    if url.startswith('mongodb://') or url.startswith('mongodb+srv://'):
        from sacred.observers import MongoObserver
        try:
            return MongoObserver(url=url)
        except ImportError:
            raise UserError(f'--db {display_url(url)}', 'recording into MongoDB needs pymongo, which is not installed',
                            'pip install pymongo, or record into sqlite:///runs/sacred.db or postgresql://') from None
        except Exception as e:  # noqa: BLE001  (pymongo's errors: a bad URL or an unreachable server)
            raise UserError(f'--db {display_url(url)}', f'cannot open the run database: {first_line(e, url)}',
                            'check the URL and that mongod runs and is reachable') from None
    if not (url.startswith('sqlite://') or url.startswith('postgresql')):
        raise UserError(f'--db {display_url(url)}', 'unsupported database URL',
                        'use sqlite:///runs/sacred.db, postgresql://user@host/db or mongodb://host/db')
    check_lasting(url)
    return ResumableSqlObserver(url)


def check_lasting(url: str) -> None:
    """Refuse a run database that ends with the process (in-memory SQLite): the run could never be resumed or
    queried; and a SQLite file that belongs to another program (store.sqlite_files.check_own_database), before anything
    is written."""
    if not url.startswith('sqlite'):
        return
    check_own_database(url)
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return  # ResumableSqlObserver reports an unparsable URL
    memory = not u.database or u.database == ':memory:' or u.database.startswith('file::memory:') \
        or u.query.get('mode') == 'memory'
    if memory:
        raise UserError(f'--db {display_url(url)}', 'an in-memory SQLite database ends with the process: the run '
                        'could not be resumed, queried or analysed afterwards',
                        'give a database file, e.g. --db sqlite:///runs/sacred.db (the default is '
                        '<Run.out_dir>/sacred.db)')


def now():
    return dt.datetime.now(dt.timezone.utc)
