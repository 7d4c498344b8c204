"""Declarative sweeps (runtime/sweep.py): expansion of seeds x grid, dependencies by name, refusal of bad sweeps with
their exact messages, the driver's skip / resume / start decisions, and real tiny sweeps run by local processes and by
submitit's local executor into one SQLite database."""
import datetime as dt
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from conftest import ROOT, TINY, rt_env

from compiler.errors import UserError
from runtime import sweep as S
from store.database import RunRecord, default_url
from store.sqlite_files import SACRED_TABLES

PROBES = 'specs/sweeps/probes.gin'
TINY_MEMBERS = TINY + ['Run.steps_scale = 0.0025']  # every stage of every member: 800 -> 2 steps
# the shipped sweep cut to 2 trials x 2 seeds: ae, then a probe of the autoencoder of its own seed
SMALL = ['Sweep.seeds = [0, 1]', 'Sweep.trials = [@ae/Trial(), @probe/Trial()]', 'probe/Trial.grid = {}']

HEAD = """Sweep.seeds = [0, 1]
Sweep.trials = [@ae/Trial(), @probe/Trial()]
ae/Trial.specs = ['specs/autoencoder.gin']
probe/Trial.specs = ['specs/information_probe.gin']
probe/Trial.bindings = ["probe/Stage.init_from = {'encoder': 'run:@ae/autoencode'}"]
"""


def sweep_file(tmp_path, extra: str = '', name: str = 'sweep.gin') -> Path:
    path = tmp_path / name
    path.write_text(HEAD + extra)
    return path


def members_of(path, bindings=(), extra=()):
    sweep_b, member_b = S.split_bindings(list(bindings))
    return S.expand(S.load_sweep(str(path), sweep_b), member_b + list(extra))


# ------------------------------------------------------------------------------------------------ expansion

def test_every_trial_runs_once_per_seed_and_grid_point_dependencies_first(tmp_path):
    path = sweep_file(tmp_path, "probe/Trial.grid = {'Memory.chunk_len': [8, 16], 'probe/Stage.lr': [1e-3, 2e-3]}\n"
                                "Sweep.bindings = ['D_MODEL = 32']\n")
    members = members_of(path, ['Run.log_every = 5'])
    assert [(m.trial, m.seed, m.point) for m in members] == [
        ('ae', 0, {}), ('ae', 1, {}),
        *[('probe', s, {'Memory.chunk_len': c, 'probe/Stage.lr': lr}) for s in (0, 1) for c in (8, 16)
          for lr in (1e-3, 2e-3)]]
    probe = members[-1]
    # Sweep.bindings, the trial's, the command line's, then the grid point and the seed (which win)
    assert probe.bindings == ['D_MODEL = 32', "probe/Stage.init_from = {'encoder': 'run:@ae/autoencode'}",
                              'Run.log_every = 5', 'Memory.chunk_len = 16', 'probe/Stage.lr = 0.002', 'Run.seed = 1']
    plan = probe.spec.plan
    assert (plan.run.seed, plan.memory.chunk_len, plan.curriculum[0].lr, plan.decoder.d_model) == (1, 16, 2e-3, 32)
    # logs are named by the grid values (file-safe), not by the grid point's index
    assert probe.label == 'probe-seed1-Memory.chunk_len=16,probe.Stage.lr=0.002' and members[0].label == 'ae-seed0'
    assert len({m.hash for m in members}) == len(members)


def test_a_dependency_resolves_by_name_to_the_run_of_the_same_seed_and_grid_point(tmp_path):
    path = sweep_file(tmp_path, "ae/Trial.grid = {'Memory.chunk_len': [8, 16]}\n"
                                "probe/Trial.grid = {'Memory.chunk_len': [8, 16], 'probe/Stage.lr': [1e-3, 2e-3]}\n")
    members = members_of(path)
    ae = {(m.seed, m.point['Memory.chunk_len']): m for m in members if m.trial == 'ae'}
    probes = [m for m in members if m.trial == 'probe']
    assert len(ae) == 4 and len(probes) == 8
    for i, m in enumerate(ae.values()):
        m.run_id, m.run_name = str(10 + i), f'{10 + i}-0123456789'
    for p in probes:
        dep = p.deps['ae']
        assert dep is ae[(p.seed, p.point['Memory.chunk_len'])]
        spec = S.compile_member(p)
        assert dict(spec.plan.curriculum[0].init_from) == {'encoder': f'run:{dep.run_name}/autoencode'}


def test_grid_values_that_read_the_same_as_file_names_fall_back_to_the_index(tmp_path):
    path = sweep_file(tmp_path, "ae/Trial.grid = {'Run.memory_store': ['m n', 'm/n', 'c']}\n")
    labels = [m.label for m in members_of(path, ['Sweep.seeds = [0]', 'Sweep.trials = [@ae/Trial()]'])]
    assert labels == ['ae-seed0-point1', 'ae-seed0-point2', 'ae-seed0-Run.memory_store=c']


def test_the_dependency_component_suffix_is_kept(tmp_path):
    path = sweep_file(tmp_path, 'probe/Trial.bindings = ["probe/Stage.init_from = '
                                "{'encoder': 'run:@ae/autoencode:encoder'}\"]\n")
    members = members_of(path)
    members[1].run_name = '7-0123456789'
    assert S.compile_member(members[3]).plan.curriculum[0].init_from == {
        'encoder': 'run:7-0123456789/autoencode:encoder'}


# Trials that drop part of their spec on purpose: the scopes left unused (a warning recorded in each run, never silent).
DROPPED = {'specs/sweeps/paper_claims.gin': {'nomem_clm': {'blank'}, 'full_clm': {'blank'},  # clm-only baselines
                                             'curriculum_random': {'autoencode', 'ae'},  # no autoencoder stage
                                             'curriculum_causal': {'autoencode', 'ae'},
                                             'curriculum_causal_matched': {'autoencode', 'ae'},
                                             'curriculum_memclm': {'autoencode', 'ae'}}}


@pytest.mark.parametrize('path', sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'specs' / 'sweeps').glob('*.gin')))
def test_every_shipped_sweep_compiles_every_member_and_warns_only_of_what_it_drops(path):
    members = members_of(ROOT / path)
    assert members
    for m in members:
        unused = {re.search(r"nothing is built in scope '(\w+)'", str(w)).group(1) for w in m.spec.warnings}
        assert unused == DROPPED.get(path, {}).get(m.trial, set()), (m.trial, [str(w) for w in m.spec.warnings])


def test_sweep_flags_of_runtime_run_expand_to_a_one_trial_sweep():
    layout = S.grid_sweep(['specs/autoencoder.gin'], ['Memory.chunks=[2,4]', 'Run.seed=[0,1]', 'D_MODEL=[32,64]'])
    assert (layout.sweep.name, layout.sweep.seeds) == ('autoencoder', (0, 1))
    members = S.expand(layout, [])
    assert [(m.trial, m.seed, m.point) for m in members] == [
        ('autoencoder', s, {'Memory.chunks': c, 'D_MODEL': d}) for s in (0, 1) for c in (2, 4) for d in (32, 64)]
    assert [(m.spec.plan.memory.chunks, m.spec.plan.encoder.d_model) for m in members[:4]] == [
        (2, 32), (2, 64), (4, 32), (4, 64)]


def test_the_recorded_sweep_entry_has_no_dots_in_its_keys():
    entry = S.member_config(json.dumps({'name': 'n', 'sweep_id': 'n-1', 'trial': 't', 'seed': 0,
                                        'grid': {'Memory.chunk_len': 8, 'probe/Stage.lr': [1, 2]}}))
    assert entry['grid'] == {'Memory:chunk_len': 8, 'probe/Stage:lr': [1, 2]}


# ------------------------------------------------------------------------------------------------ refusals

REFUSALS = {
    'unknown dependency': ('probe/Trial.bindings = ["probe/Stage.init_from = {\'encoder\': \'run:@aa/autoencode\'}"]',
                           "{f}:6: 'run:@aa/' names no trial of this sweep (trials: ae, probe)\n"
                           "  fix: depend on a trial of the sweep by its name: 'run:@<trial>/<stage>'"),
    'binding for no trial': ("prbe/Trial.grid = {'Memory.chunks': [4, 8]}",
                             "{f}:6: 'prbe' is not a trial of this sweep (trials: ae, probe)\n"
                             "  fix: did you mean 'probe'? add @prbe/Trial() to Sweep.trials or fix the scope"),
    'misspelled dependency': ('probe/Trial.bindings = '
                              '["probe/Stage.init_from = {\'encoder\': \'run:@aes/autoencode\'}"]',
                              "{f}:6: 'run:@aes/' names no trial of this sweep (trials: ae, probe)\n"
                              "  fix: did you mean 'ae'? depend on a trial of the sweep by its name: "
                              "'run:@<trial>/<stage>'"),
    'cycle': ('ae/Trial.bindings = ["Stage.init_from = {\'encoder\': \'run:@probe/probe\'}"]',
              '{f}:5: dependency cycle: ae -> probe -> ae\n'
              '  fix: a trial cannot read (through run:@...) a trial that reads it'),
    'unknown grid parameter': ("probe/Trial.grid = {'Memory.chunkz': [4, 8]}",
                               "{f}:6 (binding -b 'Memory.chunkz = 4'): trial 'probe' (seed 0, Memory.chunkz=4): "
                               "'Memory' has no parameter 'chunkz'\n  fix: did you mean 'chunks'? known names: "
                               'chunk_len, chunks, combine, compression, decoder_input, noise, pad, position, slots'),
    'bad grid value': ("probe/Trial.grid = {'Memory.chunks': [4, 0]}",
                       "{f}:6 (binding -b 'Memory.chunks = 0'): trial 'probe' (seed 0, Memory.chunks=0): "
                       'Memory.chunks must be >= 1, got 0\n  fix: use at least 1 chunk'),
    'grid key without effect': ("probe/Trial.grid = {'prob/Stage.lr': [0.1, 0.2]}",
                                "{f}:6 (binding -b 'prob/Stage.lr = 0.1'): trial 'probe' (seed 0, prob/Stage.lr=0.1): "
                                "prob/Stage.lr has no effect: no Stage is built in scope 'prob' and no @prob/...() "
                                "reference names it\n  fix: did you mean 'probe/Stage.lr'? scopes of Stage: probe"),
    'unused macro': ("probe/Trial.grid = {'CHUNKZ': [4]}",
                     "{f}:6 (binding -b 'CHUNKZ = 4'): trial 'probe' (seed 0, CHUNKZ=4): macro 'CHUNKZ' has no effect: "
                     "no binding uses %CHUNKZ\n  fix: did you mean 'CHUNKS'? macros in use: BATCH, CHUNKS, CHUNK_LEN, "
                     'D_MODEL, KIND, N_HEADS, N_LAYERS, VOCAB; or bind the parameter itself'),
    'values of one plan': ("probe/Trial.grid = {'probe/Stage.lr': [1, 1.0]}",
                           "{f}:6: grid key 'probe/Stage.lr' of trial 'probe': 1 or 1.0 give the same plan\n"
                           '  fix: list values that make different plans (each grid point is its own run)'),
    'not a key': ("probe/Trial.grid = {'Memory.chunks = 3': [4]}",
                  "{f}:6: grid key 'Memory.chunks = 3' of trial 'probe' is not a binding name\n"
                  "  fix: use '[scope/]Configurable.param' or a MACRO, e.g. {{'Memory.chunks': [4, 8]}}"),
    'value twice': ("probe/Trial.grid = {'Memory.chunks': [4, 4]}",
                    "{f}:6: grid key 'Memory.chunks' of trial 'probe' lists a value twice: [4, 4]\n"
                    '  fix: list every value once'),
    'seed in grid': ("probe/Trial.grid = {'Run.seed': [4]}",
                     "{f}:6: trial 'probe' varies Run.seed, which Sweep.seeds already varies\n"
                     '  fix: list the seeds in Sweep.seeds only'),
    'unknown stage': ('probe/Trial.bindings = ["probe/Stage.init_from = {\'encoder\': \'run:@ae/autoencoder\'}"]',
                      "{f}:6: 'run:@ae/autoencoder': trial 'ae' has no stage 'autoencoder'\n"
                      '  fix: name one of its stages: autoencode'),
    'ambiguous dependency': ("ae/Trial.grid = {'Memory.chunks': [4, 8]}",
                             "{f}:5: trial 'probe' reads trial 'ae', which varies Memory.chunks and 'probe' does not: "
                             "which 'ae' run each 'probe' run reads is ambiguous\n  fix: give 'probe' the same grid "
                             "keys (and values), or take them out of 'ae'"),
    'no matching point': ("ae/Trial.grid = {'Memory.chunks': [4, 8]}\nprobe/Trial.grid = {'Memory.chunks': [4, 16]}",
                          "{f}:7: trial 'probe' at Memory.chunks=16 reads trial 'ae', which has no run at these "
                          "values\n  fix: give 'ae' the same grid values as 'probe'"),
    'missing spec': ("ae/Trial.specs = ['nope.gin']",
                     "{f}:6: spec 'nope.gin' not found (looked in ., {d} and specs/)\n"
                     '  fix: fix the path in Trial.specs: relative to the current folder, the sweep file or specs/'),
    'trial name': ("ae/Trial.name = 'a-e'",
                   "{f}:6: trial name 'a-e' is not an identifier\n"
                   "  fix: use letters, digits and '_' (it names log files and dependencies)"),
    'seed twice': ('Sweep.seeds = [0, 0]', '{f}:6: Sweep.seeds lists a seed twice: [0, 0]\n'
                                          '  fix: list every seed once'),
    'trial named twice': ('Sweep.trials = [@ae/Trial(), @ae/Trial()]',
                          "{f}:3: two trials are named 'ae'\n  fix: give every trial its own scope or name"),
    'unnamed trial': ('Sweep.trials = [@Trial()]',
                      '{f}:6: a trial has no name\n  fix: scope it (@ae/Trial()) or bind Trial.name'),
    'unknown field': ('Sweep.trialz = []', "{f}:6: 'Sweep' has no parameter 'trialz'\n"
                                           "  fix: did you mean 'trials'? known names: bindings, name, seeds, trials"),
    'two out_dirs': ("ae/Trial.bindings = [\"Run.out_dir = 'elsewhere'\"]",
                     "{f}:2: the members write to different Run.out_dir: ['elsewhere', 'runs']\n  fix: give every "
                     "trial the same Run.out_dir (e.g. -b \"Run.out_dir='runs'\"): a dependency is read from the "
                     "dependent's out_dir and the sweep records into one database"),
}


def test_refusal_table_is_large_enough():
    assert len(REFUSALS) >= 15


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_a_bad_sweep_is_refused_with_a_located_message(case, tmp_path):
    text, message = REFUSALS[case]
    path = sweep_file(tmp_path, text + '\n')
    with pytest.raises(UserError) as e:
        members_of(path)
    assert str(e.value) == message.format(f=path, d=tmp_path)


def test_a_command_line_binding_goes_to_every_member_and_must_take_effect_in_each(tmp_path):
    with pytest.raises(UserError) as e:
        members_of(sweep_file(tmp_path), ['probe/Stage.steps = 3'])
    assert str(e.value) == (
        "binding -b 'probe/Stage.steps = 3': trial 'ae' (seed 0): probe/Stage.steps has no effect: no Stage is built "
        "in scope 'probe' and no @probe/...() reference names it\n  fix: scopes of Stage: autoencode; a -b binding is "
        'given to every member: for some trials only, put it in their Trial.bindings')


def test_a_binding_that_sets_what_the_sweep_varies_is_refused(tmp_path):
    with pytest.raises(UserError) as e:
        members_of(sweep_file(tmp_path), ['Run.seed = 3'])
    assert str(e.value) == ("binding -b 'Run.seed = 3': 'Run.seed' is what the sweep varies\n"
                            '  fix: drop this binding (the sweep sets it for every member)')


@pytest.mark.parametrize('flags, message', [
    (['Memory.chunks=4'], "--sweep 'Memory.chunks=4': a sweep flag is one binding key and a list of its values\n"
                          "  fix: write --sweep 'Memory.chunks=[4,8,16]' (repeat --sweep for more keys)"),
    (['Memory.chunks=[4]', 'Memory.chunks=[8]'], "--sweep 'Memory.chunks=[8]': 'Memory.chunks' is swept twice\n"
                                                 '  fix: give each key one --sweep flag with all its values'),
    (["Run.seed=['a']"], "--sweep 'Run.seed=['a']': seeds are integers, not ['a']\n"
                         "  fix: write --sweep 'Run.seed=[0,1,2]'"),
])
def test_bad_sweep_flags_are_refused(flags, message):
    with pytest.raises(UserError) as e:
        S.grid_sweep(['specs/autoencoder.gin'], flags)
    assert str(e.value) == message


REFUSED_COMMANDS = {
    'bad spec': (['Sweep.seeds = [0, 0]'], [], '{f}:6: Sweep.seeds lists a seed twice: [0, 0]\n'
                                               '  fix: list every seed once'),
    'slurm without a time limit': ([], ['--executor', 'slurm'],
                                   "--executor slurm: no time limit: submitit's default would stop every member after "
                                   '5 min\n  fix: give --slurm-time MINUTES'),
    'no sbatch': ([], ['--executor', 'slurm', '--slurm-time', '60'],
                  '--executor slurm: sbatch is not on PATH: this machine cannot submit Slurm jobs\n'
                  '  fix: run the sweep on a Slurm login node, or use --executor local'),
    'unknown slurm parameter': ([], ['--executor', 'submitit-local', '--slurm-param', 'acount=lab'],
                                "--slurm-param acount=lab: not a submitit Slurm parameter: 'acount'\n  fix: write "
                                'KEY=VALUE with KEY one of: {slurm}'),
}


@pytest.mark.parametrize('case', sorted(REFUSED_COMMANDS))
def test_a_refused_sweep_exits_2_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    import submitit
    monkeypatch.setattr('shutil.which', lambda name: None)  # the test machine may or may not have Slurm
    lines, flags, message = REFUSED_COMMANDS[case]
    path = sweep_file(tmp_path, ''.join(f'{line}\n' for line in lines))
    out = tmp_path / 'runs'
    with pytest.raises(SystemExit) as e:
        S.main(['run', str(path), '-b', f"Run.out_dir='{out}'", *flags])
    assert e.value.code == 2
    slurm = ', '.join(sorted(submitit.SlurmExecutor._valid_parameters()))
    assert capsys.readouterr().err == f'error: {message.format(f=path, slurm=slurm)}\n'
    assert not out.exists(), 'a refused sweep wrote into its out_dir'


def test_sweep_options_without_a_sweep_are_refused(tmp_path, capsys):
    from runtime.run import main
    out = tmp_path / 'runs'
    with pytest.raises(SystemExit) as e:
        main(['specs/autoencoder.gin', '-b', f"Run.out_dir='{out}'", '--jobs', '2'])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --jobs: this option is for sweeps\n"
                                       "  fix: add --sweep 'KEY=[values]' or drop the option\n")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the driver

class FakePool:
    """Stands in for the executors: records what would run and answers with the exit code `codes` gives a trial."""
    threads = 1

    def __init__(self, codes=None):
        self.codes, self.started = codes or {}, []

    def start(self, argv, env, log, cwd, shown):
        entry = json.loads(argv[argv.index('--sweep-member') + 1])
        self.started.append(argv)
        future = Future()
        now = time.time()
        future.set_result({'code': self.codes.get((entry['trial'], entry['seed']), 0), 'start': now, 'stop': now})
        return future

    def close(self):
        pass


KEY = '0123456789'


def record(m, status, run_id, hash_=None, silent=None):
    """A recorded run of member m (RUNNING: its last heartbeat `silent` ago)."""
    entry = {'name': 'sweep', 'sweep_id': 'sweep-old', 'trial': m.trial, 'seed': m.seed, 'grid': S.stored(m.point)}
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return RunRecord(run_id, status, now - dt.timedelta(hours=1), None, {'sweep': entry, 'spec_hash': hash_ or m.hash},
                     {'run_key': KEY}, heartbeat=None if silent is None else now - silent)


@pytest.mark.parametrize('status, checkpoint, expected', [
    ('COMPLETED', False, 'skip'), ('INTERRUPTED', False, 'resume'), ('FAILED', True, 'resume'),
    ('FAILED', False, 'start'), ('RUNNING', False, 'leave'), ('RUNNING stale', False, 'resume'),
    ('COMPLETED (other plan)', False, 'start')])
def test_a_rerun_skips_completed_members_resumes_stopped_ones_and_starts_the_rest(status, checkpoint, expected,
                                                                                  tmp_path):
    out = tmp_path / 'runs'
    (m,) = [m for m in members_of(sweep_file(tmp_path), ['Sweep.seeds = [0]', f"Run.out_dir = '{out}'"])
            if m.trial == 'ae']
    if checkpoint:
        (out / f'5-{KEY}').mkdir(parents=True)
        (out / f'5-{KEY}' / 'checkpoint.pt').write_bytes(b'x')
    other = status.endswith('(other plan)')
    silent = dt.timedelta(minutes=10 if status.endswith('stale') else 0)
    recorded = [record(m, 'FAILED', '4'), record(m, status.split()[0], '5', 'f' * 12 if other else None, silent)]
    pool = FakePool()
    driver = S.Driver('sweep', 'sweep-new', 'sqlite:///unused.db', SimpleNamespace(db=None, jobs=1), tmp_path, pool,
                      recorded)
    driver.members = [m]
    driver.bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None, write=lambda s, **k: None)
    future = driver.start(m)
    if expected == 'skip':
        assert future is None and pool.started == [] and (m.status, m.run_id, m.before) == ('COMPLETED', '5', True)
    elif expected == 'leave':
        assert future is None and pool.started == [] and (m.status, m.run_id) == ('RUNNING', '5')
    else:
        (argv,) = pool.started
        assert ('--resume' in argv) == (expected == 'resume')
        if expected == 'resume':
            assert argv[argv.index('--resume') + 1] == f'5-{KEY}' and (m.resume, m.run_id) == (f'5-{KEY}', '5')
        else:
            assert m.run_id is None
        entry = json.loads(argv[argv.index('--sweep-member') + 1])
        assert entry == {'name': 'sweep', 'sweep_id': 'sweep-new', 'trial': 'ae', 'seed': 0, 'grid': {}}


def test_a_failed_member_skips_its_dependents_and_the_others_continue(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'runs'
    layout = S.load_sweep(str(sweep_file(tmp_path)))
    pool = FakePool({('ae', 0): 1})
    monkeypatch.setattr(S.driver, 'make_executor', lambda args, folder: pool)
    args = SimpleNamespace(db=None, jobs=2, executor='local')
    code = S.execute(layout, [f"Run.out_dir = '{out}'"], args)
    assert code == 1
    started = [json.loads(a[a.index('--sweep-member') + 1]) for a in pool.started]
    assert [(e['trial'], e['seed']) for e in started] == [('ae', 0), ('ae', 1), ('probe', 1)]
    rows = member_rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[-2]) for r in rows] == [('ae', '0', 'FAILED'), ('ae', '1', 'COMPLETED'),
                                                    ('probe', '0', 'SKIPPED'), ('probe', '1', 'COMPLETED')]
    assert (out / 'sacred.db').is_file() and len(list((out / 'sweeps').iterdir())) == 1


# ------------------------------------------------------------------------------------------------ real sweeps

def sweep_cmd(out, cache, *extra) -> list[str]:
    """The shipped probes sweep cut to SMALL, tiny members, 2 at once, recorded in <out>/sacred.db."""
    return [sys.executable, '-m', 'runtime.sweep', 'run', PROBES, *[a for b in SMALL for a in ('-b', b)],
            '-b', f"Run.out_dir='{out}'", '-b', f"Data.cache_dir='{cache}'",
            *[a for b in TINY_MEMBERS for a in ('-b', b)], '--jobs', '2', *extra]


def completed(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f'exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}'
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope='module')
def small_sweeps(tmp_path_factory, rt_cache):
    """The small sweep run by local processes and, at the same time (most of a member's time here is start-up),
    through submitit's local executor, each into its own folder and database: {executor: (out_dir, result)}."""
    outs = {k: tmp_path_factory.mktemp(k) / 'runs' for k in ('local', 'submitit')}
    procs = {'local': sweep_cmd(outs['local'], rt_cache),
             'submitit': sweep_cmd(outs['submitit'], rt_cache, '--executor', 'submitit-local')}
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=rt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in procs.items()}
    return {k: (outs[k], completed(p)) for k, p in procs.items()}


def recorded(db) -> list[tuple]:
    """(run name '<id>-<key>', status, config, start, stop) of every run in the database."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute('SELECT run_id, status, config, info, start_time, stop_time FROM run ORDER BY id').fetchall()
    finally:
        con.close()
    return [(f"{i}-{json.loads(info)['run_key']}", s, json.loads(c), start, stop)
            for i, s, c, info, start, stop in rows]


def member_rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if re.match(r'^(ae|probe)\s', line)]


def check_small_sweep(out, stdout) -> str:
    """4 COMPLETED runs in one database, each with its sweep entry; each probe read the autoencoder of its seed, which
    had completed before the probe started. -> the sweep id."""
    sweep_id = re.search(r'^sweep (probes-\S+):', stdout, re.M).group(1)
    runs = recorded(out / 'sacred.db')
    assert [s for _, s, *_ in runs] == ['COMPLETED'] * 4
    entries = {(c['sweep']['trial'], c['sweep']['seed']): (n, c, start, stop) for n, _, c, start, stop in runs}
    assert sorted(entries) == [('ae', 0), ('ae', 1), ('probe', 0), ('probe', 1)]
    for (trial, seed), (_, c, start, _) in entries.items():
        assert c['sweep'] == {'name': 'probes', 'sweep_id': sweep_id, 'trial': trial, 'seed': seed, 'grid': {}}
        assert c['plan']['run']['seed'] == seed
        if trial == 'probe':
            ae_name, _, _, ae_stop = entries[('ae', seed)]
            assert c['plan']['curriculum'][0]['init_from'] == {'encoder': f'run:{ae_name}/autoencode'}
            assert start >= ae_stop, f'probe seed {seed} started before its autoencoder completed'
    logs = sorted(p.name for p in (out / 'sweeps' / sweep_id).iterdir() if p.suffix == '.log')
    assert logs == ['ae-seed0.log', 'ae-seed1.log', 'probe-seed0.log', 'probe-seed1.log']
    return sweep_id


def test_a_tiny_sweep_runs_in_parallel_processes_and_a_rerun_starts_nothing(small_sweeps, rt_cache):
    out, first = small_sweeps['local']
    sweep_id = check_small_sweep(out, first.stdout)
    assert f'local executor, 2 at once, {max(1, S.executors.cores() // 2)} thread(s) each' in first.stdout
    before = recorded(out / 'sacred.db')

    ids = {(c['sweep']['trial'], str(c['sweep']['seed'])): n.split('-')[0] for n, _, c, *_ in before}
    listed = [(t, s, ids[(t, s)], 'COMPLETED') for t, s in sorted(ids)]
    rows = member_rows(S.status(sweep_id, [], default_url(str(out))))
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == listed
    # by the sweep spec: every member's latest run, and whether it ran the plan the spec now gives
    bindings = [*SMALL, f"Run.out_dir='{out}'", f"Data.cache_dir='{rt_cache}'", *TINY_MEMBERS]
    assert [(r[0], r[1], r[3], r[4]) for r in member_rows(S.status(PROBES, bindings, None))] == listed
    changed = ('probe/Trial.bindings = ["probe/Stage.init_from = {\'encoder\': \'run:@ae/autoencode\'}", '
               '"probe/Stage.lr = 0.005"]')
    rows = member_rows(S.status(PROBES, bindings + [changed], None))
    assert [' '.join(r[4:-1]) for r in rows] == ['COMPLETED'] * 2 + ['COMPLETED (other plan)'] * 2

    again = completed(subprocess.Popen(sweep_cmd(out, rt_cache), cwd=ROOT, env=rt_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
    assert recorded(out / 'sacred.db') == before, 'the rerun recorded or changed runs'
    rows = member_rows(again.stdout)
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [(t, ids[(t, s)], 'COMPLETED', '(before)')
                                                        for t, s in sorted(ids)]
    assert 'runtime.sweep status' not in again.stdout, 'a rerun that started nothing has no runs to list by its id'
    new_id = re.search(r'^sweep (probes-\S+):', again.stdout, re.M).group(1)
    assert new_id != sweep_id
    assert not [p for p in (out / 'sweeps' / new_id).iterdir() if p.suffix == '.log'], 'the rerun started a member'


def test_the_same_sweep_through_submitits_local_executor(small_sweeps):
    out, r = small_sweeps['submitit']
    sweep_id = check_small_sweep(out, r.stdout)
    assert 'submitit-local executor, 2 at once' in r.stdout
    jobs = list((out / 'sweeps' / sweep_id / 'submitit').glob('*_result.pkl'))
    assert len(jobs) == 4, 'each member should have been one submitit job'


def test_the_readme_sweep_query_shows_each_probe_reading_its_own_seeds_autoencoder(small_sweeps):
    text = (ROOT / 'README.md').read_text()
    section = text.split('\n## Sweeps\n', 1)[1].split('\n## ', 1)[0]
    (query,) = re.findall(r'```sql\n(.*?)```', section, re.S)
    out, _ = small_sweeps['local']
    con = sqlite3.connect(out / 'sacred.db')
    try:
        rows = con.execute(query).fetchall()
    finally:
        con.close()
    ae = {seed: run_id for trial, seed, _, run_id, _, _ in rows if trial == 'ae'}
    assert sorted(ae) == [0, 1]
    probes = [(seed, encoder) for trial, seed, _, _, encoder, _ in rows if trial == 'probe']
    assert sorted(s for s, _ in probes) == [0, 1]
    assert all(re.fullmatch(rf'run:{ae[s]}-[0-9a-f]{{10}}/autoencode', encoder) for s, encoder in probes), probes
    assert all(0 <= acc <= 1 for *_, acc in rows)


# ------------------------------------------------------------------------------------------------ two drivers at once

class HeldPool(FakePool):
    """A pool whose members run until the test lets them end (set_result on the returned future)."""

    def start(self, argv, env, log, cwd, shown):
        self.started.append(argv)
        self.future = Future()
        return self.future


def claim_driver(path, out, url, sweep_id):
    """A driver of the one-member sweep (trial ae, seed 0) with its own claims on the database at `url`."""
    from runtime.sweep.claims import Claims
    (m,) = members_of(path, ['Sweep.seeds = [0]', 'Sweep.trials = [@ae/Trial()]', f"Run.out_dir = '{out}'"])
    pool = HeldPool()
    driver = S.Driver('sweep', sweep_id, url, SimpleNamespace(db=url, jobs=1), out, pool, [],
                      Claims(url, 'sweep', sweep_id))
    driver.members = [m]
    driver.bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None, write=lambda s, **k: None)
    return driver, m, pool


@pytest.mark.parametrize('backend', ['sqlite', 'postgresql'])
def test_a_member_claimed_by_one_driver_is_not_started_by_another(backend, tmp_path, request):
    """Two drivers of the same sweep decide on the same member: the first claims and starts it; the second finds the
    claim and starts nothing. Once the first collected it the claim is free; a claim whose driver stopped beating
    (killed) is taken over after database.STALE_AFTER."""
    from runtime import record
    from runtime.sweep import claims as C
    from store.database import STALE_AFTER
    out = tmp_path / 'runs'
    url = default_url(str(out)) if backend == 'sqlite' else request.getfixturevalue('pg_url')
    out.mkdir()
    obs = record.observer(url)  # the run tables, as the driver makes them before any member starts
    if hasattr(obs, 'engine'):
        obs.engine.dispose()
    path = sweep_file(tmp_path)
    a, ma, pool_a = claim_driver(path, out, url, 'sweep-a')
    b, mb, pool_b = claim_driver(path, out, url, 'sweep-b')
    assert a.start(ma) is pool_a.future and len(pool_a.started) == 1
    assert b.start(mb) is None and pool_b.started == []
    assert (mb.status, mb.note) == ('RUNNING', '(claimed by sweep sweep-a, which runs it: not started here; rerun '
                                               'the sweep once that one ended)')
    pool_a.future.set_result({'code': 0, 'start': time.time(), 'stop': time.time()})
    a.collect(ma, pool_a.future)  # ended: the claim is released
    c, mc, pool_c = claim_driver(path, out, url, 'sweep-c')
    assert c.start(mc) is pool_c.future
    # driver c is killed: its claim stays until its heartbeat is older than STALE_AFTER
    d, md, pool_d = claim_driver(path, out, url, 'sweep-d')
    assert d.start(md) is None and 'claimed by sweep sweep-c' in md.note
    engine = C.database.make_engine(url)
    with engine.begin() as conn:
        conn.execute(C.CLAIMS.update().values(beat=C._now() - STALE_AFTER - dt.timedelta(seconds=1)))
    engine.dispose()
    e, me, pool_e = claim_driver(path, out, url, 'sweep-e')
    assert e.start(me) is pool_e.future
    for driver in (a, b, c, d, e):
        driver.claims.close()


CLAIM_RACE = textwrap.dedent("""
    import json, os, sys, traceback
    from runtime import record
    from runtime.sweep.claims import Claims
    from runtime.sweep.record import records
    from store import database
    url, n, members = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    go_r, go_w = os.pipe()
    kids = []
    for i in range(n):
        ready_r, ready_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code, took = 0, []
            try:  # what a driver does before its first member: the tables of a new database, its claims
                obs = record.observer(url)
                if hasattr(obs, 'engine'):
                    obs.engine.dispose()
                claims = Claims(url, 'race', f'driver-{i}')
                os.write(ready_w, b'r')
                os.read(go_r, 1)
                for m in [*range(i % members, members), *range(i % members)]:
                    records(url, 'race')  # the driver's reading of the records, around each claim
                    if claims.take(('t', m, '{}')) is None:
                        took.append(m)
                    records(url, 'race')
                    member = database.make_engine(url)  # a member of this driver that ends: it writes and closes
                    with member.begin() as conn:
                        conn.execute(database.METRICS.insert().values(run_id=str(i), name='m', step=m, value=0.0))
                    member.dispose()
                claims.engine.dispose()  # not close(): the test reads the claims
            except BaseException:
                traceback.print_exc()
                code = 1
            os.write(out_w, json.dumps(took).encode())
            os._exit(code)
        os.close(ready_w)
        os.close(out_w)
        kids.append((pid, ready_r, out_r))
    for _, ready_r, _ in kids:  # every driver set up (or failed): release them all at once
        os.read(ready_r, 1)
    os.write(go_w, b'g' * n)
    out = []
    for pid, _, out_r in kids:
        data = b''
        while chunk := os.read(out_r, 65536):
            data += chunk
        out.append({'exit': os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), 'took': json.loads(data or b'[]')})
    print(json.dumps(out))
""")


@pytest.mark.parametrize('backend', ['sqlite', 'postgresql'])
def test_drivers_released_together_on_a_new_database_claim_each_member_exactly_once(backend, tmp_path, request):
    """6 drivers set up on a database that does not exist yet (SQLite: a new file) and released together by a pipe
    (no timing), each claiming the same 5 members in a different order, reading the records around each claim as a
    driver does and writing as its member would: every member is claimed by exactly one of them, the claims table
    says so, and every row a member wrote is there."""
    from runtime.sweep import claims as C
    url = default_url(str(tmp_path / 'runs')) if backend == 'sqlite' else request.getfixturevalue('pg_url')
    n, members = 6, 5
    r = subprocess.run([sys.executable, '-c', CLAIM_RACE, url, str(n), str(members)], cwd=ROOT, env=rt_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x['exit'] for x in results] == [0] * n, r.stderr[-5000:]
    winners = {m: f'driver-{i}' for i, x in enumerate(results) for m in x['took']}
    assert sorted(m for x in results for m in x['took']) == list(range(members)), results  # each once
    engine = C.database.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = {k: o for k, o in conn.execute(sa.select(C.CLAIMS.c.member, C.CLAIMS.c.owner))}
            written = sorted(conn.execute(sa.select(C.database.METRICS.c.run_id, C.database.METRICS.c.step)))
    finally:
        engine.dispose()
    assert rows == {C.member_key(('t', m, '{}')): owner for m, owner in winners.items()}
    assert written == [(str(i), m) for i in range(n) for m in range(members)]


def test_a_claim_taken_after_reading_the_records_holds_against_another_driver(tmp_path):
    """The order in which a second driver ran a member twice, forced step by step: driver A holds its claims'
    connection, reads the records, another process closes its last connection to the file (a member that ended),
    A claims the member; driver B, a process of its own, must find A's claim."""
    from runtime import record
    from runtime.sweep.claims import Claims
    from runtime.sweep.record import records
    url = default_url(str(tmp_path / 'runs'))
    obs = record.observer(url)
    obs.engine.dispose()
    a = Claims(url, 'sweep', 'sweep-a')
    try:
        assert records(url, 'sweep') == []
        subprocess.run([sys.executable, '-c', 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('
                        '"SELECT COUNT(*) FROM memspec_metrics").fetchall()', str(tmp_path / 'runs' / 'sacred.db')],
                       check=True, timeout=600)
        assert a.take(('ae', 0, '{}')) is None
        assert records(url, 'sweep') == []
        b = subprocess.run([sys.executable, '-c', 'import sys; from runtime.sweep.claims import Claims; '
                            "c = Claims(sys.argv[1], 'sweep', 'sweep-b'); print(c.take(('ae', 0, '{}'))); c.close()",
                            url], cwd=ROOT, env=rt_env(), capture_output=True, text=True, timeout=600)
        assert b.returncode == 0, b.stderr[-3000:]
        assert b.stdout.strip() == 'sweep-a'
    finally:
        a.close()


def wait_until_started(out, first: subprocess.Popen) -> None:
    """Wait until the first driver started a member process (its log exists) or ended."""
    deadline = time.monotonic() + 900
    while not any((out / 'sweeps').glob('*/*.log')) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize('second', ['together', 'once the first started a member'])
def test_the_same_sweep_run_twice_at_once_runs_each_member_once(second, tmp_path, rt_cache):
    """Two `runtime.sweep run` of one sweep on one new database, the second started together with the first or once
    the first runs a member: every member is recorded once, with every table of the database kept; what one driver
    ran the other reports as claimed or completed, never as a second run."""
    out = tmp_path / 'runs'
    cmd = [sys.executable, '-m', 'runtime.sweep', 'run', PROBES, '-b', 'Sweep.seeds = [0, 1]',
           '-b', 'Sweep.trials = [@ae/Trial()]', '-b', f"Run.out_dir='{out}'", '-b', f"Data.cache_dir='{rt_cache}'",
           *[a for b in TINY_MEMBERS for a in ('-b', b)], '--jobs', '2']
    procs = []
    for _ in range(2):
        if procs and second != 'together':
            wait_until_started(out, procs[0])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=900)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode in (0, 1), f'exit {p.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}'
        results.append(stdout)
    con = sqlite3.connect(out / 'sacred.db')
    try:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    assert SACRED_TABLES | {'memspec_metrics', 'memspec_sweep_claims'} <= tables, sorted(tables)
    runs = recorded(out / 'sacred.db')
    members = sorted((c['sweep']['trial'], c['sweep']['seed']) for _, _, c, *_ in runs)
    assert members == [('ae', 0), ('ae', 1)], members  # each member once, whichever driver ran it
    assert [s for _, s, *_ in runs] == ['COMPLETED'] * 2
    started = sorted(p.name for p in (out / 'sweeps').rglob('*.log'))
    assert started == ['ae-seed0.log', 'ae-seed1.log'], started
    for stdout in results:  # each driver's table accounts for both members, without a failure
        rows = member_rows(stdout)
        assert len(rows) == 2 and all(r[4] in ('COMPLETED', 'RUNNING') for r in rows), stdout
