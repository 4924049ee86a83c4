from pathlib import Path

import lightning as L
import pytest
import torch

from covid_lightning import CLASSES, RadiographyDataModule, XRayClassifier
from covid_lightning.callbacks import StagedUnfreeze
from covid_lightning.cli import build_cli, main
from covid_lightning.data.demo import make_demo_dataset
from covid_lightning.inference import classify, load_checkpoint
from tests.helpers.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[2]

_trainer = quiet_trainer


def _dm(root: Path, **kw) -> RadiographyDataModule:
    return RadiographyDataModule(root=str(root), image_size=64, batch_size=8, num_workers=0, **kw)


def test_fast_dev_run(demo_root: Path, tmp_path: Path):
    model = XRayClassifier(pretrained=False, trainable="all", image_size=64)
    _trainer(tmp_path, fast_dev_run=True).fit(model, _dm(demo_root))


def test_checkpoint_round_trip_predictions_identical(demo_root: Path, tmp_path: Path):
    dm = _dm(demo_root, balance="loss")
    model = XRayClassifier(pretrained=False, trainable="last_conv", image_size=64, class_weights=dm.class_weights)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = XRayClassifier.load_from_checkpoint(path)
    assert loaded.hparams.pretrained is False and loaded.net.trainable == "last_conv"
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["image"]), model(batch["image"]), rtol=0, atol=0)
    # the generic loader picks the right class; the helper applies the stored preprocessing
    again = load_checkpoint(path)
    assert type(again) is XRayClassifier
    probs = classify(again, batch["path"][0])
    assert list(probs) == list(CLASSES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    # the temperature fitted on the validation epoch travels with the checkpoint and scales every probability
    assert float(model.temperature) != 1.0 and float(loaded.temperature) == float(model.temperature)
    assert again.describe()["temperature"] == pytest.approx(float(model.temperature))
    expected = (model(batch["image"][:1]) / model.temperature).softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(list(probs.values())), expected, rtol=1e-5, atol=1e-6)


def test_temperature_is_fitted_on_validation_only_when_asked(demo_root: Path, tmp_path: Path):
    from covid_lightning.modules.metrics import fit_temperature

    dm = _dm(demo_root)
    model = XRayClassifier(pretrained=False, trainable="head", image_size=64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=1)
    trainer.fit(model, dm)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits.append(model(batch["image"]))
            labels.append(batch["label"])
    expected = fit_temperature(torch.cat(logits), torch.cat(labels))  # the whole val split, no sanity batch twice
    assert float(model.temperature) == pytest.approx(expected, rel=1e-3)
    assert trainer.callback_metrics["val/temperature"] == pytest.approx(expected, rel=1e-3)
    before = float(model.temperature)
    trainer.validate(model, dm)  # evaluating a model does not refit it
    assert float(model.temperature) == before

    plain = XRayClassifier(pretrained=False, trainable="head", image_size=64, calibrate=False)
    _trainer(tmp_path / "plain", max_epochs=1, limit_train_batches=2).fit(plain, dm)
    assert float(plain.temperature) == 1.0


def test_inference_accepts_pil_and_tensor(demo_root: Path):
    from PIL import Image

    model = XRayClassifier(pretrained=False, image_size=64).eval()
    path = next((demo_root / "COVID" / "images").iterdir())
    from_path = classify(model, path)
    pil = Image.open(path)
    from_pil = classify(model, pil)
    tensor = torch.from_numpy(__import__("numpy").asarray(pil.convert("RGB"))).permute(2, 0, 1)
    from_tensor = classify(model, tensor)
    from_float = classify(model, tensor.float() / 255)
    for other in (from_pil, from_tensor, from_float):
        assert other == pytest.approx(from_path, abs=1e-6)
    assert len(classify(model, [path, pil])) == 2


def test_balanced_class_weights_from_datamodule(demo_root: Path, tmp_path: Path):
    dm = _dm(demo_root, balance="loss")
    dm.setup("fit")
    assert dm.class_counts == dict.fromkeys(CLASSES, 6)
    assert dm.class_weights == pytest.approx([1.0] * 4)
    root = make_demo_dataset(tmp_path / "uneven", n_per_class=12)
    for path in sorted((root / "Viral Pneumonia" / "images").glob("*.png"))[4:]:
        path.unlink()
    full, sqrt = (_dm(root, balance=b, val_fraction=0.25) for b in ("loss", "loss_sqrt"))
    counts = list(full.class_counts.values())
    assert min(counts) < max(counts) and full.class_weights == pytest.approx([sum(counts) / (4 * c) for c in counts])
    assert sqrt.class_weights == pytest.approx([w**0.5 for w in full.class_weights])  # milder correction
    assert _dm(demo_root).class_weights is None and _dm(demo_root, balance=[1, 2, 3, 4]).class_weights == [
        1,
        2,
        3,
        4,
    ]
    model = XRayClassifier(pretrained=False, image_size=64, class_weights=dm.class_weights)
    _trainer(tmp_path, fast_dev_run=True).fit(model, dm)
    assert model.class_weight.tolist() == pytest.approx([1.0] * 4)
    # the CLI links the data's loss weights to the model: balanced weights from the train split
    cli = build_cli(["--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(demo_root),
                     "--data.balance", "loss", "--data.val_fraction", "0.5"], run=False)  # fmt: skip
    assert cli.model.class_weight.tolist() == pytest.approx([1.0] * 4)
    assert cli.model.hparams.class_weights == pytest.approx([1.0] * 4)
    # and a real fit through the command logs both hyper-parameter sets (no clash between data and model keys)
    for balance in ("loss", "sampler"):
        args = ["fit", "--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(demo_root)]
        args += ["--data.balance", balance, "--data.image_size", "32", "--data.num_workers", "0"]
        args += ["--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / balance)]
        assert main(args) == 0


def test_staged_unfreeze_keeps_bn_frozen_then_trains_backbone(demo_root: Path, tmp_path: Path):
    model = XRayClassifier(pretrained=False, trainable="head", image_size=64)
    stem_stats = model.net.backbone.bn1.running_mean.clone()
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(
                trainer.current_epoch,
                (pl_module.net.backbone.bn1.training, len(trainer.optimizers[0].param_groups)),
            )

    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[StagedUnfreeze(unfreeze_at_epoch=1, backbone_lr_factor=0.1), Probe()],
    )
    trainer.fit(model, _dm(demo_root))
    assert seen[0] == (False, 1)  # frozen stem BN in inference mode, head-only param group
    assert seen[1] == (True, 2)  # backbone unfrozen, added as a second param group
    groups = trainer.optimizers[0].param_groups
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
    assert not torch.equal(stem_stats, model.net.backbone.bn1.running_mean)  # BN trains after unfreezing


def test_metrics_logged_per_stage(demo_root: Path, tmp_path: Path):
    model = XRayClassifier(pretrained=False, trainable="all", image_size=64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(model, _dm(demo_root))
    logged = trainer.callback_metrics
    for key in (
        "train/acc",
        "val/acc",
        "val/f1_macro",
        "val/precision_COVID",
        "val/recall_Viral_Pneumonia",
        "val/f1_Lung_Opacity",
        "val/loss",
    ):
        assert key in logged, key
    cm = model.confusion_matrices["val"]
    assert cm.shape == (4, 4) and cm.sum().item() == 8  # 2 val images per class


def test_covid_vs_normal_accuracy_by_hand():
    from covid_lightning.modules.metrics import PairAccuracy

    metric = PairAccuracy(0, 2)  # COVID=0, Normal=2
    probs = torch.tensor([
        [0.5, 0.1, 0.4, 0.0],  # COVID, COVID>Normal: right
        [0.2, 0.6, 0.1, 0.1],  # COVID, argmax Lung_Opacity but COVID>Normal: right for the pair
        [0.3, 0.0, 0.2, 0.5],  # Normal, COVID>Normal: wrong
        [0.1, 0.1, 0.7, 0.1],  # Normal: right
        [0.9, 0.0, 0.1, 0.0],  # Viral Pneumonia: not counted
    ])  # fmt: skip
    metric.update(probs, torch.tensor([0, 0, 2, 2, 3]))
    assert metric.compute().item() == pytest.approx(3 / 4)
    model = XRayClassifier(pretrained=False)
    assert "val/acc_covid_vs_normal" in model.val_metrics.keys(keep_base=False)


def test_default_optimizer_is_fused_adam_and_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    model = XRayClassifier(pretrained=False, trainable="head", image_size=64)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True
    twin = XRayClassifier(pretrained=False, trainable="head", image_size=64)
    twin.load_state_dict(model.state_dict())
    reference = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    start = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    features, labels = torch.randn(8, 1280), torch.randint(0, 4, (8,))
    for _ in range(3):
        for net, opt in ((model.net.eval(), optimizer), (twin.net.eval(), reference)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net.forward_suffix(features), labels).backward()
            opt.step()
    assert all(not torch.equal(v, start[k]) for k, v in model.net.head.state_dict().items())  # it trained
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_logit_adjusted_loss_uses_the_train_prior(tmp_path: Path):
    """``balance: logit_adjust``: the data's train prior reaches the model; training adds log prior to the logits."""
    root = make_demo_dataset(tmp_path / "uneven", n_per_class=12)
    for path in sorted((root / "Viral Pneumonia" / "images").glob("*.png"))[4:]:
        path.unlink()
    dm = _dm(root, balance="logit_adjust", val_fraction=0.25)
    counts = list(dm.class_counts.values())
    assert dm.class_prior == pytest.approx([c / sum(counts) for c in counts]) and dm.class_weights is None
    assert _dm(root, balance="loss").class_prior is None
    model = XRayClassifier(pretrained=False, image_size=64, class_prior=dm.class_prior)
    batch = {
        "image": torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 2, 3, 3, 0]),
    }
    with torch.no_grad():
        logits = model.eval()(batch["image"]).float()
    prior = torch.tensor(dm.class_prior).log()
    seen = {}
    model._log_loss = lambda stage, loss, batch_size: seen.__setitem__(stage, loss.item())
    for stage in ("train", "val"):
        model.shared_step(batch, stage)
    assert seen["train"] == pytest.approx(torch.nn.functional.cross_entropy(logits + prior, batch["label"]).item())
    assert seen["val"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["label"]).item())
    cli = build_cli(["--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(root),
                     "--data.balance", "logit_adjust", "--data.val_fraction", "0.25"], run=False)  # fmt: skip
    assert cli.model.hparams.class_prior == pytest.approx(dm.class_prior)
    with pytest.raises(ValueError, match="class_prior has 2 values"):
        XRayClassifier(pretrained=False, class_prior=[0.5, 0.5])


def test_intensity_standardisation_travels_with_the_checkpoint(demo_root: Path, tmp_path: Path):
    """``data.intensity`` is linked to the model and stored, so inference preprocesses as training did."""
    from covid_lightning.data.transforms import eval_transform, load_image

    out = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(demo_root)]
    args += ["--data.intensity", "clahe", "--data.image_size", "32", "--data.num_workers", "0"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert main([*args, "--trainer.default_root_dir", str(out)]) == 0
    ckpt = next(out.rglob("last.ckpt"))
    model = load_checkpoint(ckpt).eval()
    assert model.hparams.intensity == "clahe" and model.describe()["intensity"] == "clahe"
    path = next(Path(demo_root).rglob("COVID/images/*.png"))
    image = load_image(path)
    plain, clahe = (eval_transform(32, i)(image=image)["image"] for i in ("none", "clahe"))
    assert not torch.equal(plain, clahe)
    with torch.no_grad():
        expected = model.probabilities(model(clahe[None])).squeeze(0)
    got = classify(model, path)
    assert [got[c] for c in model.class_names] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize("key, data_value", [("image_size", 32), ("intensity", "clahe")])
def test_data_prepared_unlike_the_model_is_refused(demo_root: Path, tmp_path: Path, key: str, data_value):
    """Wired by hand (no CLI link), a DataModule whose size or intensity differs from the model's is refused
    before training: the checkpoint would record the model's, and inference would follow it."""
    from covid_lightning.modules.base import InputMismatchError

    model = XRayClassifier(pretrained=False, image_size=64)
    dm = RadiographyDataModule(root=str(demo_root), batch_size=8, num_workers=0, **{"image_size": 64, key: data_value})
    with pytest.raises(InputMismatchError, match=f"data's {key}"):
        _trainer(tmp_path, fast_dev_run=True).fit(model, dm)


def test_the_intensity_choices_are_the_transforms_steps():
    """One list of intensity options: the CLI type (models, data) is the transforms' table."""
    from typing import get_args, get_type_hints

    from covid_lightning.data.datamodules import XRayDataModule
    from covid_lightning.data.transforms import INTENSITY, Intensity
    from covid_lightning.modules.segmenter import LungSegmenter

    assert set(get_args(Intensity)) == set(INTENSITY)
    for cls in (XRayClassifier, LungSegmenter, XRayDataModule):
        assert get_type_hints(cls.__init__)["intensity"] == Intensity, cls


def test_mixup_trains_on_mixed_inputs_and_soft_targets(demo_root: Path, tmp_path: Path, monkeypatch):
    """``mixup_alpha``: the training loss takes soft targets (each image's share of two labels) and the training
    metrics the larger share; validation is untouched. Both paths fit: images and cached features (manifold)."""
    import covid_lightning.modules.classifier as module
    from covid_lightning.callbacks import FrozenFeatureCache

    model = XRayClassifier(pretrained=False, image_size=64, mixup_alpha=0.4).eval()
    batch = {
        "image": torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 2, 3, 3, 0]),
    }
    targets, scored = [], []
    real_loss, real_metrics = module.F.cross_entropy, model.stage_metrics

    def loss(logits, target, **kw):
        targets.append(target)
        return real_loss(logits, target, **kw)

    class Recorder:
        def __init__(self, stage):
            self.stage = stage

        def update(self, probs, labels):
            scored.append(labels)
            real_metrics(self.stage).update(probs, labels)

    monkeypatch.setattr(module.F, "cross_entropy", loss)
    monkeypatch.setattr(model, "stage_metrics", Recorder)
    model._log_loss = lambda *a, **kw: None
    with torch.no_grad():
        model.shared_step(batch, "train")
        model.shared_step(batch, "val")
    soft, hard = targets
    assert soft.shape == (6, 4) and soft.dtype.is_floating_point
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert soft.max(1).values.lt(1).any(), "no image was mixed"
    assert (soft > 0).sum(1).le(2).all()  # two images per mix
    assert torch.equal(scored[0], soft.argmax(1)) and torch.equal(scored[1], batch["label"])
    assert torch.equal(hard, batch["label"])  # validation: the plain labels
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        XRayClassifier(pretrained=False, mixup_alpha=-1)
    monkeypatch.undo()
    for name, callbacks in (("images", []), ("features", [FrozenFeatureCache()])):
        model = XRayClassifier(pretrained=False, image_size=64, trainable="last_conv", mixup_alpha=0.4)
        trainer = _trainer(tmp_path / name, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                           callbacks=callbacks, enable_checkpointing=False)  # fmt: skip
        trainer.fit(model, _dm(demo_root))
        assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"]), name
