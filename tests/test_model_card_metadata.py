"""Hub metadata of the generated model cards: library, pipeline tag, tags, licence (none unless
given), datasets, base model and model-index, built with huggingface_hub's card utilities and read
back by them; kept through save/load, derived by a reduction, and written by
`S4DSSTrainer.create_model_card` (what `trainer.push_to_hub` calls) with the Trainer's results."""

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import TrainingArguments

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.data.collate import PadCollator
from s4bt_hf.metrics import compute_accuracy_metrics
from s4bt_hf.model_card import GENERATED_MARKER
from s4bt_hf.training import S4DSSTrainer


def signal_model(**config):
    torch.manual_seed(0)
    fields = {"input_dim": 1, "d_model": 4, "n_layers": 1, "d_state": 4, "num_labels": 2, **config}
    return S4DSSForSequenceClassification(S4DSSConfig(**fields)).eval()


def test_card_metadata_round_trips_through_huggingface_hub(tmp_path):
    model = signal_model()
    model.card_info = {"license": "mit", "datasets": ["my-series"], "data": "Series from our lab, 2026.",
                       "eval_results": [{"task_type": "audio-classification", "dataset_name": "my-series",
                                         "dataset_type": "my-series", "dataset_split": "test",
                                         "metric_type": "accuracy", "metric_value": 0.875}]}
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert GENERATED_MARKER in card.content and "Series from our lab, 2026." in card.content
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "audio-classification", "mit")
    assert data.datasets == ["my-series"] and "s4bt-hf" in data.tags
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("accuracy", 0.875, "test")
    loaded = S4DSSForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.card_info == model.card_info


def test_defaults_make_up_nothing_and_pipeline_tags_follow_the_inputs(tmp_path):
    for config, tag in (({}, "audio-classification"), ({"input_dim": 3}, None),
                        ({"input_dim": None, "vocab_size": 12}, "text-classification")):
        model = signal_model(**config)
        model.save_pretrained(tmp_path / str(tag))
        data = ModelCard.load(tmp_path / str(tag) / "README.md").data
        assert data.pipeline_tag == tag
        assert data.license is None and data.datasets is None and data.base_model is None
        assert not data.eval_results
        assert S4DSSForSequenceClassification.from_pretrained(tmp_path / str(tag)).card_info is None


def test_a_reduced_model_names_its_original_as_base_model(tmp_path):
    original = signal_model()
    original.card_info = {"license": "mit", "eval_results": [{
        "task_type": "audio-classification", "dataset_name": "d", "dataset_split": "test", "metric_type": "accuracy",
        "metric_value": 0.9}]}
    original.save_pretrained(tmp_path / "original")
    loaded = S4DSSForSequenceClassification.from_pretrained(tmp_path / "original")
    small = loaded.reduce("balanced_truncation", rank=2)
    assert small.card_info == {"license": "mit", "base_model": str(tmp_path / "original")}
    assert loaded.card_info["eval_results"]  # the original keeps its own
    small.save_pretrained(tmp_path / "small")
    data = ModelCard.load(tmp_path / "small" / "README.md").data
    assert data.base_model == str(tmp_path / "original") and not data.eval_results


def test_trainer_writes_the_package_card_with_its_results(tmp_path):
    values = torch.randn(24, 8, 1, generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_values": values.numpy(),
                                       "labels": (values.mean((1, 2)) > 0).long().numpy()}).with_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             eval_strategy="steps", eval_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                             learning_rate=0.01, seed=3, disable_tqdm=True)
    trainer = S4DSSTrainer(model=signal_model().reduce("balanced_truncation", rank=2), args=args, train_dataset=data,
                           eval_dataset=data, data_collator=PadCollator(), compute_metrics=compute_accuracy_metrics)
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.create_model_card(license="apache-2.0", dataset="toy-series", finetuned_from="me/original",
                              model_name="toy", tags="demo")
    card = ModelCard.load(tmp_path / "run" / "README.md")
    for section in ("## Compression", "## Training procedure", "- learning_rate: 0.01", "- seed: 3",
                    "| accuracy |", "Balanced truncation"):
        assert section in card.content, section
    assert GENERATED_MARKER in card.content
    meta = card.data
    assert (meta.license, meta.datasets, meta.base_model) == ("apache-2.0", ["toy-series"], "me/original")
    assert "demo" in meta.tags and "s4bt-hf" in meta.tags
    (result,) = meta.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == pytest.approx(accuracy)
    assert (result.dataset_name, result.dataset_split) == ("toy-series", "validation")
