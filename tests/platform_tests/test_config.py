"""Specs: YAML + --set overrides, one-line errors that name the field."""

import pytest

from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import (ScalingSpec, Spec, SpecError, StorageSpec, TrackingSpec, dump_spec, embedded_spec,
                                   load_spec, merge)


class ExampleSpec(Spec):
    name: str = "run"
    encoders: list[EncoderSpec] = []
    scaling: ScalingSpec = ScalingSpec()
    storage: StorageSpec = StorageSpec()
    tracking: TrackingSpec = TrackingSpec()


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "name: a\nencoders:\n  - {name: llama, path: /m/llama}\nscaling: {num_workers: 4}\n")
    spec = load_spec(ExampleSpec, path, ["scaling.num_workers=2", "scaling.use_gpu=true", "name=b"])
    assert spec.name == "b" and spec.scaling.num_workers == 2 and spec.scaling.use_gpu is True
    assert spec.encoders[0].layer == -3 and spec.encoders[0].instruction.startswith("Describe the image")


@pytest.mark.parametrize("text, overrides, field", [
    ("nmae: x\n", [], "nmae: unknown field"),
    ("scaling: {num_workers: 0}\n", [], "scaling.num_workers"),
    ("scaling: {num_workers: lots}\n", [], "scaling.num_workers"),
    ("encoders: [{name: 'bad name', path: x}]\n", [], "encoders.0.name"),
    ("encoders: [{path: x}]\n", [], "encoders.0.name"),
    ("name: a\n", ["scaling.cpus_per_worker=-1"], "scaling.cpus_per_worker"),
    ("name: a\n", ["tracking.nope=1"], "tracking.nope"),
])
def test_bad_spec_names_the_field_in_one_line(tmp_path, text, overrides, field):
    with pytest.raises(SpecError) as err:
        load_spec(ExampleSpec, write(tmp_path, text), overrides)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="line [0-9]+ not valid YAML"):
        load_spec(ExampleSpec, write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(ExampleSpec, tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="expected key.sub=value"):
        load_spec(ExampleSpec, None, ["novalue"])


def test_dump_redacts_credentials():
    spec = ExampleSpec(storage=StorageSpec(key="AKIA123", secret="hunter2"))
    text = dump_spec(spec)
    assert "hunter2" not in text and "AKIA123" not in text and "***" in text


class InnerSpec(Spec):
    lr: float = 1e-4
    steps: int = 10


class OuterSpec(Spec):
    name: str
    output: str
    inner: InnerSpec = InnerSpec()


def test_merge_lays_sections_over_each_other():
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 4}, "e": 5}) == {"a": {"b": 1, "c": 4}, "d": 3, "e": 5}


def test_embedded_spec_takes_any_field_but_the_filled_ones():
    spec = embedded_spec(OuterSpec, {"inner": {"lr": 0.5}}, {"name": "n", "output": "o"}, "train")
    assert (spec.name, spec.output, spec.inner.lr, spec.inner.steps) == ("n", "o", 0.5, 10)
    with pytest.raises(SpecError, match=r"^train\.output: set by the job itself"):
        embedded_spec(OuterSpec, {"output": "mine"}, {"name": "n", "output": "o"}, "train")
    with pytest.raises(SpecError, match=r"^train\.inner\.steps: Input should be a valid integer"):
        embedded_spec(OuterSpec, {"inner": {"steps": "many"}}, {"name": "n", "output": "o"}, "train")
    with pytest.raises(SpecError, match=r"^train\.inner\.nope: unknown field"):
        embedded_spec(OuterSpec, {"inner": {"nope": 1}}, {"name": "n", "output": "o"}, "train")
