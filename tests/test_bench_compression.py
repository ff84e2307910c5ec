"""The compression benchmark still runs against the current pipeline (a smoke run of
`bench/bench_compression.py --quick`). Nothing here is timed: the benchmark's numbers are read
from its JSON line, never compared with a time."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_compression.py"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_quick_compression_benchmark_reports_its_breakdown(bidirectional):
    command = [sys.executable, str(BENCH), "--quick", "--threads", "2", "--d-state", "8", "--rank", "2"]
    if bidirectional:
        command.append("--bidirectional")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "the benchmark prints exactly one JSON line on stdout"
    report = json.loads(lines[0])
    assert report["bidirectional"] is bidirectional and report["rank"] == 2 and report["d_state"] == 8
    one_layer = report["breakdown"]["one_layer"]
    for step in ("gramians", "cholesky", "hankel_decomposition", "reduce_to_modes_serial"):
        assert one_layer[step] > 0, step
    floors = report["floor_seconds"]
    assert set(floors) == {"eigenvalues_only", "eigendecomposition", "rediagonalisation",
                           "reduced_systems_per_channel"}
    assert all(value > 0 for value in floors.values())
    assert floors["reduced_systems_per_channel"] >= 1  # every channel is diagonalised at least once
    # the timed work is a real compression: finite measured errors, a positive a-priori bound
    assert math.isfinite(report["max_relative_kernel_error"]) and report["max_error_bound"] > 0
