"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

import os
import sys


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the benchmark's JSON line."""
    print(message, file=sys.stderr, flush=True)
