"""The run database: one module owns how memspec reaches Sacred's records (both the runtime, which writes them, and
the store's readers use it).

- URLs: `sqlite:///path.db` (default `<Run.out_dir>/sacred.db`), `postgresql://user:password@host/db` (psycopg2),
  `mongodb://host` (Sacred's MongoObserver, read with pymongo where installed). `display_url` (store/urls.py)
  masks every secret a URL can carry; every message, record and export that names a database uses it.
- Tables: Sacred's SqlObserver tables (`run`, `host`, `experiment`, `artifact`, ...) plus `memspec_metrics`
  (run_id, name, step, value, time), which Sacred's SqlObserver does not keep, and `memspec_evaluations`
  (run_id, stage, task, metric, value, memory, limit, time): one row per metric of `python -m runtime.evaluate`,
  tied to the run and the stage whose weights were evaluated ('final' for the final weights). Plain SQL joins both
  to `run` on run_id.
- Reading: `open_db(url)` -> SqlDb or MongoDb with one interface (runs, metrics, final_metrics, at_steps,
  artifacts); SQLite files are opened read-only and never created (store/sqlite_files.py, which also refuses to
  write into a SQLite file of another program). `RunRecord` is one run as recorded, each field checked on read
  (store/record_checks.py): a damaged one is named in `damaged`, and `get_run` refuses such a run with one message.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import sqlalchemy as sa

from compiler.errors import UserError
from store.layout import is_run_key, run_name
from store.record_checks import STATUSES, checked, type_name
from store.sqlite_files import check_own_database, connect_readonly, not_a_database
from store.urls import display_url, redact  # noqa: F401  (display_url: the name every module imports)

DEFAULT_DB = 'sqlite:///runs/sacred.db'
# A RUNNING run whose last heartbeat is older than this is presumably dead: Sacred beats every 10 s, so this is six
# missed beats (a busy SQLite file or a loaded machine delays one by seconds, not by a minute).
STALE_AFTER = dt.timedelta(seconds=60)

METRICS = sa.Table(
    'memspec_metrics', sa.MetaData(),
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('run_id', sa.String(24), index=True, nullable=False),
    sa.Column('name', sa.String(128), nullable=False),
    sa.Column('step', sa.Integer, nullable=False),
    sa.Column('value', sa.Float),
    sa.Column('time', sa.DateTime),
)

EVALUATIONS = sa.Table(
    'memspec_evaluations', sa.MetaData(),
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('run_id', sa.String(24), index=True, nullable=False),
    sa.Column('stage', sa.String(128), nullable=False),  # the stage whose end weights were read, or 'final'
    sa.Column('task', sa.String(256), nullable=False),
    sa.Column('metric', sa.String(256), nullable=False),
    sa.Column('value', sa.Float),
    sa.Column('memory', sa.String(32), nullable=False),  # on | ablated | full_context
    sa.Column('limit', sa.Integer),  # documents per task (None: all)
    sa.Column('time', sa.DateTime),
)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    stage: str
    task: str
    metric: str
    value: float
    memory: str
    limit: int | None
    time: dt.datetime | None


def record_evaluations(url: str, run_id: str, rows: list[dict]) -> None:
    """Append evaluation rows (stage, task, metric, value, memory, limit, time) of one run, in one transaction."""
    engine = make_engine(url)
    try:
        EVALUATIONS.create(engine, checkfirst=True)
        with engine.begin() as conn:
            conn.execute(EVALUATIONS.insert(), [{'run_id': str(run_id), **r} for r in rows])
    except sa.exc.SQLAlchemyError as e:
        raise UserError(f'--db {display_url(url)}', f'cannot record the evaluation: {first_line(e)}',
                        'check that the database is writable and its server runs; nothing was recorded')
    finally:
        engine.dispose()


def latest_evaluations(evals: list[Evaluation]) -> list[Evaluation]:
    """The newest value of each (stage, memory, limit, task, metric), in first-recorded order."""
    out: dict[tuple, Evaluation] = {}
    for e in evals:
        out[(e.stage, e.memory, e.limit, e.task, e.metric)] = e
    return list(out.values())


def engine_url(url: str) -> str:
    """The URL SQLAlchemy opens. SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed; the
    pinned driver is psycopg2 (psycopg2-binary), so name it unless the URL names a driver itself."""
    if url.startswith('postgresql://'):
        return 'postgresql+psycopg2://' + url[len('postgresql://'):]
    return url


def make_engine(url: str) -> sa.Engine:
    """An engine that writes. SQLite in WAL mode with a generous busy timeout: Sacred's heartbeat thread, our metrics
    writes and other runs sharing the file then wait for each other instead of failing with 'database is locked'
    (seen under load)."""
    if not url.startswith('sqlite'):
        return sa.create_engine(engine_url(url), pool_pre_ping=True, connect_args={'connect_timeout': 10})
    check_own_database(url)  # before the first connection switches the file to WAL
    # one session serves Sacred's main and heartbeat threads (under a lock), so connections cross threads
    engine = sa.create_engine(url, connect_args={'timeout': 60, 'check_same_thread': False})

    @sa.event.listens_for(engine, 'connect')
    def _pragmas(conn, _):
        cur = conn.cursor()
        cur.execute('PRAGMA busy_timeout=60000')
        _switch_to_wal(cur)
        cur.close()

    return engine


def _switch_to_wal(cur, patience: float = 60.0) -> None:
    """PRAGMA journal_mode=WAL, retried while another process holds the file: switching a new file's journal needs
    an exclusive lock, and SQLite answers 'database is locked' at once (its busy handler is not asked, to avoid a
    deadlock) when processes open a new run database together."""
    import sqlite3
    deadline = time.monotonic() + patience
    while True:
        try:
            cur.execute('PRAGMA journal_mode=WAL')
            return
        except sqlite3.OperationalError as e:
            if 'locked' not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def default_url(out_dir: str) -> str:
    return f'sqlite:///{Path(out_dir) / "sacred.db"}'


def span(t: dt.timedelta) -> str:
    """A duration for messages: '45 s', '12 min', '2 h 05 min', '3 days'."""
    s = max(0, int(t.total_seconds()))
    if s < 120:
        return f'{s} s'
    if s < 7200:
        return f'{s // 60} min'
    if s < 3 * 86400:
        return f'{s // 3600} h {s % 3600 // 60:02d} min'
    return f'{s // 86400} days'


def first_line(e: Exception, url: str | None = None) -> str:
    """The first line of a database error (the driver's own message when there is one), without the password of
    `url` (some drivers and SQLAlchemy's URL parser quote the URL they were given)."""
    text = redact(str(getattr(e, 'orig', None) or e).strip(), url)
    return text.splitlines()[0] if text else type(e).__name__


def recorded_run(url: str, run_id: str) -> RunRecord | None:
    """A run as recorded, or None when the database (an SQLite file that does not exist is not created) or the run
    is not there."""
    try:
        found = open_db(url).runs(run_id=run_id)
    except UserError:
        return None
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------ records

@dataclasses.dataclass
class RunRecord:
    id: str
    status: str
    start: dt.datetime | None
    stop: dt.datetime | None
    config: dict
    info: dict
    result: float | None = None
    fail_trace: str | None = None
    host: dict = dataclasses.field(default_factory=dict)
    experiment: str = ''
    heartbeat: dt.datetime | None = None  # Sacred's last heartbeat (naive UTC), None before the first one
    damaged: list[str] = dataclasses.field(default_factory=list)  # fields recorded wrong and left out (checked())

    def check(self) -> RunRecord:
        """This run, or one message naming what of its record is damaged (for commands that need all of it)."""
        if self.damaged:
            raise UserError(f'run {self.id}', f"its record is damaged: {'; '.join(self.damaged)}",
                            'the row was changed outside memspec: restore the database from a backup, or record the '
                            'run again (python -m store.runs list still lists it)')
        return self

    @property
    def run_key(self) -> str | None:
        """The run key recorded with the run (store/layout.py); None for runs recorded before run keys."""
        key = self.info.get('run_key')
        return key if is_run_key(key) else None

    @property
    def name(self) -> str:
        """The name of the run's folder and memory group (store/layout.py)."""
        return run_name(self.id, self.run_key)

    def silent_for(self, now: dt.datetime | None = None) -> dt.timedelta | None:
        """How long a RUNNING run has not beaten (since its start when it never did); None for other states."""
        last = self.heartbeat or self.start
        if self.status != 'RUNNING' or last is None:
            return None
        now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        if last.tzinfo is not None:
            last = last.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return now - last

    @property
    def plan(self) -> dict:
        return self.config.get('plan') or {}  # an object (checked())

    @property
    def flat(self) -> dict:
        if not hasattr(self, '_flat'):
            self._flat = flatten(self.config)
        return self._flat

    @property
    def stages(self) -> list[str]:
        stages = self.plan.get('curriculum')
        return [str(s.get('name', f'stage{i}')) if isinstance(s, dict) else f'stage{i}'
                for i, s in enumerate(stages if isinstance(stages, list) else [])]

    @property
    def end_steps(self) -> dict[str, int]:
        """Stage name -> global step of its end (only stages that finished)."""
        return {k: int(v['end_step']) for k, v in (self.info.get('stages') or {}).items()
                if isinstance(v, dict) and 'end_step' in v}

    @property
    def spec_files(self) -> list[str]:
        return list(self.config.get('spec_files') or [])


def metric_row(run_id, name, step, value) -> tuple[str, int, float]:
    """(name, step, value) of a recorded metric; a step that is no whole number or a value that is no number (a row
    changed outside memspec) is one message naming the run and the metric."""
    try:
        if isinstance(step, bool) or (isinstance(step, float) and not step.is_integer()):
            raise ValueError
        return str(name), int(step), float('nan') if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f'run {run_id}', f'its recorded metric {str(name)[:80]!r} is damaged (step {str(step)[:20]!r}, '
                        f'value {str(value)[:20]!r})', 'the row was changed outside memspec: restore the database from '
                        'a backup, or delete the row (memspec_metrics)') from None


def record(run_id: str, status, start, stop, config, info, result, trace, host: dict, experiment,
           heartbeat) -> RunRecord:
    """A RunRecord from the values of one recorded row, each checked (what is damaged is named in .damaged)."""
    damaged: list[str] = []
    config, info = checked('config', config, damaged), checked('info', info, damaged)
    if str(status) not in STATUSES:
        damaged.append(f'status ({str(status)[:20]!r} is no Sacred status)')
    if result is not None and (isinstance(result, bool) or not isinstance(result, (int, float))):
        damaged.append(f'result ({type_name(result)}, not a number)')
        result = None
    times = [_time(t) for t in (start, stop, heartbeat)]
    for name, raw, t in zip(('start_time', 'stop_time', 'heartbeat'), (start, stop, heartbeat), times):
        if raw is not None and t is None:
            damaged.append(f'{name} (not a time)')
    return RunRecord(run_id, str(status), times[0], times[1], config, info, result,
                     trace if isinstance(trace, str) else None, host, str(experiment or ''), times[2], damaged)


def _time(value) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _labels(items: list[dict]) -> list[str]:
    """How list elements appear in flattened keys: stages by name, objectives by kind, else by position."""
    for field in ('name', 'kind'):
        labels = [str(x.get(field)) for x in items]
        if all(field in x for x in items) and len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(items))]


def flatten(obj, prefix: str = '') -> dict:
    """Nested config -> {'plan.memory.chunks': 4, 'plan.curriculum.blank_copy.lr': 0.002, ...}."""
    out: dict = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(flatten(v, f'{prefix}.{k}' if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for label, x in zip(_labels(obj), obj):
            out.update(flatten(x, f'{prefix}.{label}'))
    elif prefix:
        out[prefix] = obj
    return out


# ------------------------------------------------------------------------------------------------ databases

class SqlDb:
    """Sacred's SqlObserver tables + memspec_metrics, through SQLAlchemy Core text queries."""

    def __init__(self, url: str):
        self.url, self.where = url, f'--db {display_url(url)}'
        self.name = self.where[len('--db '):]
        try:
            u = sa.engine.make_url(url)
        except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise UserError(self.where, 'not a database URL',
                            'use sqlite:///runs/sacred.db, postgresql://user:password@host/db or mongodb://host')
        backend = u.get_backend_name()
        if backend == 'sqlite':
            if not u.database or u.database == ':memory:':
                raise UserError(self.where, 'an in-memory SQLite database holds no runs',
                                'give the database file, e.g. sqlite:///runs/sacred.db')
            path = Path(u.database)
            if not path.is_file():
                raise UserError(self.where, f'no run database at {redact(path.resolve(), url)}',
                                'record a run first (python -m runtime.run SPEC writes <Run.out_dir>/sacred.db) '
                                'or point --db at the file it wrote (the default sqlite:///runs/sacred.db is relative '
                                'to the current folder)')
            where = self.where  # (no open() of the file here: store/sqlite_files.py says why)
            self.engine = sa.create_engine('sqlite://', creator=lambda: connect_readonly(path, where))
        elif backend == 'postgresql':
            try:
                self.engine = sa.create_engine(engine_url(url), connect_args={'connect_timeout': 5})
            except (ImportError, sa.exc.ArgumentError) as e:
                raise UserError(self.where, f'cannot use this URL: {first_line(e, url)}',
                                'use postgresql://user:password@host:port/database (psycopg2 driver)')
        else:
            raise UserError(self.where, f"unsupported database '{backend}'",
                            'use sqlite:///runs/sacred.db, postgresql://user:password@host/db or mongodb://host')
        try:
            tables = set(sa.inspect(self.engine).get_table_names())
        except sa.exc.DBAPIError as e:
            if not_a_database(e):
                raise UserError(self.where, f'{redact(path.resolve(), url)} is not a SQLite database',
                                'point --db at the sacred.db python -m runtime.run recorded into') from None
            raise UserError(self.where, f'cannot open the run database: {first_line(e, url)}',
                            'check the URL, the credentials and that the server runs '
                            '(locally: pg_ctlcluster 15 main start)' if backend == 'postgresql' else
                            'check that the file is a SQLite database written by python -m runtime.run')
        if not tables & {'run', 'memspec_metrics'}:
            raise UserError(self.where, "no Sacred 'run' table here: not a run database, or no run recorded yet",
                            'point --db at the database python -m runtime.run recorded into')
        self.has_runs = 'run' in tables
        self.has_metrics = 'memspec_metrics' in tables
        self.has_host = 'host' in tables
        self.has_experiment = 'experiment' in tables
        self.has_artifacts = 'artifact' in tables
        self.has_evaluations = 'memspec_evaluations' in tables

    def _rows(self, sql: str, params: dict | None = None, expanding: tuple = ()) -> list:
        stmt = sa.text(sql)
        if expanding:
            stmt = stmt.bindparams(*[sa.bindparam(name, expanding=True) for name in expanding])
        try:
            with self.engine.connect() as conn:
                return conn.execute(stmt, params or {}).all()
        except sa.exc.DBAPIError as e:
            raise UserError(self.where, f'query failed: {first_line(e, self.url)}',
                            'check that this is a run database written by python -m runtime.run')

    def runs(self, status: str | None = None, run_id: str | None = None) -> list[RunRecord]:
        if not self.has_runs:  # a metrics-only database
            return []
        cols = ['r.run_id', 'r.status', 'r.start_time', 'r.stop_time', 'r.config', 'r.info', 'r.result', 'r.fail_trace',
                'r.heartbeat']
        joins = ''
        if self.has_host:
            cols += ['h.hostname', 'h.cpu', 'h.os_info', 'h.python_version']
            joins += ' LEFT JOIN host h ON h.host_id = r.host_id'
        if self.has_experiment:
            cols += ['e.name AS experiment']
            joins += ' LEFT JOIN experiment e ON e.experiment_id = r.experiment_id'
        conds, params = [], {}
        if status is not None:
            conds.append('r.status = :status')
            params['status'] = status
        if run_id is not None:
            conds.append('r.run_id = :run_id')
            params['run_id'] = str(run_id)
        sql = f"SELECT {', '.join(cols)} FROM run r{joins}"
        if conds:
            sql += ' WHERE ' + ' AND '.join(conds)
        out = []
        for row in self._rows(sql + ' ORDER BY r.id', params):
            m = row._mapping
            host = {k: m[k] for k in ('hostname', 'cpu', 'os_info', 'python_version') if k in m and m[k] is not None}
            out.append(record(str(m['run_id']), m['status'], m['start_time'], m['stop_time'], m['config'],
                              m['info'], m['result'], m['fail_trace'], host, m.get('experiment'), m['heartbeat']))
        return out

    def metrics(self, run_id: str) -> list[tuple[str, int, float]]:
        if not self.has_metrics:
            return []
        rows = self._rows('SELECT name, step, value FROM memspec_metrics WHERE run_id = :r ORDER BY name, step, id',
                          {'r': str(run_id)})
        return [metric_row(run_id, n, s, v) for n, s, v in rows]

    def final_metrics(self, run_ids: list[str], names: list[str]) -> dict[str, dict[str, float]]:
        """run -> {name: value at the last step that logged it}."""
        if not self.has_metrics or not run_ids or not names:
            return {}
        rows = self._rows(
            'SELECT m.run_id, m.name, m.value FROM memspec_metrics m '
            'JOIN (SELECT run_id, name, MAX(step) AS step FROM memspec_metrics '
            '      WHERE run_id IN :runs AND name IN :names GROUP BY run_id, name) last '
            '  ON last.run_id = m.run_id AND last.name = m.name AND last.step = m.step ORDER BY m.id',
            {'runs': [str(r) for r in run_ids], 'names': list(names)}, expanding=('runs', 'names'))
        out: dict[str, dict[str, float]] = {}
        for r, n, v in rows:
            try:
                out.setdefault(str(r), {})[n] = metric_row(r, n, 0, v)[2]
            except UserError:  # a damaged row: the listing shows no number (commands that read the run refuse it)
                out.setdefault(str(r), {})[n] = float('nan')
        return out

    def at_steps(self, run_id: str, steps: list[int]) -> list[tuple[str, int, float]]:
        if not self.has_metrics or not steps:
            return []
        rows = self._rows("SELECT name, step, value FROM memspec_metrics WHERE run_id = :r AND name LIKE 'eval/%' "
                          'AND step IN :steps ORDER BY id', {'r': str(run_id), 'steps': list(steps)},
                          expanding=('steps',))
        return [metric_row(run_id, n, s, v) for n, s, v in rows]

    def evaluations(self, run_id: str) -> list[Evaluation]:
        """Every evaluation row of a run, oldest first."""
        if not self.has_evaluations:
            return []
        rows = self._rows('SELECT stage, task, metric, value, memory, "limit", time FROM memspec_evaluations '
                          'WHERE run_id = :r ORDER BY id', {'r': str(run_id)})
        return [Evaluation(st, t, m, metric_row(run_id, f'{t}/{m}', 0, v)[2], mem,
                           None if lim is None else metric_row(run_id, f'{t}/{m} limit', lim, 0)[1], _time(tm))
                for st, t, m, v, mem, lim, tm in rows]

    def artifacts(self, run_id: str) -> list[tuple[str, int]]:
        if not self.has_artifacts:
            return []
        rows = self._rows('SELECT filename, LENGTH(content) FROM artifact WHERE run_id = :r ORDER BY artifact_id',
                          {'r': str(run_id)})
        return [(n, int(size or 0)) for n, size in rows]

    def artifact(self, run_id: str, name: str) -> bytes | None:
        if not self.has_artifacts:
            return None
        rows = self._rows('SELECT content FROM artifact WHERE run_id = :r AND filename = :n ORDER BY artifact_id DESC',
                          {'r': str(run_id), 'n': name})
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None


class MongoDb:
    """Sacred's MongoObserver layout (database 'sacred': runs, metrics, GridFS artifacts), via pymongo."""

    has_metrics = True

    def __init__(self, url: str):
        self.url, self.where = url, f'--db {display_url(url)}'
        self.name = self.where[len('--db '):]
        try:
            import pymongo
        except ImportError:
            raise UserError(self.where, 'reading a MongoDB run database needs pymongo, which is not installed',
                            "pip install pymongo (Sacred's MongoObserver needs it too), or query a sqlite:/// or "
                            'postgresql:// run database')
        try:
            self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
            self.client.admin.command('ping')
        except Exception as e:  # noqa: BLE001  (any connection failure is the user's URL or server)
            raise UserError(self.where, f'cannot reach the MongoDB server: {first_line(e, url)}',
                            'check the URL and that mongod runs and is reachable')
        self.db = self.client['sacred']  # runtime.run's MongoObserver(url=...) writes to Sacred's default database

    @staticmethod
    def _key(run_id):
        return int(run_id) if str(run_id).isdigit() else run_id

    def runs(self, status: str | None = None, run_id: str | None = None) -> list[RunRecord]:
        query = {}
        if status is not None:
            query['status'] = status
        if run_id is not None:
            query['_id'] = self._key(run_id)
        out = []
        for d in self.db.runs.find(query, {'captured_out': 0}).sort('_id', 1):
            host, trace = d.get('host') or {}, d.get('fail_trace')
            host = host if isinstance(host, dict) else {}
            out.append(record(str(d['_id']), d.get('status', ''), d.get('start_time'), d.get('stop_time'),
                              d.get('config'), d.get('info'), d.get('result'),
                              ''.join(map(str, trace)) if isinstance(trace, list) else trace,
                              {'hostname': host.get('hostname'), 'cpu': host.get('cpu'),
                               'os_info': ' '.join(map(str, host.get('os') or [])),
                               'python_version': host.get('python_version')},
                              (d.get('experiment') or {}).get('name', '') if isinstance(d.get('experiment'), dict)
                              else '', d.get('heartbeat')))
        return out

    def metrics(self, run_id: str) -> list[tuple[str, int, float]]:
        rows = [(d['name'], int(s), float(v)) for d in self.db.metrics.find({'run_id': self._key(run_id)})
                for s, v in zip(d.get('steps', []), d.get('values', []))]
        return sorted(rows, key=lambda r: (r[0], r[1]))

    def final_metrics(self, run_ids: list[str], names: list[str]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for d in self.db.metrics.find({'run_id': {'$in': [self._key(r) for r in run_ids]},
                                       'name': {'$in': list(names)}}):
            if d.get('steps'):
                i = max(range(len(d['steps'])), key=lambda j: d['steps'][j])
                out.setdefault(str(d['run_id']), {})[d['name']] = float(d['values'][i])
        return out

    def at_steps(self, run_id: str, steps: list[int]) -> list[tuple[str, int, float]]:
        return [r for r in self.metrics(run_id) if r[0].startswith('eval/') and r[1] in set(steps)]

    def evaluations(self, run_id: str) -> list[Evaluation]:
        return []  # runtime.evaluate records into SQL databases only

    def _artifact_docs(self, run_id: str) -> list[dict]:
        d = self.db.runs.find_one({'_id': self._key(run_id)}, {'artifacts': 1}) or {}
        return d.get('artifacts') or []

    def artifacts(self, run_id: str) -> list[tuple[str, int]]:
        out = []
        for a in self._artifact_docs(run_id):
            f = self.db['fs.files'].find_one({'_id': a.get('file_id')}) or {}
            out.append((a.get('name', '?'), int(f.get('length', 0))))
        return out

    def artifact(self, run_id: str, name: str) -> bytes | None:
        import gridfs
        for a in self._artifact_docs(run_id):
            if a.get('name') == name:
                return gridfs.GridFS(self.db).get(a['file_id']).read()
        return None


def open_db(url: str):
    if url.startswith(('mongodb://', 'mongodb+srv://')):
        return MongoDb(url)
    if '://' not in url:
        fix = f'write sqlite:///{url}' if url.endswith(('.db', '.sqlite')) or Path(url).is_file() else \
            'use sqlite:///runs/sacred.db, postgresql://user:password@host/db or mongodb://host'
        raise UserError(f'--db {display_url(url)}', 'not a database URL', fix)
    return SqlDb(url)


def get_run(db, run_id: str) -> RunRecord:
    found = db.runs(run_id=run_id)
    if not found:
        ids = [r.id for r in db.runs()]
        known = f"known ids: {', '.join(ids[-20:])}" if ids else 'the database holds no runs yet'
        raise UserError(f'run {run_id}', f'no run with this id in {db.name}',
                        f'pick an id from python -m store.runs list ({known}), or pass the --db it was recorded in')
    return found[0].check()


