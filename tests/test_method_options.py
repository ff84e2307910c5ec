"""Typed options of the reduction methods (issue 18, item 3c): one declaration per method
(`METHOD_OPTIONS`), the same check for `model.reduce`, `ReductionSchedule`, `s4bt compress --option`
and `s4bt train --reduce-option`; a wrong type is refused naming the method, the option, the
expected type and the value, never coerced (match_dc="no" once built the match_dc=True model)."""

import inspect
import json
import re

import numpy as np
import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.cli import main as cli_main
from s4bt_hf.reduction_methods import (
    METHOD_OPTIONS,
    REDUCTION_METHODS,
    check_method_options,
    method_options,
    parse_method_options,
)
from s4bt_hf.training import ReductionSchedule

EVERY_OPTION = [(method, option) for method, options in METHOD_OPTIONS.items() for option in options]


def _build(seed=0):
    torch.manual_seed(seed)
    config = S4DSSConfig(input_dim=1, num_labels=2, d_model=4, n_layers=2, d_state=4)
    model = S4DSSForSequenceClassification(config).double()
    with torch.no_grad():
        for layer in model.s4dss.layers:
            layer.kernel.log_dt.uniform_(-1.5, -0.5)
    return model.eval()


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _wrong_types(option):
    """Values of another type than the option's: never coerced."""
    if option.type is bool:
        return ["no", "False", "true", 1, 0, 1.0, None]
    if option.type is int:
        return [2.0, 2.5, "20", True, None]
    return ["0.5", True, None]


def _out_of_range(option):
    values = []
    if option.minimum is not None:
        values.append(option.type(option.minimum) - 1)
    if option.maximum is not None:
        values.append(option.type(option.maximum) + 1)
    return values


def test_the_declarations_match_the_methods_signatures():
    assert set(METHOD_OPTIONS) == set(REDUCTION_METHODS)
    for method, function in REDUCTION_METHODS.items():
        parameters = inspect.signature(function).parameters.values()
        keywords = {parameter.name: parameter.default for parameter in parameters
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                    and parameter.name not in ("pad_mode", "workers")}
        assert method_options(method) == keywords, method
        for option in METHOD_OPTIONS[method]:
            assert isinstance(option.default, option.type) and option.help, (method, option.name)
            assert option.check(method, option.default) == option.default


@pytest.mark.parametrize("method, option", EVERY_OPTION, ids=[f"{m}.{o.name}" for m, o in EVERY_OPTION])
def test_the_python_api_refuses_a_wrong_type_naming_everything(method, option):
    model = _build()
    before = _state(model)
    for value in _wrong_types(option):
        with pytest.raises(TypeError) as error:
            model.reduce(method, rank=2, **{option.name: value})
        message = str(error.value)
        assert repr(method) in message and f"`{option.name}`" in message and repr(value) in message, message
        assert option.type.__name__ in message, message
        with pytest.raises(TypeError, match=f"ReductionSchedule: `options`: method '{method}': option `{option.name}`"):
            ReductionSchedule(at=1, rank=2, method=method, options={option.name: value})
    for value in _out_of_range(option):
        with pytest.raises(ValueError, match=f"`{option.name}` must be .*got {value}"):
            model.reduce(method, rank=2, **{option.name: value})
        with pytest.raises(ValueError, match=f"`{option.name}`"):
            ReductionSchedule(at=1, rank=2, method=method, options={option.name: value})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("method", sorted(REDUCTION_METHODS))
def test_an_unknown_option_names_what_the_method_takes(method):
    takes = ", ".join(option.name for option in METHOD_OPTIONS[method]) or "no options"
    with pytest.raises(TypeError, match=rf"method '{method}' does not take option\(s\) matchdc \(it takes {takes}\)"):
        _build().reduce(method, rank=2, matchdc=True)
    with pytest.raises(TypeError, match=r"does not take option\(s\) matchdc"):
        parse_method_options(method, [("matchdc", "true")])


def test_match_dc_false_is_the_default_model_and_true_is_not():
    model = _build()
    default = model.reduce("modal_truncation", rank=2)
    off = model.reduce("modal_truncation", rank=2, match_dc=False)
    on = model.reduce("modal_truncation", rank=2, match_dc=np.True_)  # numpy bools are bools
    assert all(torch.equal(tensor, off.state_dict()[name]) for name, tensor in default.state_dict().items())
    assert not torch.equal(on.s4dss.layers[0].kernel.D, off.s4dss.layers[0].kernel.D)
    assert off.compression_report.options == {"match_dc": False}
    assert on.compression_report.options == {"match_dc": True}
    assert type(on.compression_report.options["match_dc"]) is bool


def test_numpy_scalars_are_accepted_as_plain_values(tmp_path):
    model = _build()
    plain = model.reduce("h2", budget=4 * 5, max_iterations=3)
    numpy = model.reduce("h2", budget=np.int64(4 * 5), max_iterations=np.int64(3))
    assert numpy.compression_report.budget == plain.compression_report.budget
    assert type(numpy.compression_report.budget["budget"]) is int
    assert type(numpy.compression_report.options["max_iterations"]) is int
    assert all(torch.equal(tensor, numpy.state_dict()[name]) for name, tensor in plain.state_dict().items())
    fraction = model.reduce("modal_truncation", budget=np.float32(0.5))
    assert fraction.compression_report.budget == model.reduce("modal_truncation", budget=0.5).compression_report.budget
    numpy.save_pretrained(tmp_path / "numpy")  # the report is JSON
    assert json.loads((tmp_path / "numpy" / "compression_report.json").read_text())["options"] == {"max_iterations": 3}
    schedule = ReductionSchedule(at=np.int64(2), budget=np.int64(20), method="h2",
                                 options={"max_iterations": np.int64(3)})
    assert json.loads(json.dumps(schedule.to_dict())) == {"at": 2, "method": "h2", "rank": None, "tol": None,
                                                          "time": "discrete", "budget": 20,
                                                          "options": {"max_iterations": 3}}
    assert ReductionSchedule(at=np.float64(0.5), budget=np.float32(0.5)).budget == 0.5
    assert ReductionSchedule(at=1, rank=[np.int64(2), np.int64(3)]).rank == (2, 3)
    assert json.dumps(ReductionSchedule(at=1, tol=np.float32(0.5)).to_dict())


# ----------------------------------------------------------------------------- command line text

TEXT_CASES = {
    bool: ([("true", True), ("false", False), ("True", True), ("False", False), ("FALSE", False)],
           ["0", "1", "no", "yes", "", "t", "on", "none"]),
    int: ([("0", 0), ("20", 20), (" 7 ", 7)], ["2.5", "20.0", "1e3", "", "x", "true"]),
    float: ([("0.5", 0.5), ("1e-3", 1e-3)], ["x", "", "nan", "inf"]),
}


@pytest.mark.parametrize("method, option", EVERY_OPTION, ids=[f"{m}.{o.name}" for m, o in EVERY_OPTION])
def test_command_line_text_is_read_by_the_options_type(method, option):
    good, bad = TEXT_CASES[option.type]
    for text, value in good:
        parsed = parse_method_options(method, [(option.name, text)])[option.name]
        assert parsed == value and type(parsed) is option.type, text
    for text in bad:
        expected = f"option `{option.name}` takes {option.accepted}, got {text!r}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_method_options(method, [(option.name, text)])
    for value in _out_of_range(option):
        with pytest.raises(ValueError, match=f"`{option.name}` must be"):
            parse_method_options(method, [(option.name, str(value))])
    with pytest.raises(ValueError, match="given more than once"):
        parse_method_options(method, [(option.name, good[0][0]), (option.name, good[-1][0])])


def test_the_checks_return_plain_values_and_refuse_unknown_methods():
    assert check_method_options("h2", {}) == {}
    with pytest.raises(ValueError, match="`method` must be one of"):
        check_method_options("pruning", {})
    with pytest.raises(ValueError, match="`method` must be one of"):
        parse_method_options("pruning", [])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    _build().float().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("true", True), ("TRUE", True)])
def test_s4bt_compress_option_builds_the_model_it_says(saved_model, tmp_path, text, expected):
    output = tmp_path / "out"
    assert cli_main(["compress", "--model", str(saved_model), "--output", str(output), "--rank", "2",
                     "--method", "modal_truncation", "--option", f"match_dc={text}"]) == 0
    report = json.loads((output / "compression_report.json").read_text())
    assert report["options"] == {"match_dc": expected}
    reference = S4DSSForSequenceClassification.from_pretrained(saved_model).reduce("modal_truncation", rank=2,
                                                                                    match_dc=expected)
    compressed = S4DSSForSequenceClassification.from_pretrained(output)
    assert torch.equal(compressed.s4dss.layers[0].kernel.D, reference.s4dss.layers[0].kernel.D)


@pytest.mark.parametrize("argv, message", [
    (["--method", "modal_truncation", "--option", "match_dc=1"],
     "--option: method 'modal_truncation': option `match_dc` takes true or false, got '1'."),
    (["--method", "modal_truncation", "--option", "match_dc=no"],
     "--option: method 'modal_truncation': option `match_dc` takes true or false, got 'no'."),
    (["--method", "h2", "--option", "max_iterations=2.5"],
     "--option: method 'h2': option `max_iterations` takes an integer in [0, 10000], got '2.5'."),
    (["--method", "h2", "--option", "max_iterations=-1"],
     "--option: method 'h2': option `max_iterations` must be an integer in [0, 10000], got -1."),
    (["--option", "match_dc=true"],
     "--option: method 'balanced_truncation' does not take option(s) match_dc (it takes no options)."),
])
def test_s4bt_compress_refuses_a_bad_option_in_one_line(saved_model, tmp_path, capsys, argv, message):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compress", "--model", str(saved_model), "--output", str(output), "--rank", "2", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"s4bt compress: error: {message}"
    assert not output.exists()


@pytest.mark.parametrize("argv, message", [
    (["--reduce-method", "modal_truncation", "--reduce-option", "match_dc=0"],
     "--reduce-option: method 'modal_truncation': option `match_dc` takes true or false, got '0'."),
    (["--reduce-method", "h2", "--reduce-option", "max_iterations=ten"],
     "--reduce-option: method 'h2': option `max_iterations` takes an integer in [0, 10000], got 'ten'."),
])
def test_s4bt_train_refuses_a_bad_reduce_option_before_the_run(tmp_path, capsys, argv, message):
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--task", "smnist", "--output", str(output), "--d-model", "4", "--n-layers", "1",
                  "--d-state", "4", "--no-progress", "--reduce-at", "0.5", "--reduce-rank", "2", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"s4bt train: error: {message}"
    assert not output.exists()


def test_s4bt_train_reduce_option_false_reaches_the_schedule(tmp_path):
    """`--reduce-option match_dc=False` is the schedule of match_dc=False (it once meant True)."""
    from s4bt_hf.cli.commands import build_parser, reduction_schedule

    args = build_parser().parse_args(["train", "--task", "smnist", "--output", str(tmp_path / "r"), "--reduce-at",
                                      "0.5", "--reduce-rank", "2", "--reduce-method", "modal_truncation",
                                      "--reduce-option", "match_dc=False"])
    assert reduction_schedule(args).options == {"match_dc": False}


def test_a_float_option_is_checked_and_parsed_by_its_type():
    """No method has a float option yet; the declaration supports one the same way."""
    from s4bt_hf.reduction_methods import MethodOption

    option = MethodOption("shift", float, 0.5, "a float option", minimum=0.0, maximum=1.0)
    assert option.accepted == "a finite number in [0.0, 1.0]"
    assert option.check("m", 1) == 1.0 and type(option.check("m", np.float32(0.25))) is float
    for value in _wrong_types(option):
        with pytest.raises(TypeError, match="method 'm': option `shift` must be a float"):
            option.check("m", value)
    for value in (float("nan"), float("inf"), 1.5, -0.1):
        with pytest.raises(ValueError, match="`shift` must be"):
            option.check("m", value)
    good, bad = TEXT_CASES[float]
    assert [option.parse("m", text) for text, _ in good] == [value for _, value in good]
    for text in bad:
        with pytest.raises(ValueError, match="`shift`"):
            option.parse("m", text)
