"""Shared test setup: the repository root is importable (plain `pytest` as well as `python -m pytest`), tests
run offline, single-threaded and deterministic in float32.

One intra-op thread: the test models are tiny, and on the 2-core machines two OpenMP threads made a forward
pass ~4x slower in wall time whenever anything else ran (measured), with no gain when idle."""
import os
import sqlite3
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


# ------------------------------------------------------------------ runtime runs (test_runtime.py, test_record.py)
# Tiny curricula that finish in seconds on 2 CPU cores. In-process runs call runtime.run.main(argv); runs whose
# exit code, stderr or death by signal matter run as subprocesses (`rt_cli_many`, `rt_refusals`). All runs of a
# session share one data cache, so the byte-level BPE is trained once.
import json as _json
import subprocess as _subprocess
import types as _types

FLAGSHIP = 'specs/frozen_encoder_curriculum.gin'
PROBE = 'specs/information_probe.gin'
FLAGSHIP_STAGES = ('autoencode', 'blank_copy', 'copy', 'combined')
TINY = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'BATCH=4', 'Stage.eval_every=2', 'Run.eval_batches=1',
        'Run.checkpoint_every=1', 'Run.log_every=1', "Run.memory_store='none'"]
TINY_FLAGSHIP = TINY + ['autoencode/Stage.steps=3', 'blank/Stage.steps=3', 'copy/Stage.steps=2',
                        'combined/Stage.steps=2']
TINY_PROBE = TINY + ['probe/Stage.steps=2']


def rt_argv(spec: str, out_dir, cache_dir, bindings=(), extra=()) -> list[str]:
    """argv for runtime.run: spec, the run/cache folders, then `bindings` as -b flags, then `extra` verbatim."""
    argv = [spec, '-b', f"Run.out_dir='{out_dir}'", '-b', f"Data.cache_dir='{cache_dir}'"]
    for b in bindings:
        argv += ['-b', b]
    return argv + list(extra)


def rt_bindings(argv: list[str]) -> list[str]:
    """The -b values of an argv (what compiler.spec.load takes)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == '-b']


def rt_env() -> dict:
    """Environment of CLI subprocesses: offline, one thread (like this process, so numbers match bit for bit)."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=str(ROOT))
    env.pop('WORLD_SIZE', None)
    return env


def rt_cli_many(argvs: dict) -> dict:
    """Several `python -m runtime.run` subprocesses at once ({key: argv} -> {key: CompletedProcess}): most of a
    refused run's time is importing torch and sacred, which two cores do side by side."""
    procs = {k: _subprocess.Popen([sys.executable, '-m', 'runtime.run', *a], cwd=ROOT, env=rt_env(), text=True,
                                  stdout=_subprocess.PIPE, stderr=_subprocess.PIPE) for k, a in argvs.items()}
    out = {}
    try:
        for k, p in procs.items():
            stdout, stderr = p.communicate(timeout=600)
            out[k] = _subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


def rt_main(argv: list[str]) -> int:
    """runtime.run.main in-process; returns the exit code (0 when it returns normally)."""
    from runtime.run import main
    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def in_process(main, argv, capsys) -> tuple[int, str, str]:
    """A CLI's main(argv) run in this process: (exit code, stdout, stderr); 0 when it returns normally."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def argparse_error(capsys, main, argv) -> str:
    """The last line of a CLI's refusal of its flags: exit code 2, nothing on stdout, no traceback."""
    capsys.readouterr()
    code, out, err = in_process(main, argv, capsys)
    assert code == 2 and out == '' and 'Traceback' not in err, err
    return err.strip().splitlines()[-1]


def no_run(ref, looked: str, known=()) -> str:
    """The one message (without 'error: ') of every command whose RUN matches nothing (store/runref.py)."""
    held = f"known: {', '.join(map(str, known))}" if known else 'it holds no runs'
    return (f"RUN {ref}: no run matches {str(ref)!r}: it is not a run folder, and {looked} has no run with that id or "
            f'name ({held})\n  fix: give a run id (python -m store.runs list), its full name <id>-<key>, or the path '
            'of its run folder (a folder that holds operative.gin)')


def db_rows(db, sql, *args) -> list[tuple]:
    """Rows of one query on a SQLite run database (a file path)."""
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def rt_run_folders(out_dir) -> dict[str, list[Path]]:
    """Run id -> the run folders (<id>-<key>, store/layout.py) with that id under an out_dir."""
    from store.layout import parse_name
    out_dir = Path(out_dir)
    found: dict[str, list[Path]] = {}
    for p in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if p.is_dir() and parse_name(p.name):
            found.setdefault(parse_name(p.name)[0], []).append(p)
    return found


def rt_run_ids(out_dir) -> set[str]:
    """The run ids of the run folders under an out_dir."""
    return set(rt_run_folders(out_dir))


def rt_run_dir(out_dir, run_id) -> Path:
    """The one run folder of run `run_id` under an out_dir."""
    (folder,) = rt_run_folders(out_dir)[str(run_id)]
    return folder


@pytest.fixture(scope='session')
def rt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp('memspec-cache')


@pytest.fixture(scope='session')
def flagship_run(tmp_path_factory, rt_cache):
    """One finished tiny flagship run (4 stages, 10 steps): out_dir, run_id, run_dir, argv, bindings, db."""
    out = tmp_path_factory.mktemp('flagship')
    argv = rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP)
    code = rt_main(argv)
    assert code == 0, f'the tiny flagship run failed with exit code {code}'
    ids = rt_run_ids(out)
    assert len(ids) == 1, ids
    run_id = ids.pop()
    run_dir = rt_run_dir(out, run_id)
    return _types.SimpleNamespace(out_dir=out, run_id=run_id, run_dir=run_dir, argv=argv,
                                  bindings=rt_bindings(argv), db=out / 'sacred.db',
                                  summary=_json.loads((run_dir / 'summary.json').read_text()))


@pytest.fixture(scope='session')
def stored_run(tmp_path_factory, rt_cache):
    """A finished tiny flagship run that writes its memories (the default store <out_dir>/memories.zarr): the
    tracking views, provenance, shared memories and export tests read it. out_dir, run_id, run_dir, db, store."""
    out = tmp_path_factory.mktemp('stored')
    bindings = [b for b in TINY_FLAGSHIP if not b.startswith('Run.memory_store')]
    code = rt_main(rt_argv(FLAGSHIP, out, rt_cache, bindings))
    assert code == 0, f'the tiny flagship run with a memory store failed with exit code {code}'
    (run_id,) = rt_run_ids(out)
    run_dir = rt_run_dir(out, run_id)
    return _types.SimpleNamespace(out_dir=out, run_id=run_id, run_dir=run_dir, db=out / 'sacred.db',
                                  url=f"sqlite:///{out / 'sacred.db'}", store=out / 'memories.zarr',
                                  name=run_dir.name, bindings=bindings)


# --- subprocess checks started early ------------------------------------------------------------------------------
# `python -m compiler` pays ~3 s of CPU for Python + torch start-up. Test modules that run it define
# `start_background()`, called once after collection when any of their tests is selected; the processes then run on
# the core the single-threaded in-process tests leave idle, and the tests wait on the returned futures.

_pool = None
_futures = {}


def background_run(key, cmd, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs) on a shared 2-worker pool, once per key."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2)
    if key not in _futures:
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
        _futures[key] = _pool.submit(subprocess.run, cmd, capture_output=True, text=True, env=env, **kwargs)
    return _futures[key]


def pytest_collection_finish(session):
    started = set()
    for item in session.items:
        module = getattr(item, 'module', None)
        start = getattr(module, 'start_background', None)
        if start is not None and module not in started:
            started.add(module)
            start()


@pytest.fixture(scope='session')
def rt_refusals(flagship_run, rt_cache, tmp_path_factory):
    """The command lines the runtime must refuse (exit 2, before anything is recorded), run side by side as
    subprocesses once per session. .cases: {case: (out_dir, CompletedProcess)}; .flagship_before: the flagship run's
    checkpoint mtime, database rows and run folders just before (the other_spec case points at that run)."""
    import sqlite3
    fresh = {k: tmp_path_factory.mktemp(k) / 'runs' for k in ('unknown_resume', 'unknown_init', 'unreachable_db')}
    cases = {
        'unknown_resume': (fresh['unknown_resume'], rt_argv(FLAGSHIP, fresh['unknown_resume'], rt_cache, TINY_FLAGSHIP,
                                                            ['--resume', '999'])),
        'other_spec': (flagship_run.out_dir, rt_argv(FLAGSHIP, flagship_run.out_dir, rt_cache,
                                                     TINY_FLAGSHIP + ['combined/Stage.steps=3'],
                                                     ['--resume', flagship_run.run_id])),
        'unknown_init': (fresh['unknown_init'], rt_argv(PROBE, fresh['unknown_init'], rt_cache,
                                                        TINY_PROBE
                                                        + ["probe/Stage.init_from = {'encoder': 'run:999/x'}"])),
        'unreachable_db': (fresh['unreachable_db'], rt_argv(FLAGSHIP, fresh['unreachable_db'], rt_cache, TINY_FLAGSHIP,
                                                            ['--db', 'postgresql://nobody@127.0.0.1:1/x'])),
    }
    con = sqlite3.connect(flagship_run.db)
    try:
        rows = con.execute('SELECT run_id, status FROM run ORDER BY id').fetchall()
    finally:
        con.close()
    before = {'checkpoint': (flagship_run.run_dir / 'checkpoint.pt').stat().st_mtime_ns, 'rows': rows,
              'runs': rt_run_ids(flagship_run.out_dir)}
    results = rt_cli_many({k: argv for k, (_, argv) in cases.items()})
    return _types.SimpleNamespace(cases={k: (out, results[k]) for k, (out, _) in cases.items()}, flagship_before=before)


# -------------------------------------------------------------------------------------------------- PostgreSQL

PG_DEFAULT = 'postgresql://memspec:memspec@localhost:5432/postgres'


@pytest.fixture
def pg_url():
    """A fresh database on the server of MEMSPEC_TEST_POSTGRES (set by .ci/run), or of a local server when the
    variable is unset; dropped afterwards."""
    import psycopg2
    from sqlalchemy.engine import make_url
    env = os.environ.get('MEMSPEC_TEST_POSTGRES')
    admin = env or PG_DEFAULT
    try:
        con = psycopg2.connect(admin, connect_timeout=5)
    except psycopg2.OperationalError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if env:
            pytest.fail(f'MEMSPEC_TEST_POSTGRES={env} is set but the server is unreachable: {reason}')
        pytest.skip(f'no PostgreSQL: MEMSPEC_TEST_POSTGRES is unset and {PG_DEFAULT} is unreachable ({reason}); '
                    f'.ci/run starts a server and sets the variable')
    con.autocommit = True
    name = f'memspec_test_{uuid.uuid4().hex[:12]}'
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE {name}')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with con.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
        con.close()


# specs/pretrained/<spec> -> (the macro naming its hub model, the tiny architecture that stands in for it offline)
PRETRAINED = {'pretrained/llama_copy_memory.gin': ('LLAMA', 'llama'),
              'pretrained/llama_information.gin': ('LLAMA', 'llama'),
              'pretrained/qwen_information.gin': ('QWEN', 'qwen3'),
              'pretrained/bert_information.gin': ('BERT', 'bert'),
              'pretrained/icae_autoencoder.gin': ('LLAMA', 'llama')}


@pytest.fixture(scope='session')
def tiny_models(tmp_path_factory):
    """arch -> the folder of a tiny random model of that architecture (compiler/tiny.py, made on first use): the
    offline stand-ins for the hub models of specs/pretrained/."""
    from compiler.tiny import make
    root, made = tmp_path_factory.mktemp('tiny'), {}

    def get(arch):
        if arch not in made:
            made[arch] = str(make(root / arch, arch))
        return made[arch]
    return get


def pretrained_bindings(spec: str, tiny_models) -> list[str]:
    """-b bindings that point a specs/pretrained/ spec at its tiny stand-in (none for other specs)."""
    macro, arch = PRETRAINED.get(spec, (None, None))
    return [f"{macro} = '{tiny_models(arch)}'"] if macro else []
