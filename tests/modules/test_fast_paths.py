"""The speed switches keep results: channels_last vs contiguous layout, bf16 autocast vs float32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from covid_lightning import LungSegmenter, XRayClassifier

CASES = [
    pytest.param(XRayClassifier, {"pretrained": False, "trainable": "all", "image_size": 64}, 64, id="classifier"),
    pytest.param(LungSegmenter, {"image_size": 32}, 32, id="seed_unet"),
]


def _loss(model: Any, images: torch.Tensor) -> torch.Tensor:
    out = model(images).float()
    if isinstance(model, XRayClassifier):
        return F.cross_entropy(out, torch.arange(len(images)) % out.shape[1])
    return model.compute_loss(out, (torch.arange(out[0].numel()).view_as(out[0]) % 3 == 0).expand_as(out))


@pytest.mark.parametrize(("cls", "kwargs", "size"), CASES)
def test_channels_last_gives_the_contiguous_results(cls: type, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    plain = cls(memory_format="contiguous", **kwargs)
    fast = cls(memory_format="channels_last", **kwargs)
    fast.load_state_dict(plain.state_dict())
    assert fast.to_input(torch.zeros(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(images), plain.eval()(images), rtol=1e-4, atol=1e-5)
    plain.train(), fast.train()
    _loss(plain, images).backward()
    _loss(fast, images).backward()
    # a layout changes the order of float sums: compare on the scale of the largest gradient
    scale = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize(("cls", "kwargs", "size"), CASES)
def test_bf16_autocast_stays_close_to_float32(cls: type, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        full = model(images).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images).float()
    assert torch.isfinite(half).all()
    probs = (lambda x: x.softmax(-1)) if cls is XRayClassifier else torch.sigmoid
    torch.testing.assert_close(probs(half), probs(full), rtol=0, atol=0.03)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model.train(), images)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the loss is computed in float32


@pytest.mark.parametrize(("cls", "kwargs", "size"), CASES)
def test_auto_memory_format_keeps_the_faster_layout(cls: type, kwargs: dict, size: int, monkeypatch) -> None:
    """``memory_format: auto`` keeps the layout that timed faster; timing runs on a copy of the network
    (the run's weights, gradients and BatchNorm statistics are untouched)."""
    model = cls(memory_format="auto", image_size=size, **{k: v for k, v in kwargs.items() if k != "image_size"})
    assert model.auto_memory_format and model.memory_format == torch.channels_last
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layout in (torch.channels_last, torch.contiguous_format):
        assert model.time_layout(layout, steps=1) > 0
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for faster in (torch.contiguous_format, torch.channels_last):
        monkeypatch.setattr(model, "time_layout", lambda layout, steps=2, f=faster: 1.0 if layout == f else 2.0)
        timings = model.pick_memory_format()
        assert model.memory_format == faster and sorted(timings.values()) == [1.0, 2.0]
        conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=faster)
    with pytest.raises(ValueError, match="channels_last, contiguous, auto"):
        cls(memory_format="fastest", **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_auto_memory_format_in_a_fit(demo_root, tmp_path, precision: str) -> None:
    """At fit start, under the run's precision (the lab U-Net config's path)."""
    from covid_lightning import LungSegmentationDataModule
    from tests.helpers.trainers import quiet_trainer

    model = LungSegmenter(image_size=32, memory_format="auto")
    dm = LungSegmentationDataModule(root=str(demo_root), image_size=32, batch_size=4, num_workers=0)
    quiet_trainer(tmp_path, precision=precision, fast_dev_run=1).fit(model, dm)
    assert model.memory_format in (torch.channels_last, torch.contiguous_format)
