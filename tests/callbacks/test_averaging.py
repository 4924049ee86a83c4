from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from covid_lightning import RadiographyDataModule, XRayClassifier
from covid_lightning.callbacks import EMAWeights
from tests.helpers.trainers import quiet_trainer


@pytest.mark.parametrize(
    ("callback", "tested_key"), [(EMAWeights, "state_dict"), (EMAWeightAveraging, "current_model_state")]
)
def test_the_checkpoint_tests_with_the_weights_that_were_validated(
    demo_root: Path, tmp_path: Path, callback, tested_key, recwarn
):
    """``fit`` then ``test(ckpt_path="best")`` in one Trainer (the experiment runner): EMAWeights tests the averaged
    weights the checkpoint was selected by; Lightning's callback reloads the raw ones (why the subclass exists).
    EMAWeights does not warn about sharded layers (these modules' configure_model only compiles)."""
    torch.manual_seed(0)
    dm = RadiographyDataModule(root=str(demo_root), image_size=32, batch_size=8, num_workers=0, test_fraction=0.25)
    model = XRayClassifier(pretrained=False, image_size=32, trainable="last_conv")
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[callback(decay=0.5)])
    trainer.fit(model, dm)
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged), "EMA left the weights as they were"
    tested = {}
    model.on_test_start = lambda: tested.update({k: v.clone() for k, v in model.state_dict().items()})
    trainer.test(model, dm, ckpt_path="best", verbose=False)
    expected = ckpt[tested_key]
    assert all(torch.equal(tested[k], expected[k]) for k in expected)
    sharding_warned = any("configure_model" in str(w.message) for w in recwarn)
    assert sharding_warned == (callback is EMAWeightAveraging)
