"""`lidit serve` on real Ray Serve (127.0.0.1, a free port), a real MLflow registry and real HTTP.

Three applications share the Serve proxy: `/reg` serves `models:/<name>@champion` from the registry with
bearer auth on (and the alias is moved under load), `/local` serves the newest local checkpoint with auth
off and truncation of long prompts (and is driven from headless Chromium), and `/unbatched` (the spec `lidit
bench serve` compares against) serves a model trained here at 16 px. The other tiny checkpoints are
random-init LI-DiT tiny with every weight jittered, so that the prompt reaches the image.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")]

MODEL = "lidit-serve-test"
TOKEN_ENV = "LIDIT_SERVE_TEST_TOKEN"
TOKEN = "serve-test-token"
PROMPT = "a red circle to the left of a blue square"


def make_checkpoint(folder: Path, llms: dict[str, str], seed: int) -> str:
    """Tiny LI-DiT over the two tiny LLMs; weights jittered (zero-init gates would ignore the text)."""
    from lidit.models import CheckpointInfo, EncoderConfig, EncoderEntry, LiDiT, lidit_config, save_checkpoint

    encoders = (EncoderEntry("llama", EncoderConfig(path=llms["tiny-llama"], max_tokens=24)),
                EncoderEntry("qwen2", EncoderConfig(path=llms["tiny-qwen2"], max_tokens=24)))
    torch.manual_seed(seed)
    model = LiDiT(lidit_config("tiny"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_checkpoint(str(folder), model, None, CheckpointInfo(model.config, encoders, {"kind": "identity"}, (32, 32)))
    return str(folder)


def train_at_16_px(root: Path, llms: dict[str, str]) -> str:
    """A real `lidit train` run (2 steps, 1 worker) on 16 px shards: the folder of its checkpoints."""
    from helpers import make_tiny_embeddings
    from lidit.jobs.train.driver import train
    from lidit.jobs.train.spec import TrainSpec

    embeddings = make_tiny_embeddings(str(root / "embeddings-16"), llms, rows=16, size=16, files=2)
    spec = TrainSpec.model_validate({
        "name": "sixteen", "output": str(root / "runs-16"), "workdir": str(root / "work-16"),
        "encoders": [{"name": "llama", "path": llms["tiny-llama"]}, {"name": "qwen", "path": llms["tiny-qwen2"]}],
        "data": {"embeddings": embeddings, "batch_size": 4}, "train": {"steps": 2}, "samples": {"prompts": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}})
    train(spec)
    return spec.output


@pytest.fixture(scope="module")
def apps(ray_local, mlflow_server, tiny_llms, tmp_path_factory):
    from ray import serve as ray_serve

    from lidit.jobs.bench import serve as bench_serve
    from lidit.jobs.serve.deploy import serve_many
    from lidit.jobs.serve.spec import ServeSpec
    from lidit.platform import registry
    from lidit.platform.config import load_spec
    from servers import free_port  # tests/servers.py (conftest puts tests/ on sys.path)

    root = tmp_path_factory.mktemp("serve")
    v1 = make_checkpoint(root / "v1", tiny_llms, seed=1)
    v2 = make_checkpoint(root / "v2", tiny_llms, seed=2)
    runs = root / "runs"
    # the newest is the last one written, whatever the run and step names say
    make_checkpoint(runs / "b" / "checkpoint_00000009", tiny_llms, seed=3)
    time.sleep(0.05)
    newest = make_checkpoint(runs / "a" / "checkpoint_00000001", tiny_llms, seed=4)
    sixteen = train_at_16_px(root, tiny_llms)
    first = registry.register_checkpoint(mlflow_server, v1, name=MODEL, alias="champion")
    second = registry.register_checkpoint(mlflow_server, v2, name=MODEL, alias=None)

    ray_serve.shutdown()  # an earlier test's Serve instance would keep its own HTTP port
    port = free_port()
    common = [f"port={port}", "poll_interval_s=1", "encoder.num_cpus=0", "denoiser.num_cpus=0", "ingress.num_cpus=0",
              "limits.max_steps=20", "limits.default_steps=4"]
    os.environ[TOKEN_ENV] = TOKEN
    bench_args = bench_args_for(["--clients", "3", "--requests", "6", "--steps", "2", "--size", "16", "--json"])
    unbatched_spec = bench_serve._spec(sixteen, "unbatched", port, 1, bench_args)
    try:
        reg, local, unbatched = serve_many([
            load_spec(ServeSpec, None, common + [
                f"model=models:/{MODEL}@champion", f"tracking.tracking_uri={mlflow_server}", "app_name=serve-reg",
                "route_prefix=/reg", f"auth_token_env={TOKEN_ENV}"]),
            load_spec(ServeSpec, None, common + [
                f"model={runs}", "app_name=serve-local", "route_prefix=/local", "auth_token_env=null",
                "limits.long_prompt=truncate", "denoiser.batch_wait_timeout_s=0.2", "encoder.batch_wait_timeout_s=0.1"]),
            unbatched_spec.model_copy(update={  # no CPU reserved: the test's Ray has 2
                "ray": load_spec(ServeSpec, None, common).ray,
                "denoiser": unbatched_spec.denoiser.model_copy(update={"num_cpus": 0})})])
        yield {"reg": reg, "local": local, "unbatched": unbatched, "v1": v1, "v2": v2, "first": first,
               "second": second, "newest": newest, "tracking_uri": mlflow_server, "bench_args": bench_args}
    finally:
        os.environ.pop(TOKEN_ENV, None)
        for name in ("serve-reg", "serve-local", "unbatched"):
            ray_serve.delete(name)
        ray_serve.shutdown()


def bench_args_for(argv: list[str]):
    import argparse

    from lidit.jobs.bench import serve as bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, body: dict | bytes, headers: dict = AUTH) -> requests.Response:
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    return requests.post(f"{url}/v1/images", headers=headers, timeout=120, **kwargs)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_models_reports_version_alias_and_encoder_fingerprints(apps):
    import yaml

    url = apps["reg"].url
    info = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()
    model = info["data"][0]
    assert (model["name"], model["alias"], model["uri"]) == (MODEL, "champion", f"models:/{MODEL}/{model['version']}")
    config = yaml.safe_load(Path(apps["v1"], "config.yaml").read_text())
    assert {e["name"]: e["fingerprint"] for e in model["encoders"]} == {
        e["name"]: e["fingerprint"] for e in config["encoders"]}
    assert model["image_size"] == [32, 32] and info["limits"]["size_multiple"] == 2 and info["auth"] is True
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"  # health needs no token


def test_auth_on_refuses_missing_or_wrong_tokens(apps):
    url = apps["reg"].url
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        for response in (post(url, {"prompt": PROMPT}, headers),
                         requests.get(f"{url}/v1/models", headers=headers, timeout=30)):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["field"] == "authorization"
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_same_seed_and_parameters_give_the_same_image_as_the_pipeline(apps):
    from lidit.models.generate import TextToImagePipeline

    url = apps["reg"].url
    body = {"prompt": PROMPT, "seed": 11, "steps": 4, "guidance": 3.0}
    first, again = post(url, body), post(url, body)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == again.content
    assert (first.headers["X-Lidit-Seed"], first.headers["X-Lidit-Model-Version"]) == ("11", apps["first"].version)
    assert post(url, {**body, "seed": 12}).content != first.content
    assert post(url, {**body, "prompt": "two green triangles above a yellow star"}).content != first.content
    pipeline = TextToImagePipeline.from_checkpoint(apps["v1"])
    expected = pipeline.generate([PROMPT], seeds=[11], steps=4, guidance=3.0)[0].numpy()
    assert np.abs(pixels(first.content).astype(int) - expected).max() <= 1  # float rounding across processes
    several = post(url, {**body, "n": 2, "response_format": "b64_json"}).json()
    assert [d["seed"] for d in several["data"]] == [11, 12] and several["version"] == apps["first"].version
    image0 = pixels(base64.b64decode(several["data"][0]["b64_json"]))
    assert np.abs(image0.astype(int) - pixels(first.content)).max() <= 1


BAD = [
    (b"{not json", 400, "body"),
    (b'["a list"]', 400, "body"),
    (b'{"prompt": "x", "guidance": Infinity}', 400, "body"),
    (b"{" + b'"prompt": "' + b"x" * 70000 + b'"}', 413, "body"),
    ({"negative_prompt": "x"}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": " ".join(["red circle"] * 40)}, 422, "prompt"),  # over the encoders' 24 tokens
    ({"prompt": PROMPT, "negative_prompt": " ".join(["blue"] * 40)}, 422, "negative_prompt"),
    ({"prompt": PROMPT, "n": 9, "response_format": "b64_json"}, 422, "n"),
    ({"prompt": PROMPT, "steps": 21}, 422, "steps"),
    ({"prompt": PROMPT, "steps": 0}, 422, "steps"),
    ({"prompt": PROMPT, "width": 1024}, 422, "width"),
    ({"prompt": PROMPT, "height": 33}, 422, "height"),
    ({"prompt": PROMPT, "steps": "4"}, 422, "steps"),
    ({"prompt": PROMPT, "seed": 1.5}, 422, "seed"),
    ({"prompt": ["a", "b"]}, 422, "prompt"),
    ({"prompt": PROMPT, "response_format": "url"}, 422, "response_format"),
    ({"prompt": PROMPT, "size": "1024x1024"}, 422, "size"),
]


@pytest.mark.parametrize("body, status, field", BAD, ids=[f"{s}-{f}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_every_bad_input_class_gets_its_4xx_json_over_http(apps, body, status, field):
    response = post(apps["reg"].url, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"].startswith(f"{field}:")


def test_routing_errors_are_json_too(apps):
    url = apps["reg"].url
    assert requests.get(f"{url}/v1/images", headers=AUTH, timeout=30).status_code == 405
    missing = requests.get(f"{url}/v2/nothing", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_local_mode_serves_the_newest_checkpoint_without_auth(apps):
    url = apps["local"].url
    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert (model["name"], model["version"], model["uri"]) == ("local", "a/checkpoint_00000001", apps["newest"])
    long = post(url, {"prompt": " ".join(["red circle"] * 40), "seed": 1}, headers={})
    assert long.status_code == 200 and int(long.headers["X-Lidit-Truncated-Tokens"]) > 0


def test_concurrent_requests_share_a_denoiser_batch(apps):
    url = apps["local"].url
    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda i=i: results.append(post(url, {"prompt": PROMPT, "seed": i}, {})))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 6
    assert max(int(r.headers["X-Lidit-Batch-Images"]) for r in results) > 1


def test_a_model_trained_at_16_px_is_served_at_16_px_by_default(apps):
    url = apps["unbatched"].url
    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert model["image_size"] == [16, 16]
    response = post(url, {"prompt": PROMPT, "seed": 3, "steps": 2}, {})
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (16, 16)


def test_bench_serve_measures_and_reports_a_batched_and_an_unbatched_app(apps, capsys):
    """`lidit bench serve`'s load generator (a separate process, closed loop) and its report, against a
    batched app (/local) and the bench's own unbatched spec (/unbatched); the bench deploys its two apps with
    `serve_many` as this module's fixture does (a whole bench run is a minute here: the figures are in
    docs/serving.md, not a timed test)."""
    from lidit.jobs.bench import serve as bench_serve

    args = apps["bench_args"]
    rows = bench_serve.measure({"batched": apps["local"].url, "unbatched": apps["unbatched"].url}, [3], args)
    assert [(r["mode"], r["clients"], r["requests"], r["errors"]) for r in rows] == [
        ("batched", 3, 6, 0), ("unbatched", 3, 6, 0)]
    batched, unbatched = rows
    assert unbatched["batch_max"] == 1, "the unbatched spec runs one image per forward"
    assert all(r["requests_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    bench_serve.report(rows, args, [3])
    lines = capsys.readouterr().out.strip().splitlines()
    ratio = batched["requests_per_s"] / unbatched["requests_per_s"]
    assert f"batched / unbatched requests/s at 3 clients: {ratio:.2f}x" in lines
    assert json.loads(lines[-1])["speedup_at_max_clients"] == pytest.approx(ratio)


def test_alias_switch_is_picked_up_without_a_failed_request(apps):
    from lidit.platform import registry

    url, old, new = apps["reg"].url, apps["first"].version, apps["second"].version
    body = {"prompt": PROMPT, "seed": 5, "steps": 2}
    reference = {old: post(url, body).content}
    log: list[tuple[float, float, int, str, bytes]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            response = post(url, body)
            log.append((start, time.monotonic(), response.status_code,
                        response.headers.get("X-Lidit-Model-Version", ""), response.content))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    registry.promote(apps["tracking_uri"], MODEL, new, benchmark="serve-test", force=True)
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["version"] != new:
        assert time.monotonic() < deadline, "the alias move was not picked up"
        time.sleep(0.2)
    switched = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert [entry[2] for entry in log] == [200] * len(log)
    versions = {entry[3] for entry in log}
    assert versions == {old, new}
    reference[new] = next(entry[4] for entry in log if entry[3] == new)
    assert reference[new] != reference[old]
    for start, _, _, version, content in log:
        assert content == reference[version]  # every answer is wholly one version's, in flight included
        if start > switched:
            assert version == new


def test_playground_in_headless_chromium(apps, tmp_path):
    from playwright.sync_api import sync_playwright

    url = apps["local"].url + "/"
    shot = tmp_path / "playground.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.includes('version')")
        page.fill("#prompt", "two green triangles above a yellow star")
        page.fill("#seed", "7")
        page.fill("#steps", "4")
        page.fill("#guidance", "3")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('seed 7')", timeout=60000)
        assert page.text_content("#error") == ""
        assert "a/checkpoint_00000001" in page.text_content("#model")
        assert "version a/checkpoint_00000001" in page.text_content("#status")
        page.screenshot(path=str(shot))
        image = page.locator("#image").screenshot()
        browser.close()
    shown = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(float)
    assert shown.std() > 20 and len(np.unique(shown.reshape(-1, 3), axis=0)) > 50  # a real image, not blank
    assert shot.stat().st_size > 10_000
