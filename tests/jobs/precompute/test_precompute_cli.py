"""`lidit precompute` fails fast, in one line, before any work: bad spec (exit 2), missing input or an
unreachable S3 endpoint (exit 1)."""

import time

import yaml

from lidit.jobs.cli import main


def write_spec(tmp_path, **fields):
    spec = {"input": str(tmp_path / "in" / "*.tar"), "output": str(tmp_path / "out"),
            "encoders": [{"name": "llama", "path": str(tmp_path / "model")}], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_spec_names_the_field(tmp_path, capsys):
    assert main(["precompute", write_spec(tmp_path), "--set", "encoders.0=3"]) == 2
    assert "encoders" in one_line_error(capsys)
    assert main(["precompute", write_spec(tmp_path, window=0)]) == 2
    assert "window" in one_line_error(capsys)
    assert main(["precompute", write_spec(tmp_path, store_dtype="float32")]) == 2
    assert "store_dtype" in one_line_error(capsys)


def test_missing_input_fails_fast(tmp_path, capsys):
    start = time.monotonic()
    assert main(["precompute", write_spec(tmp_path)]) == 1
    assert "no input shards found" in one_line_error(capsys)
    assert time.monotonic() - start < 30  # before any model or Ray starts


def test_unreachable_s3_endpoint_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    spec = write_spec(tmp_path, input="s3://nowhere/shards/*.tar",
                      storage={"endpoint_url": "http://127.0.0.1:9"})
    start = time.monotonic()
    assert main(["precompute", spec]) == 1
    assert "s3://nowhere/shards/*.tar" in one_line_error(capsys)
    assert time.monotonic() - start < 30
