"""S4DSSFeatureExtractor: statistics against numpy in float64, every accepted input form, padding,
truncation and masks, clear errors, save/load (also as remote code without the package), and the
pipelines: audio-classification for a one-channel signal classifier, text-classification with a
BERT-style tokenizer (token_type_ids accepted and ignored)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hidden_package import HIDE_S4BT_HF
from transformers import AutoFeatureExtractor, PreTrainedTokenizerFast, pipeline

from s4bt_hf import S4DSSConfig, S4DSSFeatureExtractor, S4DSSForSequenceClassification


def ragged(seed=0, channels=2, lengths=(7, 12, 9)):
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0, 2.5, size=(length, channels)) * np.arange(1, channels + 1) for length in lengths]


def test_fit_matches_float64_statistics_over_every_position():
    sequences = ragged()
    extractor = S4DSSFeatureExtractor(feature_size=2).fit(sequences)
    stacked = np.concatenate(sequences)
    np.testing.assert_allclose(extractor.mean, stacked.mean(0), rtol=1e-12)
    np.testing.assert_allclose(extractor.std, stacked.std(0), rtol=1e-12)
    constant = S4DSSFeatureExtractor().fit([np.full(5, 4.0), np.full(3, 4.0)])
    assert constant.mean == [4.0] and constant.std == [1.0]  # centred, not scaled by a zero spread


def test_ragged_batch_is_normalised_padded_and_masked():
    sequences = ragged()
    extractor = S4DSSFeatureExtractor(feature_size=2, padding_value=-7.0).fit(sequences)
    batch = extractor(sequences, return_tensors="pt")
    assert batch["input_values"].shape == (3, 12, 2) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 5, [1] * 12, [1] * 9 + [0] * 3]
    for index, sequence in enumerate(sequences):
        length = len(sequence)
        expected = (sequence - np.array(extractor.mean)) / np.array(extractor.std)
        np.testing.assert_allclose(batch["input_values"][index, :length].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert (batch["input_values"][index, length:] == -7.0).all()


@pytest.mark.parametrize("form", ["list_1d", "numpy_1d", "torch_1d", "numpy_l1", "numpy_batch_2d", "torch_batch_2d",
                                  "nested_lists", "list_of_tensors"])
def test_one_channel_input_forms(form):
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(2, 6))
    inputs = {
        "list_1d": batch[0].tolist(), "numpy_1d": batch[0], "torch_1d": torch.tensor(batch[0]),
        "numpy_l1": batch[0][:, None], "numpy_batch_2d": batch, "torch_batch_2d": torch.tensor(batch),
        "nested_lists": batch.tolist(), "list_of_tensors": [torch.tensor(row) for row in batch],
    }[form]
    output = S4DSSFeatureExtractor()(inputs, return_tensors="np")
    expected = batch[:1] if form in ("list_1d", "numpy_1d", "torch_1d", "numpy_l1") else batch
    np.testing.assert_allclose(output["input_values"][..., 0], expected, rtol=1e-6)
    assert output["input_values"].shape == (*expected.shape, 1)


@pytest.mark.parametrize("form", ["one_lc", "nested_lc", "batch_blc", "ragged_list"])
def test_multichannel_input_forms(form):
    sequences = ragged(lengths=(5, 5))
    inputs = {"one_lc": sequences[0], "nested_lc": sequences[0].tolist(), "batch_blc": np.stack(sequences),
              "ragged_list": sequences}[form]
    output = S4DSSFeatureExtractor(feature_size=2)(inputs, return_tensors="np")
    expected = np.stack(sequences[:1] if form in ("one_lc", "nested_lc") else sequences)
    np.testing.assert_allclose(output["input_values"], expected, rtol=1e-6)


def test_truncation_max_length_and_multiple_of():
    extractor = S4DSSFeatureExtractor()
    sequences = [np.arange(10.0), np.arange(3.0)]
    cut = extractor(sequences, padding="max_length", max_length=6, truncation=True, return_tensors="np")
    assert cut["input_values"].shape == (2, 6, 1)
    np.testing.assert_array_equal(cut["input_values"][0, :, 0], np.arange(6.0))
    assert cut["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    rounded = extractor(sequences, pad_to_multiple_of=4, return_tensors="np")
    assert rounded["input_values"].shape == (2, 12, 1)
    unpadded = extractor(sequences, padding=False)
    assert [values.shape for values in unpadded["input_values"]] == [(10, 1), (3, 1)]


@pytest.mark.parametrize("inputs, message", [
    ([np.ones((3, 2)), np.array([[1.0, 2.0], [np.nan, 0.0]])], r"sequence 1 holds nan at position 1, channel 0"),
    ([np.ones((4, 2)), np.array([[1.0, np.inf], [1.0, 1.0]])], r"sequence 1 holds inf at position 0, channel 1"),
    ([np.ones((4, 3))], r"sequence 0 has shape \(4, 3\); expected \(L, 2\)"),
    ([[[1.0, 2.0], [3.0]]], r"sequence 0 holds a non-numeric value or channels of different lengths"),
    ([[["a", "b"], ["c", "d"]]], r"sequence 0 holds a non-numeric value"),
    ([], r"got no sequence"),
    ([np.zeros((0, 2))], r"sequence 0 is empty"),
])
def test_bad_sequences_are_named(inputs, message):
    with pytest.raises(ValueError, match=message):
        S4DSSFeatureExtractor(feature_size=2)(inputs if inputs else [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling rate 16000 differs"):
        S4DSSFeatureExtractor(sampling_rate=100)([1.0, 2.0], sampling_rate=16000)
    with pytest.raises(ValueError, match="need 2 values"):
        S4DSSFeatureExtractor(feature_size=2, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="std` finite and positive"):
        S4DSSFeatureExtractor(mean=[0.0], std=[0.0])
    with pytest.raises(TypeError, match="numpy array, torch tensor or list"):
        S4DSSFeatureExtractor()("1, 2, 3")


def signal_classifier(tmp_path):
    """A saved one-channel classifier with its fitted feature extractor."""
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=1, d_model=8, n_layers=2, d_state=4, num_labels=3,
                         id2label={0: "low", 1: "mid", 2: "high"}, label2id={"low": 0, "mid": 1, "high": 2})
    model = S4DSSForSequenceClassification(config).eval()
    extractor = S4DSSFeatureExtractor(sampling_rate=50).fit([np.random.default_rng(2).normal(5.0, 3.0, 40)])
    folder = tmp_path / "signal"
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return model, extractor, folder


def test_saved_with_the_model_and_loaded_by_auto_feature_extractor(tmp_path):
    _, extractor, folder = signal_classifier(tmp_path)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["mean"] == extractor.mean and saved["std"] == extractor.std
    assert saved["auto_map"]["AutoFeatureExtractor"] == "feature_extraction_s4dss.S4DSSFeatureExtractor"
    loaded = AutoFeatureExtractor.from_pretrained(folder)
    assert isinstance(loaded, S4DSSFeatureExtractor)
    assert (loaded.mean, loaded.std, loaded.sampling_rate) == (extractor.mean, extractor.std, 50)


def test_model_reads_the_extractor_output_and_ignores_padding(tmp_path):
    model, extractor, _ = signal_classifier(tmp_path)
    rng = np.random.default_rng(3)
    signals = [rng.normal(5.0, 3.0, 17), rng.normal(5.0, 3.0, 11)]
    with torch.no_grad():
        batched = model(**extractor(signals, return_tensors="pt")).logits
        alone = [model(**extractor(signal, return_tensors="pt")).logits[0] for signal in signals]
        by_hand = model(input_values=torch.tensor((signals[0] - extractor.mean[0]) / extractor.std[0],
                                                  dtype=torch.float32)[None, :, None]).logits[0]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], by_hand, rtol=1e-5, atol=1e-6)


def test_audio_classification_pipeline_on_a_saved_folder(tmp_path):
    model, extractor, folder = signal_classifier(tmp_path)
    classify = pipeline("audio-classification", model=str(folder), top_k=3)
    signal = np.random.default_rng(4).normal(5.0, 3.0, 30).astype(np.float32)
    scores = classify(signal)
    with torch.no_grad():
        expected = model(**extractor(signal, return_tensors="pt")).logits[0].softmax(-1)
    assert {entry["label"] for entry in scores} == {"low", "mid", "high"}
    for entry in scores:
        assert entry["score"] == pytest.approx(expected[model.config.label2id[entry["label"]]].item(), rel=1e-5)


def bert_style_tokenizer():
    """A WordLevel tokenizer that emits token_type_ids, as BERT's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "good", "bad", "movie", "very", "plot"]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def test_bert_style_tokenizer_and_text_classification_pipeline(tmp_path):
    tokenizer = bert_style_tokenizer()
    torch.manual_seed(0)
    config = S4DSSConfig(vocab_size=len(tokenizer), pad_token_id=0, d_model=8, n_layers=1, d_state=4, num_labels=2,
                         id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = S4DSSForSequenceClassification(config).eval()
    texts = ["very good movie", "bad plot"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert "token_type_ids" in encoded
    with torch.no_grad():
        logits = model(**encoded).logits
        without = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    torch.testing.assert_close(logits, without, rtol=0, atol=0)
    folder = tmp_path / "text"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    results = pipeline("text-classification", model=str(folder))(texts)
    for result, row in zip(results, without.softmax(-1), strict=True):
        assert result["score"] == pytest.approx(row.max().item(), rel=1e-5)
        assert result["label"] == config.id2label[int(row.argmax())]


CHILD_SCRIPT = HIDE_S4BT_HF + r"""
import json, sys
import numpy as np
from transformers import AutoFeatureExtractor, pipeline

folder, signal_path, output = sys.argv[1:4]
extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
signal = np.load(signal_path)
values = extractor(signal, return_tensors="np")["input_values"]
scores = pipeline("audio-classification", model=folder, trust_remote_code=True, top_k=3)(signal)
with open(output, "w") as handle:
    json.dump({"found_before": found_before, "class": type(extractor).__name__, "module": type(extractor).__module__,
               "values": values.tolist(), "scores": scores}, handle)
"""


def test_remote_code_feature_extractor_and_pipeline_without_the_package(tmp_path):
    model, extractor, folder = signal_classifier(tmp_path)
    signal = np.random.default_rng(5).normal(5.0, 3.0, 25).astype(np.float32)
    np.save(tmp_path / "signal.npy", signal)
    (tmp_path / "child.py").write_text(CHILD_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "child_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(folder), str(tmp_path / "signal.npy"),
                             str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["found_before"] and report["class"] == "S4DSSFeatureExtractor"
    assert report["module"].startswith("transformers_modules."), report["module"]
    np.testing.assert_allclose(report["values"], extractor(signal, return_tensors="np")["input_values"], rtol=1e-6)
    with torch.no_grad():
        expected = model(**extractor(signal, return_tensors="pt")).logits[0].softmax(-1)
    for entry in report["scores"]:
        assert entry["score"] == pytest.approx(expected[model.config.label2id[entry["label"]]].item(), rel=1e-5)
