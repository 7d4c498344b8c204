"""python -m runtime.harness [lm_eval arguments]: lm-evaluation-harness' own CLI, with the `memspec` model registered.

The harness' CLI does not import third-party models; this entry imports runtime.lm_adapter (which registers
`memspec`) and hands every argument to the harness unchanged, e.g.

    python -m runtime.harness --model memspec --model_args run=runs/0,memory=ablated \\
        --include_path specs/eval --tasks memspec --device cpu --batch_size 32

Results of the `memspec` model are also recorded in the run's evaluations table (as python -m runtime.evaluate
records them: store.runs show and compare list them), in the database beside the run folder (<run>/../sacred.db)
when the run is recorded there. Bad model arguments end in one message and exit 2, like every memspec CLI.
"""
from __future__ import annotations

import datetime as dt
import sys

from compiler.errors import UserError, cli


def record(kwargs: dict, results: dict | None) -> None:
    """Record the memspec model's results (rank 0 gets them; other ranks None) in its run's evaluations table."""
    from lm_eval.utils import simple_parse_args_string

    from runtime.evaluate import record as record_rows
    from runtime.evaluate import rows_of
    from store.database import default_url, display_url, get_run, open_db
    from store.runref import folder_of

    if not results or kwargs.get('model') != 'memspec':
        return
    margs = kwargs.get('model_args') or {}
    margs = simple_parse_args_string(margs) if isinstance(margs, str) else dict(margs)
    folder = folder_of(str(margs.get('run')), str(margs.get('runs') or 'runs'))
    url, run_id = default_url(folder.out_dir), folder.run_id
    limit = kwargs.get('limit')
    if limit is not None and (limit < 1 or limit != int(limit)):
        print(f'note: --limit {limit} is a fraction of each task: not recorded in the evaluations table',
              file=sys.stderr)
        return
    try:
        get_run(open_db(url), run_id)
    except UserError as e:
        print(f'note: not recorded in the evaluations table: {e.where}: {e.what}', file=sys.stderr)
        return
    record_rows(url, run_id, str(margs.get('stage') or 'final'), str(margs.get('memory') or 'on'),
                None if limit is None else int(limit), rows_of(results.get('results') or {}),
                dt.datetime.now(dt.timezone.utc))
    print(f'recorded in {display_url(url)} (memspec_evaluations, run {run_id})', file=sys.stderr)


@cli
def main(argv=None) -> None:
    try:
        import lm_eval
        from lm_eval.__main__ import cli_evaluate

        import runtime.lm_adapter  # noqa: F401  (registers the model)
    except ImportError as e:
        raise UserError('python -m runtime.harness', f'lm-evaluation-harness is not installed ({e})',
                        "pip install -e '.[eval]'") from None
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    original = lm_eval.simple_evaluate  # what the harness' `run` command calls (it imports it when it runs)

    def evaluate(*args, **kwargs):
        results = original(*args, **kwargs)
        record(kwargs, results)
        return results
    lm_eval.simple_evaluate = evaluate
    try:
        cli_evaluate()
    finally:
        lm_eval.simple_evaluate = original


if __name__ == '__main__':
    main()
