"""Bad inputs, labels and configs raise ValueError/TypeError with a message naming the problem."""

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel


@pytest.fixture
def token_model(token_config):
    torch.manual_seed(0)
    return S4DSSForSequenceClassification(token_config(vocab_size=20, num_labels=3)).eval()


@pytest.fixture
def real_model(real_config):
    torch.manual_seed(0)
    return S4DSSForSequenceClassification(real_config(input_dim=2, num_labels=3)).eval()


def _ids(batch=2, length=6):
    return torch.randint(0, 20, (batch, length), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("shape", [(6,), (2, 6, 1)], ids=["1d", "3d"])
def test_input_ids_of_wrong_rank(token_model, shape):
    with pytest.raises(ValueError, match=r"input_ids.*2 dimensions"):
        token_model(input_ids=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 2, 1)], ids=["2d", "4d"])
def test_input_values_of_wrong_rank(real_model, shape):
    with pytest.raises(ValueError, match=r"input_values.*3 dimensions"):
        real_model(input_values=torch.zeros(shape))


def test_input_values_of_wrong_width(real_model):
    with pytest.raises(ValueError, match=r"input_values.*shape.*2\)"):
        real_model(input_values=torch.zeros(2, 6, 3))


def test_input_values_width_one_hint(real_config):
    model = S4DSSModel(real_config(input_dim=1))
    with pytest.raises(ValueError, match=r"unsqueeze\(-1\)"):
        model(input_values=torch.zeros(2, 6, 6))


def test_both_inputs(real_model, token_model):
    for model in (real_model, token_model):
        with pytest.raises(ValueError, match=r"exactly one.*input_ids, input_values"):
            model(input_ids=_ids(), input_values=torch.zeros(2, 6, 2))


def test_no_input(token_model):
    with pytest.raises(ValueError, match=r"exactly one.*got none"):
        token_model()
    with pytest.raises(ValueError, match=r"exactly one.*got none"):
        token_model(attention_mask=torch.ones(2, 6, dtype=torch.long))


def test_input_ids_on_real_valued_model(real_model):
    with pytest.raises(ValueError, match=r"input_values.*not `input_ids`"):
        real_model(input_ids=_ids())


def test_input_values_on_token_model(token_model):
    with pytest.raises(ValueError, match=r"input_ids.*not `input_values`"):
        token_model(input_values=torch.zeros(2, 6, 2))


@pytest.mark.parametrize("bad_id", [-1, 20, 1000])
def test_ids_outside_the_vocabulary(token_model, bad_id):
    ids = _ids()
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 20\)"):
        token_model(input_ids=ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_input_ids(token_model, dtype):
    with pytest.raises(TypeError, match=r"input_ids.*integer"):
        token_model(input_ids=_ids().to(dtype))


def test_integer_input_values(real_model):
    with pytest.raises(TypeError, match=r"input_values.*floating"):
        real_model(input_values=torch.zeros(2, 6, 2, dtype=torch.long))


def test_input_that_is_not_a_tensor(token_model):
    with pytest.raises(TypeError, match=r"input_ids.*torch.Tensor"):
        token_model(input_ids=[[1, 2, 3]])


def test_empty_sequences(token_model):
    with pytest.raises(ValueError, match=r"length 0"):
        token_model(input_ids=torch.zeros(2, 0, dtype=torch.long))


def test_inputs_embeds_of_wrong_width(token_model):
    with pytest.raises(ValueError, match=r"inputs_embeds.*shape"):
        token_model(inputs_embeds=torch.zeros(2, 6, 5))


# --------------------------------------------------------------------------- attention mask


@pytest.mark.parametrize("shape", [(2, 5), (2, 7), (1, 6), (2, 6, 1), (12,)])
def test_attention_mask_of_wrong_shape(token_model, shape):
    with pytest.raises(ValueError, match=r"attention_mask.*shape"):
        token_model(input_ids=_ids(), attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("bad_value", [2, -1])
def test_attention_mask_with_values_other_than_0_and_1(token_model, bad_value):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 2] = bad_value
    with pytest.raises(ValueError, match=r"attention_mask.*only 0.*and 1"):
        token_model(input_ids=_ids(), attention_mask=mask)


def test_attention_mask_with_fractional_values(token_model):
    mask = torch.ones(2, 6)
    mask[1, 1] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask.*only 0.*and 1"):
        token_model(input_ids=_ids(), attention_mask=mask)


def test_attention_mask_row_without_valid_position(token_model):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"at least one valid position"):
        token_model(input_ids=_ids(), attention_mask=mask)


def test_attention_mask_that_is_not_a_tensor(token_model):
    with pytest.raises(TypeError, match=r"attention_mask.*torch.Tensor"):
        token_model(input_ids=_ids(), attention_mask=[[1] * 6] * 2)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)],
    ids=["2d", "wrong-batch", "column"],
)
def test_single_label_labels_of_wrong_shape(token_config, labels):
    model = S4DSSForSequenceClassification(token_config(num_labels=3, problem_type="single_label_classification"))
    with pytest.raises(ValueError, match=r"Single-label.*shape \(2,\)"):
        model(input_ids=_ids(), labels=labels)


def test_single_label_float_labels(token_config):
    model = S4DSSForSequenceClassification(token_config(num_labels=3, problem_type="single_label_classification"))
    with pytest.raises(ValueError, match=r"Single-label.*integer"):
        model(input_ids=_ids(), labels=torch.zeros(2))


@pytest.mark.parametrize("bad_class", [-1, 3, 7])
def test_single_label_class_ids_out_of_range(token_model, bad_class):
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        token_model(input_ids=_ids(), labels=torch.tensor([0, bad_class]))


@pytest.mark.parametrize("shape", [(2, 2), (3,), (2, 1, 1)])
def test_regression_labels_of_wrong_shape(token_config, shape):
    model = S4DSSForSequenceClassification(token_config(num_labels=1))
    with pytest.raises(ValueError, match=r"regression needs `labels` of shape"):
        model(input_ids=_ids(), labels=torch.zeros(shape))


def test_multi_output_regression_labels_of_wrong_shape(token_config):
    model = S4DSSForSequenceClassification(token_config(num_labels=3, problem_type="regression"))
    with pytest.raises(ValueError, match=r"regression needs `labels` of shape \(2, 3\)"):
        model(input_ids=_ids(), labels=torch.zeros(2))


@pytest.mark.parametrize("shape", [(2,), (2, 2), (3, 3)])
def test_multi_label_labels_of_wrong_shape(token_config, shape):
    model = S4DSSForSequenceClassification(token_config(num_labels=3, problem_type="multi_label_classification"))
    with pytest.raises(ValueError, match=r"multi_label_classification needs `labels` of shape \(2, 3\)"):
        model(input_ids=_ids(), labels=torch.zeros(shape))


def test_labels_that_are_not_a_tensor(token_model):
    with pytest.raises(TypeError, match=r"labels.*torch.Tensor"):
        token_model(input_ids=_ids(), labels=[0, 1])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "fields, error, pattern",
    [
        (dict(d_model=0), ValueError, r"d_model"),
        (dict(d_model=-4), ValueError, r"d_model"),
        (dict(d_model="abc"), TypeError, r"d_model"),
        (dict(d_model=8.0), TypeError, r"d_model"),
        (dict(n_layers=0), ValueError, r"n_layers"),
        (dict(d_state=0), ValueError, r"d_state"),
        (dict(d_state=[4, 4, 4]), ValueError, r"d_state.*n_layers"),
        (dict(d_state=[4]), ValueError, r"d_state.*n_layers"),
        (dict(d_state=[4, 0]), ValueError, r"d_state\[1\]"),
        (dict(init="hippo"), ValueError, r"init"),
        (dict(norm="group"), ValueError, r"norm"),
        (dict(pooling="max"), ValueError, r"pooling"),
        (dict(dt_min=0.5, dt_max=0.1), ValueError, r"dt_min"),
        (dict(dt_min=0.0), ValueError, r"dt_min"),
        (dict(input_dim=3), ValueError, r"vocab_size.*input_dim"),
        (dict(vocab_size=0), ValueError, r"vocab_size"),
        (dict(dropout=1.0), ValueError, r"dropout"),
        (dict(dropout=-0.1), ValueError, r"dropout"),
        (dict(ssm_lr=-1e-3), ValueError, r"ssm_lr"),
        (dict(ssm_lr=float("nan")), ValueError, r"ssm_lr"),
        (dict(ssm_weight_decay=-0.1), ValueError, r"ssm_weight_decay"),
        (dict(pad_token_id=20), ValueError, r"pad_token_id"),
        (dict(pad_token_id=-1), ValueError, r"pad_token_id"),
        (dict(bidirectional="yes"), TypeError, r"bidirectional"),
    ],
)
def test_configs_that_cannot_be_built(fields, error, pattern):
    base = {"vocab_size": 20, "d_model": 8, "n_layers": 2, "d_state": 4}
    base.update(fields)
    with pytest.raises(error, match=pattern):
        S4DSSConfig(**base)


def test_pad_token_id_on_real_valued_config():
    with pytest.raises(ValueError, match=r"pad_token_id.*vocab_size"):
        S4DSSConfig(input_dim=2, d_model=8, n_layers=1, d_state=4, pad_token_id=0)


@pytest.mark.parametrize(
    "field, value, error, pattern",
    [
        ("d_model", 0, ValueError, r"d_model"),
        ("norm", "group", ValueError, r"norm"),
        ("n_layers", 3, ValueError, r"d_state.*n_layers"),
        ("dropout", 1.5, ValueError, r"dropout"),
        ("d_model", "abc", TypeError, r"d_model"),
    ],
)
@pytest.mark.parametrize("model_class", [S4DSSModel, S4DSSForSequenceClassification])
def test_config_edited_into_an_invalid_state(token_config, model_class, field, value, error, pattern):
    config = token_config(d_state=[4, 4])
    setattr(config, field, value)
    with pytest.raises(error, match=pattern):
        model_class(config)


# --------------------------------------------------------------------------- streaming


def test_streaming_on_a_bidirectional_model(token_config):
    for model_class in (S4DSSModel, S4DSSForSequenceClassification):
        model = model_class(token_config(bidirectional=True)).eval()
        with pytest.raises(ValueError, match=r"unidirectional.*bidirectional"):
            model.init_streaming_state(2)


def test_streaming_in_training_mode(token_config):
    for model_class in (S4DSSModel, S4DSSForSequenceClassification):
        model = model_class(token_config()).train()
        with pytest.raises(ValueError, match=r"eval\(\)"):
            model.init_streaming_state(2)


def test_streaming_step_in_training_mode(token_config):
    model = S4DSSModel(token_config()).eval()
    state = model.init_streaming_state(2)
    model.train()
    with pytest.raises(ValueError, match=r"eval\(\)"):
        model.streaming_step(state, input_ids=torch.tensor([1, 2]))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_streaming_bad_batch_size(token_config, batch_size):
    model = S4DSSModel(token_config()).eval()
    with pytest.raises(ValueError, match=r"batch_size"):
        model.init_streaming_state(batch_size)
