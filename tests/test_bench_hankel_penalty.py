"""The Hankel-penalty benchmark still runs (one repeat of `bench/bench_hankel_penalty.py`) and
reports every part of its JSON line. Nothing here is timed: no measured time is compared."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_hankel_penalty.py"


def test_penalty_benchmark_reports_its_overheads_and_the_eigh_floor():
    result = subprocess.run([sys.executable, str(BENCH), "--repeats", "1", "--every", "1", "4"], capture_output=True,
                            text=True, timeout=300, env=os.environ.copy(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "the benchmark prints exactly one JSON line on stdout"
    report = json.loads(lines[0])
    assert set(report["overhead"]) == {"hankel_every_1", "hankel_every_4"}
    assert set(report["overhead_with_reuse_percent_median"]) == {"hankel_every_4"}  # reuse needs k > 1
    # the floor decomposes the model's own matrices: one 2N x 2N per channel of every layer
    assert report["eigh_floor"]["matrices"] == [report["model"]["d_model"] * report["model"]["n_layers"],
                                                2 * report["model"]["d_state"], 2 * report["model"]["d_state"]]
    assert report["step_ms"]["median"] > 0 and report["penalty_forward_backward_ms"]["median"] > 0
    assert report["surrogate_ms_median"] > 0 and report["eigh_floor"]["ms_median"] > 0
