"""``scripts/transfer_probe.py``: target validation hold-out, selection on validation, summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedvision.data.cache import DecodedCache
from fedvision.errors import FedvisionError
from scripts import transfer_probe as tp


def _labels(per_class: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``per_class[c]`` images of class ``c``."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_split_target_disjoint_stratified_and_seeded():
    labels = _labels([300, 300, 120, 50, 7])
    fit, val = tp.split_target(labels, 0.1, seed=3)
    assert np.intersect1d(fit, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(labels.size))
    # per class: round(0.1 * count) held out, every class present in both parts
    assert np.bincount(labels[val]).tolist() == [30, 30, 12, 5, 1]
    assert np.bincount(labels[fit]).tolist() == [270, 270, 108, 45, 6]
    again_fit, again_val = tp.split_target(labels, 0.1, seed=3)
    assert np.array_equal(fit, again_fit) and np.array_equal(val, again_val)
    _, other_val = tp.split_target(labels, 0.1, seed=4)
    assert not np.array_equal(val, other_val)
    assert np.bincount(labels[other_val]).tolist() == [30, 30, 12, 5, 1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_target_refuses_fraction_outside_open_interval(fraction):
    with pytest.raises(FedvisionError, match="val_fraction"):
        tp.split_target(_labels([10, 10]), fraction, seed=0)


def test_split_target_refuses_class_without_validation_image():
    with pytest.raises(FedvisionError, match=r"no image of classes \[1\]"):
        tp.split_target(_labels([100, 2]), 0.1, seed=0)


def test_best_epoch_is_earliest_maximum():
    assert tp.best_epoch([0.2, 0.5, 0.5, 0.4]) == 1
    with pytest.raises(ValueError):
        tp.best_epoch([])


def test_select_on_val_reports_test_of_best_validation_epoch_not_best_test():
    """Validation peaks at epoch 1, test at epoch 2: the reported test must be epoch 1's."""
    model = torch.nn.Linear(1, 1)
    val_by_epoch, test_by_epoch = [0.2, 0.5, 0.4], [0.30, 0.35, 0.60]
    test_calls = []

    def epochs():
        for e in range(3):
            with torch.no_grad():
                model.bias.fill_(float(e))  # stands in for one epoch of training
            yield e

    def epoch_of(m):
        return round(float(m.bias.detach()))

    def test_acc(m):
        test_calls.append(epoch_of(m))
        return test_by_epoch[epoch_of(m)]

    sel = tp.select_on_val(model, epochs(), lambda m: val_by_epoch[epoch_of(m)], test_acc)
    assert sel.val == val_by_epoch
    assert sel.best_epoch == 1 and sel.val_best == 0.5
    assert sel.test == 0.35  # not 0.60, the best test accuracy
    assert test_calls == [1]  # the test split is evaluated once, with the chosen epoch's weights
    assert epoch_of(model) == 1


def test_summarize_mean_sample_std_and_per_seed_values():
    rows = []
    for seed, x in [(2, 0.3), (0, 0.1), (1, 0.2)]:
        rows.append({"model": "m", "size": 64, "seed": seed, "pretrain_s": 10.0 * (seed + 1)})
        rows[-1].update({k: x for k in tp.METRICS})
    rows.append(
        {"model": "m", "size": 48, "seed": 0, "pretrain_s": 1.0, **dict.fromkeys(tp.METRICS, 0.7)}
    )
    (a, b) = tp.summarize(rows)
    assert (a["model"], a["size"], a["seeds"]) == ("m", 64, [0, 1, 2])
    assert a["pretrain_s"] == pytest.approx(20.0)
    for key in tp.METRICS:
        assert a[key]["values"] == pytest.approx([0.1, 0.2, 0.3])
        assert a[key]["mean"] == pytest.approx(0.2)
        assert a[key]["std"] == pytest.approx(0.1)  # ddof=1
    assert b["size"] == 48 and b["probe_test"] == {"mean": 0.7, "std": 0.0, "values": [0.7]}
    table = tp.format_summary([a, b])
    assert "| m, 64 px | 0 1 2 | 0.200 ± 0.100 [0.100, 0.200, 0.300] |" in table
    assert len(table.splitlines()) == 4


def _cache(tmp_path: Path, name: str, per_class: int, classes: int, size: int = 32) -> DecodedCache:
    rng = np.random.default_rng(len(name))
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    images = rng.integers(0, 256, (labels.size, 3, size, size), dtype=np.uint8)
    cls = [f"c{i}" for i in range(classes)]
    return DecodedCache(tmp_path / name, images, labels, cls, cls, size, {})


def test_run_candidate_trains_on_fit_part_selects_on_held_out_and_tests_once(tmp_path, monkeypatch):
    """Wiring: fine-tuning never trains on held-out or test images; test evaluated once a start."""
    source = (_cache(tmp_path, "src_tr", 6, 2), _cache(tmp_path, "src_va", 3, 2))
    tgt_train, tgt_test = _cache(tmp_path, "tgt_tr", 10, 2), _cache(tmp_path, "tgt_test", 4, 2)
    trained, evaluated = [], []
    real_train, real_eval = tp.train_local, tp.evaluate

    def spy_train(model, images, labels, indices, *a, **k):
        trained.append((images is tgt_train.images, np.array(indices)))
        return real_train(model, images, labels, indices, *a, **k)

    def spy_eval(model, images, labels, indices=None, **k):
        evaluated.append((images, None if indices is None else np.array(indices)))
        return real_eval(model, images, labels, indices, **k)

    monkeypatch.setattr(tp, "train_local", spy_train)
    monkeypatch.setattr(tp, "evaluate", spy_eval)
    res = tp.run_candidate(
        "shufflenet_v2_x0_5", source, (tgt_train, tgt_test), seed=5, val_fraction=0.2,
        pretrain_epochs=1, finetune_epochs=2, lr=0.05, batch_size=8, augment="none",
    )  # fmt: skip
    fit, val = tp.split_target(tgt_train.labels, 0.2, 5)
    assert (res["target_fit_images"], res["target_val_images"]) == (16, 4)
    target_fits = [idx for on_target, idx in trained if on_target]
    assert len(target_fits) == 3 * 2
    assert all(np.array_equal(idx, fit) for idx in target_fits)
    test_evals = [e for e in evaluated if e[0] is tgt_test.images]
    held_evals = [e for e in evaluated if e[0] is tgt_train.images]
    assert len(test_evals) == 3 and all(idx is None for _, idx in test_evals)
    assert len(held_evals) == 3 * 2 and all(np.array_equal(idx, val) for _, idx in held_evals)
    for start in tp.STARTS:
        assert res[f"{start}_val"] == max(res[f"{start}_val_per_epoch"])
        assert res[f"{start}_best_epoch"] in (1, 2)
        assert 0.0 <= res[f"{start}_test"] <= 1.0
    assert set(tp.METRICS) <= set(res)
