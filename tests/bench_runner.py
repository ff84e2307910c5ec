"""Run a benchmark script of `bench/` as a user would and read its one JSON line (the smoke tests
of the benchmarks share it; nothing is timed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *arguments: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCH_DIR / script), *arguments], capture_output=True, text=True,
                            timeout=300, env=os.environ.copy(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "the benchmark prints exactly one JSON line on stdout"
    return json.loads(lines[0])
