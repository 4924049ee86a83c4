import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_recall,
)

from covid_lightning.modules.metrics import (
    PairAccuracy,
    bootstrap,
    classification_scores,
    fit_temperature,
    pair_choice,
)

NAMES = ("a", "b", "c")


def _data(n: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    logits = torch.randn(n, 3, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 3)
    return logits.softmax(1), y


def _one_resample(probs: torch.Tensor, y: torch.Tensor, pair: tuple[int, int]):
    """The straightforward statistic: one resample (1-D image indices) at a time, AUROC by ``rankdata``."""
    p_all, y_all = probs.numpy(), y.numpy()

    def scores(idx: np.ndarray) -> dict[str, float]:
        p, t = p_all[idx], y_all[idx]
        out, recall, f1 = {"accuracy": np.mean(p.argmax(1) == t)}, [], []
        for c, name in enumerate(NAMES):
            pred, true = p.argmax(1) == c, t == c
            recall.append((pred & true).sum() / true.sum() if true.any() else np.nan)
            f1.append(2 * (pred & true).sum() / (true.sum() + pred.sum()) if true.any() else np.nan)
            auroc, n_pos = np.nan, true.sum()
            if 0 < n_pos < len(t):
                auroc = (rankdata(p[:, c])[true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(t) - n_pos))
            out |= {f"recall/{name}": recall[-1], f"f1/{name}": f1[-1], f"auroc/{name}": auroc}
        out |= {"balanced_accuracy": np.nanmean(recall), "macro_f1": np.nanmean(f1)}
        keep = (t == pair[0]) | (t == pair[1])
        out["pair_accuracy"] = np.mean(np.where(p[keep, pair[0]] >= p[keep, pair[1]], *pair) == t[keep])
        return out

    return scores


def _loop_bootstrap(statistic, n: int, resamples: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """The seeded percentile bootstrap, one generator draw per resample and metric, in that order."""
    point, rng = statistic(np.arange(n)), np.random.default_rng(seed)
    draws = np.array([[statistic(rng.integers(0, n, n))[k] for k in point] for _ in range(resamples)])
    low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return {k: (point[k], lo, hi) for k, lo, hi in zip(point, low, high)}


def test_pair_choice_takes_the_more_probable_of_the_two_on_tensors_and_arrays():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.7, 0.2], [0.1, 0.5, 0.4], [0.3, 0.4, 0.3]])
    expected = [0, 2, 2, 0]  # rows 2 and 3: the argmax (1) is neither; row 4: a tie goes to a
    assert pair_choice(probs, 0, 2).tolist() == expected and pair_choice(probs.numpy(), 0, 2).tolist() == expected
    assert pair_choice(probs, 2, 0).tolist() == [0, 2, 2, 2]


def test_vectorised_bootstrap_equals_the_per_resample_loop():
    """Every interval (and value) as the straightforward per-resample computation gives it, same seed: ties in the
    scores (AUROC), resamples without a class (NaN), and resamples drawn in more than one block."""
    probs, y = _data(70, seed=1)
    probs = (probs * 10).round() / 10  # ties
    y = torch.where((y == 1) & (torch.arange(70) > 5), 0, y)  # class "b": 3 images, absent from some resamples
    fast = bootstrap(classification_scores(probs, y, NAMES, pair=(0, 2)), len(y), resamples=150, seed=7)
    slow = _loop_bootstrap(_one_resample(probs, y, (0, 2)), len(y), resamples=150, seed=7)
    assert list(fast) == list(slow)
    np.testing.assert_allclose(np.array(list(fast.values())), np.array(list(slow.values())), rtol=1e-12)
    values = np.random.default_rng(0).random((2, 6000))  # 2**20 // 6000 = 174 resamples a block: 4 blocks
    fast = bootstrap(lambda i: {"x": values[0][i].mean(1), "y": values[1][i].mean(1)}, 6000, resamples=300, seed=1)
    slow = _loop_bootstrap(lambda i: {"x": values[0][i].mean(), "y": values[1][i].mean()}, 6000, 300, seed=1)
    np.testing.assert_allclose(np.array(list(fast.values())), np.array(list(slow.values())), rtol=1e-12)


def test_scores_on_all_images_equal_torchmetrics():
    probs, y = _data()
    scores = {k: v[0] for k, v in classification_scores(probs, y, NAMES, pair=(0, 2))(np.arange(len(y))[None]).items()}
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
