"""The GPU suite's command: runs bench/gpu/suite.py (the harness), which see. `python bench/gpu_suite.py --dry-run`
exercises every step on CPU."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "gpu" / "suite.py"), run_name="__main__")
