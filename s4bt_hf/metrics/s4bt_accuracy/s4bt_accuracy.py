"""Accuracy as an `evaluate` metric module that ships with s4bt_hf.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, so it fails offline.
This module is loaded by path instead (`s4bt_hf.metrics.load_accuracy()`), which needs no network.
It imports only `evaluate` and `datasets`: `evaluate.load` copies it into its module cache.
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy: the fraction of predictions equal to their references,
    accuracy = (number of correct predictions) / (number of predictions).
Both are integer class ids.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids, as many as `predictions`.

Returns:
    accuracy (`float`): in [0, 1].

Examples:
    >>> metric = s4bt_hf.metrics.load_accuracy()
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class S4btAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Accuracy of no predictions is undefined: got 0 predictions.")
        pairs = zip(predictions, references, strict=True)
        correct = sum(int(prediction == reference) for prediction, reference in pairs)
        return {"accuracy": float(correct / len(predictions))}
