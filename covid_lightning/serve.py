"""``covid-lightning serve``: an HTTP server for a covid-lightning checkpoint, built on LitServe.

::

    covid-lightning serve --ckpt runs/head_only/version_0/checkpoints/last.ckpt --port 8000
    curl --data-binary @COVID-1.png -H "Content-Type: image/png" http://127.0.0.1:8000/predict

``POST /predict`` takes one image, as raw PNG/JPEG/DICOM bytes (``Content-Type: image/png``, ``image/jpeg``,
``application/dicom`` or ``application/octet-stream``) or as JSON ``{"image": "<base64 PNG/JPEG/DICOM>"}``
(``application/json``; a ``data:image/png;base64,`` prefix is accepted). DICOM is recognised by its contents and
decoded by the one decoding function training uses (``transforms.decode_rgb``: modality and VOI LUTs,
MONOCHROME1 inverted, 8-bit scaling). It answers, for a classifier::

    {"kind": "classifier", "probs": {"COVID": 0.91, ...}, "predicted": "COVID"}

and for a segmenter (the mask at the image's own size, 0 = background, 255 = lung)::

    {"kind": "segmenter", "mask_png": "<base64 PNG>", "lung_fraction": 0.27, "width": 299, "height": 299}

Bad requests get a 4xx with a JSON ``{"detail": "..."}``: 400 (empty body, not a decodable image, bad
or too deeply nested JSON, no ``image`` key, bad base64), 413 (over ``--max-bytes``, or over 64 Mpixels: a small PNG can
hold a huge image), 415 (another content type, or an image format other than PNG/JPEG/DICOM).
``GET /health`` answers ``ok`` once the model is loaded; ``GET /info`` describes the model under ``"model"``
(:func:`model_info`: kind, class names or threshold, image size, checkpoint, package version).

How the work is split, and why:

- The HTTP process (uvicorn) checks, decodes and preprocesses each request in a FastAPI dependency
  (the ``request`` annotation of :meth:`XRayAPI.decode_request`), with the very function
  :func:`covid_lightning.inference.preprocess` that ``classify``/``segment`` use. A bad image is refused
  there, before it is queued: in LitServe's batched loop an exception in one request's
  ``decode_request`` fails every request of its batch.
- The inference workers (LitServe: one process per ``--workers`` per device, on the ``--accelerator``)
  load the checkpoint with :func:`covid_lightning.inference.load_checkpoint` in ``setup(device)``, stack
  up to ``--max-batch-size`` requests arriving within ``--batch-timeout`` seconds, and run them as one
  batch, with the same float32 post-processing as ``classify``/``segment``.
"""

import argparse
import base64
import binascii
import io
import json
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import Depends, HTTPException, Request  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from covid_lightning import __version__  # noqa: E402
from covid_lightning.data.dicom import DicomError, dicom_size, has_dicom_magic  # noqa: E402
from covid_lightning.data.transforms import decode_rgb  # noqa: E402
from covid_lightning.inference import load_checkpoint, preprocess  # noqa: E402
from covid_lightning.modules.base import as_xray_module  # noqa: E402
from covid_lightning.runtime import usable_cpus  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: raw image bodies; anything else but JSON is refused with 415
RAW_CONTENT_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "application/dicom", "application/octet-stream"}
)
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
#: more pixels are refused (413) before decoding: a small PNG can hold a huge image (below Pillow's 89 MP warning)
MAX_PIXELS = 64 * 1024 * 1024
API_PATH = "/predict"


def model_info(model: torch.nn.Module, ckpt: str | Path) -> dict[str, Any]:
    """What ``GET /info`` reports under ``"model"``: the kind, the class names (classifier) or the mask threshold
    (segmenter), the input image size, the checkpoint's absolute path and the covid-lightning version."""
    info = dict(as_xray_module(model, "serve").describe())
    info["kind"] = info.pop("task")
    info["checkpoint"] = str(Path(ckpt).expanduser().resolve())
    info["version"] = __version__
    return info


@dataclass(frozen=True)
class HttpConfig:
    """What the HTTP process needs to check and preprocess a request (kept in ``app.state.covid_lightning``)."""

    image_size: int
    max_bytes: int = DEFAULT_MAX_BYTES


def _http_error(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _json_body_limit(max_bytes: int) -> int:
    """Largest JSON body that can carry an image of ``max_bytes`` (base64, line breaks, a data-URL prefix)."""
    return 4 * math.ceil(max_bytes / 3) + max_bytes // 38 + 64 * 1024


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _http_error(413, f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _http_error(413, f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def image_bytes_from_json(body: bytes) -> bytes:
    """``{"image": "<base64>"}`` -> the image bytes; 400 with the reason otherwise."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _http_error(400, f"Invalid JSON body: {err}.") from None
    except RecursionError:  # the parser recurses per nesting level: [[[[...]]]] must not become a 500
        raise _http_error(
            400, 'JSON body nested too deeply: send a flat object {"image": "<base64 PNG/JPEG>"}.'
        ) from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise _http_error(400, 'JSON body must be an object with an "image" key holding a base64 PNG/JPEG.')
    encoded = payload["image"]
    if not isinstance(encoded, str):
        raise _http_error(400, '"image" must be a base64 string.')
    if encoded.startswith("data:") and "," in encoded:  # data URL: data:image/png;base64,....
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _http_error(400, f'"image" is not valid base64: {err}.') from None


def decode_dicom(data: bytes, image_size: int) -> dict[str, Any]:
    """DICOM bytes -> what :func:`decode_image` returns, through ``transforms.decode_rgb`` (the training decode):
    the size is checked from the header before the pixel data is decoded."""
    try:
        width, height = dicom_size(data)
    except DicomError as err:
        status = 415 if "pydicom" in str(err) else 400
        raise _http_error(status, f"Cannot read the DICOM: {err}") from None
    if width * height > MAX_PIXELS:
        raise _http_error(413, f"Image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels.")
    try:
        rgb = decode_rgb(data)
    except Exception as err:  # corrupt pixel data, a missing pixel-data handler: never take the server down
        raise _http_error(400, f"Cannot decode the DICOM: {err}") from None
    return {"image": preprocess([rgb], image_size)[0].numpy(), "height": rgb.shape[0], "width": rgb.shape[1]}


def decode_image(data: bytes, image_size: int) -> dict[str, Any]:
    """PNG/JPEG/DICOM bytes -> ``{"image": uint8 (3, S, S) array, "height", "width"}``, preprocessed exactly as
    :func:`covid_lightning.inference.classify`/``segment`` do; HTTP 400/413/415 when that is impossible."""
    if has_dicom_magic(data):
        return decode_dicom(data, image_size)
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format not in IMAGE_FORMATS:
                raise _http_error(415, f"Unsupported image format {image.format}; send PNG, JPEG or DICOM.")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise _http_error(413, f"Image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels.")
            image.load()
            batch = preprocess([image], image_size)
    except HTTPException:
        raise
    except Image.DecompressionBombError as err:
        raise _http_error(413, f"Image too large: {err}") from None
    except UnidentifiedImageError:
        raise _http_error(400, "The body is not a PNG, JPEG or DICOM image.") from None
    except Exception as err:  # truncated or corrupt data, odd modes: never take the server down
        raise _http_error(400, f"Cannot decode the image: {err}") from None
    return {"image": batch[0].numpy(), "height": height, "width": width}


async def read_image_request(request: Request) -> dict[str, Any]:
    """FastAPI dependency run in the HTTP process: content type, size, body -> a preprocessed image.

    Everything that can be wrong with a request is refused here, before it reaches the inference queue.
    """
    config: HttpConfig = request.app.state.covid_lightning
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media_type == "application/json" or media_type.endswith("+json")
    if not is_json and media_type not in RAW_CONTENT_TYPES:
        raise _http_error(
            415,
            f"Unsupported Content-Type {media_type or '(none)'!r}: send raw image bytes as image/png, image/jpeg, "
            'application/dicom or application/octet-stream, or JSON {"image": "<base64>"} as application/json.',
        )
    body = await _read_body(request, _json_body_limit(config.max_bytes) if is_json else config.max_bytes)
    if not body:
        raise _http_error(400, "Empty request body: send a PNG or JPEG image.")
    data = image_bytes_from_json(body) if is_json else body
    if not data:
        raise _http_error(400, '"image" is empty: send a PNG or JPEG image.')
    if len(data) > config.max_bytes:
        raise _http_error(413, f"Image of {len(data)} bytes exceeds the limit of {config.max_bytes} bytes.")
    return await run_in_threadpool(decode_image, data, config.image_size)


#: the ``request`` annotation of :meth:`XRayAPI.decode_request`: LitServe hands it to FastAPI as the endpoint's
#: parameter, so the dependency runs in the HTTP process and its result is what gets queued
ImageRequest = Annotated[dict[str, Any], Depends(read_image_request)]


class Batch(NamedTuple):
    """Preprocessed images stacked on the model's device, with each input's original (height, width)."""

    images: torch.Tensor
    sizes: list[tuple[int, int]]


class XRayAPI(ls.LitAPI):
    """LitServe API over any covid-lightning checkpoint (classifier or segmenter).

    Args:
        ckpt: checkpoint path, loaded with :func:`~covid_lightning.inference.load_checkpoint` in each worker.
        max_batch_size: most requests run as one batch.
        batch_timeout: seconds to wait for a batch to fill.
        threads: torch intra-op threads of a CPU worker (default: :func:`default_cpu_threads` for one worker).
    """

    def __init__(
        self, ckpt: str | Path, max_batch_size: int = 8, batch_timeout: float = 0.01, threads: int | None = None
    ) -> None:
        with warnings.catch_warnings():  # "batch and unbatch implemented but max_batch_size not set": intended
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.ckpt = str(ckpt)
        self.threads = threads

    def setup(self, device: str) -> None:
        """Load the checkpoint on this worker's device."""
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cpu":
            torch.set_num_threads(self.threads or default_cpu_threads(1))
        self.model = load_checkpoint(self.ckpt, map_location=self.torch_device).to(self.torch_device).eval()
        self.kind = as_xray_module(self.model, "serve").kind
        log.info("Serving %s (%s, %d px) on %s", self.ckpt, self.kind, self.model.hparams.image_size, device)

    def decode_request(self, request: ImageRequest) -> dict[str, Any]:
        """The request was decoded and preprocessed in the HTTP process (:func:`read_image_request`)."""
        return request

    def batch(self, inputs: list[dict[str, Any]]) -> Batch:
        """Stack the uint8 (3, S, S) images on the device."""
        images = torch.from_numpy(np.stack([x["image"] for x in inputs])).to(self.torch_device)
        return Batch(images, [(int(x["height"]), int(x["width"])) for x in inputs])

    @torch.inference_mode()
    def predict(self, x: Batch | dict[str, Any]) -> list[Any] | Any:
        """One forward pass for the batch: class probabilities, or lung masks at each input's own size."""
        if isinstance(x, dict):  # max_batch_size == 1: LitServe calls neither batch nor unbatch
            return self.predict(self.batch([x]))[0]
        return self.model.postprocess(self.model.probabilities(self.model(x.images)), x.sizes)

    def unbatch(self, output: list[Any]) -> list[Any]:
        """``predict`` already returns one output per request."""
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        """Probabilities -> the classifier answer; a bool mask -> a base64 PNG (0/255) and its lung fraction."""
        if self.kind == "classifier":
            return {"kind": "classifier", "probs": output, "predicted": max(output, key=output.get)}
        mask: np.ndarray = output
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG", compress_level=1)
        return {
            "kind": "segmenter",
            "mask_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "lung_fraction": float(mask.mean()),
            "width": int(mask.shape[1]),
            "height": int(mask.shape[0]),
        }


def build_server(
    ckpt: str | Path,
    *,
    image_size: int,
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    threads: int | None = None,
    info: dict[str, Any] | None = None,
) -> ls.LitServer:
    """The LitServer for ``ckpt`` (not started: call ``.run(host=..., port=...)``).

    ``info`` is what ``GET /info`` reports under ``"model"`` (:func:`model_info`); None loads the checkpoint
    here to describe it.
    """
    threads = threads or default_cpu_threads(workers)
    if info is None:
        info = model_info(load_checkpoint(ckpt), ckpt)
    api = XRayAPI(ckpt, max_batch_size=max_batch_size, batch_timeout=batch_timeout, threads=threads)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers,
        timeout=timeout,
        model_metadata=info,
    )
    server.app.state.covid_lightning = HttpConfig(image_size=image_size, max_bytes=max_bytes)
    return server


def default_cpu_threads(workers: int) -> int:
    """Torch threads per CPU worker: the usable cores less one for the HTTP process, shared by the workers.

    Oversubscribing matters: with as many OpenMP threads as cores while the HTTP process (or anything else)
    also wants a core, a forward pass can be tens of times slower (measured: MobileNetV2 at 224 px on 2 busy
    cores, 1.5 s per image with 2 threads against 45 ms with 1).
    """
    return max(1, (usable_cpus() - 1) // max(1, workers))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _devices(text: str) -> int | str:
    return text if text == "auto" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``covid-lightning serve`` arguments."""
    parser = argparse.ArgumentParser(
        prog="covid-lightning serve",
        description="Serve a covid-lightning checkpoint over HTTP (LitServe): POST an image to /predict.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="classifier or segmenter checkpoint")
    parser.add_argument(
        "--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"], help="bind address (LitServe's choices)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port, 1024-65535 (default: 8000)")
    parser.add_argument("--workers", type=_positive_int, default=1, help="inference workers per device (default: 1)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=8, help="requests per batch (default: 8)")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill (default: 0.01)"
    )
    parser.add_argument(
        "--max-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES, help="largest image accepted (default: 20 MiB)"
    )
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")
    parser.add_argument("--devices", type=_devices, default="auto", help="number of devices, or auto (default)")
    parser.add_argument("--api-servers", type=_positive_int, default=None, help="HTTP processes (default: = workers)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait (default: 30)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads per CPU worker (default: (cores - 1) // workers, at least 1)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="default: info"
    )
    return parser


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """``covid-lightning serve --ckpt PATH [...]``: run until interrupted (Ctrl+C or SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in 1024-65535 (LitServe), got {args.port}")
    if args.batch_timeout < 0:
        parser.error(f"--batch-timeout must be >= 0, got {args.batch_timeout}")
    if args.batch_timeout == 0 and args.max_batch_size > 1:
        log.warning("--batch-timeout 0 with batching: LitServe's batch loop polls its queue nonstop (a core).")
    if not args.ckpt.is_file():
        parser.error(f"--ckpt: no such file: {args.ckpt}")
    try:  # fail here with a clear message, not in a worker process
        model = load_checkpoint(args.ckpt)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)  # torch's messages run long
        parser.error(f"--ckpt: cannot load {args.ckpt}: {reason}")
    try:
        info = model_info(model, args.ckpt)
    except TypeError as err:
        parser.error(f"--ckpt: {err}")
    image_size = int(model.hparams.image_size)
    del model
    torch.set_num_threads(1)  # this process and its forked HTTP process only preprocess single images
    server = build_server(
        args.ckpt,
        image_size=image_size,
        accelerator=args.accelerator,
        devices=args.devices,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        max_bytes=args.max_bytes,
        timeout=args.timeout,
        threads=args.threads,
        info=info,
    )
    # SIGTERM (docker stop, kill) shuts down like Ctrl+C: LitServe then stops its worker processes too. Forked
    # children (uvicorn, the queue manager) get the default handler back: uvicorn re-raises the SIGTERM it caught.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    os.register_at_fork(after_in_child=_default_sigterm)
    try:
        server.run(
            host=args.host,
            port=args.port,
            num_api_servers=args.api_servers,
            log_level=args.log_level,
            generate_client_file=False,
        )
    except RuntimeError as err:  # LitServe: "One or more workers failed to start" (the worker logged why)
        print(f"covid-lightning serve: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so LitServe's spawned workers unpickle covid_lightning.serve.XRayAPI
    # rather than a class of __main__.
    from covid_lightning.serve import main as _main

    sys.exit(_main())
