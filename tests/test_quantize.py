"""INT8 ONNX: a valid quantized graph with the float32 contract, outputs close to float32, honest scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_lightning.cli import main
from covid_lightning.data.scan import list_predict_images
from covid_lightning.export import (
    agreement,
    calibration_batches,
    export_onnx,
    int8_path,
    load_contract,
    quantize_onnx,
    session,
)
from covid_lightning.inference import load_checkpoint, preprocess
from tests.helpers.scripts import load_script

quantize_eval = load_script("quantize_eval")

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module", params=["classifier", "segmenter"])
def quantized(request: pytest.FixtureRequest, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    model = load_checkpoint(ckpt).eval()
    out = tmp_path_factory.mktemp(f"int8_{request.param}")
    fp32 = export_onnx(model, out / "model.onnx", checkpoint=ckpt)
    paths = list_predict_images(demo_root)
    size = int(model.hparams.image_size)
    int8 = quantize_onnx(fp32, None, calibration_batches(paths, (size, "none"), count=16, batch=8))
    return request.param, model, fp32, int8, paths


def test_int8_graph_carries_the_contract(quantized) -> None:
    kind, _, fp32, int8, _ = quantized
    assert int8 == int8_path(fp32) == fp32.with_name("model.int8.onnx")
    proto = onnx.load(str(int8))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)  # int8 weights
    contract, base = load_contract(int8), load_contract(fp32)
    assert contract["quantization"]["calibration_images"] == 16 and contract["file"] == "model.int8.onnx"
    assert {k: v for k, v in contract.items() if k not in ("quantization", "file")} == {
        k: v for k, v in base.items() if k != "file"
    }
    meta = session(int8).get_modelmeta().custom_metadata_map
    assert json.loads(meta["contract"]) == contract and meta["kind"] == kind


def test_int8_stays_close_to_float32(quantized) -> None:
    kind, _, fp32, int8, paths = quantized
    batch = preprocess(paths[-8:], load_contract(fp32)["image_size"]).numpy()
    same = agreement(fp32, fp32, [batch])
    assert same["max_prob_diff"] == 0.0 and same.get("top1_agreement", same.get("mask_dice")) == 1.0
    a, b = (session(p).run(["probs"], {"image": batch})[0] for p in (fp32, int8))
    assert a.shape == b.shape and float(np.abs(a - b).mean()) < 0.05  # a broken scale/zero point is far off
    report = agreement(fp32, int8, [batch])
    assert report["images"] == 8 and 0 <= report["max_prob_diff"] <= 1
    assert quantize_eval.throughput(int8, batch, repeats=2, threads=1) > 0


def test_labelled_scores_match_pytorch(quantized, demo_root: Path) -> None:
    """The float32 graph scored on labelled records gives what the PyTorch model gives on the same images."""
    from covid_lightning.data.scan import scan_dataset

    kind, model, fp32, _, _ = quantized
    records = scan_dataset(demo_root, with_masks=kind == "segmenter")[::3]
    size = int(model.hparams.image_size)
    images = preprocess([r.path for r in records], size)
    with torch.no_grad():
        logits = model(images).float()
    scores = quantize_eval.labelled_scores(fp32, records, batch=5)
    if kind == "classifier":
        expected = (logits.argmax(1) == torch.tensor([r.label for r in records])).float().mean().item()
        assert scores["accuracy"] == pytest.approx(expected)
        return
    import cv2

    from covid_lightning.data.transforms import load_mask

    # the briefly trained demo segmenter is unsure everywhere: threshold at its median probability, so the
    # masks compared are half lung, half not (the contract's threshold is what the scoring reads)
    probs = logits.sigmoid()[:, 0]
    threshold = probs.median().item()
    contract = load_contract(fp32) | {"threshold": threshold}
    fp32 = fp32.with_name("median_threshold.onnx")
    fp32.write_bytes(quantized[2].read_bytes())
    fp32.with_name(fp32.name + ".json").write_text(json.dumps(contract))
    scores = quantize_eval.labelled_scores(fp32, records, batch=5)
    pred = probs > threshold
    truth = torch.from_numpy(
        np.stack([cv2.resize(load_mask(r.mask_path), (size, size), interpolation=cv2.INTER_NEAREST) for r in records])
    ).bool()
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert scores["dice"] == pytest.approx(dice.item(), abs=1e-3)  # float32 ONNX vs torch: a pixel or two
    assert 0 < scores["iou"] <= scores["dice"] <= 1


def test_export_cli_quantizes(segmenter_ckpt: Path, demo_root: Path, tmp_path: Path, capsys) -> None:
    argv = ["export", str(segmenter_ckpt), "--out", str(tmp_path), "--quantize", "int8"]
    assert main(argv) == 2 and "--calibrate" in capsys.readouterr().err
    assert main([*argv, "--calibrate", str(demo_root), "--calibration_images", "8", "--check_images", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stem = segmenter_ckpt.stem
    files = (".onnx", ".onnx.json", ".model_card.md", ".int8.onnx", ".int8.onnx.json")
    assert lines[:5] == [str(tmp_path / f"{stem}{s}") for s in files]
    assert lines[5].startswith("int8 vs float32 on 4 images not used for calibration: ") and "mask_dice" in lines[5]
    assert load_contract(tmp_path / f"{stem}.int8.onnx")["quantization"]["calibration_images"] == 8


def test_quantize_eval_main_scores_the_split(classifier_ckpt: Path, demo_root: Path, tmp_path: Path, capsys) -> None:
    """The research script reads its split the one way (select_records with the split file) and scores its test
    rows: as many as the split holds."""
    from covid_lightning.data.split import select_records, write_manifest

    sel = select_records(demo_root, val_fraction=0.2, test_fraction=0.2, seed=0, duplicates="none")
    split = write_manifest(tmp_path / "split.csv", sel.screening.records, sel.splits, sel.source.base)
    argv = ["--ckpt", str(classifier_ckpt), "--root", str(demo_root), "--split", str(split)]
    assert quantize_eval.main([*argv, "--calibration-images", "8", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert f"scored on {len(sel.records('test'))} test images" in out and "int8 vs float32" in out
