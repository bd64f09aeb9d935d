"""One aggregation round of each Flower strategy in conf/strategy/, checked against hand arithmetic.

Every strategy is built from its config file the way a run builds it; the replies are tiny
hand-made models (one array ``w`` of two weights) with distinct example counts, so that weighting
matters. Server-optimiser strategies run two rounds, to check the state they carry between rounds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedvision import constants as C
from fedvision.config import compose_config

pytestmark = pytest.mark.usefixtures("task_identity")


@lru_cache
def _config(name: str) -> DictConfig:
    return compose_config([f"strategy={name}"])


def _strategy(name: str):
    """A fresh strategy from conf/strategy/<name>.yaml, as `fedvision run strategy=<name>`."""
    return instantiate(_config(name).strategy)


class _Grid:
    """Just enough of a Grid for ``configure_train``: ten connected nodes, as in the default run."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


def _record(w) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float64))})


def _replies(*clients: tuple[list[float], int, float]) -> list[Message]:
    """One train reply per (weights, num-examples, train loss), as fedvision's clients send them."""
    return [
        Message(
            content=RecordDict(
                {
                    C.KEY_ARRAYS: _record(w),
                    C.KEY_METRICS: MetricRecord({C.KEY_NUM_EXAMPLES: n, C.KEY_TRAIN_LOSS: loss}),
                }
            ),
            dst_node_id=1,
            message_type="train",
        )
        for w, n, loss in clients
    ]


def _round(strategy, server_round: int, global_w, replies: list[Message]):
    """configure_train (the strategy notes the global model), then aggregate_train."""
    list(strategy.configure_train(server_round, _record(global_w), ConfigRecord(), _Grid()))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy(), metrics


# Three clients with 1, 3 and 4 examples. Example-weighted means:
#   R1: ((4,3)*1 + (2,5)*3 + (5.5,1.5)*4) / 8 = (32, 24) / 8 = (4, 3);  loss (0.8 + 1.2 + 0.8) / 8
#   R2: ((3.5,4.5)*1 + (1.5,6.5)*3 + (5,3)*4) / 8 = (28, 36) / 8 = (3.5, 4.5)
#   R2B: all first weights 0.1; ((4.5)*1 + (6.5)*3 + (3)*4) / 8 = 36 / 8 = 4.5  ->  (0.1, 4.5)
R1 = [([4.0, 3.0], 1, 0.8), ([2.0, 5.0], 3, 0.4), ([5.5, 1.5], 4, 0.2)]
R2 = [([3.5, 4.5], 1, 0.6), ([1.5, 6.5], 3, 0.3), ([5.0, 3.0], 4, 0.1)]
R2B = [([0.1, 4.5], 1, 0.6), ([0.1, 6.5], 3, 0.3), ([0.1, 3.0], 4, 0.1)]
AVG_R1, AVG_R2, AVG_R2B = np.array([4.0, 3.0]), np.array([3.5, 4.5]), np.array([0.1, 4.5])


# --- averaging -----------------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean():
    strategy = _strategy("fedavg")
    assert type(strategy).__name__ == "FedAvg"
    arrays, metrics = strategy.aggregate_train(1, _replies(*R1))
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 3.0])  # not the plain mean (3.83, 3.17)
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx((0.8 * 1 + 0.4 * 3 + 0.2 * 4) / 8)  # 0.35


def test_fedprox_sends_mu_and_averages_like_fedavg():
    strategy = _strategy("fedprox")
    assert strategy.proximal_mu == 0.01
    messages = list(strategy.configure_train(1, _record([0, 0]), ConfigRecord(), _Grid()))
    assert {m.content[C.KEY_CONFIG][C.KEY_PROXIMAL_MU] for m in messages} == {0.01}
    arrays, _ = strategy.aggregate_train(1, _replies(*R1))
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 3.0])


# --- server optimisers ---------------------------------------------------------------------------


def test_fedavgm_carries_server_momentum():
    strategy = _strategy("fedavgm")
    assert (strategy.server_momentum, strategy.server_learning_rate) == (0.9, 1.0)
    # Round 1: pseudo-gradient g1 = x0 - avg = (0,0) - (4,3) = (-4,-3); the buffer starts at g1
    # (PyTorch's SGD convention), so x1 = x0 - 1.0 * g1 = (4, 3): plain FedAvg.
    x1, _ = _round(strategy, 1, [0.0, 0.0], _replies(*R1))
    np.testing.assert_allclose(x1, [4.0, 3.0])
    np.testing.assert_allclose(strategy.momentum_vector[0], [-4.0, -3.0])
    # Round 2: g2 = x1 - avg = (4,3) - (3.5,4.5) = (0.5,-1.5);
    # buffer = 0.9 * (-4,-3) + (0.5,-1.5) = (-3.1,-4.2); x2 = x1 - buffer = (7.1, 7.2).
    x2, _ = _round(strategy, 2, x1, _replies(*R2))
    np.testing.assert_allclose(strategy.momentum_vector[0], [-3.1, -4.2])
    np.testing.assert_allclose(x2, [7.1, 7.2])


def _adam_lr(eta: float, b1: float, b2: float, t: int) -> float:
    # Flower's bias correction counts from t + 1 (round 1 uses beta**2), not from t as Kingma & Ba
    # do; Reddi et al.'s Algorithm 2 has no bias correction at all.
    return eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))


def test_fedadam_follows_reddi_et_al():
    strategy = _strategy("fedadam")
    assert (strategy.eta, strategy.eta_l, strategy.tau) == (3e-3, 0.02, 1e-3)
    eta, b1, b2, tau = strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau
    assert (b1, b2) == (0.9, 0.99)
    x0 = np.zeros(2)
    # Round 1, Reddi et al. Algorithm 2: d = avg - x; m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2;
    # x += lr_t * m / (sqrt(v) + tau), from m = v = 0.
    x1, _ = _round(strategy, 1, x0, _replies(*R1))
    d1 = AVG_R1 - x0
    m1, v1 = (1 - b1) * d1, (1 - b2) * d1**2
    np.testing.assert_allclose(x1, x0 + _adam_lr(eta, b1, b2, 1) * m1 / (np.sqrt(v1) + tau))
    assert np.all(np.abs(x1 - x0) < eta)  # however large the update, a weight moves < eta
    # Round 2 starts from the moments of round 1.
    x2, _ = _round(strategy, 2, x1, _replies(*R2B))
    d2 = AVG_R2B - x1
    m2, v2 = b1 * m1 + (1 - b1) * d2, b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(strategy.m_t["w"], m2)
    np.testing.assert_allclose(strategy.v_t["w"], v2)
    np.testing.assert_allclose(x2, x1 + _adam_lr(eta, b1, b2, 2) * m2 / (np.sqrt(v2) + tau))


def test_fedyogi_follows_reddi_et_al():
    strategy = _strategy("fedyogi")
    assert (strategy.eta, strategy.eta_l, strategy.tau) == (3e-3, 0.02, 1e-3)
    eta, b1, b2, tau = strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau
    assert (b1, b2) == (0.9, 0.99)
    x0 = np.zeros(2)
    # Yogi: v = v - (1-b2) d^2 sign(v - d^2); from v = 0 that is (1-b2) d^2, as Adam's.
    x1, _ = _round(strategy, 1, x0, _replies(*R1))
    d1 = AVG_R1 - x0
    m1, v1 = (1 - b1) * d1, (1 - b2) * d1**2
    np.testing.assert_allclose(x1, x0 + eta * m1 / (np.sqrt(v1) + tau))  # no bias correction
    x2, _ = _round(strategy, 2, x1, _replies(*R2B))
    d2 = AVG_R2B - x1
    # Weight 0 barely moves (d2^2 < v1: v shrinks), weight 1 jumps (d2^2 > v1: v grows).
    np.testing.assert_array_equal(np.sign(v1 - d2**2), [1.0, -1.0])
    m2, v2 = b1 * m1 + (1 - b1) * d2, v1 - (1 - b2) * d2**2 * np.sign(v1 - d2**2)
    np.testing.assert_allclose(strategy.m_t["w"], m2)
    np.testing.assert_allclose(strategy.v_t["w"], v2)
    np.testing.assert_allclose(x2, x1 + eta * m2 / (np.sqrt(v2) + tau))


def test_fedadagrad_accumulates_squared_updates():
    strategy = _strategy("fedadagrad")
    assert (strategy.eta, strategy.eta_l, strategy.tau) == (3e-3, 0.02, 1e-3)
    assert strategy.beta_1 == 0.0  # Flower's FedAdagrad has no server momentum: m = d
    strategy.eta, strategy.tau = 0.5, 0.0  # round numbers for the arithmetic below
    # Round 1: d1 = (4,3) - (0,0); v1 = d1^2 = (16, 9); x1 = 0.5 * (4/4, 3/3) = (0.5, 0.5).
    x1, _ = _round(strategy, 1, [0.0, 0.0], _replies(*R1))
    np.testing.assert_allclose(x1, [0.5, 0.5])
    # Round 2: d2 = (3.5,4.5) - (0.5,0.5) = (3,4); v2 = (16+9, 9+16) = (25, 25);
    # x2 = (0.5 + 0.5 * 3/5, 0.5 + 0.5 * 4/5) = (0.8, 0.9).
    x2, _ = _round(strategy, 2, x1, _replies(*R2))
    np.testing.assert_allclose(strategy.v_t["w"], [25.0, 25.0])
    np.testing.assert_allclose(strategy.m_t["w"], [3.0, 4.0])
    np.testing.assert_allclose(x2, [0.8, 0.9])


def _qffl_step(w, local_ws, losses, q: float, lipschitz: float):
    """Li et al. 2020, Algorithm 2 (q-FedAvg): one server step from the clients' local models."""
    dw = [lipschitz * (w - wk) for wk in local_ws]  # Delta w_k = L (w - w_k)
    delta = [f**q * d for f, d in zip(losses, dw, strict=True)]  # Delta_k = F_k^q Delta w_k
    h = [  # h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q
        q * f ** (q - 1) * np.sum(d**2) + lipschitz * f**q for f, d in zip(losses, dw, strict=True)
    ]
    return w - sum(delta) / sum(h)


def test_qfedavg_follows_li_et_al():
    strategy = _strategy("qfedavg")
    assert (strategy.q, strategy.client_learning_rate) == (0.1, 0.02)  # = client.lr
    assert strategy.train_loss_key == C.KEY_TRAIN_LOSS
    x0 = np.zeros(2)
    local_ws = [np.array(w) for w, _, _ in R1]
    losses = [loss for _, _, loss in R1]
    x1, metrics = _round(strategy, 1, x0, _replies(*R1))
    np.testing.assert_allclose(x1, _qffl_step(x0, local_ws, losses, 0.1, 1 / 0.02))
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(0.35)  # metrics stay example-weighted
    # Round 2 steps from the model given to configure_train; nothing else is carried over.
    x2, _ = _round(strategy, 2, x1, _replies(*R2))
    local_ws = [np.array(w) for w, _, _ in R2]
    np.testing.assert_allclose(x2, _qffl_step(x1, local_ws, [0.6, 0.3, 0.1], 0.1, 1 / 0.02))
    # q = 0: Delta_k = L (w - w_k), h_k = L, so the step lands on the UNweighted mean
    # ((4+2+5.5)/3, (3+5+1.5)/3) = (11.5/3, 9.5/3), not FedAvg's (4, 3).
    strategy = _strategy("qfedavg")
    strategy.q = 0.0
    x1, _ = _round(strategy, 1, x0, _replies(*R1))
    np.testing.assert_allclose(x1, [11.5 / 3, 9.5 / 3])


def test_qfedavg_copes_with_integer_buffers_once_fedvision_packs_them_as_float32():
    """BatchNorm's num_batches_tracked is int64 in a state_dict; Flower's QFedAvg does in-place
    float maths on every array, so the raw reply fails and fedvision's float32 packing does not."""
    from fedvision.fl.arrays import float32_arrays

    def run(pack):
        strategy = _strategy("qfedavg")
        model = {"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(0, np.int64))}
        list(strategy.configure_train(1, pack(ArrayRecord(model)), ConfigRecord(), _Grid()))
        reply = _replies(([1.0, 1.0], 1, 0.5))[0]
        reply.content[C.KEY_ARRAYS]["n"] = Array(np.array(5, np.int64))
        reply.content[C.KEY_ARRAYS] = pack(reply.content[C.KEY_ARRAYS])
        return strategy.aggregate_train(1, [reply])

    with pytest.raises(TypeError):
        run(lambda a: a)
    arrays, _ = run(float32_arrays)
    assert arrays["n"].numpy().size == 1 and np.isfinite(arrays["n"].numpy()).all()


# --- robust aggregation --------------------------------------------------------------------------


def test_fedmedian_takes_the_unweighted_median_and_rejects_the_outlier():
    strategy = _strategy("fedmedian")
    assert type(strategy).__name__ == "FedMedian"
    # The outlier holds 100 examples: FedAvg would land near (909, -909).
    replies = _replies(
        ([1.0, 10.0], 1, 0.5),
        ([2.0, 20.0], 3, 0.5),
        ([3.0, 30.0], 4, 0.5),
        ([1000.0, -1000.0], 100, 0.5),
        ([4.0, 40.0], 2, 0.5),
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    # sorted (1, 2, 3, 4, 1000) -> 3; sorted (-1000, 10, 20, 30, 40) -> 20.
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 20.0])


def test_fedtrimmedavg_cuts_each_tail_and_rejects_the_outlier():
    strategy = _strategy("fedtrimmedavg")
    assert strategy.beta == 0.2  # int(0.2 * 5) = 1 client cut from each end, per weight
    replies = _replies(
        ([1.0, 10.0], 1, 0.5),
        ([2.0, 20.0], 3, 0.5),
        ([3.0, 30.0], 4, 0.5),
        ([1000.0, -1000.0], 100, 0.5),
        ([7.0, 70.0], 2, 0.5),
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    # sorted (1, 2, 3, 7, 1000) -> mean(2, 3, 7) = 4 (the median would be 3);
    # sorted (-1000, 10, 20, 30, 70) -> mean(10, 20, 30) = 20.
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 20.0])


# Four honest clients near the origin and one outlier with 50 examples. Squared distances:
#   A-B 1, A-C 4, A-D 2, B-C 5, B-D 1, C-D 2; the outlier E is >= 162 from everyone.
# Krum score with f = 1, n = 5: sum of the n - f - 2 = 2 smallest distances to the others:
#   A 1+2 = 3, B 1+1 = 2, C 2+4 = 6, D 1+2 = 3, E 162+164 = 326.
KRUM_CLIENTS = [
    ([0.0, 0.0], 1, 0.5),  # A
    ([1.0, 0.0], 3, 0.4),  # B
    ([0.0, 2.0], 4, 0.3),  # C
    ([1.0, 1.0], 2, 0.6),  # D
    ([10.0, 10.0], 50, 9.0),  # E, the outlier
]


def test_krum_keeps_the_single_most_central_client():
    strategy = _strategy("krum")
    assert (strategy.num_malicious_nodes, strategy.min_train_nodes) == (1, 5)
    arrays, metrics = strategy.aggregate_train(1, _replies(*KRUM_CLIENTS))
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 0.0])  # B, best score 2
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(0.4)  # and only B's metrics


def test_multikrum_averages_the_best_scores_without_the_outlier():
    strategy = _strategy("multikrum")
    assert (strategy.num_malicious_nodes, strategy.num_nodes_to_select) == (1, 8)
    assert strategy.min_train_nodes == 5
    strategy.num_nodes_to_select = 4  # m = n - f for these 5 clients
    arrays, metrics = strategy.aggregate_train(1, _replies(*KRUM_CLIENTS))
    # A, B, C, D (scores 3, 2, 6, 3) weighted by 1, 3, 4, 2 examples:
    # ((0,0)*1 + (1,0)*3 + (0,2)*4 + (1,1)*2) / 10 = (5, 10) / 10 = (0.5, 1.0).
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5, 1.0])
    # (0.5*1 + 0.4*3 + 0.3*4 + 0.6*2) / 10 = 0.41: the outlier's loss 9.0 is left out too.
    assert metrics[C.KEY_TRAIN_LOSS] == pytest.approx(0.41)


# Seven clients (Bulyan with f = 1 needs n >= 4f + 3 = 7). Krum scores (sum of the n - f - 2 = 4
# smallest squared distances to the others): H1 75, H2 56, H3 33, H4 49, H5 73, H6 104, O 76283.
# Multi-Krum keeps the n - 2f = 5 best: H1..H5 (H6 and the outlier O are out).
BULYAN_CLIENTS = [
    ([0.0, -2.0], 1, 0.5),  # H1
    ([1.0, -2.0], 2, 0.5),  # H2
    ([2.0, 1.0], 3, 0.5),  # H3
    ([3.0, 2.0], 4, 0.5),  # H4
    ([4.0, 3.0], 5, 0.5),  # H5
    ([6.0, -2.0], 6, 0.5),  # H6
    ([100.0, 100.0], 1000, 0.5),  # O, the outlier
]


def test_bulyan_trims_around_the_median_of_the_multikrum_choice():
    strategy = _strategy("bulyan")
    assert (strategy.num_malicious_nodes, strategy.min_train_nodes) == (1, 7)
    arrays, _ = strategy.aggregate_train(1, _replies(*BULYAN_CLIENTS))
    # Per weight, the n - 4f = 3 values of H1..H5 nearest their median, averaged (unweighted):
    #   x (0, 1, 2, 3, 4): median 2, nearest 2, 1, 3 -> 2
    #   y (-2, -2, 1, 2, 3): median 1, nearest 1, 2, 3 -> 2 (the median alone would say 1)
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])


def test_bulyan_skips_a_round_with_too_few_replies():
    """Fewer than 4f + 3 replies: Flower keeps no model for the round (and only logs a warning)."""
    strategy = _strategy("bulyan")
    assert strategy.aggregate_train(1, _replies(*BULYAN_CLIENTS[:6])) == (None, None)
