"""`train_child.py` run in a child process, as the resume tests run it: one place for the command."""

import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("train_child.py")


def run_train_child(*args: str) -> subprocess.CompletedProcess:
    """python train_child.py ARGS, output captured, no stdin, at most 5 minutes."""
    return subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
