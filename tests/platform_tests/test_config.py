"""Specs: YAML + --set overrides, one-line errors that name the field."""

import pytest

from lidit.platform.config import (EncoderSpec, ScalingSpec, Spec, SpecError, StorageSpec, TrackingSpec, dump_spec,
                                   load_spec)


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
