"""Declarative sweeps: a gin `Sweep`/`Trial` spec run as named member runs (the spec, the command lines and how a rerun
continues are described in cli.py).

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
