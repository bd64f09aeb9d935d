"""The run's Flower strategy: built from ``cfg.strategy``, checked before any work."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate

from fedvision.errors import FedvisionError
from fedvision.privacy.server import wrap_strategy
from strategies.sampling import SeededSampling, base_strategy, sample_size


def build_strategy(cfg: Mapping[str, Any], wait_timeout_s: float = 120.0) -> SeededSampling:
    """The Flower strategy of ``cfg.strategy`` (by ``_target_``), inside seeded sampling.

    Every key of the strategy config goes to the Flower strategy, which alone owns how many
    clients a round uses; ``SeededSampling`` only decides which. Client-level DP
    (``privacy.wrapper``) wraps the strategy inside the sampling: ``SeededSampling(DP(FedAvg))``.
    ``wait_timeout_s``: how long sampling waits for the clients it needs (the run plan's
    ``connect_timeout_s``).
    """
    scfg = cfg["strategy"]
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    # Flower's strategies log warnings for settings fedvision uses on purpose (fraction_evaluate=0).
    flwr_logger.setLevel(logging.ERROR)
    try:
        strategy = instantiate(dict(scfg))
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise FedvisionError(
            f"cannot build strategy {scfg.get('_target_')!r}: {exc}".splitlines()[0]
        ) from exc
    finally:
        flwr_logger.setLevel(level)
    if not isinstance(strategy, Strategy):
        raise FedvisionError(f"strategy._target_ {scfg.get('_target_')!r} is no Strategy")
    strategy = wrap_strategy(cfg, strategy)
    return SeededSampling(
        strategy,
        seed=int(cfg["seed"]),
        wait_timeout_s=wait_timeout_s,
    )


def check_strategy(cfg: Mapping[str, Any]) -> None:
    """Refuse sampling settings that cannot work with ``num_clients`` clients (before any work)."""
    n = int(cfg["num_clients"])
    base = base_strategy(build_strategy(cfg))
    # Strategies that assume a local optimiser (SCAFFOLD, FedNova: SGD) say so before any work.
    if callable(check_client := getattr(base, "check_client_config", None)):
        check_client(cfg["client"])
    for key in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        if int(getattr(base, key, 0)) > n:
            raise FedvisionError(
                f"strategy.{key}={getattr(base, key)} but only num_clients={n} clients exist; "
                f"lower strategy.{key} or raise num_clients"
            )
    for kind in ("train", "evaluate"):
        fraction = float(getattr(base, f"fraction_{kind}", 0.0))
        if not 0.0 <= fraction <= 1.0:
            raise FedvisionError(f"strategy.fraction_{kind}={fraction} must lie in [0, 1]")
        minimum = int(getattr(base, f"min_{kind}_nodes", 0))
        if (fraction > 0 or kind == "train") and sample_size(n, fraction, minimum) == 0:
            raise FedvisionError(
                f"strategy.fraction_{kind}={fraction} with min_{kind}_nodes={minimum} samples 0 of "
                f"{n} clients, so no round could {kind}; raise one of them"
            )
    if float(getattr(base, "fraction_evaluate", 0.0)) > 0 and (
        float(cfg["partition"].get("val_fraction", 0)) <= 0
    ):
        raise FedvisionError(
            "strategy.fraction_evaluate > 0 needs local validation data: set partition.val_fraction"
        )
