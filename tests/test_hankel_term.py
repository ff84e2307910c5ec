"""`HankelTerm`: the penalty's term in the training loss. Without reuse, k·λ·Σσ on one step in k;
with reuse, λ·Σσ and its exact gradient on the evaluation steps and that same (stale) gradient on
the steps in between; its state survives a checkpoint, and a run resumed between two evaluations
ends bit-identical to an uninterrupted one, in the Accelerate loop and in S4DSSTrainer."""

import shutil

import pytest
import torch
from train_child import toy_dataset

import s4bt_hf
from s4bt_hf.training import S4DSSTrainer, TrainingConfig, latest_checkpoint, train
from s4bt_hf.training.hankel_term import HankelTerm, penalised_parameters


def tiny_model(d_state=4, seed=0):
    torch.manual_seed(seed)
    return s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(d_model=6, n_layers=2, d_state=d_state, num_labels=2)).double()


def term_gradients(term, model):
    return torch.autograd.grad(term, penalised_parameters(model))


def exact_gradients(model):
    return torch.autograd.grad(s4bt_hf.hankel_penalty(model), penalised_parameters(model))


def nudge(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in penalised_parameters(model):
            parameter.add_(1e-2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def test_without_reuse_the_term_is_k_times_the_penalty_on_one_step_in_k():
    model = tiny_model()
    hankel = HankelTerm(0.5, every=3)
    for step in range(7):
        term, value = hankel.loss_term(model, step)
        if step % 3:
            assert term is None and value is None
        else:
            exact = s4bt_hf.hankel_penalty(model)
            assert value == pytest.approx(exact.item(), rel=1e-12)
            assert term.item() == pytest.approx(1.5 * exact.item(), rel=1e-12)
    assert HankelTerm(0.0, every=1).loss_term(model, 0) == (None, None)


def test_with_reuse_the_gradient_is_exact_when_due_and_held_in_between():
    model = tiny_model()
    hankel = HankelTerm(0.5, every=3, reuse=True)
    term, value = hankel.loss_term(model, 0)  # due: the exact penalty and gradient, weight λ (not k·λ)
    first = exact_gradients(model)
    assert value == pytest.approx(s4bt_hf.hankel_penalty(model).item(), rel=1e-12)
    assert term.item() == pytest.approx(0.5 * value, rel=1e-12)
    for got, want in zip(term_gradients(term, model), first, strict=True):
        torch.testing.assert_close(got, 0.5 * want, rtol=1e-12, atol=0)
    for step in (1, 2):  # parameters moved, nothing due: the gradient of step 0, no fresh value
        nudge(model, step)
        term, value = hankel.loss_term(model, step)
        assert value is None and term.item() == pytest.approx(0.5 * hankel.value, rel=1e-12)
        moved = exact_gradients(model)
        assert any(not torch.allclose(a, b) for a, b in zip(moved, first, strict=True))  # a stale gradient indeed
        for got, want in zip(term_gradients(term, model), first, strict=True):
            torch.testing.assert_close(got, 0.5 * want, rtol=1e-12, atol=0)
    term, value = hankel.loss_term(model, 3)  # due again: the gradient at the current parameters
    assert value is not None
    for got, want in zip(term_gradients(term, model), exact_gradients(model), strict=True):
        torch.testing.assert_close(got, 0.5 * want, rtol=1e-12, atol=0)


def test_kept_gradient_is_dropped_for_other_parameters_and_survives_its_state_dict():
    model = tiny_model()
    hankel = HankelTerm(1.0, every=4, reuse=True)
    hankel.loss_term(model, 0)
    restored = HankelTerm(1.0, every=4, reuse=True)
    restored.load_state_dict(hankel.state_dict())
    _, value = restored.loss_term(model, 1)
    assert value is None  # matched by shape: the checkpoint's gradient is used
    smaller = tiny_model(d_state=2)  # other shapes (as after a reduction): evaluated afresh, not due or not
    _, value = restored.loss_term(smaller, 2)
    assert value == pytest.approx(s4bt_hf.hankel_penalty(smaller).item(), rel=1e-12)
    other = tiny_model(seed=1)  # same shapes, other tensors: evaluated afresh too
    _, value = restored.loss_term(other, 3)
    assert value == pytest.approx(s4bt_hf.hankel_penalty(other).item(), rel=1e-12)
    restored.clear()
    _, value = restored.loss_term(other, 5)
    assert value is not None


def run_config(output_dir, **changes):
    fields = dict(output_dir=str(output_dir), max_steps=6, batch_size=8, progress=False, log_every=1,
                  save_every=3, hankel_weight=0.5, hankel_every=2, hankel_reuse=True)
    fields.update(changes)
    return TrainingConfig(**fields)


def test_reuse_in_the_accelerate_loop_and_a_resume_from_mid_period(tmp_path):
    """6 steps, evaluations at steps 0, 2 and 4, a checkpoint after step 3. Deleting `final/` and
    training again resumes from that checkpoint and must end bit-identical to the uninterrupted run."""
    data = toy_dataset(64, seed=1)
    model = tiny_model().float()
    train(model, data, None, run_config(tmp_path / "reuse"))
    records = [row for row in (tmp_path / "reuse" / "metrics.jsonl").read_text().splitlines() if "loss" in row]
    assert ['"hankel_penalty"' in row for row in records] == [True, False, True, False, True, False]
    skipping = tiny_model().float()
    train(skipping, data, None, run_config(tmp_path / "skip", hankel_reuse=False))
    reused, skipped = (s4bt_hf.hankel_penalty(m).item() for m in (model, skipping))
    assert reused != skipped  # the steps in between got the penalty's gradient, not nothing
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    assert latest_checkpoint(str(tmp_path / "reuse")).endswith("step_3")
    shutil.rmtree(tmp_path / "reuse" / "final")
    resumed_model = tiny_model().float()
    result = train(resumed_model, data, None, run_config(tmp_path / "reuse"))
    assert result.resumed_from == 3
    assert all(torch.equal(uninterrupted[k], v) for k, v in resumed_model.state_dict().items())


def test_trainer_with_reuse_resumes_from_mid_period_to_the_same_weights(tmp_path):
    """5 steps, evaluations at steps 0, 2 and 4, a checkpoint after step 3: step 4 (index 3) uses
    step 2's gradient, which must come back from the checkpoint."""
    from transformers import TrainingArguments

    data = toy_dataset(48, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, max_steps=5,
                             save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, learning_rate=1e-2)
    options = dict(hankel_weight=1.0, hankel_every=2, hankel_reuse=True)
    model = tiny_model().float()
    S4DSSTrainer(model=model, args=args, train_dataset=data, **options).train()
    checkpoint = tmp_path / "t" / "checkpoint-3"
    assert (checkpoint / "hankel_term.pt").exists()
    resumed_model = tiny_model().float()
    S4DSSTrainer(model=resumed_model, args=args, train_dataset=data, **options).train(
        resume_from_checkpoint=str(checkpoint))
    expected, actual = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_trainer_with_reuse_logs_only_evaluations(tmp_path):
    from transformers import TrainingArguments

    data = toy_dataset(32, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, num_train_epochs=1,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    model = tiny_model().float()
    trainer = S4DSSTrainer(model=model, args=args, train_dataset=data, hankel_weight=1.0, hankel_every=2,
                           hankel_reuse=True)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [("hankel_penalty" in row) for row in rows] == [True, False, True, False]
    # every step's loss holds the weighted term (1 · Σσ at the last evaluation), not only the due ones
    assert rows[1]["loss"] == pytest.approx(rows[1]["task_loss"] + rows[0]["hankel_penalty"], rel=1e-3)
    with pytest.raises(TypeError, match="hankel_reuse"):
        S4DSSTrainer(model=tiny_model(), args=args, hankel_reuse="yes")
    with pytest.raises(TypeError, match="hankel_reuse"):
        TrainingConfig(output_dir="x", hankel_reuse=1)


def test_reuse_with_every_ssm_parameter_frozen_falls_back_to_the_plain_rule():
    model = tiny_model()
    for parameter in penalised_parameters(model):
        parameter.requires_grad_(False)
    hankel = HankelTerm(0.5, every=2, reuse=True)
    term, value = hankel.loss_term(model, 0)
    assert term.item() == pytest.approx(1.0 * value, rel=1e-12) and not term.requires_grad
    assert hankel.loss_term(model, 1) == (None, None)
