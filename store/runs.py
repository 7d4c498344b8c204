"""python -m store.runs {list,show,metrics,compare} [--db URL] ...: query the runs that `python -m runtime.run` recorded.

    list                       one line per run: id, spec, status, stages, final eval metrics, start time
                               (--spec SUBSTRING, --status STATUS, --where KEY=VALUE, repeatable)
    show ID                    plan summary, host, run folder, artifacts, stage-end metrics, operative gin
    metrics ID [--name PAT]    every logged value (name, step, value); --csv for CSV, --plot OUT.png for curves
    compare ID ID ...          plan keys, CLI bindings and stage-end metrics that differ between runs

The database is Sacred's (SqlObserver tables `run`, `host`, `experiment`, `artifact`, ...) plus our
`memspec_metrics(run_id, name, step, value, time)` table: sqlite:///runs/sacred.db by default, or a PostgreSQL URL;
a mongodb:// URL reads Sacred's MongoObserver collections (needs pymongo). Queries are SQLAlchemy Core text
statements, so SQLite and PostgreSQL run the same code. SQLite files are opened read-only and never created.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime as dt
import difflib
import fnmatch
import json
import math
import os
import re
import sqlite3
import sys
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from compiler.errors import SpecError, cli

DEFAULT_DB = 'sqlite:///runs/sacred.db'
STATUSES = ('COMPLETED', 'FAILED', 'INTERRUPTED', 'RUNNING', 'TIMEOUT', 'QUEUED')
# final eval metrics shown by `list` (column title, metric name)
HEADLINE = [('clm.ce', 'eval/clm.ce'), ('blank_copy acc', 'eval/blank_copy.token_accuracy'),
            ('copy acc', 'eval/copy.token_accuracy'), ('autoencode acc', 'eval/autoencode.token_accuracy')]
# stage-end metrics shown by `compare` unless --name picks others
COMPARE_METRICS = ['clm.ce', 'clm.token_accuracy', 'clm.bits_per_byte', 'copy.token_accuracy', 'blank_copy.token_accuracy',
                   'blank_copy_ablated.token_accuracy', 'autoencode.token_accuracy', 'autoencode.info_proportion']
STACKS = ('decoder', 'encoder', 'ae_decoder')


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

    @property
    def plan(self) -> dict:
        return self.config.get('plan') or {}

    @property
    def flat(self) -> dict:
        if not hasattr(self, '_flat'):
            self._flat = flatten(self.config)
        return self._flat

    @property
    def stages(self) -> list[str]:
        return [s.get('name', f'stage{i}') for i, s in enumerate(self.plan.get('curriculum') or [])]

    @property
    def end_steps(self) -> dict[str, int]:
        """Stage name -> global step of its end (only stages that finished)."""
        return {k: int(v['end_step']) for k, v in (self.info.get('stages') or {}).items()
                if isinstance(v, dict) and 'end_step' in v}

    @property
    def spec_files(self) -> list[str]:
        return list(self.config.get('spec_files') or [])


def _json(value) -> dict:
    if value is None or value == '':
        return {}
    if isinstance(value, (dict, list)):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return {}


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


def _where_db(url: str) -> str:
    try:
        return f'--db {sa.engine.make_url(url).render_as_string(hide_password=True)}'
    except Exception:  # noqa: BLE001  (only for the message)
        return f'--db {url}'


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _first_line(e: Exception) -> str:
    text = str(getattr(e, 'orig', None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------ databases

class SqlDb:
    """Sacred's SqlObserver tables + memspec_metrics, through SQLAlchemy Core text queries."""

    def __init__(self, url: str):
        self.url, self.where = url, _where_db(url)
        self.name = self.where[len('--db '):]
        try:
            u = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise SpecError(f'--db {url}', 'not a database URL',
                            'use sqlite:///runs/sacred.db, postgresql://user:password@host/db or mongodb://host')
        backend = u.get_backend_name()
        if backend == 'sqlite':
            if not u.database or u.database == ':memory:':
                raise SpecError(self.where, 'an in-memory SQLite database holds no runs',
                                'give the database file, e.g. sqlite:///runs/sacred.db')
            path = Path(u.database)
            if not path.is_file():
                raise SpecError(self.where, f'no run database at {path.resolve()}',
                                'record a run first (python -m runtime.run SPEC writes <Run.out_dir>/sacred.db) or point '
                                '--db at the file it wrote (the default sqlite:///runs/sacred.db is relative to the '
                                'current folder)')
            uri = f'file:{quote(str(path.resolve()))}?mode=ro'  # read-only: never creates or changes the file
            self.engine = sa.create_engine('sqlite://', creator=lambda: sqlite3.connect(uri, uri=True, timeout=10))
        elif backend == 'postgresql':
            if u.drivername == 'postgresql' and not _importable('psycopg') and _importable('psycopg2'):
                u = u.set(drivername='postgresql+psycopg2')  # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2
            try:
                self.engine = sa.create_engine(u, connect_args={'connect_timeout': 5})
            except (ImportError, sa.exc.ArgumentError) as e:
                raise SpecError(self.where, f'cannot use this URL: {_first_line(e)}',
                                'use postgresql://user:password@host:port/database (psycopg2 driver)')
        else:
            raise SpecError(self.where, f"unsupported database '{backend}'",
                            'use sqlite:///runs/sacred.db, postgresql://user:password@host/db or mongodb://host')
        try:
            tables = set(sa.inspect(self.engine).get_table_names())
        except sa.exc.DBAPIError as e:
            raise SpecError(self.where, f'cannot open the run database: {_first_line(e)}',
                            'check the URL, the credentials and that the server runs '
                            '(locally: pg_ctlcluster 15 main start)' if backend == 'postgresql' else
                            'check that the file is a SQLite database written by python -m runtime.run')
        if 'run' not in tables:
            raise SpecError(self.where, "no Sacred 'run' table here: not a run database, or no run recorded yet",
                            'point --db at the database python -m runtime.run recorded into')
        self.has_metrics = 'memspec_metrics' in tables
        self.has_host = 'host' in tables
        self.has_experiment = 'experiment' in tables
        self.has_artifacts = 'artifact' in tables

    def _rows(self, sql: str, params: dict | None = None, expanding: tuple = ()) -> list:
        stmt = sa.text(sql)
        if expanding:
            stmt = stmt.bindparams(*[sa.bindparam(name, expanding=True) for name in expanding])
        try:
            with self.engine.connect() as conn:
                return conn.execute(stmt, params or {}).all()
        except sa.exc.DBAPIError as e:
            raise SpecError(self.where, f'query failed: {_first_line(e)}',
                            'check that this is a run database written by python -m runtime.run')

    def runs(self, status: str | None = None, run_id: str | None = None) -> list[RunRecord]:
        cols = ['r.run_id', 'r.status', 'r.start_time', 'r.stop_time', 'r.config', 'r.info', 'r.result', 'r.fail_trace']
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
            out.append(RunRecord(str(m['run_id']), str(m['status']), _time(m['start_time']), _time(m['stop_time']),
                                 _json(m['config']), _json(m['info']), m['result'], m['fail_trace'], host,
                                 m.get('experiment') or ''))
        return out

    def metrics(self, run_id: str) -> list[tuple[str, int, float]]:
        if not self.has_metrics:
            return []
        rows = self._rows('SELECT name, step, value FROM memspec_metrics WHERE run_id = :r ORDER BY name, step, id',
                          {'r': str(run_id)})
        return [(n, int(s), float('nan') if v is None else float(v)) for n, s, v in rows]

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
            out.setdefault(str(r), {})[n] = float('nan') if v is None else float(v)
        return out

    def at_steps(self, run_id: str, steps: list[int]) -> list[tuple[str, int, float]]:
        if not self.has_metrics or not steps:
            return []
        rows = self._rows("SELECT name, step, value FROM memspec_metrics WHERE run_id = :r AND name LIKE 'eval/%' "
                          'AND step IN :steps ORDER BY id', {'r': str(run_id), 'steps': list(steps)}, expanding=('steps',))
        return [(n, int(s), float('nan') if v is None else float(v)) for n, s, v in rows]

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
        self.url, self.where = url, f'--db {re.sub(r"//[^@/]*@", "//***@", url)}'
        self.name = self.where[len('--db '):]
        try:
            import pymongo
        except ImportError:
            raise SpecError(self.where, 'reading a MongoDB run database needs pymongo, which is not installed',
                            "pip install pymongo (Sacred's MongoObserver needs it too), or query a sqlite:/// or "
                            'postgresql:// run database')
        try:
            self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
            self.client.admin.command('ping')
        except Exception as e:  # noqa: BLE001  (any connection failure is the user's URL or server)
            raise SpecError(self.where, f'cannot reach the MongoDB server: {_first_line(e)}',
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
            host, trace, result = d.get('host') or {}, d.get('fail_trace'), d.get('result')
            out.append(RunRecord(str(d['_id']), str(d.get('status', '')), _time(d.get('start_time')),
                                 _time(d.get('stop_time')), d.get('config') or {}, d.get('info') or {},
                                 result if isinstance(result, (int, float)) else None,
                                 ''.join(trace) if isinstance(trace, list) else trace,
                                 {'hostname': host.get('hostname'), 'cpu': host.get('cpu'),
                                  'os_info': ' '.join(host.get('os') or []), 'python_version': host.get('python_version')},
                                 (d.get('experiment') or {}).get('name', '')))
        return out

    def metrics(self, run_id: str) -> list[tuple[str, int, float]]:
        rows = [(d['name'], int(s), float(v)) for d in self.db.metrics.find({'run_id': self._key(run_id)})
                for s, v in zip(d.get('steps', []), d.get('values', []))]
        return sorted(rows, key=lambda r: (r[0], r[1]))

    def final_metrics(self, run_ids: list[str], names: list[str]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for d in self.db.metrics.find({'run_id': {'$in': [self._key(r) for r in run_ids]}, 'name': {'$in': list(names)}}):
            if d.get('steps'):
                i = max(range(len(d['steps'])), key=lambda j: d['steps'][j])
                out.setdefault(str(d['run_id']), {})[d['name']] = float(d['values'][i])
        return out

    def at_steps(self, run_id: str, steps: list[int]) -> list[tuple[str, int, float]]:
        return [r for r in self.metrics(run_id) if r[0].startswith('eval/') and r[1] in set(steps)]

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
        raise SpecError(f'--db {url}', 'not a database URL', fix)
    return SqlDb(url)


def get_run(db, run_id: str) -> RunRecord:
    found = db.runs(run_id=run_id)
    if not found:
        ids = [r.id for r in db.runs()]
        known = f"known ids: {', '.join(ids[-20:])}" if ids else 'the database holds no runs yet'
        raise SpecError(f'run {run_id}', f'no run with this id in {db.name}',
                        f'pick an id from python -m store.runs list ({known}), or pass the --db it was recorded in')
    return found[0]


# ------------------------------------------------------------------------------------------------ derived views

def spec_label(path: str) -> str:
    """'/work/main/specs/mixer/autoencoder.gin' -> 'mixer/autoencoder.gin' (relative to specs/), else the file name."""
    parts = Path(path).parts
    if 'specs' in parts:
        i = len(parts) - 1 - parts[::-1].index('specs')
        if i < len(parts) - 1:
            return '/'.join(parts[i + 1:])
    return Path(path).name


_INCLUDES: dict[str, list[str]] = {}


def top_specs(files: list[str]) -> list[str]:
    """The spec files given on the command line (the recorded list also holds their includes, in parse order).
    Includes are recognised from the files on disk where they still exist; otherwise the first file is the spec."""
    included = set()
    for f in files:
        if f not in _INCLUDES:
            try:
                _INCLUDES[f] = re.findall(r"""^\s*include\s+['"]([^'"]+)['"]""", Path(f).read_text(), re.M)
            except (OSError, UnicodeDecodeError):
                _INCLUDES[f] = []
        included.update(_INCLUDES[f])
    tops = [f for f in files if not any(f == inc or f.endswith('/' + inc.lstrip('./')) for inc in included)]
    return tops or files[:1]


def spec_text(run: RunRecord) -> str:
    return ' + '.join(spec_label(f) for f in top_specs(run.spec_files)) or '?'


def stage_end_metrics(db, run: RunRecord) -> dict[str, dict[str, float]]:
    """stage -> {eval metric (without 'eval/'): value at the stage's last step}. From the metrics table; the
    run's summary.json (artifact, or file in the run folder) where the table has none."""
    ends = run.end_steps
    out: dict[str, dict[str, float]] = {}
    if ends:
        by_step: dict[int, list[str]] = {}
        for stage, step in ends.items():
            by_step.setdefault(step, []).append(stage)
        for name, step, value in db.at_steps(run.id, sorted(by_step)):
            for stage in by_step.get(step, []):
                out.setdefault(stage, {})[name[len('eval/'):]] = value
    if out:
        return {s: out[s] for s in sorted(out, key=lambda s: ends[s])}
    raw = db.artifact(run.id, 'summary.json')
    if raw is None and run.info.get('run_dir'):
        p = Path(run.info['run_dir']) / 'summary.json'
        raw = p.read_bytes() if p.is_file() else None
    try:
        summary = json.loads(raw) if raw else {}
    except ValueError:
        summary = {}
    return {s: {k: float(v) for k, v in m.items()} for s, m in summary.items() if isinstance(m, dict)}


def macros(run: RunRecord) -> dict[str, object]:
    """Macro values of the operative gin (`NAME = value` lines)."""
    out = {}
    for m in re.finditer(r'^([A-Z][A-Z0-9_]*)\s*=\s*(.+)$', run.config.get('operative_gin') or '', re.M):
        out[m.group(1)] = _literal(m.group(2).strip())
    return out


def scope_names(run: RunRecord, configurable: str, field: str) -> dict[str, str]:
    """Gin scope -> value of `scope/Configurable.field` in the operative gin (e.g. 'blank' -> 'blank_copy')."""
    pat = rf"""^([\w./-]+)/{configurable}\.{field}\s*=\s*['"]([^'"]+)['"]"""
    return {m.group(1).split('/')[-1]: m.group(2) for m in re.finditer(pat, run.config.get('operative_gin') or '', re.M)}


def bindings(run: RunRecord) -> dict[str, str]:
    out = {}
    for b in run.config.get('bindings') or []:
        key, _, value = str(b).partition('=')
        out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------------------ --where

def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip('"\'') if text[:1] in '"\'' else text


def same(a, b) -> bool:
    """Config value a equals filter value b (1e-3 == 0.001, True == 'true', learned == 'learned')."""
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return str(a).lower() == str(b).lower()
    return a == b or str(a) == str(b)


class Where:
    """One --where filter: 'scope/Configurable.param=value', a macro ('LR=1e-3') or a flattened config key
    ('plan.memory.chunks=4'); '!=' negates."""

    def __init__(self, expr: str):
        self.expr, self.place = expr, f"--where '{expr}'"
        m = re.match(r'^\s*([^=!]+?)\s*(!=|==|=)\s*(.*?)\s*$', expr)
        if not m or not m.group(1):
            raise SpecError(self.place, 'expected KEY=VALUE',
                            "e.g. --where Memory.chunks=4, --where 'encoder/Stack.d_model=128', --where LR=1e-3 or "
                            '--where plan.memory.chunks=4')
        self.key, self.negate, self.value = m.group(1), m.group(2) == '!=', _literal(m.group(3))
        self.kind = 'raw'
        gm = re.match(r'^(?:([\w./-]+)/)?([A-Z]\w*)\.(\w+)$', self.key)
        if gm:
            from compiler.plan import CONFIGURABLES
            self.scope, self.cls, self.param = gm.groups()
            if self.cls not in CONFIGURABLES:
                raise SpecError(self.place, f"unknown configurable '{self.cls}'",
                                f"use one of {', '.join(CONFIGURABLES)} (or a flattened key like plan.memory.chunks)")
            fields = [f.name for f in dataclasses.fields(CONFIGURABLES[self.cls]) if f.name != 'scope']
            if self.param not in fields:
                close = difflib.get_close_matches(self.param, fields, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ''
                raise SpecError(self.place, f"{self.cls} has no field '{self.param}'",
                                f"{hint}{self.cls} fields: {', '.join(fields)}")
            if self.cls == 'Stack' and self.scope and self.scope.split('/')[-1] not in STACKS:
                raise SpecError(self.place, f"unknown Stack scope '{self.scope}'",
                                f"use {', '.join(s + '/Stack' for s in STACKS)} or unscoped Stack (any stack)")
            self.kind = 'gin'
        elif re.match(r'^[A-Z][A-Z0-9_]*$', self.key):
            self.kind = 'macro'

    def keys(self, run: RunRecord) -> list[str]:
        """The flattened config keys of `run` this filter reads."""
        flat = run.flat
        if self.kind == 'raw':
            return [k for k in (self.key, f'plan.{self.key}') if k in flat][:1]
        if self.kind == 'macro':
            return []
        scope = (self.scope or '').split('/')[-1]
        if self.cls in ('Memory', 'Data', 'Run'):
            prefix = f'plan.{self.cls.lower()}.'
        elif self.cls == 'Plan':
            prefix = 'plan.'
        elif self.cls == 'Stack':
            stacks = [scope] if scope else list(STACKS)
            return [f'plan.{s}.{self.param}' for s in stacks if f'plan.{s}.{self.param}' in flat]
        elif self.cls == 'Stage':
            stages = run.stages
            if scope:
                name = scope_names(run, 'Stage', 'name').get(scope, scope)
                stages = [s for s in stages if s == name]
            return [k for k in (f'plan.curriculum.{s}.{self.param}' for s in stages) if k in flat]
        else:  # Objective
            kind = scope_names(run, 'Objective', 'kind').get(scope, scope) if scope else None
            pat = re.compile(r'^plan\.curriculum\.[^.]+\.objectives\.([^.]+)\.' + re.escape(self.param) + '$')
            return [k for k in flat if (m := pat.match(k)) and (kind is None or m.group(1) == kind
                                                                 or flat.get(k.rsplit('.', 1)[0] + '.kind') == kind)]
        key = prefix + self.param
        return [key] if key in flat or any(k.startswith(key + '.') for k in flat) else []

    def values(self, run: RunRecord) -> list:
        if self.kind == 'macro':
            mac = macros(run)
            return [mac[self.key]] if self.key in mac else []
        out = []
        for k in self.keys(run):
            if k in run.flat:
                out.append(run.flat[k])
            else:  # a section (Plan.encoder): compare the nested value
                out.append(_nested(run.config, k))
        return out

    def __call__(self, run: RunRecord) -> bool:
        hit = any(same(v, self.value) for v in self.values(run))
        return not hit if self.negate else hit


def _nested(config: dict, key: str):
    node = config
    for part in key.split('.'):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ------------------------------------------------------------------------------------------------ output

BOLD, RESET = '\033[1m', '\033[0m'


def fmt(v) -> str:
    if v is None:
        return 'None'
    if isinstance(v, float):
        return 'nan' if math.isnan(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return '[' + ', '.join(fmt(x) if not isinstance(x, str) else repr(x) for x in v) + ']'
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True) if v else '{}'
    return str(v)


def num(v, digits: int = 4) -> str:
    if v is None:
        return '-'
    if isinstance(v, float) and math.isnan(v):
        return 'nan'
    return f'{v:.{digits}f}' if abs(v) < 1e5 else f'{v:.4g}'


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(), marked: set = frozenset(),
          tty: bool = False, indent: str = '') -> str:
    """Plain aligned columns. `marked` cells ((row, col)) are bold on a terminal, else suffixed with '*'."""
    cells = [[str(c) for c in r] for r in rows]
    for (i, j) in marked:
        if not tty:
            cells[i][j] += '*'
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(vals, row=None):
        parts = []
        for j, v in enumerate(vals):
            pad = ' ' * (widths[j] - len(v))
            if tty and row is not None and (row, j) in marked:
                v = f'{BOLD}{v}{RESET}'
            parts.append(pad + v if j in right else v + pad)
        return (indent + '  '.join(parts)).rstrip()

    out = [line(headers), (indent + '  '.join('-' * w for w in widths)).rstrip()]
    out += [line(r, i) for i, r in enumerate(cells)]
    return '\n'.join(out)


def when(t: dt.datetime | None, seconds: bool = False) -> str:
    if t is None:
        return '-'
    return t.strftime('%Y-%m-%d %H:%M:%S' if seconds else '%Y-%m-%d %H:%M')


def duration(a, b) -> str:
    if a is None or b is None:
        return ''
    s = int((b - a).total_seconds())
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


# ------------------------------------------------------------------------------------------------ commands

def cmd_list(db, args) -> None:
    wheres = [Where(w) for w in args.where or []]
    runs = db.runs(status=args.status)
    if args.spec:
        runs = [r for r in runs if any(args.spec in f or args.spec in spec_label(f) for f in r.spec_files)]
    for w in wheres:
        if w.kind != 'gin' and runs and not any(w.values(r) for r in runs):
            raise SpecError(w.place, f"no recorded run has {'macro' if w.kind == 'macro' else 'config key'} '{w.key}'",
                            'use Configurable.param (Memory.chunks), a macro of the operative gin (LR), or a key that '
                            'python -m store.runs show ID --keys lists (plan.memory.chunks)')
        runs = [r for r in runs if w(r)]
    if not runs:
        print('no runs match' if (args.spec or args.status or wheres) else f'no runs in {db.name}', file=sys.stderr)
        return
    finals = db.final_metrics([r.id for r in runs], [n for _, n in HEADLINE])
    for r in runs:  # no metric rows (the recorder lost them, or another observer): the run's summary.json
        if not finals.get(r.id):
            sm = stage_end_metrics(db, r)
            if sm:
                finals[r.id] = {f'eval/{k}': v for k, v in sm[list(sm)[-1]].items()}
    cols = [(t, n) for t, n in HEADLINE if any(n in finals.get(r.id, {}) for r in runs)]
    headers = ['id', 'spec', 'status', 'stages'] + [t for t, _ in cols] + ['started (UTC)']
    rows = []
    for r in runs:
        stages = ','.join(r.stages)
        done = len(r.end_steps)
        if r.status != 'COMPLETED' and r.stages:
            stages += f' ({done}/{len(r.stages)} done)'
        rows.append([r.id, spec_text(r), r.status, stages] + [num(finals.get(r.id, {}).get(n)) for _, n in cols]
                    + [when(r.start)])
    print(table(headers, rows, right={0} | set(range(4, 4 + len(cols)))))


def plan_summary(plan: dict) -> list[tuple[str, str]]:
    out = [('family', str(plan.get('family')))]
    for name in STACKS:
        s = plan.get(name)
        if isinstance(s, dict):
            heads = f", {s.get('n_heads')} heads" if s.get('kind') == 'transformer' else ''
            out.append((name, f"{s.get('kind')}, d_model {s.get('d_model')}, {s.get('n_layers')} layers{heads}, "
                              f"{'causal' if s.get('causal') else 'bidirectional'}"))
    m = plan.get('memory') or {}
    if m and plan.get('family') not in ('clm', 'full_context'):
        out.append(('memory', f"{m.get('chunks')} chunks x {m.get('chunk_len')} tokens, position {m.get('position')}, "
                              f"compression {m.get('compression')}, slots {m.get('slots')}, pad {m.get('pad')}, "
                              f"decoder input {m.get('decoder_input')}"))
    d = plan.get('data') or {}
    if d:
        out.append(('data', f"{d.get('source')}, vocab {d.get('vocab_size')}, batch {d.get('batch_size')}, "
                            f"{d.get('layout')}" + (f", tokenizer {d['tokenizer']}" if d.get('tokenizer') else '')))
    r = plan.get('run') or {}
    if r:
        out.append(('run', f"name {r.get('name')}, seed {r.get('seed')}, device {r.get('device')}, "
                           f"out_dir {r.get('out_dir')}"))
    return out


def stage_line(s: dict) -> list[str]:
    objs = ', '.join(o.get('kind', '?') + (f" x{o['weight']:g}" if o.get('weight', 1.0) != 1.0 else '')
                     for o in s.get('objectives') or [])
    extra = []
    if s.get('freeze'):
        extra.append('freeze ' + ','.join(s['freeze']))
    if s.get('init_from'):
        extra.append('init ' + ','.join(f"{k.replace(':', '.')}<-{v}" for k, v in s['init_from'].items()))
    if s.get('normalize', 'weighted_sum') != 'weighted_sum':
        extra.append(f"normalize {s['normalize']}")
    return [str(s.get('name')), str(s.get('steps')), f"{s.get('lr'):g}" if isinstance(s.get('lr'), (int, float)) else '?',
            objs, '  '.join(extra)]


def metrics_table(stage_metrics: dict[str, dict[str, float]], ends: dict[str, int], indent: str = '  ') -> str:
    stages = list(stage_metrics)
    names = sorted({n for m in stage_metrics.values() for n in m})
    rows = [['(step)'] + [str(ends.get(s, '-')) for s in stages]] if ends else []
    rows += [[n] + [num(stage_metrics[s].get(n)) for s in stages] for n in names]
    return table(['metric'] + stages, rows, right=set(range(1, len(stages) + 1)), indent=indent)


def cmd_show(db, args) -> None:
    run = get_run(db, args.id)
    if args.keys:
        for k, v in run.flat.items():
            if k not in ('operative_gin',):
                print(f'{k} = {fmt(v)}')
        return
    cfg, info = run.config, run.info
    print(f"run {run.id}  {run.status}  experiment '{run.experiment or '?'}'  plan {cfg.get('spec_hash', '?')}")
    print(f'started     {when(run.start, True)} UTC' + (f'   stopped {when(run.stop, True)} UTC  ({duration(run.start, run.stop)})'
                                                        if run.stop else ''))
    tops = top_specs(run.spec_files)
    includes = [spec_label(f) for f in run.spec_files if f not in tops]
    print(f"spec        {', '.join(tops) or '?'}" + (f"   (includes {', '.join(includes)})" if includes else ''))
    if cfg.get('bindings'):
        print('bindings    ' + ' '.join(f'-b {b!r}' if ' ' in b or "'" not in b else f'-b "{b}"' for b in cfg['bindings']))
    h, hi = run.host, info.get('host') or {}
    pk = hi.get('packages') or {}
    details = [x for x in (h.get('cpu'), h.get('os_info'), f"Python {h.get('python_version') or hi.get('python', '?')}",
                           f"torch {pk['torch']}" if 'torch' in pk else None,
                           f"{hi['threads']} threads" if 'threads' in hi else None) if x]
    print(f"host        {h.get('hostname', '?')}  ({', '.join(details)})")
    run_dir = info.get('run_dir')
    print(f"run folder  {run_dir or '?'}" + ('' if not run_dir or Path(run_dir).is_dir() else '  (not on this machine)'))
    data = info.get('data') or {}
    if data:
        st = data.get('stats') or {}
        sizes = ', '.join(f"{k} {v.get('tokens', 0):,} tokens / {v.get('examples', 0):,} examples"
                          for k, v in st.items() if isinstance(v, dict))
        print(f"data        {data.get('cache', '?')}  (vocab {data.get('vocab_size', '?')}" + (f'; {sizes}' if sizes else '') + ')')
    if run.result is not None:
        print(f'result      {run.result:.6g}')
    if run.fail_trace:
        last = [ln for ln in str(run.fail_trace).strip().splitlines() if ln.strip()]
        print(f"failure     {last[-1].strip() if last else '?'}")
    print('\nplan')
    for k, v in plan_summary(run.plan):
        print(f'  {k:<11} {v}')
    stages = run.plan.get('curriculum') or []
    if stages:
        print('  curriculum')
        print(table(['stage', 'steps', 'lr', 'objectives', ''], [stage_line(s) for s in stages], right={1, 2},
                    indent='    '))
    sm = stage_end_metrics(db, run)
    print('\nstage-end metrics (eval, at each stage\'s last step)')
    print(metrics_table(sm, run.end_steps) if sm else '  none recorded')
    arts = db.artifacts(run.id)
    print('\nartifacts')
    if arts:
        print(table(['name', 'bytes'], [[n, f'{s:,}'] for n, s in arts], right={1}, indent='  '))
    else:
        print('  none recorded')
    print('\noperative gin')
    print('\n'.join('  ' + ln for ln in (cfg.get('operative_gin') or '(not recorded)').rstrip().splitlines()))


def select_metrics(rows, patterns: list[str] | None, run_id: str, place: str = '--name'):
    if not rows:
        raise SpecError(f'run {run_id}', 'no metrics recorded for this run',
                        'metrics live in the memspec_metrics table that python -m runtime.run writes; a run that died '
                        'before its first log step, or one recorded elsewhere, has none')
    if not patterns:
        return rows
    names = sorted({r[0] for r in rows})
    keep = set()
    for p in patterns:
        hits = {n for n in names if (fnmatch.fnmatchcase(n, p) if any(c in p for c in '*?[') else p in n)}
        if not hits:
            close = difflib.get_close_matches(p, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ''
            raise SpecError(f'{place} {p}', f'run {run_id} has no metric matching this',
                            f"{hint}give a substring or glob of one of: {', '.join(names)}")
        keep |= hits
    return [r for r in rows if r[0] in keep]


def plot(rows, run: RunRecord, out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(out)
    if not path.parent.is_dir():
        raise SpecError(f'--plot {out}', f'folder {path.parent} does not exist', 'create it or write the plot elsewhere')
    groups: dict[str, dict[str, tuple[list, list]]] = {}
    for name, step, value in rows:
        group = name.split('/', 1)[0] if '/' in name else 'metrics'
        xs, ys = groups.setdefault(group, {}).setdefault(name, ([], []))
        xs.append(step)
        ys.append(value)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), sharex=True, squeeze=False)
    ends = sorted(run.end_steps.items(), key=lambda kv: kv[1])
    for ax, (group, curves) in zip(axes[:, 0], groups.items()):
        for name, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker='.', label=name)
        for stage, step in ends:
            ax.axvline(step, color='grey', linestyle='--', linewidth=0.8)
            ax.annotate(stage, (step, 1.0), xycoords=('data', 'axes fraction'), rotation=90, fontsize=7,
                        ha='right', va='top', color='grey')
        ax.set_ylabel(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel('step (global; dashed lines: stage ends)')
    fig.suptitle(f'run {run.id}  {spec_text(run)}  ({run.status})')
    fig.tight_layout()
    tmp = path.with_name(f'.{path.name}.tmp{path.suffix}')
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except ValueError as e:  # unsupported format
        raise SpecError(f'--plot {out}', f'cannot write this plot: {e}', 'end the file name in .png, .pdf or .svg')
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    print(f'wrote {path} ({len({r[0] for r in rows})} metrics, {len(rows)} points)', file=sys.stderr)


def cmd_metrics(db, args) -> None:
    run = get_run(db, args.id)
    rows = select_metrics(db.metrics(run.id), args.name, run.id)
    if args.plot:
        plot(rows, run, args.plot)
    elif args.csv:
        w = csv.writer(sys.stdout, lineterminator='\n')
        w.writerow(['name', 'step', 'value'])
        for name, step, value in rows:
            w.writerow([name, step, repr(value)])
    else:
        print(table(['name', 'step', 'value'], [[n, str(s), f'{v:.6g}'] for n, s, v in rows], right={1, 2}))


def cmd_compare(db, args) -> None:
    if len(args.ids) < 2:
        raise SpecError('compare', 'needs at least two run ids', 'e.g. python -m store.runs compare 0 2')
    runs = [get_run(db, i) for i in args.ids]
    tty = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
    ids = [r.id for r in runs]
    print(table(['run'] + ids, [['spec'] + [spec_text(r) for r in runs], ['status'] + [r.status for r in runs],
                                ['plan hash'] + [str(r.config.get('spec_hash', '?')) for r in runs]], tty=tty))

    def diff_rows(values: dict[str, list], show_all: bool):
        rows, marked = [], set()
        for key, vals in values.items():
            texts = [fmt(v) if v is not _MISSING else '-' for v in vals]
            differs = len(set(texts)) > 1
            if not differs and not show_all:
                continue
            i = len(rows)
            rows.append([key] + texts)
            marked |= {(i, j + 1) for j, t in enumerate(texts) if j and t != texts[0]}
            if differs and show_all:
                marked.add((i, 0))
        return rows, marked

    plan_keys = list(dict.fromkeys(k for r in runs for k in r.flat if k.startswith('plan.')))
    values = {k: [r.flat.get(k, _MISSING) for r in runs] for k in plan_keys}
    ndiff = sum(1 for v in values.values() if len({fmt(x) if x is not _MISSING else '-' for x in v}) > 1)
    rows, marked = diff_rows(collapse_missing(values, runs), args.all)
    note = 'bold' if tty else '*'
    print(f'\nplan: {ndiff} of {len(plan_keys)} keys differ ({note}: differs from run {ids[0]})')
    if rows:
        print(table(['key'] + ids, rows, marked=marked, tty=tty, indent='  '))
    bs = [bindings(r) for r in runs]
    bkeys = list(dict.fromkeys(k for b in bs for k in b))
    brows, bmarked = diff_rows({k: [b.get(k, _MISSING) for b in bs] for k in bkeys}, False)
    print('\ncommand-line bindings that differ' + ('' if brows else ': none'))
    if brows:
        print(table(['binding'] + ids, brows, marked=bmarked, tty=tty, indent='  '))
    sms = [stage_end_metrics(db, r) for r in runs]
    stages = list(dict.fromkeys(s for sm in sms for s in sm))
    names = sorted({n for sm in sms for m in sm.values() for n in m})
    if args.name:
        pick = []
        for p in args.name:
            hits = [n for n in names if (fnmatch.fnmatchcase(n, p) if any(c in p for c in '*?[') else p in n)]
            if not hits:
                raise SpecError(f'--name {p}', 'no stage-end metric of these runs matches this',
                                f"known: {', '.join(names) or 'none recorded'}")
            pick += hits
        names = list(dict.fromkeys(pick))
    else:
        names = [n for n in COMPARE_METRICS if n in names]
    mrows = [[s, n] + [num(sm.get(s, {}).get(n)) for sm in sms] for s in stages for n in names
             if any(n in sm.get(s, {}) for sm in sms)]
    print('\nstage-end metrics' + ('' if mrows else ': none recorded'))
    if mrows:
        print(table(['stage', 'metric'] + ids, mrows, right=set(range(2, 2 + len(ids))), indent='  '))


_MISSING = object()


def _missing_prefix(key: str, run: RunRecord) -> str:
    """The shortest prefix of `key` (at dots) that `run`'s config lacks entirely, e.g. a whole stage."""
    parts = key.split('.')
    for i in range(2, len(parts) + 1):
        prefix = '.'.join(parts[:i])
        if prefix not in run.flat and not any(k.startswith(prefix + '.') for k in run.flat):
            return prefix
    return key


def collapse_missing(values: dict[str, list], runs: list[RunRecord]) -> dict[str, list]:
    """Keys that differ only because a whole section (a stage, an encoder) is absent from some runs become one
    'section.*' row ('present' / '-'); keys whose values differ among the runs that have them stay."""
    out: dict[str, list] = {}
    for key, vals in values.items():
        present = {fmt(v) for v in vals if v is not _MISSING}
        absent = [j for j, v in enumerate(vals) if v is _MISSING]
        if len(present) > 1 or not absent:
            out[key] = vals
            continue
        prefixes = {_missing_prefix(key, runs[j]) for j in absent}
        prefix = min(prefixes, key=len)
        if prefix == key:
            out[key] = vals
        else:
            out.setdefault(prefix + '.*', ['present' if v is not _MISSING else _MISSING for v in vals])
    return out


# ------------------------------------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--db', default=DEFAULT_DB, metavar='URL',
                        help=f'run database: sqlite:///path.db, postgresql://user:pw@host/db or mongodb://host '
                             f'(default {DEFAULT_DB})')
    ap = argparse.ArgumentParser(prog='python -m store.runs', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n')[1])
    sub = ap.add_subparsers(dest='command', required=True, metavar='{list,show,metrics,compare}')
    p = sub.add_parser('list', parents=[common], help='one line per run')
    p.add_argument('--spec', metavar='SUBSTRING', help='only runs whose spec file paths contain this')
    p.add_argument('--status', type=str.upper, choices=STATUSES, help='only runs with this status')
    p.add_argument('--where', action='append', metavar='KEY=VALUE',
                   help="plan filter, repeatable (all must hold): 'Memory.chunks=4', 'encoder/Stack.d_model=128', "
                        "'blank/Stage.lr=1e-3', a macro 'LR=1e-3', or a flattened key 'plan.memory.chunks=4'; '!=' negates")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser('show', parents=[common], help='one run in full')
    p.add_argument('id')
    p.add_argument('--keys', action='store_true', help='print the flattened config keys (what --where and compare read)')
    p.set_defaults(func=cmd_show)
    p = sub.add_parser('metrics', parents=[common], help="one run's logged metrics")
    p.add_argument('id')
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help="metric names containing this (or matching a glob such as 'eval/*accuracy'); repeatable")
    out = p.add_mutually_exclusive_group()
    out.add_argument('--csv', action='store_true', help='CSV (name,step,value) on stdout')
    out.add_argument('--plot', metavar='OUT.png', help='plot one curve per metric, dashed lines at stage ends')
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser('compare', parents=[common], help='what differs between runs')
    p.add_argument('ids', nargs='+', metavar='ID')
    p.add_argument('--all', action='store_true', help='list every plan key, not only those that differ')
    p.add_argument('--name', action='append', metavar='PATTERN', help='stage-end metrics to compare (default: headline)')
    p.add_argument('--color', choices=('auto', 'always', 'never'), default='auto',
                   help='bold differing values (auto: when stdout is a terminal; otherwise they get a *)')
    p.set_defaults(func=cmd_compare)
    return ap


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    db = open_db(args.db)
    try:
        args.func(db, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == '__main__':
    main()
