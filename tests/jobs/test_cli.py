"""One CLI shape: every job command takes an optional spec (its packaged default), `--set`, `--json` and
shared flags that mean the same everywhere; global options parse before or after the command."""

from __future__ import annotations

import pytest

from lidit.jobs import commands
from lidit.jobs.cli import build_parser, main
from lidit.platform.config import load_spec

JOBS = [name for name in commands.COMMANDS if commands.load(name).spec is not None]


def test_the_job_commands_are_the_spec_driven_ones():
    assert sorted(JOBS) == ["ablate", "demo", "evaluate", "precompute", "promote", "serve", "train"]


@pytest.mark.parametrize("name", JOBS)
def test_every_job_takes_an_optional_spec_set_and_json(name):
    parser, command = build_parser(name)
    args = parser.parse_args(["--set", "a.b=1", "--json"])
    assert args.spec == str(commands.default_config(command)) and args.overrides == ["a.b=1"] and args.json
    load_spec(command.spec, args.spec)  # the packaged default spec is valid as shipped


@pytest.mark.parametrize("name", JOBS)
def test_a_shared_flag_is_the_same_spec_field_everywhere(name):
    parser, command = build_parser(name)
    for flag in command.flags:
        args = parser.parse_args([flag, "value-of-" + flag.lstrip("-")])
        field = commands.FLAGS[flag].field
        assert field in command.spec.model_fields, f"{name}: {flag} names no spec field"
        assert getattr(args, "flag_" + flag.lstrip("-").replace("-", "_")) == "value-of-" + flag.lstrip("-")


def test_model_flag_means_a_checkpoint_folder_or_registry_uri_in_evaluate_and_serve(tmp_path):
    for name in ("evaluate", "serve"):
        parser, command = build_parser(name)
        for model in (str(tmp_path / "runs"), "models:/lidit@candidate"):
            assert commands.job_spec(command, parser.parse_args(["--model", model])).model == model


@pytest.mark.parametrize("argv", [
    ["--log-level", "WARNING", "train", "--set", "train.steps=0"],
    ["train", "--set", "train.steps=0", "--log-level", "WARNING"],
    ["--log-level=WARNING", "train", "--set", "train.steps=0"],
])
def test_global_options_parse_before_or_after_the_command(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown command" not in err and "train.steps: Input should be greater than 0" in err


def test_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out


def _leaves(data, prefix=()):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, data


def _without(data: dict, path: tuple) -> dict:
    out = dict(data)
    if len(path) == 1:
        out.pop(path[0])
    else:
        out[path[0]] = _without(out[path[0]], path[1:])
    return out


def _resolved(spec) -> dict:
    """The spec as a dict, its embedded job sections (demo, ablate) as the specs they build."""
    from lidit.pipelines.stages import EncoderSpec

    data = spec.model_dump(mode="json")
    encoders = [EncoderSpec(name="e", path="p")]
    if hasattr(spec, "train_spec"):
        data["precompute"] = spec.precompute_spec(encoders, "d", "o").model_dump(mode="json")
        args = ("d", "c", ".") if spec.__class__.__name__ == "DemoSpec" else ("n", "refiner", encoders, 0, "d", ".")
        built = spec.train_spec(encoders, *args) if len(args) == 3 else spec.train_spec(*args)
        data["train"] = built.model_dump(mode="json")
    if getattr(spec, "serve", None) is not None and hasattr(spec, "serve_spec"):
        data["serve"] = spec.serve_spec(".").model_dump(mode="json")
    return data


def _at(data, path):
    for key in path:
        data = data[key]
    return data


@pytest.mark.parametrize("name", JOBS)
def test_shipped_specs_state_only_what_differs_from_the_code_defaults(name):
    """Each default lives in one place: a packaged YAML value equal to the code's default is a second copy."""
    import yaml

    command = commands.load(name)
    data = yaml.safe_load(commands.default_config(command).read_text()) or {}
    restated = []
    for path, value in _leaves(data):
        try:
            without = _resolved(command.spec.model_validate(_without(data, path)))
        except Exception:  # noqa: BLE001 (a required field: not a default)
            continue
        if _at(without, path) == value:
            restated.append(".".join(path))
    assert restated == []
