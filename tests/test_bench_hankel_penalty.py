"""The Hankel-penalty benchmark still runs (one repeat of `bench/bench_hankel_penalty.py`) and
reports every part of its JSON line. Nothing here is timed: no measured time is compared."""

from bench_runner import run_bench


def test_penalty_benchmark_reports_its_overheads_and_the_eigh_floor():
    report = run_bench("bench_hankel_penalty.py", "--repeats", "1", "--every", "1", "4")
    assert set(report["overhead"]) == {"hankel_every_1", "hankel_every_4"}
    assert set(report["overhead_with_reuse_percent_median"]) == {"hankel_every_4"}  # reuse needs k > 1
    # the floor decomposes the model's own matrices: one 2N x 2N per channel of every layer
    assert report["eigh_floor"]["matrices"] == [report["model"]["d_model"] * report["model"]["n_layers"],
                                                2 * report["model"]["d_state"], 2 * report["model"]["d_state"]]
    assert report["step_ms"]["median"] > 0 and report["penalty_forward_backward_ms"]["median"] > 0
    assert report["surrogate_ms_median"] > 0 and report["eigh_floor"]["ms_median"] > 0
