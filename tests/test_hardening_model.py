"""What a hostile but fair user did to the models (issue 12): garbage at padded positions, empty
batches, label dtypes, inputs on another device, the value-check switch, float32 SSM parameters
however the model is built, and `torch.export` of both classes."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

import s4bt_hf
from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


def _padded_batch(input_dim=2, batch=3, length=12):
    torch.manual_seed(0)
    values = torch.randn(batch, length, input_dim)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 10:] = 0
    return values, mask


def _with_garbage(values, mask, garbage):
    dirty = values.clone()
    dirty[mask == 0] = garbage
    return dirty


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("norm,pooling,bidirectional", [
    ("layer", "mean", False), ("batch", "mean", False), ("batch", "last", True), ("layer", "last", True),
])
def test_garbage_at_padded_positions_changes_nothing(garbage, norm, pooling, bidirectional):
    """Logits, loss, every gradient and BatchNorm's running statistics are those of the same
    batch with zeros at the padded positions, in training mode (batch statistics)."""
    config = S4DSSConfig(input_dim=2, d_model=8, n_layers=2, d_state=4, num_labels=3, norm=norm, pooling=pooling,
                         bidirectional=bidirectional, prenorm=norm == "layer")
    torch.manual_seed(1)
    model = S4DSSForSequenceClassification(config).train()
    values, mask = _padded_batch()
    labels = torch.tensor([0, 1, 2])
    results = []
    for inputs in (values.masked_fill(mask.unsqueeze(-1) == 0, 0.0), _with_garbage(values, mask, garbage)):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.reset_running_stats()
        model.zero_grad()
        output = model(input_values=inputs, attention_mask=mask, labels=labels)
        output.loss.backward()
        stats = [buffer.clone() for name, buffer in model.named_buffers() if "running" in name]
        results.append((output.logits.detach(), [p.grad.clone() for p in model.parameters()], stats))
    (clean_logits, clean_grads, clean_stats), (logits, grads, stats) = results
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, clean_logits)
    for clean, dirty in zip(clean_grads + clean_stats, grads + stats, strict=True):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean)


def test_garbage_inputs_embeds_at_padded_positions_changes_nothing():
    model = S4DSSModel(S4DSSConfig(input_dim=1, d_model=8, n_layers=1, d_state=4)).eval()
    embeds, mask = _padded_batch(input_dim=8)
    clean = model(inputs_embeds=embeds.masked_fill(mask.unsqueeze(-1) == 0, 0.0), attention_mask=mask)
    dirty = model(inputs_embeds=_with_garbage(embeds, mask, float("nan")), attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(dirty.last_hidden_state[valid], clean.last_hidden_state[valid])


@pytest.mark.parametrize("training", [False, True])
def test_an_empty_batch_gives_empty_outputs(training, token_config):
    for norm in ("layer", "batch"):
        model = S4DSSForSequenceClassification(token_config(norm=norm)).train(training)
        before = [buffer.clone() for buffer in model.buffers()]
        output = model(input_ids=torch.zeros(0, 5, dtype=torch.long))
        assert output.logits.shape == (0, 3)
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
        with pytest.raises(ValueError, match="empty batch"):
            model(input_ids=torch.zeros(0, 5, dtype=torch.long), labels=torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_are_class_ids(dtype, token_config):
    model = S4DSSForSequenceClassification(token_config()).eval()
    ids = torch.randint(0, 20, (4, 6))
    labels = torch.tensor([0, 2, 1, 2])
    output = model(input_ids=ids, labels=labels.to(dtype))
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    assert model.config.problem_type == "single_label_classification"


def test_multi_label_targets_must_lie_in_the_unit_interval(token_config):
    model = S4DSSForSequenceClassification(token_config(problem_type="multi_label_classification")).eval()
    ids = torch.randint(0, 20, (2, 6))
    for bad in (2.0, -0.5, float("nan")):
        labels = torch.zeros(2, 3)
        labels[1, 1] = bad
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            model(input_ids=ids, labels=labels)
    labels = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    output = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))


def test_num_labels_zero_is_refused():
    with pytest.raises(ValueError, match="num_labels"):
        S4DSSConfig(num_labels=0)


def test_inputs_on_another_device_are_named(token_config):
    model = S4DSSForSequenceClassification(token_config()).eval()
    with pytest.raises(ValueError, match="`input_ids` is on device meta"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="`attention_mask` is on device meta"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, device="meta"))


def test_streaming_state_of_another_model_is_named():
    small = S4DSSModel(S4DSSConfig(d_model=8, n_layers=1, d_state=4)).eval()
    for other in (S4DSSConfig(d_model=8, n_layers=1, d_state=6), S4DSSConfig(d_model=6, n_layers=1, d_state=4)):
        state = S4DSSModel(other).eval().init_streaming_state(batch_size=1)
        with pytest.raises(ValueError, match="does not fit this model"):
            small.streaming_step(state, input_values=torch.zeros(1, 1))


def test_workers_must_be_positive(token_config):
    model = S4DSSForSequenceClassification(token_config())
    with pytest.raises(ValueError, match="`workers`"):
        model.balanced_truncate(rank=2, workers=-3)


@pytest.mark.parametrize("method", ["balanced_truncation", "singular_perturbation"])
def test_several_workers_reduce_exactly_as_one(token_config, method):
    """The suite runs on one thread (conftest), so the threaded chunks are asked for explicitly:
    every channel is reduced on its own, whichever worker takes it; the thread count comes back."""
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(token_config(d_model=24, d_state=6))
    one = model.reduce(method, rank=3, workers=1)
    threads = torch.get_num_threads()
    several = model.reduce(method, rank=3, workers=3)
    assert torch.get_num_threads() == threads
    for name, value in one.state_dict().items():
        torch.testing.assert_close(several.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_corrupt_compression_report_names_the_file_and_the_model_loads(tmp_path, token_config):
    model = S4DSSForSequenceClassification(token_config()).balanced_truncate(rank=2)
    model.save_pretrained(tmp_path)
    (tmp_path / "compression_report.json").write_text("{not json")
    with pytest.warns(UserWarning, match="compression_report.json cannot be read"):
        loaded = S4DSSForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.compression_report is None
    assert json.loads((tmp_path / "config.json").read_text())["d_state"] == 2


def test_ssm_parameter_groups_refuse_a_negative_learning_rate(token_config):
    model = S4DSSForSequenceClassification(token_config())
    with pytest.raises(ValueError, match="`lr`"):
        s4bt_hf.ssm_param_groups(model, lr=-1, weight_decay=0.0)
    with pytest.raises(TypeError, match="`lr`"):
        s4bt_hf.ssm_param_groups(model, lr="1e-3", weight_decay=0.0)


# ---------------------------------------------------------------- the value-check switch (item 7)

VALUE_ERRORS = {
    "ids outside the vocabulary": dict(input_ids=torch.tensor([[0, 25, 3]])),
    "mask of 2s": dict(input_ids=torch.tensor([[0, 1, 3]]), attention_mask=torch.tensor([[1, 2, 1]])),
    "row without a valid position": dict(input_ids=torch.tensor([[0, 1, 3]]), attention_mask=torch.tensor([[0, 0, 0]])),
    "class id out of range": dict(input_ids=torch.tensor([[0, 1, 3]]), labels=torch.tensor([7])),
}
METADATA_ERRORS = {
    "float ids": (TypeError, dict(input_ids=torch.zeros(1, 3))),
    "mask of another shape": (ValueError, dict(input_ids=torch.zeros(1, 3, dtype=torch.long),
                                               attention_mask=torch.ones(1, 4))),
    "labels of another shape": (ValueError, dict(input_ids=torch.zeros(1, 3, dtype=torch.long),
                                                 labels=torch.zeros(2, dtype=torch.long))),
    "ids on meta": (ValueError, dict(input_ids=torch.zeros(1, 3, dtype=torch.long, device="meta"))),
}


def test_the_flag_removes_the_value_checks_and_nothing_else(token_config):
    checked, unchecked = (S4DSSForSequenceClassification(token_config(check_input_values=flag)).eval()
                          for flag in (True, False))
    for name, inputs in VALUE_ERRORS.items():
        with pytest.raises(ValueError):
            checked(**inputs)
        if name in ("ids outside the vocabulary", "class id out of range"):
            with pytest.raises(IndexError):  # torch's own error on CPU (embedding, cross-entropy): ours did not run
                unchecked(**inputs)
        else:
            unchecked(**inputs)  # no error: the value check is gone
    for error, inputs in METADATA_ERRORS.values():
        for model in (checked, unchecked):
            with pytest.raises(error):
                model(**inputs)


def test_without_value_checks_no_value_is_read_back(token_config, monkeypatch):
    """With the flag off, a forward with mask and labels never reads a tensor value on the host:
    every reading method fails if called."""
    model = S4DSSForSequenceClassification(token_config(check_input_values=False)).eval()
    ids = torch.randint(0, 20, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    labels = torch.tensor([0, 2])

    def forbidden(*args, **kwargs):
        raise AssertionError("a value was read back to the host")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    output = model(input_ids=ids, attention_mask=mask, labels=labels)
    monkeypatch.undo()
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)


# ---------------------------------------------------------------- what transformers' model tests expect (item 8)

def test_ssm_parameters_are_float32_however_the_model_is_built():
    config = S4DSSConfig(d_model=8, n_layers=1, d_state=4)
    built = {"from_config": AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        built["default dtype"] = S4DSSModel(config)
    finally:
        torch.set_default_dtype(previous)
    for how, model in built.items():
        for name, parameter in model.named_parameters():
            expected = torch.float32 if ".kernel." in name else torch.bfloat16
            assert parameter.dtype == expected, (how, name, parameter.dtype)
        model(input_values=torch.randn(2, 16, 1, dtype=torch.bfloat16))  # runs in mixed dtypes


@pytest.mark.parametrize("model_class", [S4DSSModel, S4DSSForSequenceClassification])
@pytest.mark.parametrize("tokens", [True, False])
def test_torch_export_with_an_attention_mask(model_class, tokens):
    config = (S4DSSConfig(vocab_size=12, d_model=8, n_layers=2, d_state=4, pooling="last") if tokens
              else S4DSSConfig(d_model=8, n_layers=2, d_state=4, norm="batch"))
    torch.manual_seed(0)
    model = model_class(config).eval()
    inputs = {"input_ids": torch.randint(0, 12, (2, 16))} if tokens else {"input_values": torch.randn(2, 16, 1)}
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (), {**inputs, "attention_mask": mask})
    exported = program.module()(**inputs, attention_mask=mask)
    eager = model(**inputs, attention_mask=mask)
    key = "logits" if model_class is S4DSSForSequenceClassification else "last_hidden_state"
    exported = exported[key] if isinstance(exported, dict) else getattr(exported, key, exported[0])
    torch.testing.assert_close(exported, getattr(eager, key))
    # another mask through the same program: the mask is an input, not a constant
    mask[1, 5:] = 0
    other = program.module()(**inputs, attention_mask=mask)
    other = other[key] if isinstance(other, dict) else getattr(other, key, other[0])
    torch.testing.assert_close(other, getattr(model(**inputs, attention_mask=mask), key))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(token_config):
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(token_config(dropout=0.0)).train()
    ids = torch.randint(0, 20, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 6:] = 0
    labels = torch.tensor([0, 1, 2])
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    assert all(layer.gradient_checkpointing for layer in model.s4dss.layers)
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], msg=name)


def test_the_balanced_truncation_docstring_example_runs():
    import doctest

    import s4bt_hf.balanced_truncation as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("task,options,name", [
    ("listops", {"seed": "a"}, "seed"), ("listops", {"num_train": 2.5}, "num_train"),
    ("listops", {"min_length": 20.0}, "min_length"), ("smnist", {"seed": "a"}, "seed"),
])
def test_task_builders_name_a_wrong_type_at_once(task, options, name):
    from s4bt_hf.data import load_task

    with pytest.raises(TypeError, match=name):
        load_task(task, **options)
