"""The cached streaming step (never stale) and the real-arithmetic streaming module."""

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel
from s4bt_hf.modeling_s4dss import S4DSSStreamingState


def stream(model, state, key, inputs):
    outputs = []
    for t in range(inputs.shape[1]):
        output, state = model.streaming_step(state, **{key: inputs[:, t]})
        outputs.append(output)
    return torch.stack(outputs, dim=1)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(input_dim=1, d_model=8, n_layers=2, d_state=[5, 3], norm="batch", prenorm=False)
    fields.update(overrides)
    return S4DSSModel(S4DSSConfig(**fields)).eval()


def test_step_system_is_cached_between_steps():
    model = small_model()
    kernel = model.layers[0].kernel
    model.init_streaming_state(1)
    with torch.no_grad():
        first = kernel.step_system()
        assert all(a is b for a, b in zip(first, kernel.step_system(), strict=True))
    # while autograd records for trainable parameters it is computed afresh, with a graph
    with torch.enable_grad():
        assert kernel.step_system()[0].requires_grad


def test_cache_is_rebuilt_after_an_optimizer_step():
    model = small_model()
    inputs = torch.randn(2, 30, 1)
    zero_state = model.init_streaming_state(2)  # states are never modified: reused after the step
    with torch.no_grad():
        before = stream(model, zero_state, "input_values", inputs)  # fills the cache
    # only the SSM moves, so any change of the outputs has to come through the step system
    optimizer = torch.optim.Adam([p for layer in model.layers for p in layer.kernel.parameters()], lr=0.5)
    model(input_values=inputs).last_hidden_state.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(input_values=inputs).last_hidden_state
        after = stream(model, zero_state, "input_values", inputs)
    assert (expected - before).abs().max() > 1e-3  # the step changed the model: a stale cache would fail
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_cache_is_rebuilt_after_load_state_dict_and_dtype_change():
    model, other = small_model(seed=0), small_model(seed=1)
    inputs = torch.randn(2, 25, 1)
    zero_state = model.init_streaming_state(2)
    with torch.no_grad():
        stream(model, zero_state, "input_values", inputs)
        model.load_state_dict(other.state_dict())
        expected = other(input_values=inputs).last_hidden_state
        torch.testing.assert_close(stream(model, zero_state, "input_values", inputs), expected, rtol=1e-5, atol=1e-5)
        model.to(torch.float64)
        zero64 = S4DSSStreamingState(tuple(s.to(torch.complex128) for s in zero_state.ssm_states))
        expected64 = model(input_values=inputs.double()).last_hidden_state
        streamed64 = stream(model, zero64, "input_values", inputs.double())
    assert model.layers[0].kernel.step_system()[0].dtype == torch.complex128
    torch.testing.assert_close(streamed64, expected64, rtol=1e-10, atol=1e-10)


def test_edit_through_data_is_seen_by_the_next_stream():
    """`param.data` edits bypass the version counter; a new `init_streaming_state` rebuilds."""
    model = small_model()
    inputs = torch.randn(1, 20, 1)
    with torch.no_grad():
        stream(model, model.init_streaming_state(1), "input_values", inputs)
        model.layers[1].kernel.C.data.mul_(-3.0)
        expected = model(input_values=inputs).last_hidden_state
        streamed = stream(model, model.init_streaming_state(1), "input_values", inputs)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


def test_streaming_gradients_equal_forward_gradients():
    model = small_model(norm="layer", prenorm=True)
    inputs = torch.randn(2, 12, 1)
    model(input_values=inputs).last_hidden_state.sum().backward()
    expected = model.layers[0].kernel.log_A_real.grad.clone()
    model.zero_grad()
    stream(model, model.init_streaming_state(2), "input_values", inputs).sum().backward()
    torch.testing.assert_close(model.layers[0].kernel.log_A_real.grad, expected, rtol=1e-4, atol=1e-5)


def run_real_module(module, inputs):
    state = module.initial_state(inputs.shape[0])
    outputs = []
    for t in range(inputs.shape[1]):
        output, *state = module(inputs[:, t], *state)
        outputs.append(output)
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_real_module_equals_streaming_step_over_1000_steps(pooling):
    torch.manual_seed(3)
    config = S4DSSConfig(input_dim=2, d_model=8, n_layers=2, d_state=[6, 2], norm="batch", pooling=pooling,
                         num_labels=3, dt_min=0.001, dt_max=0.01)  # slow modes: the state carries over 1,000 steps
    model = S4DSSForSequenceClassification(config)
    inputs = torch.randn(2, 1000, 2)
    model.train()
    with torch.no_grad():
        model(input_values=inputs[:, :50])  # BatchNorm statistics that are not the identity
    model.eval()
    module = model.streaming_module()
    with torch.no_grad():
        expected = stream(model, model.init_streaming_state(2), "input_values", inputs)
        real_outputs, real_state = run_real_module(module, inputs)
    assert all(not t.is_complex() for t in [*module.state_dict().values(), *real_state])
    assert [tuple(t.shape) for t in real_state] == module.state_shapes(2)
    assert len(real_state) == 2 + (2 if pooling == "mean" else 0)
    torch.testing.assert_close(real_outputs, expected, rtol=1e-5, atol=1e-5)


def test_real_module_of_a_token_backbone_equals_forward():
    torch.manual_seed(4)
    model = S4DSSModel(S4DSSConfig(vocab_size=7, d_model=6, n_layers=2, d_state=3)).to(torch.float64).eval()
    tokens = torch.randint(0, 7, (3, 40))
    module = model.streaming_module()
    with torch.no_grad():
        outputs, state = run_real_module(module, tokens)
        expected = model(input_ids=tokens).last_hidden_state
    assert state[0].dtype == torch.float64 and state[0].shape == (3, 6, 3, 2)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-10)


def test_real_module_is_a_snapshot_and_refuses_what_cannot_stream():
    model = small_model()
    module = model.streaming_module()
    with torch.no_grad():
        model.layers[0].kernel.C.mul_(2.0)  # the snapshot keeps the parameters it was built from
    assert not torch.equal(module.blocks[0].c_re, model.layers[0].kernel.step_system()[2].real)
    with pytest.raises(ValueError, match="eval"):
        small_model().train().streaming_module()
    with pytest.raises(ValueError, match="bidirectional"):
        small_model(bidirectional=True).streaming_module()
    with pytest.raises(ValueError, match="batch_size"):
        module.initial_state(0)


# ---------------------------------------------------------------- whole-sequence chunked path
def random_system(num_channels, num_modes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    log_a_bar = torch.complex(-0.2 * torch.rand(num_channels, num_modes, generator=generator, dtype=dtype),
                              torch.randn(num_channels, num_modes, generator=generator, dtype=dtype))
    weights = torch.randn(num_channels, num_modes, generator=generator, dtype=complex_dtype)
    return log_a_bar, weights


@pytest.mark.parametrize("length, chunk", [(1, 4), (37, 8), (64, 64), (100, 16), (300, 32)])
def test_chunked_convolution_equals_fft_in_float64(length, chunk):
    from s4bt_hf.kernel_s4dss import chunked_convolution, fft_convolution, vandermonde_kernel

    log_a_bar, weights = random_system(5, 4, torch.float64, seed=length)
    inputs = torch.randn(3, length, 5, dtype=torch.float64)
    expected = fft_convolution(inputs.transpose(1, 2), vandermonde_kernel(log_a_bar, weights[None], length))
    chunked = chunked_convolution(inputs, log_a_bar, weights, chunk)
    assert chunked.shape == (3, length, 5)
    torch.testing.assert_close(chunked, expected.transpose(1, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("norm, prenorm", [("layer", True), ("batch", False)])
def test_model_forward_is_the_same_through_fft_and_chunked_paths(dtype, tolerance, norm, prenorm):
    torch.manual_seed(5)
    model = S4DSSModel(S4DSSConfig(input_dim=2, d_model=8, n_layers=2, d_state=[4, 2], norm=norm,
                                   prenorm=prenorm)).to(dtype).eval()
    inputs = torch.randn(3, 150, 2, dtype=dtype)
    mask = torch.ones(3, 150, dtype=torch.long)
    mask[1, 120:] = 0
    outputs = {}
    for mode in ("fft", "chunked"):
        for layer in model.layers:
            layer.kernel.convolution = mode
        with torch.no_grad():
            outputs[mode] = model(input_values=inputs, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(outputs["chunked"], outputs["fft"], rtol=tolerance, atol=tolerance)


def test_chunked_path_gradients_equal_fft_gradients():
    torch.manual_seed(6)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=6, n_layers=2, d_state=3,
                                                       num_labels=2)).to(torch.float64)
    inputs, labels = torch.randn(2, 70, 1, dtype=torch.float64), torch.tensor([0, 1])
    gradients = {}
    for mode in ("fft", "chunked"):
        for layer in model.s4dss.layers:
            layer.kernel.convolution = mode
        model.zero_grad()
        model(input_values=inputs, labels=labels).loss.backward()
        gradients[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in gradients["fft"].items():
        torch.testing.assert_close(gradients["chunked"][name], grad, rtol=1e-9, atol=1e-11, msg=name)


def test_cost_rule_picks_chunked_for_small_rank_only_and_never_for_bidirectional(monkeypatch):
    import s4bt_hf.modeling_s4dss as modeling
    from s4bt_hf.kernel_s4dss import convolution_chunk

    assert convolution_chunk(8, 4096) is not None and convolution_chunk(64, 4096) is None
    assert convolution_chunk(2, 784) is not None and convolution_chunk(64, 784) is None
    assert convolution_chunk(64, 4096, force=True) == 128
    assert convolution_chunk(1, 5, force=True) == 8  # never longer than the sequence needs
    calls = []
    monkeypatch.setattr(modeling, "chunked_convolution",
                        lambda *args: calls.append(args[-1]) or torch.zeros(args[0].shape))
    small = S4DSSModel(S4DSSConfig(input_dim=1, d_model=4, n_layers=1, d_state=2)).eval()
    small(input_values=torch.randn(1, 1000, 1))
    assert calls == [convolution_chunk(2, 1000)]
    S4DSSModel(S4DSSConfig(input_dim=1, d_model=4, n_layers=1, d_state=2, bidirectional=True))(
        input_values=torch.randn(1, 1000, 1))
    assert len(calls) == 1
    small.layers[0].kernel.convolution = "fast"
    with pytest.raises(ValueError, match="convolution"):
        small(input_values=torch.randn(1, 10, 1))


def test_real_module_of_a_bfloat16_classifier_counts_exactly():
    torch.manual_seed(7)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=4, n_layers=1, d_state=2,
                                                       num_labels=2)).to(torch.bfloat16).eval()
    module = model.streaming_module()
    inputs = torch.randn(1, 300, 1, dtype=torch.bfloat16)
    with torch.no_grad():
        outputs, state = run_real_module(module, inputs)
        expected = stream(model, model.init_streaming_state(1), "input_values", inputs)
    assert state[-1].dtype == torch.float32 and float(state[-1]) == 300.0  # bf16 would stop at 256
    torch.testing.assert_close(outputs, expected, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- the real module: a frozen copy that checks its states
def model_tensors(model):
    return [*model.parameters(), *model.buffers()]


def test_real_module_shares_no_storage_and_survives_training_of_the_model():
    torch.manual_seed(8)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=6, n_layers=2, d_state=[4, 3],
                                                       norm="batch", pooling="mean", num_labels=2)).eval()
    module = model.streaming_module()
    model_storages = {t.untyped_storage().data_ptr() for t in model_tensors(model)}
    assert not [name for name, t in [*module.named_parameters(), *module.named_buffers()]
                if t.untyped_storage().data_ptr() in model_storages]
    assert not any(p.requires_grad for p in module.parameters())
    inputs = torch.randn(2, 40, 1)
    with torch.no_grad():
        before, _ = run_real_module(module, inputs)
    # train the model (every parameter moves), then edit the skip term in place
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(input_values=inputs, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        for layer in model.s4dss.layers:
            layer.kernel.D.mul_(-4.0)
        after, _ = run_real_module(module, inputs)
        moved = model(input_values=inputs).logits
    assert (moved - before[:, -1]).abs().max() > 0.5 * before[:, -1].abs().max()  # the model did change
    assert torch.equal(after, before)
    # and the other way: editing the module leaves the model alone
    expected = moved.clone()
    with torch.no_grad():
        for block in module.blocks:
            block.d.mul_(3.0)
            block.output_linear.weight.mul_(3.0)
        assert torch.equal(model(input_values=inputs).logits, expected)


def test_real_module_refuses_states_that_do_not_fit():
    torch.manual_seed(9)
    model = S4DSSForSequenceClassification(S4DSSConfig(vocab_size=16, d_model=6, n_layers=2, d_state=[4, 3],
                                                       pooling="mean", num_labels=2)).eval()
    module = model.streaming_module()
    tokens = torch.tensor([1, 2, 3])
    state = module.initial_state(3)
    with torch.no_grad():
        module(tokens, *state)  # fits
        with pytest.raises(ValueError, match=r"takes 4 states \(ssm_state_0, ssm_state_1, pooled_sum, pooled_count\), "
                                             r"got 3"):
            module(tokens, state[0], *state[2:])  # a missing layer state: it used to skip layer 1
        one = module.initial_state(1)
        with pytest.raises(ValueError, match=r"State 1 `ssm_state_1` \(layer 1\) must be torch.float32 of shape "
                                             r"\(3, 6, 3, 2\) \(batch 3.*got torch.float32 of shape \(1, 6, 3, 2\)"):
            module(tokens, state[0], one[1], *state[2:])  # a batch-1 state: it used to broadcast to batch 3
        with pytest.raises(ValueError, match=r"State 0 `ssm_state_0` \(layer 0\) must be torch.float32.*torch.float64"):
            module(tokens, state[0].double(), *state[1:])
        with pytest.raises(ValueError, match=r"State 3 `pooled_count` \(mean pooling\) must be"):
            module(tokens, *state[:3], state[3][:, 0])
        with pytest.raises(ValueError, match=r"`pooled_count` counts the positions read \(>= 0\), got -1"):
            module(tokens, *state[:3], state[3] - 1)  # a hand-made count of -1: it used to give inf/NaN
        with pytest.raises(ValueError, match=r"token ids outside the vocabulary \[0, 16\): min -1, max 3"):
            module(torch.tensor([-1, 2, 3]), *state)
        with pytest.raises(ValueError, match=r"`inputs` of one position must be \(batch,\) token ids, got \(3, 1\)"):
            module(tokens[:, None], *state)
        with pytest.raises(TypeError, match="`inputs` must be an integer tensor, got torch.float32"):
            module(tokens.float(), *state)
    module.double()  # the states it expects follow the module's dtype
    with torch.no_grad():
        module(tokens, *module.initial_state(3))
        with pytest.raises(ValueError, match="must be torch.float64"):
            module(tokens, *state)


def test_real_module_checks_cost_a_few_microseconds_and_vanish_from_the_exported_graph():
    module = small_model(d_model=16, n_layers=2, d_state=8).streaming_module()
    inputs = torch.zeros(1, 1)
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch}, tuple({0: batch} for _ in module.state_names()))

    def exported_ops():
        program = torch.export.export(module, module.example_inputs(2), dynamic_shapes=dynamic)
        return [str(node.target) for node in program.graph.nodes]

    with_checks = exported_ops()
    module.check_call = lambda *args: None
    assert with_checks == exported_ops()  # the checks add no node (no guard, no assert) to the graph
    del module.check_call
    import timeit

    state = module.initial_state(1)
    per_call = min(timeit.repeat(lambda: module.check_call(inputs, state), number=200, repeat=5)) / 200
    assert per_call < 200e-6  # typically ~10 µs; loose for a loaded machine
