"""Streaming (recurrent) inference equals the convolutional forward over the whole sequence."""

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel


def trained_norm_statistics(model, inputs_kwargs):
    """One training-mode forward so BatchNorm running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        model(**inputs_kwargs)
    model.eval()


def stream(model, key, inputs):
    """Feed the sequence one position at a time; returns the stacked per-step outputs."""
    state = model.init_streaming_state(inputs.shape[0])
    outputs = []
    for t in range(inputs.shape[1]):
        output, state = model.streaming_step(state, **{key: inputs[:, t]})
        outputs.append(output)
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("prenorm", [True, False])
def test_backbone_streaming_equals_convolution(dtype, tolerance, norm, prenorm):
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=2, d_model=12, n_layers=2, d_state=[6, 3], norm=norm, prenorm=prenorm)
    model = S4DSSModel(config).to(dtype)
    inputs = torch.randn(3, 48, 2, dtype=dtype)
    trained_norm_statistics(model, {"input_values": inputs})
    with torch.no_grad():
        expected = model(input_values=inputs).last_hidden_state
        streamed, state = stream(model, "input_values", inputs)
    assert state.steps == 48
    assert state.ssm_states[0].dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    torch.testing.assert_close(streamed, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_classifier_streaming_logits_equal_forward_on_every_prefix(pooling, dtype, tolerance):
    torch.manual_seed(1)
    config = S4DSSConfig(vocab_size=9, d_model=8, n_layers=2, d_state=4, norm="batch", pooling=pooling, num_labels=3)
    model = S4DSSForSequenceClassification(config).to(dtype)
    tokens = torch.randint(0, 9, (2, 20))
    trained_norm_statistics(model, {"input_ids": tokens})
    with torch.no_grad():
        streamed, _ = stream(model, "input_ids", tokens)
        for prefix in (1, 7, 20):
            expected = model(input_ids=tokens[:, :prefix]).logits
            torch.testing.assert_close(streamed[:, prefix - 1], expected, rtol=tolerance, atol=tolerance)


def test_streaming_step_does_not_modify_the_given_state():
    torch.manual_seed(2)
    model = S4DSSModel(S4DSSConfig(d_model=8, n_layers=1, d_state=4)).eval()
    state = model.init_streaming_state(2)
    before = [s.clone() for s in state.ssm_states]
    with torch.no_grad():
        _, new_state = model.streaming_step(state, input_values=torch.randn(2, 1))
        again, _ = model.streaming_step(state, input_values=torch.ones(2, 1))
        repeat, _ = model.streaming_step(state, input_values=torch.ones(2, 1))
    assert all(torch.equal(b, s) for b, s in zip(before, state.ssm_states, strict=True))
    assert state.steps == 0 and new_state.steps == 1
    assert not torch.equal(new_state.ssm_states[0], state.ssm_states[0])
    torch.testing.assert_close(again, repeat)


def test_streaming_rejects_state_of_other_batch_or_model():
    model = S4DSSModel(S4DSSConfig(d_model=8, n_layers=2, d_state=4)).eval()
    other = S4DSSModel(S4DSSConfig(d_model=8, n_layers=1, d_state=4)).eval()
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model.streaming_step(model.init_streaming_state(2), input_values=torch.randn(3, 1))
    with pytest.raises(ValueError, match="init_streaming_state"):
        model.streaming_step(other.init_streaming_state(2), input_values=torch.randn(2, 1))
    with pytest.raises(ValueError, match="dimensions"):
        model.streaming_step(model.init_streaming_state(2), input_values=torch.randn(2, 5, 1))


def test_streaming_refuses_states_that_do_not_fit_naming_the_layer():
    from s4bt_hf import S4DSSStreamingState

    torch.manual_seed(3)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=8, n_layers=2, d_state=[4, 3],
                                                       num_labels=2, pooling="mean")).eval()
    inputs = torch.randn(3, 1)
    state = model.init_streaming_state(3)
    one = model.init_streaming_state(1)
    with torch.no_grad():
        _, after_one = model.streaming_step(state, input_values=inputs)
        with pytest.raises(ValueError, match=r"it has 2 layers, the state holds 1 layer states"):
            model.streaming_step(S4DSSStreamingState(state.ssm_states[:1]), input_values=inputs)
        with pytest.raises(ValueError, match=r"\(layer 1\) holds 1 sequences but the input has 3"):
            model.streaming_step(S4DSSStreamingState((state.ssm_states[0], one.ssm_states[1])), input_values=inputs)
        with pytest.raises(TypeError, match=r"`state.ssm_states\[0\]` \(layer 0\) must be torch.complex64, "
                                            r"got torch.complex128"):
            model.streaming_step(S4DSSStreamingState((state.ssm_states[0].to(torch.complex128),
                                                      state.ssm_states[1])), input_values=inputs)
        with pytest.raises(ValueError, match=r"`state.steps` counts the positions consumed: .* got -1"):
            model.streaming_step(S4DSSStreamingState(state.ssm_states, steps=-1), input_values=inputs)  # was NaN
        with pytest.raises(ValueError, match=r"`state.pooled_sum` is None after 1 steps"):
            model.streaming_step(S4DSSStreamingState(after_one.ssm_states, steps=1), input_values=inputs)
        with pytest.raises(ValueError, match=r"`state.pooled_sum` must be torch.float32 of shape \(3, 8\)"):
            model.streaming_step(S4DSSStreamingState(after_one.ssm_states, 1, after_one.pooled_sum[:1]),
                                 input_values=inputs)
        with pytest.raises(TypeError, match="S4DSSStreamingState"):
            model.streaming_step(list(state.ssm_states), input_values=inputs)
