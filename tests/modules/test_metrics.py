import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_recall,
)

from covid_lightning.modules.metrics import PairAccuracy, bootstrap, classification_scores, fit_temperature

NAMES = ("a", "b", "c")


def _data(n: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    logits = torch.randn(n, 3, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 3)
    return logits.softmax(1), y


def test_scores_on_all_images_equal_torchmetrics():
    probs, y = _data()
    scores = classification_scores(probs, y, NAMES, pair=(0, 2))(np.arange(len(y)))
    assert scores["accuracy"] == pytest.approx(multiclass_accuracy(probs, y, 3, average="micro").item())
    assert scores["balanced_accuracy"] == pytest.approx(multiclass_accuracy(probs, y, 3, average="macro").item())
    assert scores["macro_f1"] == pytest.approx(multiclass_f1_score(probs, y, 3, average="macro").item())
    for c, name in enumerate(NAMES):
        assert scores[f"recall/{name}"] == pytest.approx(multiclass_recall(probs, y, 3, average=None)[c].item())
        assert scores[f"f1/{name}"] == pytest.approx(multiclass_f1_score(probs, y, 3, average=None)[c].item())
        assert scores[f"auroc/{name}"] == pytest.approx(multiclass_auroc(probs, y, 3, average=None)[c].item())
    pair = PairAccuracy(0, 2)
    pair.update(probs, y)
    assert scores["pair_accuracy"] == pytest.approx(pair.compute().item())


def test_bootstrap_intervals_hold_the_value_are_seeded_and_narrow_with_n():
    probs, y = _data(60)
    small = bootstrap(classification_scores(probs, y, NAMES), len(y), resamples=1000, seed=3)
    assert small == bootstrap(classification_scores(probs, y, NAMES), len(y), resamples=1000, seed=3)
    for value, low, high in small.values():
        assert low <= value <= high
    probs, y = _data(600)
    large = bootstrap(classification_scores(probs, y, NAMES), len(y), resamples=1000, seed=3)
    width = {k: v[2] - v[1] for k, v in large.items()}
    assert width["accuracy"] < small["accuracy"][2] - small["accuracy"][1]


def test_a_class_without_images_has_no_value_and_no_interval():
    probs, y = _data(40)
    y = torch.where(y == 1, 0, y)  # class "b" absent
    out = bootstrap(classification_scores(probs, y, NAMES), len(y), resamples=200)
    assert all(np.isnan(x) for x in out["recall/b"])
    assert not np.isnan(out["balanced_accuracy"][0])


def test_temperature_scaling_recovers_an_overconfident_scale_and_keeps_predictions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)  # calibrated at T = 1 for z
    logits = 3 * z  # overconfident by 3
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.15)
    before = multiclass_calibration_error(logits.softmax(1), y, 3).item()
    after = multiclass_calibration_error((logits / t).softmax(1), y, 3).item()
    assert after < before / 2
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
