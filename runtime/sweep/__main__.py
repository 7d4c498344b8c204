"""python -m runtime.sweep run|status ... (runtime/sweep/__init__.py)."""
from runtime.sweep.cli import main

main()
