"""FedNova (Wang et al. 2020): normalised averaging against hand-computed numbers, and in a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.errors import FedvisionError
from fedvision.fl.strategy import check_strategy
from strategies.fednova import FedNova, momentum_steps

pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


def _record(w) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})


def _reply(w, n: int, steps: int, momentum: float = 0.0, drop: str | None = None) -> Message:
    metrics = {
        C.KEY_NUM_EXAMPLES: n, C.KEY_TRAIN_LOSS: 0.5, C.KEY_STEPS: steps,
        C.KEY_MOMENTUM: momentum,
    }  # fmt: skip
    metrics.pop(drop, None)
    content = RecordDict({C.KEY_ARRAYS: _record(w), C.KEY_METRICS: MetricRecord(metrics)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _strategy(**overrides) -> FedNova:
    cfg = compose_config(["strategy=fednova", *(f"strategy.{k}={v}" for k, v in overrides.items())])
    strategy = instantiate(cfg.strategy)
    assert type(strategy) is FedNova
    return strategy


def _round(strategy: FedNova, x, replies) -> tuple[np.ndarray, MetricRecord]:
    list(strategy.configure_train(1, _record(x), ConfigRecord(), _Grid()))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy(), metrics


def test_momentum_steps_by_hand_and_against_torch_sgd():
    assert momentum_steps(4, 0.0) == 4.0
    assert momentum_steps(1, 0.9) == pytest.approx(1.0)
    # tau=2: the buffer is g, then rho*g + g: 1 + (1 + rho) = 2.5 at rho=0.5.
    assert momentum_steps(2, 0.5) == pytest.approx(2.5)
    # tau=4, rho=0.5: 1 + 1.5 + 1.75 + 1.875 = 6.125
    assert momentum_steps(4, 0.5) == pytest.approx(6.125)
    # PyTorch's SGD with a constant gradient g moves w by lr * g * a(tau, rho).
    w = torch.zeros(3, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5])
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(7):
        opt.zero_grad()
        (w * g).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * g * momentum_steps(7, 0.9))
    with pytest.raises(FedvisionError, match="at least 1"):
        momentum_steps(0, 0.0)


# Two clients from x = (0, 0): y1 = (-2, 2) with n1 = 1 example and tau1 = 2 steps; y2 = (-8, 6)
# with n2 = 3 and tau2 = 4. p = (0.25, 0.75).
# Plain SGD: a = (2, 4); tau_eff = 0.25*2 + 0.75*4 = 3.5; d1 = (x - y1)/2 = (1, -1);
# d2 = (x - y2)/4 = (2, -1.5); sum p d = (0.25 + 1.5, -0.25 - 1.125) = (1.75, -1.375);
# x_new = -3.5 * (1.75, -1.375) = (-6.125, 4.8125). FedAvg would give (-6.5, 5.0).
X0 = [0.0, 0.0]
Y1, Y2 = [-2.0, 2.0], [-8.0, 6.0]


def test_fednova_normalises_by_local_steps():
    x, metrics = _round(_strategy(), X0, [_reply(Y1, 1, 2), _reply(Y2, 3, 4)])
    np.testing.assert_allclose(x, [-6.125, 4.8125], rtol=1e-6)
    assert metrics["tau_eff"] == pytest.approx(3.5)
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(0.5)


def test_fednova_with_momentum():
    # rho = 0.5: a = (2.5, 6.125) (see above); tau_eff = 0.625 + 4.59375 = 5.21875;
    # d1 = (2, -2)/2.5 = (0.8, -0.8); d2 = (8, -6)/6.125 = (1.3061224, -0.9795918);
    # sum p d = (0.2 + 0.9795918, -0.2 - 0.7346939) = (1.1795918, -0.9346939);
    # x_new = -5.21875 * that = (-6.1559949, 4.8779337).
    replies = [_reply(Y1, 1, 2, 0.5), _reply(Y2, 3, 4, 0.5)]
    x, metrics = _round(_strategy(), X0, replies)
    np.testing.assert_allclose(x, [-6.1559949, 4.8779337], rtol=1e-6)
    assert metrics["tau_eff"] == pytest.approx(5.21875)


def test_equal_work_is_fedavg_and_global_lr_scales_the_step():
    # Equal tau: x - tau * sum p (x - y)/tau = sum p y = (0.25*(-2) + 0.75*(-8), 0.5 + 4.5).
    x, _ = _round(_strategy(), X0, [_reply(Y1, 1, 3), _reply(Y2, 3, 3)])
    np.testing.assert_allclose(x, [-6.5, 5.0], rtol=1e-6)
    # global_lr = 0.5 halves the normalised step of the first example.
    x, _ = _round(_strategy(global_lr=0.5), X0, [_reply(Y1, 1, 2), _reply(Y2, 3, 4)])
    np.testing.assert_allclose(x, [-3.0625, 2.40625], rtol=1e-6)


def test_running_statistics_get_the_example_weighted_mean():
    strategy = _strategy()
    strategy.set_parameter_mask(np.array([True, False]))  # w[1] is, say, a running mean
    x, _ = _round(strategy, X0, [_reply(Y1, 1, 2), _reply(Y2, 3, 4)])
    np.testing.assert_allclose(x, [-6.125, 5.0], rtol=1e-6)
    strategy.set_parameter_mask(np.array([True, False, True]))
    with pytest.raises(FedvisionError, match="mask has 3 entries"):
        _round(strategy, X0, [_reply(Y1, 1, 2), _reply(Y2, 3, 4)])


def test_a_reply_without_its_steps_is_refused_with_one_line():
    with pytest.raises(FedvisionError, match="lacks the metric 'steps'"):
        _round(_strategy(), X0, [_reply(Y1, 1, 2, drop=C.KEY_STEPS), _reply(Y2, 3, 4)])


@pytest.mark.parametrize("name", ["fednova", "scaffold"])
def test_adam_is_refused_before_a_run_starts(name):
    cfg = compose_config([f"strategy={name}", "client.optimizer=adam"])
    with pytest.raises(FedvisionError, match=r"client\.optimizer=adam; set client\.optimizer=sgd"):
        check_strategy(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize("extra", ["client.backbone_lr_factor=0.1", "client.head_warmup_rounds=1"])
def test_scaffold_refuses_a_second_learning_rate_and_fednova_takes_it(extra):
    """SCAFFOLD's option II divides by one K * lr; FedNova's normalisation holds per parameter."""
    cfg = compose_config(["strategy=scaffold", extra])
    with pytest.raises(FedvisionError, match="assumes one learning rate for every parameter"):
        check_strategy(OmegaConf.to_container(cfg, resolve=True))
    check_strategy(
        OmegaConf.to_container(compose_config(["strategy=fednova", extra]), resolve=True)
    )


# --- two rounds in process, with the real ClientApp ----------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fedvision.data.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("fednova") / "gen", num_classes=3, num_source=1,
        train_per_class=12, val_per_class=4, size=16, workers=1, progress=False,
    )  # fmt: skip


def test_two_rounds_with_unequal_work_follow_the_formula(dataset, tmp_path):
    from test_server_loop import prepared

    from fedvision.fl.server import serve
    from fedvision.models import build_model, split_parts
    from tests.grids import InlineGrid

    run_dir = prepared(
        dataset, tmp_path, "strategy=fednova", "num_rounds=2", "partition=dirichlet",
        "client.local_epochs=1", "client.batch_size=4", "client.momentum=0.5",
    )  # fmt: skip
    grid = InlineGrid(run_dir, 2)
    assert serve(grid, run_dir)["rounds_done"] == 2
    last = [
        (m, r) for m, r, _ in grid.log
        if m.metadata.message_type == "train" and m.content[C.KEY_CONFIG][C.KEY_SERVER_ROUND] == 2
    ]  # fmt: skip
    metrics = [r.content[C.KEY_METRICS] for _, r in last]
    n = np.array([mr[C.KEY_NUM_EXAMPLES] for mr in metrics], dtype=np.float64)
    tau = [int(mr[C.KEY_STEPS]) for mr in metrics]
    assert len(set(tau)) == 2, tau  # unequal client sizes: unequal local work
    assert [mr[C.KEY_MOMENTUM] for mr in metrics] == [0.5, 0.5]
    # The checkpoint's parameters are x - tau_eff * sum p (x - y)/a: every packed entry is a
    # parameter (BatchNorm statistics travel apart, averaged outside the strategy).
    model = build_model("resnet18", 2)
    parts = split_parts(model)
    assert set(parts.shared) == {k for k, _ in model.named_parameters()}
    x = last[0][0].content[C.KEY_ARRAYS][C.KEY_FLAT].numpy().astype(np.float64)
    ys = [r.content[C.KEY_ARRAYS][C.KEY_FLAT].numpy().astype(np.float64) for _, r in last]
    p, a = n / n.sum(), np.array([momentum_steps(t, 0.5) for t in tau])
    tau_eff = p @ a
    want = x - tau_eff * sum(pi * (x - y) / ai for pi, ai, y in zip(p, a, ys, strict=True))
    latest = torch.load(run_dir / C.CKPT_LATEST, weights_only=True)["model"]
    got = np.concatenate([latest[k].numpy().reshape(-1) for k in parts.shared])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fedavg = sum(pi * y for pi, y in zip(p, ys, strict=True))
    assert not np.allclose(got, fedavg, rtol=1e-5, atol=1e-6)  # FedNova is no FedAvg
