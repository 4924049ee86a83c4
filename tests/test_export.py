"""ONNX / TorchScript export: outputs match the PyTorch model, the contract travels with the files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_lightning import __version__
from covid_lightning.cli import main
from covid_lightning.export import TORCHSCRIPT_CONTRACT, export_onnx, export_torchscript, load_contract, sidecar_path
from covid_lightning.inference import load_checkpoint, preprocess

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

KINDS = ("classifier", "segmenter")


@dataclass
class Exported:
    kind: str
    ckpt: Path
    model: torch.nn.Module
    onnx: Path
    torchscript: Path


@pytest.fixture(scope="module", params=KINDS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Each checkpoint kind exported once to both formats (default options)."""
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    model = load_checkpoint(ckpt).eval()
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    onnx_path = export_onnx(model, out / "model.onnx", checkpoint=ckpt)
    ts_path = export_torchscript(model, out / "model.pt", checkpoint=ckpt)
    return Exported(request.param, ckpt, model, onnx_path, ts_path)


@pytest.fixture(scope="module")
def demo_batch(demo_root: Path) -> list[Path]:
    """Two demo images per class (L and RGB files, 299 px), to go through the validation preprocessing."""
    return [p for cls in sorted(demo_root.iterdir()) for p in sorted((cls / "images").glob("*.png"))[:2]]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _reference(model: torch.nn.Module, kind: str, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = model(images).float()
    # the classifier's probabilities are temperature-scaled (fitted on validation, stored in the checkpoint)
    probs = (logits / model.temperature).softmax(dim=-1) if kind == "classifier" else logits.sigmoid()
    return logits.numpy(), probs.numpy()


def _max_diff(outputs: list[np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> float:
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    return max(float(np.abs(o - r).max()) for o, r in zip(outputs, reference))


def test_onnx_matches_pytorch_on_any_batch_size(exported: Exported, demo_batch: list[Path]) -> None:
    size = exported.model.hparams.image_size
    images = preprocess(demo_batch, size)
    assert images.dtype == torch.uint8 and images.shape == (len(demo_batch), 3, size, size)
    session = _session(exported.onnx)
    for batch in (images, images[:3], images[-1:]):  # 8, 3 and 1: the batch axis is dynamic
        outputs = session.run(["logits", "probs"], {"image": batch.numpy()})
        reference = _reference(exported.model, exported.kind, batch)
        assert _max_diff(outputs, reference) < 1e-4
    if exported.kind == "classifier":
        np.testing.assert_allclose(outputs[1].sum(axis=1), 1.0, atol=1e-5)


def test_onnx_graph_is_uint8_in_logits_probs_out(exported: Exported) -> None:
    model_proto = onnx.load(str(exported.onnx))
    onnx.checker.check_model(model_proto, full_check=True)
    assert [i.name for i in model_proto.graph.input] == ["image"]
    tensor_type = model_proto.graph.input[0].type.tensor_type
    assert tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
    size = exported.model.hparams.image_size
    assert dims == ["batch", 3, size, size]
    assert [o.name for o in model_proto.graph.output] == ["logits", "probs"]
    assert {o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")} == {18}


def test_contract_in_sidecar_and_onnx_metadata(exported: Exported) -> None:
    model = exported.model
    sidecar = load_contract(exported.onnx)
    assert sidecar_path(exported.onnx) == exported.onnx.with_name("model.onnx.json")
    meta = _session(exported.onnx).get_modelmeta().custom_metadata_map
    assert json.loads(meta["contract"]) == sidecar
    for contract in (sidecar, load_contract(exported.torchscript)):
        assert contract["kind"] == exported.kind
        assert contract["model_class"] == f"{type(model).__module__}.{type(model).__name__}"
        assert contract["image_size"] == model.hparams.image_size == model.preprocess["image_size"]
        assert contract["mean"] == pytest.approx(model.preprocess["mean"])
        assert contract["std"] == pytest.approx(model.preprocess["std"])
        assert contract["normalization"] == model.net.normalization
        assert contract["normalization_in_graph"] is True
        layout = (contract["input_dtype"], contract["input_layout"], contract["input_range"])
        assert layout == ("uint8", "NCHW", [0, 255])
        assert contract["resize"].startswith(f"bilinear to {model.hparams.image_size} x {model.hparams.image_size}")
        assert {"logits", "probs"} <= set(contract["outputs"])
        assert contract["covid_lightning_version"] == __version__
        assert contract["source_checkpoint"] == str(exported.ckpt.resolve())
        assert contract["model_card"]["intended_use"].startswith("Research and education")
        if exported.kind == "classifier":
            assert contract["class_names"] == model.class_names
            assert f"softmax(logits / {float(model.temperature):g})" in contract["outputs"]["probs"]
        else:
            assert contract["threshold"] == model.threshold
    # flat ONNX metadata: strings as they are, everything else JSON
    assert meta["kind"] == exported.kind
    assert int(meta["image_size"]) == model.hparams.image_size
    assert json.loads(meta["mean"]) == pytest.approx(model.preprocess["mean"])
    assert json.loads(meta["std"]) == pytest.approx(model.preprocess["std"])
    assert meta["input_dtype"] == "uint8"
    if exported.kind == "classifier":
        assert json.loads(meta["class_names"]) == model.class_names
    assert (sidecar["format"], sidecar["opset"], sidecar["file"]) == ("onnx", 18, "model.onnx")


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_and_carries_contract(exported: Exported, demo_batch: list[Path]) -> None:
    size = exported.model.hparams.image_size
    images = preprocess(demo_batch, size)
    extra = {TORCHSCRIPT_CONTRACT: ""}
    scripted = torch.jit.load(str(exported.torchscript), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_CONTRACT]) == load_contract(exported.torchscript)
    with torch.no_grad():
        for batch in (images, images[:3]):
            outputs = [t.numpy() for t in scripted(batch)]
            assert _max_diff(outputs, _reference(exported.model, exported.kind, batch)) < 1e-5
        with pytest.raises(torch.jit.Error, match="uint8"):  # a traced graph would silently divide by 255 again
            scripted(images.float() / 255)
        with pytest.raises(torch.jit.Error, match="shape"):
            scripted(torch.zeros(1, 3, size + 4, size + 4, dtype=torch.uint8))


def test_real_radiograph(exported: Exported, radiography_sample: Path) -> None:
    image = sorted(radiography_sample.rglob("images/*.png"))[0]
    batch = preprocess([image], exported.model.hparams.image_size)
    outputs = _session(exported.onnx).run(None, {"image": batch.numpy()})
    assert _max_diff(outputs, _reference(exported.model, exported.kind, batch)) < 1e-4


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:The feature will be removed")
def test_old_opset_and_static_batch(segmenter_ckpt: Path, tmp_path: Path) -> None:
    model = load_checkpoint(segmenter_ckpt).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    legacy = export_onnx(model, tmp_path / "legacy.onnx", opset=17)
    static = export_onnx(model, tmp_path / "static.onnx", dynamic_batch=False)
    assert model.training  # the caller's model is left as it was
    model.eval()
    proto = onnx.load(str(legacy))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert load_contract(legacy)["exporter"] == "torch.onnx.export(dynamo=False)"
    outputs = _session(legacy).run(None, {"image": images.numpy()})
    assert _max_diff(outputs, _reference(model, "segmenter", images)) < 1e-4
    first_dim = onnx.load(str(static)).graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_value == 1 and load_contract(static)["input_shape"][0] == 1
    one = images[:1]
    assert _max_diff(_session(static).run(None, {"image": one.numpy()}), _reference(model, "segmenter", one)) < 1e-4


def test_main_writes_the_files(segmenter_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", str(segmenter_ckpt), "--out", str(out), "--format", "[onnx, torchscript]"]) == 0
    stem = segmenter_ckpt.stem
    expected = [out / f"{stem}.onnx", out / f"{stem}.onnx.json", out / f"{stem}.pt", out / f"{stem}.pt.json"]
    expected.append(out / f"{stem}.model_card.md")  # one card per export, after the formats' files
    assert capsys.readouterr().out.split() == [str(p) for p in expected]
    card = (out / f"{stem}.model_card.md").read_text()
    assert "## Intended use" in card and "## Known limitations" in card and "No evaluation report found" in card
    assert all(p.is_file() and p.stat().st_size > 0 for p in expected)
    assert load_contract(out / f"{stem}.pt")["format"] == "torchscript"

    # default: ONNX only, next to the checkpoint
    ckpt = shutil.copy(segmenter_ckpt, tmp_path / "seg.ckpt")
    assert main(["export", str(ckpt)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "seg.ckpt",
        "seg.model_card.md",
        "seg.onnx",
        "seg.onnx.json",
    ]


def test_main_rejects_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope.ckpt")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
