"""The machinery of the fault-injection suite; tests/faults.py is its command and describes what it does.

common (the run, process set-up), hooks (faults injected in a forked run), records (what a run left, compared with
the baseline), base (the suite: baseline, kill points, shared steps), resource, hardening, damage and concurrent
(scenarios by kind, mixed into Suite), report (running the scenarios side by side, the summary)."""
