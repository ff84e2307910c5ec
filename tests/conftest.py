"""Shared test setup.

The environment variables are set at import time, before any test module imports transformers or
huggingface_hub (both read them once, at their own import): the tests never touch the network and
never write into the user's Hugging Face cache (remote-code modules land in a throwaway HF_HOME).
"""

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="s4bt-hf-test-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from child_runs import run_train_child  # noqa: E402

TEST_HF_HOME = _HF_HOME
# One thread for the whole session: the tests' tiny models are dispatch-bound (more threads only spin,
# on CI as on a shared machine), and no test's speed then depends on which modules ran before it.
# The threaded reductions (`workers`) are tested by asking for workers explicitly.
torch.set_num_threads(1)


def _token_config(**overrides):
    """A tiny config for token inputs (`input_ids`)."""
    from s4bt_hf import S4DSSConfig

    fields = {"vocab_size": 20, "d_model": 8, "n_layers": 2, "d_state": 4, "num_labels": 3}
    fields.update(overrides)
    return S4DSSConfig(**fields)


def _real_config(**overrides):
    """A tiny config for real-valued inputs (`input_values` of shape (B, L, input_dim))."""
    from s4bt_hf import S4DSSConfig

    fields = {"input_dim": 2, "d_model": 8, "n_layers": 2, "d_state": 4, "num_labels": 3}
    fields.update(overrides)
    return S4DSSConfig(**fields)


def _spread_classifier(model, std=1.0, seed=1234):
    """Give the classifier head O(1) weights so that logits are O(1) and losses and tolerances
    discriminate (the default init, std 0.02, gives logits ~1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * std)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=generator) * 0.1)
    return model


@pytest.fixture
def token_config():
    """Factory: `token_config(**overrides)` -> tiny S4DSSConfig reading `input_ids`."""
    return _token_config


@pytest.fixture
def real_config():
    """Factory: `real_config(**overrides)` -> tiny S4DSSConfig reading `input_values`."""
    return _real_config


@pytest.fixture
def spread_classifier():
    return _spread_classifier


@pytest.fixture
def hf_home():
    """The throwaway HF_HOME the whole test session runs with."""
    return TEST_HF_HOME


@pytest.fixture(scope="session")
def uninterrupted_child_run(tmp_path_factory):
    """`train_child.py` with its defaults, never interrupted: the reference that the resume tests of
    several modules compare against (one child process, not one per test). Read it, never write it."""
    folder = tmp_path_factory.mktemp("child") / "uninterrupted"
    result = run_train_child(str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder
