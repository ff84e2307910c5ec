"""The package's layout: the top level of `s4bt_hf/` is exactly the remote code a checkpoint
carries (`REMOTE_CODE_MODULES`), those modules import only the standard library, torch,
transformers and each other; and folders written before the applications moved into subpackages
(tests/fixtures/legacy_layout, see make_legacy_layout.py there) still load, resume and are reused."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from child_runs import run_train_child
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import s4bt_hf
import s4bt_hf.experiments.reproduce as reproduce_module
from s4bt_hf import S4DSSFeatureExtractor, S4DSSForSequenceClassification
from s4bt_hf.hub_s4dss import REMOTE_CODE_MODULES

PACKAGE = Path(s4bt_hf.__file__).parent
LEGACY = Path(__file__).with_name("fixtures") / "legacy_layout"
# huggingface_hub: a dependency of transformers itself (hub_s4dss's push_to_hub uses its API);
# numpy: a dependency of transformers (the feature extractor's arrays)
ALLOWED_ROOTS = {"torch", "transformers", "huggingface_hub", "numpy", "__future__"} | set(sys.stdlib_module_names)


def test_top_level_is_exactly_the_remote_code(tmp_path, real_config):
    top_level = {path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    assert top_level == set(REMOTE_CODE_MODULES)
    S4DSSForSequenceClassification(real_config()).save_pretrained(tmp_path)
    saved = {path.stem for path in tmp_path.glob("*.py")}
    assert saved == set(REMOTE_CODE_MODULES) - {"feature_extraction_s4dss"}
    S4DSSFeatureExtractor(feature_size=2).save_pretrained(tmp_path)  # its own file, beside the model's
    assert {path.stem for path in tmp_path.glob("*.py")} == set(REMOTE_CODE_MODULES)
    for name in ("cli", "experiments", "export", "training", "data", "metrics"):
        assert (PACKAGE / name / "__init__.py").is_file(), name


@pytest.mark.parametrize("module", REMOTE_CODE_MODULES)
def test_remote_code_imports_only_torch_transformers_and_siblings(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and (node.module or "").split(".")[0] in REMOTE_CODE_MODULES, \
                f"{module}.py: from {'.' * node.level}{node.module} import ..."
        elif isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] in ALLOWED_ROOTS, f"{module}.py imports {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in ALLOWED_ROOTS, f"{module}.py imports {alias.name}"


def test_public_import_paths_still_work():
    from s4bt_hf.cli import main
    from s4bt_hf.export import export_model, load_exported
    from s4bt_hf.training import S4DSSTrainer, TrainingConfig, train

    assert callable(main) and callable(export_model) and callable(load_exported)
    assert S4DSSTrainer and TrainingConfig and train
    assert s4bt_hf.hankel_penalty.__module__ == "s4bt_hf.training.hankel_penalty"
    assert s4bt_hf.ssm_param_groups.__module__ == "s4bt_hf.training.optimization"


def test_checkpoint_saved_before_the_move_loads(tmp_path):
    folder = shutil.copytree(LEGACY / "checkpoint", tmp_path / "checkpoint")
    expected = load_file(LEGACY / "checkpoint_io.safetensors")
    for model in (S4DSSForSequenceClassification.from_pretrained(folder),
                  AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)):
        model.eval()
        assert model.config.d_state == 2 and model.compression_report is not None
        with torch.no_grad():
            logits = model(input_values=expected["input_values"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)


# Parameters without a gradient in the child's model: a shift of the input projection's bias is
# removed by every batch norm after it (and followed by their running means), so Adam moves it by
# the sign of rounding noise, which differs between CPUs (seen: 0.03 on an AVX-512 machine, 0 on
# the machine that wrote the fixture). Everything else agrees to rounding.
GRADIENT_FREE = ("s4dss.input_proj.bias", "running_mean")


def test_run_folder_written_before_the_move_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted_child_run):
    """The legacy run was killed after its checkpoint at step 6 on another machine; resumed by
    today's code it ends where a run of today's code that was never interrupted ends, to rounding
    (bit-identity holds only on one machine: test_accelerate_trainer checks that). A resume that
    lost the optimizer state, the schedule or the data order misses by 1e-3 or more."""
    resumed = shutil.copytree(LEGACY / "run", tmp_path / "resumed")
    result = run_train_child(str(resumed))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((resumed / "final" / "run_summary.json").read_text())
    assert summary["resumed_from"] == 6
    first = load_file(uninterrupted_child_run / "final" / "model.safetensors")
    second = load_file(resumed / "final" / "model.safetensors")
    assert first.keys() == second.keys()
    compared = [name for name in first if not name.endswith(GRADIENT_FREE)]
    assert len(compared) == len(first) - 4  # the bias and three running means
    for name in compared:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-5, msg=name)


def test_stage_cache_written_before_the_move_is_reused(tmp_path, monkeypatch):
    from test_reproduce import TINY

    output = shutil.copytree(LEGACY / "reproduce", tmp_path / "reproduce")
    monkeypatch.setattr(reproduce_module, "_write_outputs", lambda *_: None)  # needs the models, not kept
    messages = []
    results = reproduce_module.reproduce("smnist", str(output), TINY, progress=False, log=messages.append)
    assert len(messages) == 16 and all(message.endswith("done before, skipped") for message in messages)
    saved = json.loads((LEGACY / "reproduce" / "results.json").read_text())
    assert json.loads(json.dumps(results["per_rank"])) == saved["per_rank"]
