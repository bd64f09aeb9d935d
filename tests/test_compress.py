"""`fedvision compress`: pruning sparsity, channel zeroing, int8 agreement, the table, its files."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from fedvision import constants as C
from fedvision.cli import main
from fedvision.compress import (
    CompressSpec,
    check_sparsity,
    compress_run,
    count_parameters,
    load_int8,
    make_permanent,
    prune_channels,
    prune_global_unstructured,
    quantize_int8,
)
from fedvision.config import compose_config
from fedvision.data.cache import DecodedCache
from fedvision.data.generate import generate_dataset
from fedvision.data.transforms import build_eval_transform
from fedvision.engine import TrainConfig, evaluate, train_local
from fedvision.errors import FedvisionError
from fedvision.fl.checkpoint import Checkpoint, save_checkpoint
from fedvision.models import build_model, find_head
from fedvision.rundir import read_plan
from fedvision.runner import run_experiment

ARCH = "mobilenet_v2"  # small (2.2 M parameters); its int8 version runs at 16 px
CLASSES = 2  # the generated dataset below: 3 classes, 1 for pretraining, 2 targets


def _overrides(dataset, *extra: str) -> list[str]:
    return [
        f"data.root={dataset}",
        f"data.classes_file={dataset / 'target_classes.txt'}",
        "data.size=16",
        "data.workers=1",
        "num_clients=2",
        "num_rounds=1",
        "partition=iid",
        "progress=false",
        "runtime=prepare_only",
        f"model.name={ARCH}",
        "model.weights=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A prepared run (2 target classes, 16 px) with a checkpoint_best.pt."""
    root = tmp_path_factory.mktemp("compress")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDVISION_HOME", str(root / "home"))
        dataset = generate_dataset(
            root / "gen", num_classes=3, num_source=1, train_per_class=16, val_per_class=8,
            size=16, workers=1, progress=False,
        )  # fmt: skip
        run = root / "run"
        assert run_experiment(compose_config(_overrides(dataset)), run) == {"prepared": str(run)}
    plan = read_plan(run)
    torch.manual_seed(0)
    model = build_model(ARCH, plan.num_classes)  # random weights: what is measured is the tooling
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_checkpoint(
        run / C.CKPT_BEST,
        Checkpoint(model=state, arch=ARCH, num_classes=plan.num_classes, round=1, lr_horizon=1),
    )
    return run


@pytest.fixture(scope="module")
def compressed(run_dir):
    """One `compress_run` with every kind of variant, the pruned ones fine-tuned for an epoch."""
    spec = CompressSpec(
        prune=(0.5,), structured=(0.25,), quantize=True, finetune_epochs=1, device="cpu",
        calib_images=32, repeats=2, batch=8,
    )  # fmt: skip
    out = run_dir / "compressed"
    report = compress_run(run_dir, out, spec, progress=False)
    return out, report


def _load(path) -> nn.Module:
    """What `fedvision run model.weights=PATH` builds (strict about the head)."""
    return build_model(ARCH, CLASSES, weights=str(path), allow_head_mismatch=False)


def _tiny() -> nn.Module:
    """Conv(1->4, 3x3) + Linear(16->2): 36 + 32 = 68 prunable weights with distinct magnitudes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 1, 3, 3))
        model[4].weight.copy_(torch.randn(2, 16))
    return model


def _prunable(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            m.weight.detach().flatten()
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
        ]
    )


@pytest.mark.parametrize(("amount", "zeros"), [(0.25, 17), (0.5, 34), (0.9, 61)])
def test_global_pruning_zeroes_exactly_the_smallest_weights(amount, zeros):
    # 68 weights: torch prunes round(amount * 68) of them = 17, 34, 61.
    model = _tiny()
    before = _prunable(model)
    biases = [model[0].bias.detach().clone(), model[4].bias.detach().clone()]
    prune_global_unstructured(model, amount)
    make_permanent(model)
    after = _prunable(model)
    assert int((after == 0).sum()) == zeros
    # One global threshold: the zeroed ones are the smallest magnitudes across both layers.
    smallest = before.abs().argsort()[:zeros]
    assert torch.all(after[smallest] == 0)
    assert torch.equal(after[after != 0], before[after != 0])
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[4].bias, biases[1])
    # Permanent: plain weights again, no masks or hooks left.
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_channel_pruning_zeroes_whole_output_channels_and_spares_the_head():
    torch.manual_seed(0)
    model = build_model("squeezenet1_0", 3)  # its head is a 1x1 conv: classes, never pruned
    head_name, head = find_head(model)
    head_before = head.weight.detach().clone()
    convs = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and n != head_name}  # fmt: skip
    prune_channels(model, 0.25)
    make_permanent(model)
    for name, before in convs.items():
        w = model.get_submodule(name).weight.detach()
        dead = (w.flatten(1) == 0).all(dim=1)
        assert int(dead.sum()) == round(0.25 * w.shape[0]), name
        # The zeroed channels are those of smallest L1 norm; the others are untouched.
        l1 = before.flatten(1).abs().sum(dim=1)
        assert set(l1.argsort()[: int(dead.sum())].tolist()) == set(
            dead.nonzero().flatten().tolist()
        )
        assert torch.equal(w[~dead], before[~dead])
    assert torch.equal(head.weight, head_before)


@pytest.mark.parametrize("bad", [1.5, -0.1, 0.0, 1.0])
def test_impossible_sparsity_is_a_fedvision_error(bad):
    with pytest.raises(FedvisionError, match="strictly between 0 and 1"):
        check_sparsity(bad, "--prune")
    with pytest.raises(FedvisionError, match="--structured"):
        CompressSpec(structured=(bad,))


def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys):
    assert main(["compress", str(run_dir), "--prune", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedvision: error: --prune 1.5") and err.count("\n") == 1
    assert main(["compress", str(run_dir), "--structured", "-0.1"]) == 2
    assert "--structured -0.1 is not a sparsity" in capsys.readouterr().err
    # A run without checkpoint_latest.pt, and a file that does not exist.
    assert main(["compress", str(run_dir), "--checkpoint", "latest", "--quantize"]) == 2
    err = capsys.readouterr().err
    assert f"has no {C.CKPT_LATEST}" in err and err.count("\n") == 1
    assert main(["compress", str(tmp_path / "missing.pt"), "--quantize"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A weights file outside a run directory: the model and data are unknown.
    (tmp_path / "w.pt").write_bytes(b"")
    assert main(["compress", str(tmp_path / "w.pt"), "--quantize"]) == 2
    assert "pass --run DIR" in capsys.readouterr().err


def test_pruned_masks_hold_through_engine_finetune(compressed, run_dir):
    out, report = compressed
    rows = {r["variant"].split(",")[0]: r for r in report["variants"]}
    unstructured, channels = rows["unstructured 0.5"], rows["channels 0.25 (L1)"]
    assert unstructured["finetune"]["steps"] > 0 and channels["finetune"]["steps"] > 0
    # Fine-tuned yet still exactly at the requested sparsity: the masks applied in every step.
    model = _load(out / C.COMPRESS_PRUNED.format(0.5))
    weights = _prunable(model)
    assert int((weights == 0).sum()) == round(0.5 * weights.numel())
    # ... and the unpruned weights did move (the fine-tune trained).
    base = _load(run_dir / C.CKPT_BEST)
    kept = weights != 0
    assert not torch.equal(weights[kept], _prunable(base)[kept])
    head_name, _ = find_head(model)
    model = _load(out / C.COMPRESS_CHANNELS.format(0.25))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != head_name:
            dead = (m.weight.detach().flatten(1) == 0).all(dim=1)
            assert int(dead.sum()) == round(0.25 * m.out_channels), name


def test_pruned_file_loads_and_evaluates_as_in_the_table(compressed, run_dir):
    out, report = compressed
    plan = read_plan(run_dir)
    test = DecodedCache.open(plan.test_cache)
    for row in report["variants"][:3]:  # float and the two pruned ones: plain state dicts
        model = _load(out / row["file"])
        res = evaluate(model, test.images, test.labels, device="cpu")
        assert res.accuracy == pytest.approx(row["test_accuracy"])
        assert count_parameters(model) == (row["params"], row["nonzeros"])


def test_pruned_file_is_the_initial_model_of_fedvision_run(compressed, run_dir, tmp_path):
    out, _ = compressed
    pruned = out / C.COMPRESS_PRUNED.format(0.5)
    dataset = run_dir.parent / "gen"
    cfg = compose_config(_overrides(dataset, f"model.weights={pruned}"))
    assert run_experiment(cfg, tmp_path / "next") == {"prepared": str(tmp_path / "next")}
    initial = torch.load(tmp_path / "next" / C.RUN_INITIAL, weights_only=True)
    initial = initial.get("model", initial)
    saved = torch.load(pruned, weights_only=True)["model"]
    assert initial.keys() == saved.keys()
    assert all(torch.equal(initial[k].float(), saved[k].float()) for k in saved)


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip


def test_int8_agrees_with_float_on_a_trained_cnn(run_dir):
    plan = read_plan(run_dir)
    test, train = DecodedCache.open(plan.test_cache), DecodedCache.open(plan.train_cache)
    torch.manual_seed(0)
    model = _small_cnn()
    cfg = TrainConfig(epochs=15, batch_size=8, lr=0.05, augment="none")
    train_local(model, train.images, train.labels, np.arange(len(train)), cfg, "cpu")
    to_float = build_eval_transform(None)
    calib = to_float(torch.from_numpy(np.array(train.images)))
    x = torch.cat([to_float(torch.from_numpy(np.array(test.images))), calib])
    q = quantize_int8(copy.deepcopy(model), [calib])
    with torch.inference_mode():
        ref, got = model.eval()(x), q(x)
    assert len(x) == 48 and len(set(ref.argmax(1).tolist())) == CLASSES  # not a constant answer
    # Tolerance: 8-bit activations (per tensor) and weights (per channel) round to 1/255 of their
    # calibrated range, about 0.4 % per quantized layer; over these three layers the logits move
    # by about 1 % of their range (measured 0.7-1.2 % over 4 seeds), so 5 % leaves room for test
    # images outside the calibrated range. Top-1 flips only where the float model's two logits are
    # within that error (one image of 48 in 4 seeds), so at least 90 % must agree.
    spread = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) <= 0.05 * spread
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9


def test_int8_variant_reloads_as_measured(compressed, run_dir):
    out, report = compressed
    test = DecodedCache.open(read_plan(run_dir).test_cache)
    q = load_int8(out / C.COMPRESS_INT8, ARCH, CLASSES, test.size)
    row = next(r for r in report["variants"] if r["variant"] == "int8")
    res = evaluate(q, test.images, test.labels, device="cpu")
    assert res.accuracy == pytest.approx(row["test_accuracy"])
    assert count_parameters(q) == (row["params"], row["nonzeros"])
    # Quantized weights are int8: a quarter of the float file, give or take scales and keys.
    assert 0.2 < row["size_bytes_vs_float"] < 0.35


def test_quantize_int8_calibrates_activation_ranges():
    # Calibrated on inputs 100x larger, the input quantizer's scale is ~100x larger too.
    model = _tiny().eval()
    x = torch.randn(8, 1, 6, 6)
    small = quantize_int8(copy.deepcopy(model), [x])
    large = quantize_int8(copy.deepcopy(model), [100 * x])
    scales = [
        float(getattr(m, name)) for m in (small, large) for name, _ in m.named_buffers()
        if name.endswith("input_scale_0")
    ]  # fmt: skip
    assert len(scales) == 2 and scales[1] / scales[0] == pytest.approx(100, rel=0.05)


def test_int8_failure_on_a_shape_is_one_fedvision_error():
    # Quantized mean over shufflenet's final 1x1 map is missing in torch's int8 kernels.
    model = build_model("shufflenet_v2_x0_5", 2).eval()
    with pytest.raises(FedvisionError, match="leave out --quantize or use larger images"):
        quantize_int8(model, [torch.randn(2, 3, 16, 16)])


def test_table_numbers_are_consistent(compressed):
    out, report = compressed
    rows = report["variants"]
    assert [r["variant"].split(",")[0] for r in rows] == [
        "float", "unstructured 0.5", "channels 0.25 (L1)", "int8"
    ]  # fmt: skip
    ref = rows[0]
    for r in rows:
        assert r["nonzeros"] == r["params"] - r["zeros"]
        assert r["sparsity"] == pytest.approx(r["zeros"] / r["params"])
        assert r["size_bytes"] == (out / r["file"]).stat().st_size
        assert r["size_bytes_vs_float"] == pytest.approx(r["size_bytes"] / ref["size_bytes"])
        for key in ("ms_per_image_b1", "ms_per_image_batch"):
            assert r[key] > 0
            assert r[f"{key}_vs_float"] == pytest.approx(r[key] / ref[key])
        assert r["test_accuracy_delta"] == pytest.approx(r["test_accuracy"] - ref["test_accuracy"])
    assert ref["size_bytes_vs_float"] == 1.0
    # Unstructured zeros keep the dense file size, but zip well.
    assert rows[1]["size_bytes_vs_float"] == pytest.approx(1.0, abs=0.01)
    assert rows[1]["zlib_bytes_vs_float"] < 0.8
    assert report["threads"] == 1 and report["batch"] == 8
    # The same rows in the CSV, JSON and markdown files.
    with (out / C.COMPRESS_CSV).open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["nonzeros"]) for r in csv_rows] == [r["nonzeros"] for r in rows]
    assert json.loads((out / C.COMPRESS_JSON).read_text())["variants"] == json.loads(
        json.dumps(rows)
    )
    md = (out / C.COMPRESS_MD).read_text()
    assert all(f"| {r['variant']} |" in md for r in rows) and "set_num_threads(1)" in md
