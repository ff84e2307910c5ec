"""Sequence classification: losses of the three problem types, output formats, gradients, padding
invariance, bf16, optimizer parameter groups and Auto registration."""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import s4bt_hf
from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel, ssm_param_groups

SSM_DYNAMICS = ("log_dt", "log_A_real", "A_imag", "B")
BATCH, LENGTH = 4, 10


def _model(config, spread_classifier=None, seed=0):
    torch.manual_seed(seed)
    model = S4DSSForSequenceClassification(config)
    if spread_classifier is not None:
        spread_classifier(model)
    return model.eval()


def _ids(config, batch=BATCH, length=LENGTH, seed=0, low=None):
    generator = torch.Generator().manual_seed(seed)
    if low is None:
        low = 1 if config.pad_token_id is not None else 0
    return torch.randint(low, config.vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------- losses


def test_regression_loss(token_config, spread_classifier):
    model = _model(token_config(num_labels=1), spread_classifier)
    labels = torch.randn(BATCH)
    output = model(input_ids=_ids(model.config), labels=labels)
    assert output.logits.shape == (BATCH, 1)
    expected = F.mse_loss(output.logits.squeeze(-1), labels)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-7)
    assert model.config.problem_type == "regression"


def test_multi_output_regression_loss(token_config, spread_classifier):
    model = _model(token_config(num_labels=3, problem_type="regression"), spread_classifier)
    labels = torch.randn(BATCH, 3)
    output = model(input_ids=_ids(model.config), labels=labels)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits, labels), rtol=1e-6, atol=1e-7)


def test_single_label_loss(token_config, spread_classifier):
    model = _model(token_config(num_labels=3), spread_classifier)
    labels = torch.tensor([0, 2, 1, 2])
    output = model(input_ids=_ids(model.config), labels=labels)
    assert output.logits.shape == (BATCH, 3)
    expected = F.cross_entropy(output.logits, labels)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-7)
    # The loss depends on the labels (a wrong label gives a different loss).
    other = model(input_ids=_ids(model.config), labels=torch.tensor([1, 0, 2, 0])).loss
    assert not torch.allclose(other, output.loss)
    assert model.config.problem_type == "single_label_classification"


def test_multi_label_loss(token_config, spread_classifier):
    model = _model(token_config(num_labels=3, problem_type="multi_label_classification"), spread_classifier)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    output = model(input_ids=_ids(model.config), labels=labels)
    expected = F.binary_cross_entropy_with_logits(output.logits, labels)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-7)


def test_real_valued_single_label_loss(real_config, spread_classifier):
    model = _model(real_config(num_labels=4), spread_classifier)
    labels = torch.tensor([3, 0, 1, 2])
    output = model(input_values=torch.randn(BATCH, LENGTH, 2), labels=labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- output formats


def test_return_dict_false_gives_loss_and_logits(token_config, spread_classifier):
    model = _model(token_config(), spread_classifier)
    inputs, labels = _ids(model.config), torch.tensor([0, 1, 2, 1])
    as_dict = model(input_ids=inputs, labels=labels)
    as_tuple = model(input_ids=inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == 2
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[1], as_dict.logits)
    without_labels = model(input_ids=inputs, return_dict=False)
    assert isinstance(without_labels, tuple) and len(without_labels) == 1
    assert torch.equal(without_labels[0], as_dict.logits)
    backbone = model.s4dss(input_ids=inputs, return_dict=False)
    assert isinstance(backbone, tuple) and len(backbone) == 1
    assert torch.equal(backbone[0], model.s4dss(input_ids=inputs).last_hidden_state)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_output_hidden_states(token_config, n_layers):
    config = token_config(n_layers=n_layers)
    model = _model(config)
    inputs = _ids(config)
    output = model(input_ids=inputs, output_hidden_states=True)
    assert len(output.hidden_states) == n_layers + 1
    for hidden in output.hidden_states:
        assert hidden.shape == (BATCH, LENGTH, config.d_model)
    assert model(input_ids=inputs).hidden_states is None

    base = model.s4dss(input_ids=inputs, output_hidden_states=True)
    assert len(base.hidden_states) == n_layers + 1
    assert torch.equal(base.hidden_states[0], model.s4dss.embeddings(inputs))
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)
    # Consecutive states differ: every block changes its input.
    for before, after in zip(base.hidden_states[:-1], base.hidden_states[1:], strict=True):
        assert not torch.allclose(before, after)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("inputs", ["tokens", "real"])
def test_gradients_reach_every_parameter(token_config, real_config, inputs, bidirectional, norm):
    make = token_config if inputs == "tokens" else real_config
    config = make(bidirectional=bidirectional, norm=norm, d_state=[4, 6])
    model = _model(config).train()
    if inputs == "tokens":
        batch = {"input_ids": _ids(config)}
    else:
        batch = {"input_values": torch.randn(BATCH, LENGTH, config.input_dim)}
    loss = model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    for layer in model.s4dss.layers:
        # Both output rows of a bidirectional kernel (forward and backward) are used.
        for row in range(layer.kernel.C.shape[0]):
            assert layer.kernel.C.grad[row].abs().sum() > 0


# --------------------------------------------------------------------------- padding

PAD = 0
LONG, SHORT = 12, 7


def _pad(sequence, length, side, filler):
    """Pad a 1-D id tensor to `length` with `filler` ids; returns (ids, mask)."""
    extra = length - sequence.shape[0]
    padding = torch.full((extra,), filler, dtype=sequence.dtype) if isinstance(filler, int) else filler[:extra]
    mask = torch.cat([torch.ones_like(sequence), torch.zeros(extra, dtype=torch.long)])
    ids = torch.cat([sequence, padding])
    if side == "left":
        return ids.roll(extra), mask.roll(extra)
    return ids, mask


def _valid(tensor, mask):
    """The rows of a (L, H) tensor at the valid positions of a (L,) mask."""
    return tensor[mask.bool()]


def _run(model, input_ids, attention_mask=None):
    """(logits, last_hidden_state, state_dict) of a fresh copy of `model` (training-mode
    BatchNorm updates its running stats, so every call starts from the same model)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        logits = clone(input_ids=input_ids, attention_mask=attention_mask).logits
    backbone = copy.deepcopy(model.s4dss)
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return logits, hidden, clone.state_dict()


def _padding_model(token_config, spread_classifier, bidirectional, norm_mode, pooling, prenorm=True):
    norm = "layer" if norm_mode == "layer" else "batch"
    config = token_config(
        pad_token_id=PAD, bidirectional=bidirectional, norm=norm, pooling=pooling, prenorm=prenorm, d_state=[4, 6]
    )
    model = _model(config, spread_classifier)
    if norm == "batch":  # non-trivial running stats and affine parameters
        model.train()
        with torch.no_grad():
            model(input_ids=_ids(config, batch=6, length=LONG, seed=42))
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.weight.add_(torch.randn_like(module.weight) * 0.3)
                    module.bias.add_(torch.randn_like(module.bias) * 0.3)
    model.train(norm_mode == "batch-train")
    return model


PADDING_CASES = [
    pytest.param(bidirectional, norm_mode, pooling, id=f"{'bi' if bidirectional else 'uni'}-{norm_mode}-{pooling}")
    for bidirectional in (False, True)
    for norm_mode in ("layer", "batch-eval", "batch-train")
    for pooling in ("mean", "last")
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("bidirectional, norm_mode, pooling", PADDING_CASES)
def test_padding_matches_unpadded_sequences(token_config, spread_classifier, bidirectional, norm_mode, pooling, side):
    """A padded batch gives, at every valid position and in the logits, what the unpadded
    sequences give, and the ids at padded positions do not matter."""
    model = _padding_model(token_config, spread_classifier, bidirectional, norm_mode, pooling)
    config = model.config
    generator = torch.Generator().manual_seed(7)
    seq_a = torch.randint(1, config.vocab_size, (SHORT,), generator=generator)
    seq_b = torch.randint(1, config.vocab_size, (LONG,), generator=generator)
    garbage = torch.randint(0, config.vocab_size, (LONG,), generator=generator)

    ids_a, mask_a = _pad(seq_a, LONG, side, PAD)
    batch_ids = torch.stack([ids_a, seq_b])
    batch_mask = torch.stack([mask_a, torch.ones(LONG, dtype=torch.long)])
    logits, hidden, state = _run(model, batch_ids, batch_mask)
    assert logits.shape == (2, config.num_labels)
    assert logits.abs().max() > 0.1  # the comparisons below are not between near-zero numbers

    if norm_mode != "batch-train":
        # Reference: every sequence alone, without padding or mask.
        for row, sequence in enumerate((seq_a, seq_b)):
            ref_logits, ref_hidden, _ = _run(model, sequence.unsqueeze(0))
            torch.testing.assert_close(logits[row], ref_logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(_valid(hidden[row], batch_mask[row]), ref_hidden[0], rtol=0, atol=1e-5)
    else:
        # Batch statistics depend on the batch: the reference is the same valid content with other
        # padding (longer, other side, other filler ids), which must give the same result.
        other_side = "left" if side == "right" else "right"
        ids_a2, mask_a2 = _pad(seq_a, LONG + 5, other_side, garbage)
        ids_b2, mask_b2 = _pad(seq_b, LONG + 5, side, garbage)
        ref_logits, ref_hidden, ref_state = _run(model, torch.stack([ids_a2, ids_b2]), torch.stack([mask_a2, mask_b2]))
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(_valid(hidden[0], mask_a), _valid(ref_hidden[0], mask_a2), rtol=0, atol=1e-5)
        torch.testing.assert_close(_valid(hidden[1], batch_mask[1]), _valid(ref_hidden[1], mask_b2), rtol=0, atol=1e-5)
        # The running statistics were updated from the valid positions only.
        for key, value in state.items():
            if "running_" in key:
                torch.testing.assert_close(value, ref_state[key], rtol=0, atol=1e-6, msg=key)

    # Other ids at the padded positions change nothing.
    scrambled = batch_ids.clone()
    scrambled[batch_mask == 0] = garbage[: int((batch_mask == 0).sum())]
    assert not torch.equal(scrambled, batch_ids)
    logits2, hidden2, state2 = _run(model, scrambled, batch_mask)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-5)
    for row in range(2):
        torch.testing.assert_close(
            _valid(hidden2[row], batch_mask[row]), _valid(hidden[row], batch_mask[row]), rtol=0, atol=1e-5
        )
    for key, value in state.items():
        if "running_" in key:
            torch.testing.assert_close(state2[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_batch_norm_training_padding_equals_unpadded_batch(token_config, spread_classifier, bidirectional, side):
    """Train-mode BatchNorm: a batch of equal-length sequences, padded with extra positions, gives
    what the same batch gives without padding (statistics over the valid positions only)."""
    model = _padding_model(token_config, spread_classifier, bidirectional, "batch-train", "mean")
    generator = torch.Generator().manual_seed(11)
    sequences = torch.randint(1, model.config.vocab_size, (3, SHORT), generator=generator)
    garbage = torch.randint(0, model.config.vocab_size, (LONG,), generator=generator)
    ref_logits, ref_hidden, ref_state = _run(model, sequences)
    padded = [_pad(sequence, LONG, side, garbage) for sequence in sequences]
    ids = torch.stack([pair[0] for pair in padded])
    mask = torch.stack([pair[1] for pair in padded])
    logits, hidden, state = _run(model, ids, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for row in range(3):
        torch.testing.assert_close(_valid(hidden[row], mask[row]), ref_hidden[row], rtol=0, atol=1e-5)
    for key, value in ref_state.items():
        if "running_" in key:
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padding_post_norm(token_config, spread_classifier, bidirectional, side):
    """prenorm=False: the norm after each block sees padded positions too; still invariant."""
    model = _padding_model(token_config, spread_classifier, bidirectional, "batch-eval", "mean", prenorm=False)
    generator = torch.Generator().manual_seed(3)
    seq_a = torch.randint(1, model.config.vocab_size, (SHORT,), generator=generator)
    seq_b = torch.randint(1, model.config.vocab_size, (LONG,), generator=generator)
    ids_a, mask_a = _pad(seq_a, LONG, side, PAD)
    logits, hidden, _ = _run(model, torch.stack([ids_a, seq_b]), torch.stack([mask_a, torch.ones_like(mask_a)]))
    ref_a, ref_hidden_a, _ = _run(model, seq_a.unsqueeze(0))
    ref_b, _, _ = _run(model, seq_b.unsqueeze(0))
    torch.testing.assert_close(logits, torch.cat([ref_a, ref_b]), rtol=0, atol=1e-5)
    torch.testing.assert_close(_valid(hidden[0], mask_a), ref_hidden_a[0], rtol=0, atol=1e-5)


def test_all_ones_mask_equals_no_mask(token_config, spread_classifier):
    model = _model(token_config(pad_token_id=PAD), spread_classifier)
    ids = _ids(model.config)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(input_ids=ids).logits
        )


# --------------------------------------------------------------------------- bf16


def _assert_close_to_scale(actual, expected, fraction=5e-2):
    scale = float(expected.abs().max())
    assert scale > 1e-2
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected, rtol=fraction, atol=fraction * scale)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_bf16_autocast_forward(token_config, spread_classifier, norm):
    model = _model(token_config(norm=norm, bidirectional=norm == "batch"), spread_classifier)
    ids = _ids(model.config)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(input_ids=ids).logits
    _assert_close_to_scale(actual, expected)
    # The model itself stays in float32.
    assert all(param.dtype == torch.float32 for param in model.parameters())


@pytest.mark.parametrize("inputs", ["tokens", "real"])
def test_bf16_loading_keeps_kernels_in_fp32(tmp_path, token_config, real_config, spread_classifier, inputs):
    config = (token_config if inputs == "tokens" else real_config)(norm="batch", d_state=[4, 6])
    model = _model(config, spread_classifier)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    kernel_params = 0
    for name, param in loaded.named_parameters():
        if "kernel" in name:
            kernel_params += 1
            assert param.dtype == torch.float32, name
            assert torch.equal(param, model.get_parameter(name)), name
        else:
            assert param.dtype == torch.bfloat16, name
    assert kernel_params == 6 * config.n_layers

    if inputs == "tokens":
        batch = {"input_ids": _ids(config)}
    else:
        batch = {"input_values": torch.randn(BATCH, LENGTH, config.input_dim)}
    with torch.no_grad():
        expected = model(**batch).logits
        actual = loaded(**batch).logits
    _assert_close_to_scale(actual, expected)


# --------------------------------------------------------------------------- optimizer groups


def _expected_group(name):
    leaf = name.rsplit(".", 1)[-1]
    if ".kernel." in name and leaf in SSM_DYNAMICS:
        return "ssm"
    if "norm." in name or leaf == "bias":
        return "no_decay"
    return "decay"


def _check_groups(model, lr=0.01, weight_decay=0.1):
    groups = ssm_param_groups(model, lr=lr, weight_decay=weight_decay)
    names = {id(param): name for name, param in model.named_parameters()}
    trainable = {id(param) for param in model.parameters() if param.requires_grad}
    seen = [id(param) for group in groups for param in group["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == trainable

    config = model.config
    expected_settings = {
        "decay": (lr, weight_decay),
        "no_decay": (lr, 0.0),
        "ssm": (config.ssm_lr, config.ssm_weight_decay),
    }
    for group in groups:
        kinds = {_expected_group(names[id(param)]) for param in group["params"]}
        assert len(kinds) == 1, [names[id(param)] for param in group["params"]]
        kind = kinds.pop()
        assert (group["lr"], group["weight_decay"]) == expected_settings[kind], kind
    assert _expected_group(names[id(groups[0]["params"][0])]) == "decay"
    assert groups[0]["lr"] == lr and groups[0]["weight_decay"] == weight_decay
    ssm = [names[id(param)] for group in groups for param in group["params"] if group["lr"] == config.ssm_lr]
    assert len(ssm) == len(SSM_DYNAMICS) * config.n_layers
    return groups


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_ssm_param_groups(token_config, norm):
    config = token_config(norm=norm, ssm_lr=3e-4, ssm_weight_decay=0.05, bidirectional=True)
    model = _model(config)
    groups = _check_groups(model)
    assert len(groups) == 3
    # Usable as is by a torch optimizer.
    optimizer = torch.optim.AdamW(groups)
    model.train()
    model(input_ids=_ids(config), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    before = model.s4dss.layers[0].kernel.log_dt.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.s4dss.layers[0].kernel.log_dt)


def test_ssm_param_groups_skip_frozen_parameters(real_config):
    model = _model(real_config(ssm_lr=2e-3))
    model.s4dss.layers[0].kernel.log_dt.requires_grad_(False)
    model.classifier.weight.requires_grad_(False)
    groups = ssm_param_groups(model, lr=0.01, weight_decay=0.1)
    grouped = {id(param) for group in groups for param in group["params"]}
    assert id(model.s4dss.layers[0].kernel.log_dt) not in grouped
    assert id(model.classifier.weight) not in grouped
    assert grouped == {id(param) for param in model.parameters() if param.requires_grad}


def test_ssm_param_groups_on_the_base_model(token_config):
    config = token_config(ssm_lr=5e-4, ssm_weight_decay=0.0)
    torch.manual_seed(0)
    _check_groups(S4DSSModel(config), lr=0.02, weight_decay=0.0)


def test_ssm_param_groups_reject_other_models():
    with pytest.raises(TypeError, match="S4-DSS"):
        ssm_param_groups(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0)


def test_ssm_param_groups_after_round_trip(tmp_path, token_config):
    config = token_config(norm="batch", ssm_lr=3e-4, ssm_weight_decay=0.05, d_state=[4, 6])
    model = _model(config)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.ssm_lr == 3e-4 and loaded.config.ssm_weight_decay == 0.05
    before = _check_groups(model)
    after = _check_groups(loaded)
    model_names = {id(param): name for name, param in model.named_parameters()}
    loaded_names = {id(param): name for name, param in loaded.named_parameters()}
    assert [[model_names[id(p)] for p in group["params"]] for group in before] == [
        [loaded_names[id(p)] for p in group["params"]] for group in after
    ]


def test_ssm_param_groups_on_a_remote_code_model(tmp_path, token_config):
    """A checkpoint loaded through its saved code (trust_remote_code) has classes from
    `transformers_modules`, not from s4bt_hf: the groups must still follow the S4 recipe."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = token_config(norm="batch", ssm_lr=3e-4, ssm_weight_decay=0.05)
    model = _model(config)
    model.save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module(
        "modeling_s4dss.S4DSSForSequenceClassification", str(tmp_path), trust_remote_code=True
    )
    assert remote_class is not S4DSSForSequenceClassification
    remote = remote_class.from_pretrained(tmp_path, dtype=torch.float32)
    _check_groups(remote)


# --------------------------------------------------------------------------- registration


def test_auto_registration_is_idempotent(token_config):
    importlib.import_module("s4bt_hf")
    importlib.reload(s4bt_hf)  # re-runs every registration line
    AutoConfig.register(S4DSSConfig.model_type, s4bt_hf.S4DSSConfig, exist_ok=True)
    AutoModel.register(s4bt_hf.S4DSSConfig, s4bt_hf.S4DSSModel, exist_ok=True)
    AutoModelForSequenceClassification.register(
        s4bt_hf.S4DSSConfig, s4bt_hf.S4DSSForSequenceClassification, exist_ok=True
    )

    config = AutoConfig.for_model("s4dss", vocab_size=11, d_model=8, n_layers=1, d_state=4)
    assert isinstance(config, S4DSSConfig)
    assert (config.vocab_size, config.d_model, config.n_layers, config.d_state) == (11, 8, 1, 4)
    assert config.hidden_size == 8 and config.num_hidden_layers == 1
    torch.manual_seed(0)
    assert type(AutoModel.from_config(config)) is S4DSSModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is S4DSSForSequenceClassification
