"""The compression benchmark still runs against the current pipeline (a smoke run of
`bench/bench_compression.py --quick`). Nothing here is timed: the benchmark's numbers are read
from its JSON line, never compared with a time."""

import math

import pytest
from bench_runner import run_bench


@pytest.mark.parametrize("bidirectional", [False, True])
def test_quick_compression_benchmark_reports_its_breakdown(bidirectional):
    report = run_bench("bench_compression.py", "--quick", "--threads", "2", "--d-state", "8", "--rank", "2",
                       *(["--bidirectional"] if bidirectional else []))
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
