"""Configuration and loading where transformers leaves room (issue 18, items 6 and 7): a LayerNorm
over one channel is refused, a misspelt keyword warns naming the field it meant (transformers' own
keywords and the keys of saved configs never do), and `from_pretrained` names a folder without
config.json and warns for a checkpoint that does not fill the model; the checkpoint is never touched."""

import hashlib
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel
from s4bt_hf.hub_s4dss import IncompleteCheckpointWarning

FIXTURES = "tests/fixtures/legacy_layout"


def _keyword_warnings(caught):
    return [str(warning.message) for warning in caught if "S4DSSConfig: unknown keyword" in str(warning.message)]


# ----------------------------------------------------------------------------- LayerNorm over one channel


@pytest.mark.parametrize("prenorm", [True, False])
def test_layer_norm_over_one_channel_is_refused(prenorm):
    with pytest.raises(ValueError, match=r"`norm`='layer' with `d_model`=1 .* outputs 0 .* Use norm='batch'"):
        S4DSSConfig(d_model=1, n_layers=1, d_state=4, prenorm=prenorm)
    with pytest.raises(ValueError, match="`norm`='layer' with `d_model`=1"):
        S4DSSConfig(hidden_size=1, n_layers=1, d_state=4, norm="layer")


def test_the_suggested_batch_norm_model_reads_its_input():
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(S4DSSConfig(d_model=1, n_layers=2, d_state=4, norm="batch")).eval()
    inputs = torch.randn(2, 30, 1)
    with torch.no_grad():
        first, second = model(input_values=inputs).logits, model(input_values=2 * inputs + 1).logits
    assert not torch.allclose(first, second)


def test_the_command_line_refuses_it_in_one_line(tmp_path, capsys):
    from s4bt_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "smnist", "--output", str(tmp_path / "run"), "--d-model", "1", "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "`d_model`=1" in error and "norm='batch'" in error
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- misspelt keywords


@pytest.mark.parametrize("keyword, field", [
    ("d_modle", "d_model"), ("dmodel", "d_model"), ("num_layers", "n_layers"), ("dstate", "d_state"),
    ("drop_out", "dropout"), ("pre_norm", "prenorm"), ("layernorm_eps", "layer_norm_eps"), ("num_lables", "num_labels"),
    ("id2lable", "id2label"), ("bidirectionnal", "bidirectional"), ("check_inputs", "check_input_values"),
])
def test_a_misspelt_keyword_warns_naming_the_field(keyword, field):
    with pytest.warns(UserWarning) as caught:
        config = S4DSSConfig(**{keyword: 8 if field != "id2label" else {0: "a"}})
    messages = _keyword_warnings(caught)
    assert messages == [f"S4DSSConfig: unknown keyword `{keyword}`; did you mean `{field}`? `{keyword}` is kept as an "
                        f"attribute that the model never reads, and `{field}` keeps its value."]
    assert caught[0].filename == __file__  # points at the caller's line
    if field == "d_model":
        assert config.d_model == 128


LEGIT_KEYWORDS = {
    "hidden_size": 8, "num_hidden_layers": 1, "num_labels": 3, "torch_dtype": "float32", "dtype": "float32",
    "problem_type": "single_label_classification", "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 3,
    "decoder_start_token_id": 0, "use_cache": False, "tie_word_embeddings": False, "name_or_path": "x",
    "attn_implementation": "eager", "output_hidden_states": True, "output_attentions": False, "return_dict": True,
    "architectures": ["S4DSSForSequenceClassification"], "is_decoder": False, "tie_encoder_decoder": False,
    "do_sample": False, "num_beams": 1, "output_scores": False, "return_dict_in_generate": False,
    "model_type": "s4dss", "auto_map": {}, "transformers_version": "4.46.0", "_commit_hash": None,
    "torchscript": False, "pruned_heads": {}, "finetuning_task": None, "gradient_checkpointing": False,
    "my_run_note": "metadata far from every field",
}


def test_keywords_transformers_passes_never_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = S4DSSConfig(**LEGIT_KEYWORDS)
        S4DSSConfig(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    assert _keyword_warnings(caught) == []
    assert (config.d_model, config.n_layers, config.my_run_note) == (8, 1, "metadata far from every field")


def test_generation_parameters_of_old_configs_never_warn():
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if defaults is None:
        pytest.skip("this transformers has no list of generation parameters")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, value in defaults().items():
            S4DSSConfig(**{name: value})
    assert _keyword_warnings(caught) == []


@pytest.mark.parametrize("folder", ["checkpoint", "run/best"])
def test_saved_configs_load_without_a_warning(tmp_path, folder):
    model = S4DSSForSequenceClassification(S4DSSConfig(d_model=4, n_layers=1, d_state=2, num_labels=3))
    model.save_pretrained(tmp_path / "new")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoConfig.from_pretrained(f"{FIXTURES}/{folder}")
        S4DSSConfig.from_pretrained(tmp_path / "new", num_labels=3)
        S4DSSForSequenceClassification.from_pretrained(tmp_path / "new")
    assert _keyword_warnings(caught) == []
    assert not [warning for warning in caught if issubclass(warning.category, IncompleteCheckpointWarning)]


def test_a_misspelt_key_in_config_json_warns_on_loading(tmp_path):
    S4DSSConfig(d_model=4, n_layers=1, d_state=2).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["d_sate"] = 8
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="unknown keyword `d_sate`; did you mean `d_state`"):
        config = S4DSSConfig.from_pretrained(tmp_path)
    assert config.d_state == 2


# ----------------------------------------------------------------------------- from_pretrained


def _digest(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(S4DSSConfig(d_model=4, n_layers=2, d_state=2, num_labels=3))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edited(saved, tmp_path, drop=None, **config_changes):
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    if drop is not None:
        weights = {name: tensor for name, tensor in load_file(folder / "model.safetensors").items() if drop not in name}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _load_warnings(load):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load()
    return loaded, [str(warning.message) for warning in caught
                    if issubclass(warning.category, IncompleteCheckpointWarning)]


def test_missing_tensors_warn_naming_them(saved, tmp_path):
    folder = _edited(saved, tmp_path, drop="layers.1.")
    before = _digest(folder)
    (model, info), messages = _load_warnings(
        lambda: S4DSSForSequenceClassification.from_pretrained(folder, output_loading_info=True))
    assert isinstance(model, S4DSSForSequenceClassification) and len(info["missing_keys"]) == 10
    assert messages == [f"S4DSSForSequenceClassification.from_pretrained({str(folder)!r}): the checkpoint lacks 10 "
                        "weight tensor(s) of the model (s4dss.layers.1.kernel.A_imag, s4dss.layers.1.kernel.B, "
                        "s4dss.layers.1.kernel.C, ...); config.json says n_layers=2 but the weights hold nothing for "
                        "layer(s) 1. They were freshly initialised: this is not the model that was saved."]
    _, messages = _load_warnings(lambda: AutoModelForSequenceClassification.from_pretrained(folder))
    assert len(messages) == 1
    _, messages = _load_warnings(lambda: S4DSSModel.from_pretrained(_edited(saved, tmp_path / "b", drop="D")))
    assert len(messages) == 1 and "lacks 2 weight tensor(s) of the model (layers.0.kernel.D, layers.1.kernel.D)" in \
        messages[0] and "n_layers" not in messages[0]
    assert _digest(folder) == before


def test_a_config_with_other_layers_than_the_weights_warns(saved, tmp_path):
    more = _edited(saved, tmp_path / "more", n_layers=3)
    _, messages = _load_warnings(lambda: S4DSSForSequenceClassification.from_pretrained(more))
    assert len(messages) == 1 and "config.json says n_layers=3 but the weights hold nothing for layer(s) 2" in \
        messages[0]
    fewer = _edited(saved, tmp_path / "fewer", n_layers=1)
    model, messages = _load_warnings(lambda: S4DSSForSequenceClassification.from_pretrained(fewer))
    assert messages == [f"S4DSSForSequenceClassification.from_pretrained({str(fewer)!r}): config.json says "
                        "n_layers=1 but the weights also hold layer(s) 1 (s4dss.layers.1.kernel.A_imag, "
                        "s4dss.layers.1.kernel.B, s4dss.layers.1.kernel.C, ...); they were ignored: this is not the "
                        "model that was saved."]
    assert len(model.s4dss.layers) == 1


def test_a_new_head_or_a_dropped_head_is_the_usual_fine_tuning_start(saved, tmp_path):
    """Base checkpoint under a classification head, or a classifier checkpoint as a base model: no warning;
    a classifier checkpoint that lost its head: a warning."""
    S4DSSModel.from_pretrained(saved).save_pretrained(tmp_path / "base")
    _, messages = _load_warnings(lambda: S4DSSForSequenceClassification.from_pretrained(tmp_path / "base",
                                                                                        num_labels=3))
    assert messages == []
    _, messages = _load_warnings(lambda: S4DSSModel.from_pretrained(saved))
    assert messages == []
    headless = _edited(saved, tmp_path, drop="classifier.")
    _, messages = _load_warnings(lambda: S4DSSForSequenceClassification.from_pretrained(headless))
    assert len(messages) == 1 and "lacks 2 weight tensor(s) of the model (classifier.bias, classifier.weight)" in \
        messages[0]


def test_a_folder_without_config_json_is_one_clear_error(saved, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(saved, folder)
    (folder / "config.json").unlink()
    before = _digest(folder)
    for model_class in (S4DSSForSequenceClassification, S4DSSModel):
        with pytest.raises(OSError, match=rf"^{folder} holds no config.json, so it is no saved model"):
            model_class.from_pretrained(folder)
    config = S4DSSConfig.from_pretrained(saved)
    model = S4DSSForSequenceClassification.from_pretrained(folder, config=config)  # given a config: fine
    assert model.config.d_model == 4
    with pytest.raises(OSError, match=rf"^no model folder at {tmp_path / 'nowhere'}\.$"):
        S4DSSForSequenceClassification.from_pretrained(tmp_path / "nowhere")
    assert _digest(folder) == before


def test_the_command_line_still_refuses_an_incomplete_checkpoint_in_one_line(saved, tmp_path, capsys):
    """Its own one-line error, without the Python warning on stderr."""
    import subprocess
    import sys

    folder = _edited(saved, tmp_path, drop="layers.1.kernel.B")
    code = "import sys; from s4bt_hf.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "evaluate", "--model", str(folder), "--task", "smnist",
                             "--no-progress"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lacks 1 weight tensor(s)" in lines[0], result.stderr


def test_weights_given_as_a_state_dict_need_no_folder():
    config = S4DSSConfig(d_model=4, n_layers=1, d_state=2)
    state = S4DSSForSequenceClassification(config).state_dict()
    model, messages = _load_warnings(lambda: S4DSSForSequenceClassification.from_pretrained(None, config=config,
                                                                                            state_dict=state))
    assert messages == [] and all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in state.items())


# ----------------------------------------------------------------------------- input magnitudes (documented)


@pytest.mark.parametrize("norm, prenorm", [("layer", True), ("layer", False), ("batch", True)])
def test_the_documented_input_magnitudes(norm, prenorm):
    """float32: values of 1e20 at valid positions give finite logits; 1e30 gives non-finite logits with
    LayerNorm (the hidden activations' squares overflow near 1e19 · 1e19); float64 takes 1e30."""
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=1, d_model=8, n_layers=2, d_state=8, num_labels=3, norm=norm, prenorm=prenorm)
    model = S4DSSForSequenceClassification(config).eval()
    inputs = torch.rand(2, 64, 1) * 2 - 1

    def logits(module, scale, dtype=torch.float32):
        with torch.no_grad():
            return module(input_values=(inputs * scale).to(dtype)).logits

    assert torch.isfinite(logits(model, 1e20)).all()
    assert torch.isfinite(logits(model, 1e30)).all() == (norm == "batch")  # BatchNorm in eval: running statistics
    assert torch.isfinite(logits(model.double(), 1e30, torch.float64)).all()
