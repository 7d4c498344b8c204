"""python -m runtime.harness [lm_eval arguments]: lm-evaluation-harness' own CLI, with the `memspec` model registered.

The harness' CLI does not import third-party models; this entry imports runtime.lm_adapter (which registers
`memspec`) and hands every argument to the harness unchanged, e.g.

    python -m runtime.harness --model memspec --model_args run=runs/0,memory=ablated \\
        --include_path specs/eval --tasks memspec --device cpu --batch_size 32
"""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import runtime.lm_adapter  # noqa: F401  (registers the model)
    except ImportError as e:
        print(f'error: lm-evaluation-harness is not installed ({e})\n'
              "  fix: pip install -e '.[eval]'", file=sys.stderr)
        sys.exit(2)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == '__main__':
    main()
