"""save_pretrained / from_pretrained: bit-exact round trips, the saved files, and loading the saved
code with trust_remote_code=True in a process where s4bt_hf is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hidden_package import HIDE_S4BT_HF
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel

SSM_PARAMETERS = ("log_dt", "log_A_real", "A_imag", "B", "C", "D")
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_s4dss.S4DSSConfig",
    "AutoModel": "modeling_s4dss.S4DSSModel",
    "AutoModelForSequenceClassification": "modeling_s4dss.S4DSSForSequenceClassification",
    "AutoModelForAudioClassification": "modeling_s4dss.S4DSSForSequenceClassification",
}
EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "configuration_s4dss.py",
    "modeling_s4dss.py",
    "kernel_s4dss.py",
    "initialization_s4dss.py",
}


def _ids(config, batch=3, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low = 1 if config.pad_token_id == 0 else 0
    return torch.randint(low, config.vocab_size, (batch, length), generator=generator)


def _warm_up_batch_norm(model, config):
    """A training-mode forward, so BatchNorm running stats move away from their defaults."""
    model.train()
    with torch.no_grad():
        model(input_ids=_ids(config, batch=4, length=12, seed=99))
    model.eval()


def _assert_state_dicts_equal(expected, actual):
    assert set(expected) == set(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), f"{key} changed in the round trip"


def _build(model_class, config):
    torch.manual_seed(0)
    model = model_class(config)
    if config.norm == "batch":
        _warm_up_batch_norm(model, config)
    model.eval()
    return model


ROUND_TRIP_CASES = [
    pytest.param(dict(norm="layer", d_state=4), id="layer-norm"),
    pytest.param(dict(norm="batch", d_state=4), id="batch-norm"),
    pytest.param(dict(norm="layer", d_state=[4, 6]), id="per-layer-d-state"),
    pytest.param(dict(norm="batch", d_state=[6, 4], bidirectional=True, prenorm=False), id="bidir-postnorm-batch"),
]


@pytest.mark.parametrize("fields", ROUND_TRIP_CASES)
@pytest.mark.parametrize(
    "model_class, auto_class",
    [(S4DSSModel, AutoModel), (S4DSSForSequenceClassification, AutoModelForSequenceClassification)],
    ids=["base", "classifier"],
)
def test_round_trip_is_bit_exact(tmp_path, token_config, spread_classifier, fields, model_class, auto_class):
    config = token_config(pad_token_id=0, **fields)
    model = _build(model_class, config)
    if model_class is S4DSSForSequenceClassification:
        spread_classifier(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}

    # Every SSM parameter of every layer is in the checkpoint.
    for layer in range(config.n_layers):
        for name in SSM_PARAMETERS:
            assert any(key.endswith(f"layers.{layer}.kernel.{name}") for key in state), (layer, name)
    if config.norm == "batch":
        running = [key for key in state if key.endswith("running_mean") or key.endswith("running_var")]
        assert len(running) == 2 * (config.n_layers + (1 if config.prenorm else 0))
        for key in running:
            default = 0.0 if key.endswith("running_mean") else 1.0
            assert not torch.allclose(state[key], torch.full_like(state[key], default)), key
        assert all(int(state[key]) == 1 for key in state if key.endswith("num_batches_tracked"))

    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path, dtype=torch.float32)

    assert type(loaded) is model_class
    assert not loaded.training
    assert loaded.config.d_state == config.d_state
    assert loaded.config.norm == config.norm
    assert loaded.config.bidirectional == config.bidirectional
    _assert_state_dicts_equal(state, loaded.state_dict())
    # The loaded parameters are real parameters (trainable), not buffers or frozen copies.
    assert all(param.requires_grad for param in loaded.parameters())

    inputs = _ids(config, seed=1)
    with torch.no_grad():
        expected = model(input_ids=inputs)
        actual = loaded(input_ids=inputs)
    if model_class is S4DSSForSequenceClassification:
        assert torch.equal(actual.logits, expected.logits)
    else:
        assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)


def test_round_trip_real_valued_model(tmp_path, real_config, spread_classifier):
    config = real_config(norm="batch", input_dim=3, d_state=[5, 3])
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(config)
    spread_classifier(model)
    model.train()
    with torch.no_grad():
        model(input_values=torch.randn(4, 9, 3))
    model.eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32)
    _assert_state_dicts_equal(state, loaded.state_dict())
    assert loaded.main_input_name == "input_values"
    inputs = torch.randn(2, 11, 3)
    with torch.no_grad():
        assert torch.equal(loaded(input_values=inputs).logits, model(input_values=inputs).logits)


def test_base_model_loads_from_classifier_checkpoint(tmp_path, token_config):
    """AutoModel on a classifier checkpoint gives the backbone with the very same weights."""
    config = token_config(norm="batch", d_state=[4, 6])
    model = _build(S4DSSForSequenceClassification, config)
    model.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(backbone) is S4DSSModel
    _assert_state_dicts_equal(model.s4dss.state_dict(), backbone.state_dict())
    inputs = _ids(config, seed=2)
    with torch.no_grad():
        expected = model.s4dss(input_ids=inputs).last_hidden_state
        assert torch.equal(backbone(input_ids=inputs).last_hidden_state, expected)


@pytest.mark.parametrize("model_class", [S4DSSModel, S4DSSForSequenceClassification])
def test_saved_directory_contents(tmp_path, token_config, model_class):
    config = token_config(d_state=[4, 6])
    model = _build(model_class, config)
    model.save_pretrained(tmp_path)

    assert EXPECTED_FILES <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "s4dss"
    assert saved["auto_map"] == EXPECTED_AUTO_MAP
    assert saved["architectures"] == [model_class.__name__]
    assert saved["d_state"] == [4, 6]
    # The saved code is the package's code, verbatim.
    import s4bt_hf

    package_dir = os.path.dirname(s4bt_hf.__file__)
    for name in EXPECTED_FILES - {"config.json", "model.safetensors"}:
        with open(os.path.join(package_dir, name), encoding="utf-8") as source:
            assert (tmp_path / name).read_text(encoding="utf-8") == source.read(), name
    # The config alone reloads through AutoConfig.
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, S4DSSConfig)
    assert reloaded.layer_d_states == [4, 6]


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_saving_does_not_modify_the_model(tmp_path, token_config, norm):
    config = token_config(norm=norm)
    model = _build(S4DSSForSequenceClassification, config)
    model.train()  # saving must not switch modes either
    state = {key: value.clone() for key, value in model.state_dict().items()}
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    model.save_pretrained(tmp_path)
    assert model.training
    _assert_state_dicts_equal(state, model.state_dict())
    assert {name: param.requires_grad for name, param in model.named_parameters()} == requires_grad
    assert all(param.dtype == torch.float32 for param in model.parameters())


def test_hub_environment_is_offline_and_isolated(hf_home):
    """conftest set the environment before huggingface_hub read it."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    assert os.path.realpath(constants.HF_HOME) == os.path.realpath(hf_home)


# --------------------------------------------------------------------------- remote code

# HIDE_S4BT_HF makes s4bt_hf unimportable in the child and defines `found_before`.
CHILD_SCRIPT = HIDE_S4BT_HF + textwrap.dedent(
    r"""
    import json

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    checkpoint, input_path, output_path = sys.argv[1:4]
    inputs = torch.load(input_path)

    refusals = {}
    for name, trust in (("default", None), ("false", False)):
        try:
            AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=trust)
        except ValueError as error:
            refusals[name] = str(error)
        else:
            refusals[name] = None

    classifier = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, trust_remote_code=True, dtype=torch.float32
    )
    backbone = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = classifier(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.save(
        {
            "logits": logits,
            "hidden": hidden,
            "classifier_state": classifier.state_dict(),
            "backbone_state": backbone.state_dict(),
        },
        output_path,
    )
    report = {
        "found_before": found_before,
        "s4bt_hf_imported": any(name == "s4bt_hf" or name.startswith("s4bt_hf.") for name in sys.modules),
        "classifier_class": type(classifier).__name__,
        "classifier_module": type(classifier).__module__,
        "backbone_class": type(backbone).__name__,
        "backbone_module": type(backbone).__module__,
        "training": classifier.training or backbone.training,
        "refusals": refusals,
    }
    with open(output_path + ".json", "w") as handle:
        json.dump(report, handle)
    """
)


def test_remote_code_loads_without_the_package(tmp_path, token_config, spread_classifier):
    config = token_config(norm="batch", d_state=[4, 6], pad_token_id=0)
    model = _build(S4DSSForSequenceClassification, config)
    spread_classifier(model)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)

    input_ids = _ids(config, batch=2, length=12, seed=5)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 8:] = 0
    input_ids[0, 8:] = 0
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected_hidden = model.s4dss(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    child_home = tmp_path / "child_hf_home"
    child_home.mkdir()
    script = workdir / "child.py"
    script.write_text(CHILD_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(child_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    output = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(output)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "out.pt.json").read_text())
    assert not report["s4bt_hf_imported"]
    assert report["classifier_class"] == "S4DSSForSequenceClassification"
    assert report["backbone_class"] == "S4DSSModel"
    # The classes came from the code saved next to the weights, not from an installed package.
    assert report["classifier_module"].startswith("transformers_modules."), report["classifier_module"]
    assert report["backbone_module"].startswith("transformers_modules."), report["backbone_module"]
    assert not report["training"]
    for name in ("default", "false"):
        assert report["refusals"][name] is not None, f"trust_remote_code={name} loaded custom code"
        assert "trust_remote_code" in report["refusals"][name]
    # The remote modules were cached in the child's HF_HOME, not ours.
    assert (child_home / "modules" / "transformers_modules").is_dir()

    results = torch.load(output)
    _assert_state_dicts_equal(model.state_dict(), results["classifier_state"])
    _assert_state_dicts_equal(model.s4dss.state_dict(), results["backbone_state"])
    torch.testing.assert_close(results["logits"], expected_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(results["hidden"], expected_hidden, rtol=0, atol=1e-6)
