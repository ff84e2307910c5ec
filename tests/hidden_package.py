"""Code for child processes that must run as if `s4bt_hf` were not installed (to load a checkpoint
through its saved code, `trust_remote_code=True`, exactly as a user without the package would).

`HIDE_S4BT_HF` is Python source to put at the top of a child script, before anything imports
transformers: it records `found_before` (whether s4bt_hf was importable at all, so a test can tell
"hidden" from "never there"), then makes `import s4bt_hf` impossible and asserts so.
"""

HIDE_S4BT_HF = r"""
import importlib
import importlib.util
import sys
from importlib.machinery import PathFinder

found_before = importlib.util.find_spec("s4bt_hf") is not None

# Hide s4bt_hf: drop every sys.path entry that holds it and every meta-path finder (such as
# the editable-install finder) that can locate it; keep everything else (torch, transformers).
sys.path[:] = [entry for entry in sys.path if PathFinder.find_spec("s4bt_hf", [entry]) is None]

def _finds_package(finder):
    if finder is PathFinder or not hasattr(finder, "find_spec"):
        return False
    try:
        return finder.find_spec("s4bt_hf", None) is not None
    except Exception:
        return False

sys.meta_path[:] = [finder for finder in sys.meta_path if not _finds_package(finder)]
importlib.invalidate_caches()
assert importlib.util.find_spec("s4bt_hf") is None, "s4bt_hf is still importable"
"""
