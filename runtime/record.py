"""Recording runs with Sacred.

- SQLite file (default `runs/sacred.db`) or PostgreSQL URL: Sacred's SqlObserver, which keeps no metrics, so
  metrics go to one extra table, `memspec_metrics`, in the same database (plain SQL can join it to Sacred's
  `run` table on run_id).
- MongoDB URL: Sacred's MongoObserver, which stores metrics itself.
- `--resume ID` re-attaches to the existing run row instead of creating a second one.
"""
from __future__ import annotations

import datetime as dt
from threading import Lock
from pathlib import Path

import sqlalchemy as sa
from sacred.observers import SqlObserver

from compiler.errors import SpecError

METRICS = sa.Table(
    'memspec_metrics', sa.MetaData(),
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('run_id', sa.String(24), index=True, nullable=False),
    sa.Column('name', sa.String(128), nullable=False),
    sa.Column('step', sa.Integer, nullable=False),
    sa.Column('value', sa.Float),
    sa.Column('time', sa.DateTime),
)


def engine_url(url: str) -> str:
    """The URL SQLAlchemy opens. SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed; the
    pinned driver is psycopg2 (psycopg2-binary), so name it unless the URL names a driver itself."""
    if url.startswith('postgresql://'):
        return 'postgresql+psycopg2://' + url[len('postgresql://'):]
    return url


def make_engine(url: str) -> sa.Engine:
    """SQLite in WAL mode with a generous busy timeout: Sacred's heartbeat thread, our metrics writes and other runs
    sharing the file then wait for each other instead of failing with 'database is locked' (seen under load)."""
    if not url.startswith('sqlite'):
        return sa.create_engine(engine_url(url), pool_pre_ping=True, connect_args={'connect_timeout': 10})
    engine = sa.create_engine(url, connect_args={'timeout': 60})

    @sa.event.listens_for(engine, 'connect')
    def _pragmas(conn, _):
        cur = conn.cursor()
        cur.execute('PRAGMA journal_mode=WAL')
        cur.execute('PRAGMA busy_timeout=60000')
        cur.close()

    return engine


def default_url(out_dir: str) -> str:
    return f'sqlite:///{Path(out_dir) / "sacred.db"}'


class ResumableSqlObserver(SqlObserver):
    """SqlObserver that continues an existing run row when Sacred is given its id (resume), and records the
    metrics Sacred's SqlObserver drops."""

    def __init__(self, url: str):
        if url.startswith('sqlite:///'):
            Path(url[len('sqlite:///'):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = make_engine(url)
            with engine.connect():
                pass
        except Exception as e:  # noqa: BLE001  (any connection failure is the user's URL)
            raise SpecError(f'--db {url}', f'cannot open the run database: {str(e).splitlines()[0]}',
                            'check the URL (sqlite:///path.db or postgresql://user@host/db) and that the server runs')
        from sqlalchemy.orm import scoped_session, sessionmaker
        # SqlObserver.__init__ would open its own engine without our SQLite settings; set up what it sets.
        self.engine, self.session = engine, scoped_session(sessionmaker(bind=engine))
        self.priority, self.run, self.lock = 40, None, Lock()
        METRICS.create(engine, checkfirst=True)
        self.metrics_engine = engine

    def _add_event(self, ex_info, command, host_info, config, meta_info, _id, status, **kwargs):
        from sacred.observers.sql_bases import Base, Run
        Base.metadata.create_all(self.engine)
        existing = self.session.query(Run).filter_by(run_id=str(_id)).first() if _id is not None else None
        if existing is None:
            return super()._add_event(ex_info, command, host_info, config, meta_info, _id, status, **kwargs)
        self.run = existing
        self.run.status, self.run.stop_time, self.run.fail_trace = status, None, None
        self.save()
        return _id

    def log_metrics(self, metrics_by_name, info):
        rows = [{'run_id': str(self.run.run_id), 'name': name, 'step': int(step), 'value': float(value), 'time': ts}
                for name, m in metrics_by_name.items()
                for step, value, ts in zip(m['steps'], m['values'], m['timestamps'])]
        if rows:
            with self.metrics_engine.begin() as conn:
                conn.execute(METRICS.insert(), rows)

    def forget_after(self, run_id: str, step: int) -> None:
        """On resume: drop metrics logged after the checkpoint, so replayed steps are not recorded twice."""
        with self.metrics_engine.begin() as conn:
            conn.execute(METRICS.delete().where(METRICS.c.run_id == str(run_id), METRICS.c.step > step))


def observer(url: str):
    if url.startswith('mongodb://') or url.startswith('mongodb+srv://'):
        from sacred.observers import MongoObserver
        return MongoObserver(url=url)
    if not (url.startswith('sqlite://') or url.startswith('postgresql')):
        raise SpecError(f'--db {url}', 'unsupported database URL',
                        'use sqlite:///runs/sacred.db, postgresql://user@host/db or mongodb://host/db')
    return ResumableSqlObserver(url)


def run_exists(url: str, run_id: str) -> bool:
    obs_engine = make_engine(url)
    try:
        with obs_engine.connect() as conn:
            return conn.execute(sa.text('SELECT 1 FROM run WHERE run_id = :r'), {'r': str(run_id)}).first() is not None
    except sa.exc.OperationalError:
        return False
    except sa.exc.ProgrammingError:
        return False


def now():
    return dt.datetime.now(dt.timezone.utc)
