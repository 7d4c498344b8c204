"""python -m runtime.sweep run SWEEP.gin [-b BINDING ...] [--jobs N] [--executor local|slurm|submitit-local] [--db URL]
python -m runtime.sweep status SWEEP.gin|SWEEP_ID [-b BINDING ...] [--db URL]

A sweep is a spec too: a gin file binding two configurables, `Sweep` and `Trial` (specs/sweeps/probes.gin):

    Sweep.name = 'probes'
    Sweep.seeds = [0, 1, 2]                     # every trial runs once per seed (Run.seed = s)
    Sweep.trials = [@ae/Trial(), @probe/Trial()]
    ae/Trial.specs = ['specs/autoencoder.gin']
    probe/Trial.specs = ['specs/information_probe.gin']
    probe/Trial.bindings = ["probe/Stage.init_from = {'encoder': 'run:@ae/autoencode'}"]
    probe/Trial.grid = {'Memory.chunk_len': [8, 16]}   # one run per combination of the grid's values

A trial is named after its gin scope (or Trial.name). `run:@<trial>/<stage>[:<component>]` in a binding is a
dependency by name: the run of that trial with the same seed (and the same values of the grid keys both trials vary);
the dependent starts once it completed. `python -m runtime.run SPEC --sweep 'Memory.chunks=[4,8]'` is a one-trial
sweep of the same kind. Every member is compiled (compiler.spec.load) before anything runs: one bad member refuses
the whole sweep (exit 2).

Members are `python -m runtime.run` processes recorded in one database with the config entry
`sweep = {name, sweep_id, trial, seed, grid}`, run by concurrent.futures (local processes, --jobs at once) or by
submitit (Slurm, or its local executor). A rerun skips members that COMPLETED with the same plan, resumes those that
stopped resumably and starts the rest. Each member is claimed in the database before it starts (claims.py), so
two drivers of the same sweep never start one member twice. Logs: <Run.out_dir>/sweeps/<sweep_id>/<member>.log,
named by trial, seed and grid values ('probe-seed0-Memory.chunk_len=8.log').

Modules: spec.py (Sweep, Trial, reading a sweep file), expand.py (members, dependencies, checks), record.py (what the
database says about members), claims.py (one driver per member), executors.py (local processes, submitit),
driver.py (running the members), cli.py (the command lines).
"""
from runtime.sweep.cli import add_options, main, run_requested, status
from runtime.sweep.driver import Driver, execute, summary
from runtime.sweep.expand import Member, compile_member, expand, stored
from runtime.sweep.record import member_config, records
from runtime.sweep.spec import Layout, Sweep, Trial, grid_sweep, load_sweep, split_bindings

__all__ = ['Driver', 'Layout', 'Member', 'Sweep', 'Trial', 'add_options', 'compile_member', 'execute', 'expand',
           'grid_sweep', 'load_sweep', 'main', 'member_config', 'records', 'run_requested', 'split_bindings', 'status',
           'stored', 'summary']
