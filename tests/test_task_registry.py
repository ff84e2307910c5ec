"""The task registry drives every entry point: a task registered with one `TaskInfo` entry (its
builder, options, description and budgets) is trained, evaluated and reproduced by the `s4bt`
command without any other change (issue 12, "the house")."""

import json

import datasets
import numpy as np
import pytest

from s4bt_hf import S4DSSConfig
from s4bt_hf.cli import main as cli_main
from s4bt_hf.configuration_s4dss import NORMS, POOLINGS, SSM_INITS
from s4bt_hf.data import TASK_INFOS, TaskInfo, TaskOption, load_task, task_info
from s4bt_hf.experiments.reproduce import default_budgets


def toy(size: int = 20, seed: int = 0) -> datasets.DatasetDict:
    """Sequences of 8 values; the label says whether their mean is positive."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", size), ("validation", 10), ("test", 10)):
        values = rng.standard_normal((count, 8, 1)).astype(np.float32)
        splits[split] = datasets.Dataset.from_dict({"input_values": values,
                                                    "labels": (values.mean((1, 2)) > 0).astype(np.int64)})
    return datasets.DatasetDict(splits)


TOY = TaskInfo("toy", "values", 2, input_dim=1, builder=toy,
               options=(TaskOption("--toy-size", ("size",), 20, "toy: training examples", minimum=1),),
               describe=lambda options: f"Toy sequences ({options})",
               budgets={"cpu": dict(d_model=4, n_layers=1, d_state=4, ranks=[2], originals=[(0, 1)], main_epochs=1,
                                    batch_size=10, eval_batch_size=10, data={"size": 30})})


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(TASK_INFOS, "toy", TOY)


def test_a_registered_task_reaches_train_evaluate_and_reproduce(toy_task, tmp_path, capsys):
    assert task_info("toy") is TOY and len(load_task("toy", size=5)["train"]) == 5
    run = tmp_path / "run"
    assert cli_main(["train", "--task", "toy", "--toy-size", "30", "--output", str(run), "--d-model", "4",
                     "--n-layers", "1", "--d-state", "2", "--batch-size", "10", "--no-progress"]) == 0
    config = json.loads((run / "run_config.json").read_text())
    assert config["training"]["extra"]["data"] == {"size": 30, "seed": 0}  # the option reached the builder
    saved = S4DSSConfig.from_pretrained(run / "final")
    assert (saved.input_dim, saved.num_labels, saved.uses_tokens) == (1, 2, False)
    capsys.readouterr()
    assert cli_main(["evaluate", "--model", str(run / "final"), "--task", "toy", "--toy-size", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 10

    assert default_budgets("toy")["cpu"].data == {"size": 30}
    output = tmp_path / "reproduce"
    assert cli_main(["reproduce", "--task", "toy", "--output", str(output), "--no-progress"]) == 0
    card = (output / "models" / "bt_r2" / "README.md").read_text()
    assert "Toy sequences ({'size': 30})" in card
    # a budget the task does not define is refused in one line
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reproduce", "--task", "toy", "--budget", "paper", "--output", str(tmp_path / "p")])
    assert exit_info.value.code == 2 and "unknown budget 'paper'" in capsys.readouterr().err


def test_cli_choices_come_from_the_registry_and_the_config(capsys):
    from s4bt_hf.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {action.dest: action.choices for action in train._actions if action.choices}
    assert choices["task"] == tuple(TASK_INFOS)
    assert (choices["init"], choices["norm"], choices["pooling"]) == (SSM_INITS, NORMS, POOLINGS)
    flags = {option for action in train._actions for option in action.option_strings}
    assert {option.flag for info in TASK_INFOS.values() for option in info.options} <= flags
