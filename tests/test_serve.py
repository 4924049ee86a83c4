"""``covid-lightning serve`` for real: LitServe subprocesses on loopback ports, answers compared with
``classify``/``segment``, every bad payload refused with the right 4xx, and a short load run."""

import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi import HTTPException
from PIL import Image

from covid_lightning import CLASSES, __version__
from covid_lightning.cli import main
from covid_lightning.inference import classify, input_spec, load_checkpoint, segment
from covid_lightning.serve import XRayAPI, decode_image, image_bytes_from_json, model_info

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
START_TIMEOUT_S = 240  # a cold start imports torch twice (server + spawned worker); shared CPUs are slow
SERVER_ARGS = ["--accelerator", "cpu", "--max_batch_size", "8", "--batch_timeout", "0.01", "--log_level", "warning"]


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body, content_type: str | None, timeout: float = 60) -> tuple[int, dict]:
    """POST to /predict on a fresh connection; (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request("POST", "/predict", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """``python -m covid_lightning serve CKPT`` in its own process group, on a free loopback port."""

    def __init__(self, ckpt: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.log = log
        cmd = [sys.executable, "-m", "covid_lightning", "serve", str(ckpt), "--port", str(self.port)]
        with open(log, "wb") as out:  # a file, not a pipe nobody reads: a full pipe would block the server
            self.proc = subprocess.Popen(
                [*cmd, *SERVER_ARGS, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=log.parent,
            )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _get(self.port, "/health", timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server not ready within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None and _get(self.port, "/health")[0] == 200

    def terminate(self) -> None:
        """SIGTERM to the whole process group: the server shuts down like on Ctrl+C."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM to the group, a bounded wait, then SIGKILL to whatever is left; the leader is reaped last, so
        its process-group id cannot be reused in between."""
        pgid = self.proc.pid
        self.terminate()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def clahe_ckpt(classifier_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo classifier's weights as a model trained with ``data.intensity: clahe`` (the hparam the link sets)."""
    import torch

    ckpt = torch.load(classifier_ckpt, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["intensity"] = "clahe"
    path = tmp_path_factory.mktemp("clahe") / "clahe.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def servers(classifier_ckpt: Path, segmenter_ckpt: Path, clahe_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """A classifier, a segmenter and a CLAHE classifier server for the module, started side by side."""
    folder = tmp_path_factory.mktemp("serve")
    started = {
        "classifier": Server(classifier_ckpt, folder / "classifier.log", "--max_bytes", str(MAX_BYTES)),
        "segmenter": Server(segmenter_ckpt, folder / "segmenter.log"),
        "clahe": Server(clahe_ckpt, folder / "clahe.log"),
    }
    try:
        t0 = time.monotonic()
        for server in started.values():
            server.wait_ready(t0 + START_TIMEOUT_S)
        print(f"\n[serve] both servers ready in {time.monotonic() - t0:.1f} s")
        yield started
    finally:
        for server in started.values():
            server.terminate()  # both at once: a shutdown takes seconds (interpreter exit of torch + lightning)
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> list[Path]:
    """Real sample images (6 per class, at least 3 of them RGB), else the demo dataset's."""
    try:
        root = request.getfixturevalue("radiography_sample")
    except pytest.skip.Exception:
        root = request.getfixturevalue("demo_root")
    files = sorted(root.rglob("*/images/*.png"))
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(f.parent.parent.name, []).append(f)
    chosen = [f for group in by_class.values() for f in group[:6]]
    rgb = [f for f in files if f not in chosen and Image.open(f).mode == "RGB"]
    return chosen + rgb[:3]


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def odd_images(images: list[Path]) -> dict[str, tuple[bytes, str]]:
    """Non-square images in other modes and formats, made from a sample: name -> (bytes, content type)."""
    gray = Image.open(images[0]).convert("L").resize((320, 240))
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "jpeg_rgb_non_square": (_encoded(gray.convert("RGB"), "JPEG", quality=90), "image/jpeg"),
        "png_16bit": (_encoded(Image.fromarray(arr16), "PNG"), "image/png"),
        "png_rgba": (_encoded(gray.convert("RGBA").resize((240, 320)), "PNG"), "application/octet-stream"),
        "png_palette": (_encoded(gray.convert("RGB").convert("P"), "PNG"), "image/png"),
    }


# ---------------------------------------------------------------------------------------------- in-process


def test_cli_arguments_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "x.ckpt", "--print_config"])
    assert exit_info.value.code in (0, None)
    args = yaml.safe_load(capsys.readouterr().out)
    assert (args["host"], args["port"], args["workers"], args["max_batch_size"]) == ("127.0.0.1", 8000, 1, 8)
    assert args["batch_timeout"] == 0.01 and args["max_bytes"] == 20 * 1024 * 1024 and args["accelerator"] == "auto"
    for argv in (
        ["x.ckpt", "--host", "localhost"],  # LitServe binds 127.0.0.1, 0.0.0.0 or :: only
        ["x.ckpt", "--port", "80"],
        ["x.ckpt", "--max_batch_size", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2, argv
    (tmp_path / "not.ckpt").write_bytes(b"not a checkpoint")
    for ckpt in (tmp_path / "missing.ckpt", tmp_path / "not.ckpt"):
        assert main(["serve", str(ckpt)]) == 2
        assert f"error: serve: cannot load {ckpt}" in capsys.readouterr().err


def test_api_single_and_batched_paths_match_classify(classifier_ckpt: Path, images: list[Path]):
    """XRayAPI without HTTP: max_batch_size 1 (LitServe skips batch/unbatch) and a batch of 4."""
    model = load_checkpoint(classifier_ckpt)
    payloads = [decode_image(p.read_bytes(), *input_spec(model)) for p in images[:4]]
    single = XRayAPI(classifier_ckpt, max_batch_size=1)
    single.setup("cpu")
    batched = XRayAPI(classifier_ckpt, max_batch_size=4)
    batched.setup("cpu")
    out_batched = batched.unbatch(batched.predict(batched.batch([batched.decode_request(x) for x in payloads])))
    for path, payload, from_batch in zip(images, payloads, out_batched):
        expected = classify(model, path)
        answer = single.encode_response(single.predict(single.decode_request(payload)))
        assert answer["kind"] == "classifier" and answer["predicted"] == max(expected, key=expected.get)
        for name, p in expected.items():
            assert answer["probs"][name] == pytest.approx(p, abs=1e-5)
            assert from_batch[name] == pytest.approx(p, abs=1e-5)


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"image": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001):
        with pytest.raises(HTTPException) as err:
            image_bytes_from_json(body)
        assert err.value.status_code == 400 and "nested" in err.value.detail


def test_model_info(classifier_ckpt: Path, segmenter_ckpt: Path):
    """What /info reports, from the loaded checkpoint (no server needed)."""
    model = load_checkpoint(classifier_ckpt)
    classifier = model_info(model, classifier_ckpt)
    assert classifier == {
        "kind": "classifier",  # as /predict's answers name it
        "task": "classification",
        "class_names": list(CLASSES),
        "temperature": pytest.approx(float(model.temperature)),
        "image_size": 64,
        "intensity": "none",  # what /predict applies after the resize, as in training
        "lung_roi": "none",  # whole films (a lungs-only model is refused: serve has no lung segmenter)
        "checkpoint": str(classifier_ckpt.resolve()),
        "version": __version__,
    }
    segmenter = model_info(load_checkpoint(segmenter_ckpt), segmenter_ckpt)
    assert segmenter == {
        "kind": "segmenter",
        "task": "segmentation",
        "threshold": 0.5,
        "image_size": 64,
        "intensity": "none",
        "lung_roi": "none",
        "checkpoint": str(segmenter_ckpt.resolve()),
        "version": __version__,
    }
    json.dumps([classifier, segmenter])


# ---------------------------------------------------------------------------------------------- over HTTP


def test_info_reports_the_model(servers, classifier_ckpt: Path, segmenter_ckpt: Path):
    for name, ckpt in (("classifier", classifier_ckpt), ("segmenter", segmenter_ckpt)):
        status, body = _get(servers[name].port, "/info")
        assert status == 200
        model = json.loads(body)["model"]
        assert model == model_info(load_checkpoint(ckpt), ckpt), name


def test_classifier_answers_match_classify(servers, classifier_ckpt: Path, images: list[Path], odd_images):
    port = servers["classifier"].port
    model = load_checkpoint(classifier_ckpt)
    requests = [(p.read_bytes(), "image/png") for p in images] + list(odd_images.values())
    expected = [classify(model, Image.open(io.BytesIO(body))) for body, _ in requests]
    with ThreadPoolExecutor(8) as pool:  # concurrent, so LitServe batches them
        answers = list(pool.map(lambda r: _post(port, *r), requests))
    for (status, answer), probs in zip(answers, expected):
        assert status == 200, answer
        assert answer["kind"] == "classifier" and set(answer["probs"]) == set(model.class_names)
        assert answer["predicted"] == max(probs, key=probs.get)
        assert np.allclose([answer["probs"][c] for c in model.class_names], list(probs.values()), rtol=0, atol=1e-5)
    # the same image as JSON, plain base64 and as a data URL
    body = requests[0][0]
    b64 = base64.b64encode(body).decode()
    for image in (b64, "data:image/png;base64," + b64, base64.encodebytes(body).decode()):  # with line breaks
        status, answer = _post(port, json.dumps({"image": image}), "application/json")
        assert status == 200, answer
        assert np.allclose(list(answer["probs"].values()), list(expected[0].values()), rtol=0, atol=1e-5)


def test_a_clahe_model_is_served_with_its_intensity_step(servers, clahe_ckpt: Path, classifier_ckpt: Path, images):
    """The server standardises intensity as the model was trained: answers equal ``classify`` of the CLAHE model,
    not of the same weights fed unstandardised images."""
    status, body = _get(servers["clahe"].port, "/info")
    assert status == 200 and json.loads(body)["model"]["intensity"] == "clahe"
    clahe, plain = load_checkpoint(clahe_ckpt), load_checkpoint(classifier_ckpt)
    differs = 0
    for path in images[:6]:
        status, answer = _post(servers["clahe"].port, path.read_bytes(), "image/png")
        assert status == 200, answer
        expected, unstandardised = classify(clahe, path), classify(plain, path)
        assert np.allclose([answer["probs"][c] for c in expected], list(expected.values()), rtol=0, atol=1e-5)
        differs += not np.allclose(list(expected.values()), list(unstandardised.values()), rtol=0, atol=1e-3)
    assert differs > 0  # CLAHE changes the inputs enough to change the answers: the check above can fail


def test_segmenter_answers_match_segment(servers, segmenter_ckpt: Path, images: list[Path], odd_images):
    port = servers["segmenter"].port
    model = load_checkpoint(segmenter_ckpt)
    requests = [(p.read_bytes(), "image/png") for p in images[::6]] + list(odd_images.values())
    for body, content_type in requests:
        image = Image.open(io.BytesIO(body))
        status, answer = _post(port, body, content_type)
        assert status == 200, answer
        assert answer["kind"] == "segmenter"
        assert (answer["width"], answer["height"]) == image.size
        mask = Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))
        assert mask.format == "PNG" and mask.mode == "L" and mask.size == image.size
        mask = np.asarray(mask)
        assert set(np.unique(mask)) <= {0, 255}
        expected = segment(model, image)
        np.testing.assert_array_equal(mask == 255, expected)
        assert answer["lung_fraction"] == pytest.approx(expected.mean(), abs=1e-9)


def _bad_payloads(images: list[Path]) -> list[tuple[str, bytes | str, str | None, int]]:
    png = images[0].read_bytes()
    return [
        ("not an image", b"hello, this is not an image", "image/png", 400),
        ("truncated PNG", png[: len(png) // 2], "image/png", 400),
        ("empty body", b"", "image/png", 400),
        ("GIF", _encoded(Image.open(images[0]), "GIF"), "image/png", 415),
        ("over the size limit", b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES), "image/png", 413),
        ("over the size limit, as JSON", json.dumps({"image": base64.b64encode(bytes(MAX_BYTES + 1)).decode()}),
         "application/json", 413),
        ("decompression bomb", _encoded(Image.new("1", (9_000, 9_000)), "PNG"), "image/png", 413),
        ("text/plain", png, "text/plain", 415),
        ("multipart", png, "multipart/form-data; boundary=x", 415),
        ("no content type", png, None, 415),
        ("bad JSON", b'{"image": ', "application/json", 400),
        ("JSON, not an object", b"[1, 2]", "application/json", 400),
        ("JSON, missing key", json.dumps({"img": base64.b64encode(png).decode()}), "application/json", 400),
        ("JSON, image not a string", b'{"image": 3}', "application/json", 400),
        ("JSON, bad base64", b'{"image": "not base64!"}', "application/json", 400),
        ("JSON, empty image", b'{"image": ""}', "application/json", 400),
        ("JSON, base64 of garbage", json.dumps({"image": base64.b64encode(b"garbage").decode()}), "application/json",
         400),
        ("JSON, deeply nested", b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        ("JSON, deeply nested beside the image", b'{"image": "", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         "application/json", 400),
    ]  # fmt: skip


def test_bad_payloads_get_4xx_and_the_server_survives(servers, images: list[Path]):
    port = servers["classifier"].port
    for name, body, content_type, code in _bad_payloads(images):
        status, answer = _post(port, body, content_type)
        assert status == code, (name, answer)
        assert isinstance(answer, dict) and isinstance(answer.get("detail"), str) and answer["detail"], name
        assert servers["classifier"].alive(), name
    # chunked upload (no Content-Length) over the limit: cut off while streaming
    chunks = iter([b"\x89PNG\r\n\x1a\n"] + [bytes(64 * 1024)] * (MAX_BYTES // (64 * 1024) + 2))
    assert _post(port, chunks, "image/png")[0] == 413
    status, answer = _post(port, images[0].read_bytes(), "image/png")
    assert status == 200 and answer["kind"] == "classifier"


def test_bad_payloads_do_not_fail_the_batch_they_share(servers, images: list[Path]):
    """LitServe fails a whole batch when one decode_request raises: bad requests are refused before queuing."""
    port = servers["classifier"].port
    good = [(p.read_bytes(), "image/png") for p in images[:8]]
    bad = [(b"not an image", "image/png")] * 8
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: _post(port, *r), [x for pair in zip(good, bad) for x in pair]))
    assert [status for status, _ in results] == [200, 400] * 8


def test_load_run_has_no_errors(servers, images: list[Path], tmp_path: Path):
    out = tmp_path / "load.json"
    root = images[0].parents[2]
    cmd = [
        sys.executable, str(REPO / "scripts" / "load_test.py"), "--url",
        f"http://127.0.0.1:{servers['classifier'].port}/predict", "--images", str(root), "--glob", "*/images/*.png",
        "-n", "200", "-c", "8", "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    print(f"\n[serve load: 64 px classifier, CPU, max_batch_size 8, batch_timeout 0.01] {run.stdout.strip()}")
    assert result["requests"] == 200 and result["errors"] == 0 and result["statuses"] == {"200": 200}
    assert 0 < result["p50_ms"] <= result["p95_ms"] and result["rps"] > 0
    assert servers["classifier"].alive() and servers["segmenter"].alive()
