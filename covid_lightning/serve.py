"""``covid-lightning serve CKPT``: a LitServe HTTP server for a classifier or segmenter checkpoint.

Requests are checked, decoded and preprocessed in the HTTP process (a FastAPI dependency): in LitServe's batched
loop an exception in one request's ``decode_request`` would fail its whole batch.
"""

import base64
import io
import json
import math
import os
import signal
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, NoReturn

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt, restricted_number_type
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from covid_lightning import __version__
from covid_lightning.data.transforms import decode_rgb, dicom_size, has_dicom_magic
from covid_lightning.errors import UserError
from covid_lightning.inference import input_spec, load_checkpoint, predict_batch, preprocess
from covid_lightning.modules.base import as_xray_module
from covid_lightning.runtime import usable_cpus

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: raw image bodies; anything else but JSON is refused with 415
RAW_CONTENT_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "application/dicom", "application/octet-stream"}
)
#: more pixels are refused (413) before decoding: a small PNG can hold a huge image
MAX_PIXELS = 64 * 1024 * 1024
Port = restricted_number_type("Port", int, [(">=", 1024), ("<=", 65535)])  # LitServe's range


class HttpConfig(NamedTuple):
    """What the HTTP process needs to check and preprocess a request (``app.state.covid_lightning``)."""

    image_size: int
    intensity: str  # the model's, from input_spec: never a default that could differ from training
    max_bytes: int = DEFAULT_MAX_BYTES


def model_info(model: torch.nn.Module, ckpt: str | Path) -> dict[str, Any]:
    """What ``GET /info`` reports under ``"model"``: the model's description (``kind`` as ``/predict`` names it),
    its checkpoint and our version."""
    info = as_xray_module(model, "serve").describe()
    return {**info, "checkpoint": str(Path(ckpt).expanduser().resolve()), "version": __version__}


def _fail(status: int, detail: str) -> NoReturn:
    raise HTTPException(status_code=status, detail=detail)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        _fail(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            _fail(413, f"Request body exceeds the limit of {limit} bytes.")
    return bytes(body)


def image_bytes_from_json(body: bytes) -> bytes:
    """``{"image": "<base64>"}`` -> the image bytes; a 400 with the reason otherwise."""
    try:
        payload = json.loads(body)
    except RecursionError:  # the parser recurses per nesting level: [[[[...]]]] must not become a 500
        _fail(400, 'JSON body nested too deeply: send a flat object {"image": "<base64>"}.')
    except ValueError as err:
        _fail(400, f"Invalid JSON body: {err}.")
    encoded = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(encoded, str):
        _fail(400, 'JSON body must be an object with an "image" key holding a base64 PNG, JPEG or DICOM.')
    if encoded.startswith("data:"):  # data:image/png;base64,....
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except ValueError as err:
        _fail(400, f'"image" is not valid base64: {err}.')


def decode_image(data: bytes, image_size: int, intensity: str) -> dict[str, Any]:
    """PNG/JPEG/DICOM bytes -> ``{"image": uint8 (3, S, S), "height", "width"}``, preprocessed as ``classify``."""
    dicom = has_dicom_magic(data)
    try:
        if dicom:
            width, height = dicom_size(data)
        else:
            image = Image.open(io.BytesIO(data))  # the header only
            if image.format not in ("PNG", "JPEG"):
                _fail(415, f"Unsupported image format {image.format}; send PNG, JPEG or DICOM.")
            width, height = image.size
        if width * height > MAX_PIXELS:
            _fail(413, f"Image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels.")
        batch = preprocess([decode_rgb(data) if dicom else image], image_size, intensity)
    except HTTPException:
        raise
    except Image.DecompressionBombError as err:
        _fail(413, f"Image too large: {err}")
    except UnidentifiedImageError:
        _fail(400, "The body is not a PNG, JPEG or DICOM image.")
    except Exception as err:  # corrupt or truncated data, no pydicom: a 4xx, never a dead server
        _fail(415 if "pydicom" in str(err) else 400, f"Cannot decode the {'DICOM' if dicom else 'image'}: {err}")
    return {"image": batch[0].numpy(), "height": height, "width": width}


async def read_image_request(request: Request) -> dict[str, Any]:
    """FastAPI dependency run in the HTTP process: content type, size and body -> a preprocessed image."""
    config: HttpConfig = request.app.state.covid_lightning
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media_type == "application/json" or media_type.endswith("+json")
    if not is_json and media_type not in RAW_CONTENT_TYPES:
        _fail(
            415,
            f"Unsupported Content-Type {media_type or '(none)'!r}: send raw image bytes as image/png, image/jpeg, "
            'application/dicom or application/octet-stream, or JSON {"image": "<base64>"} as application/json.',
        )
    base64_limit = 4 * math.ceil(config.max_bytes / 3) + config.max_bytes // 38 + 64 * 1024  # + line breaks
    body = await _read_body(request, base64_limit if is_json else config.max_bytes)
    data = image_bytes_from_json(body) if is_json else body
    if not data:
        _fail(400, "Empty image: send a PNG, JPEG or DICOM image.")
    if len(data) > config.max_bytes:
        _fail(413, f"Image of {len(data)} bytes exceeds the limit of {config.max_bytes} bytes.")
    return await run_in_threadpool(decode_image, data, config.image_size, config.intensity)


#: LitServe hands this annotation to FastAPI as the endpoint's parameter: the dependency's result is what is queued
ImageRequest = Annotated[dict[str, Any], Depends(read_image_request)]


class XRayAPI(ls.LitAPI):
    """LitServe API over a checkpoint (loaded in each worker); ``threads`` are a CPU worker's torch threads."""

    def __init__(
        self, ckpt: str | Path, max_batch_size: int = 8, batch_timeout: float = 0.01, threads: int | None = None
    ) -> None:
        with warnings.catch_warnings():  # "batch and unbatch implemented but max_batch_size not set": intended
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.ckpt, self.threads = str(ckpt), threads

    def setup(self, device: str) -> None:
        if self.threads and torch.device(device).type == "cpu":
            torch.set_num_threads(self.threads)
        self.model = load_checkpoint(self.ckpt, map_location=device).to(device).eval()
        self.kind = as_xray_module(self.model, "serve").kind

    def decode_request(self, request: ImageRequest) -> dict[str, Any]:
        return request  # checked, decoded and preprocessed in the HTTP process

    def batch(self, inputs: list[dict[str, Any]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        images = torch.from_numpy(np.stack([x["image"] for x in inputs]))
        return images, [(int(x["height"]), int(x["width"])) for x in inputs]

    def predict(self, x: tuple[torch.Tensor, list[tuple[int, int]]] | dict[str, Any]) -> Any:
        if isinstance(x, dict):  # max_batch_size 1: LitServe calls neither batch nor unbatch
            return self.predict(self.batch([x]))[0]
        return predict_batch(self.model, *x)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        if self.kind == "classifier":
            return {"kind": "classifier", "probs": output, "predicted": max(output, key=output.get)}
        buffer = io.BytesIO()
        Image.fromarray(output.astype(np.uint8) * 255).save(buffer, format="PNG", compress_level=1)
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
        size = {"width": output.shape[1], "height": output.shape[0]}
        return {"kind": "segmenter", "mask_png": png, "lung_fraction": float(output.mean()), **size}


def serve(
    ckpt: Path,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: Port = 8000,  # type: ignore[valid-type]
    workers: PositiveInt = 1,
    max_batch_size: PositiveInt = 8,
    batch_timeout: NonNegativeFloat = 0.01,
    max_bytes: PositiveInt = DEFAULT_MAX_BYTES,
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    devices: PositiveInt | Literal["auto"] = "auto",
    api_servers: PositiveInt | None = None,
    timeout: PositiveFloat = 30.0,
    threads: PositiveInt | None = None,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> int:
    """Serve a checkpoint over HTTP (LitServe) until Ctrl+C or SIGTERM: POST a PNG/JPEG/DICOM image to /predict.

    Args:
        ckpt: classifier or segmenter checkpoint.
        host: bind address (LitServe's choices).
        port: port, 1024-65535.
        workers: inference workers per device.
        max_batch_size: requests run as one batch.
        batch_timeout: seconds to wait for a batch to fill.
        max_bytes: largest image accepted, in bytes.
        accelerator: device kind of the inference workers.
        devices: number of devices, or auto.
        api_servers: HTTP processes (default: one per worker).
        timeout: seconds a request may wait.
        threads: torch threads per CPU worker (default: (cores - 1) // workers, at least 1).
        log_level: the server's log level.
    """
    try:  # fail here with a clear message, not in a worker process
        model = load_checkpoint(ckpt)
        info = model_info(model, ckpt)
    except Exception as err:
        reason = (str(err).strip() or repr(err)).splitlines()[0]  # torch's messages run long
        raise UserError(f"serve: cannot load {ckpt}: {reason}") from err
    image_size, intensity = input_spec(model)
    del model
    torch.set_num_threads(1)  # this process and its forked HTTP processes preprocess single images
    api = XRayAPI(ckpt, max_batch_size, batch_timeout, threads or max(1, (usable_cpus() - 1) // workers))
    server = ls.LitServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers, timeout=timeout, model_metadata=info
    )
    server.app.state.covid_lightning = HttpConfig(image_size, intensity, max_bytes)
    # SIGTERM (docker stop) shuts down like Ctrl+C; forked children (uvicorn) get the default handler back
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        server.run(host=host, port=port, num_api_servers=api_servers, log_level=log_level, generate_client_file=False)
    except RuntimeError as err:  # LitServe: "One or more workers failed to start" (the worker logged why)
        raise UserError(f"serve: {err}") from err
    return 0
