"""What the server tells a client each round, and how the client reads it.

Both directions live in this one module so that the keys of the train ConfigRecord cannot drift
apart between ServerApp and ClientApp. A ConfigRecord holds no ``None``: "unset" travels as -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedvision import constants as C
from fedvision.config import model_normalise
from fedvision.engine.schedule import round_lr
from fedvision.engine.train import TrainConfig
from fedvision.errors import FedvisionError


def lr_horizon(cfg: Mapping[str, Any]) -> int:
    """Rounds the learning-rate schedule spans: ``client.lr_horizon``, else ``num_rounds``.

    ``fedvision run`` fixes it when a run starts, so extending a run with ``resume=...
    num_rounds=N`` keeps the schedule the first rounds ran with.
    """
    horizon = cfg["client"].get("lr_horizon")
    return int(cfg["num_rounds"] if horizon is None else horizon)


def train_config(
    cfg: Mapping[str, Any], server_round: int, num_classes: int
) -> dict[str, int | float | str | bool]:
    """Build the train ConfigRecord content for one round from the experiment config."""
    client, model = cfg["client"], cfg["model"]
    steps = client.get("local_steps")
    return {
        C.KEY_MODEL_NAME: str(model["name"]),
        C.KEY_MODEL_FINETUNE: str(model.get("finetune", "full")),
        C.KEY_MODEL_LAST_K: int(model.get("last_k", 1)),
        C.KEY_LOCAL_BN: bool(client.get("local_bn", False)),
        C.KEY_NUM_CLASSES: int(num_classes),
        C.KEY_LOCAL_EPOCHS: int(client["local_epochs"]),
        C.KEY_LOCAL_STEPS: -1 if steps is None else int(steps),
        C.KEY_BATCH_SIZE: int(client["batch_size"]),
        C.KEY_OPTIMIZER: str(client["optimizer"]),
        C.KEY_LR: float(round_lr(client, server_round, lr_horizon(cfg))),
        C.KEY_MOMENTUM: float(client.get("momentum", 0.0)),
        C.KEY_WEIGHT_DECAY: float(client.get("weight_decay", 0.0)),
        C.KEY_AUGMENT: str(client.get("augment", "none")),
        C.KEY_NORMALISE: model_normalise(cfg),
        C.KEY_BN_MODE: str(client.get("bn_mode", "train")),
        C.KEY_BACKBONE_LR_FACTOR: backbone_lr_factor(client, server_round),
        C.KEY_SEED: int(cfg["seed"]),
    }


def backbone_lr_factor(client: Mapping[str, Any], server_round: int) -> float:
    """The backbone's share of the learning rate: 0 in the head warm-up rounds, then the factor."""
    warmup = int(client.get("head_warmup_rounds", 0))
    if warmup < 0:
        raise FedvisionError(f"client.head_warmup_rounds must be >= 0 (got {warmup})")
    return 0.0 if server_round <= warmup else float(client.get("backbone_lr_factor", 1.0))


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """One seed per (run seed, round, client): data order and augmentation are reproducible."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31 - 1)


# What every train ConfigRecord holds; the rest may be absent and then take TrainConfig's default:
# FedProx's configure_train adds proximal-mu (FedAvg leaves it out), and runs prepared before
# normalise, bn-mode and backbone-lr-factor existed sent none (ImageNet mean/std, plain
# fine-tuning).
_SENT_EVERY_ROUND = ("batch_size", "lr", "optimizer", "momentum", "weight_decay", "augment")


def to_train_config(record: Mapping[str, Any], partition_id: int) -> TrainConfig:
    """Read a round's train ConfigRecord into the engine's TrainConfig.

    The keys named like TrainConfig's fields (``batch-size``, ``lr``, ``proximal-mu``, ...) are
    read as they are; the round's work and the client's own seed are derived here.
    """
    steps = int(record[C.KEY_LOCAL_STEPS])
    return TrainConfig.from_mapping(
        record,
        require=_SENT_EVERY_ROUND,
        epochs=int(record[C.KEY_LOCAL_EPOCHS]),
        max_steps=None if steps < 0 else steps,
        seed=client_seed(int(record[C.KEY_SEED]), int(record[C.KEY_SERVER_ROUND]), partition_id),
    )


def check_every_round(cfg: Mapping[str, Any]) -> None:
    """Build and validate the train config of every round now, not when that round comes.

    A schedule can reach an impossible value late (cosine to ``lr_min_factor=0`` gives lr 0 in
    the last round; ``step`` with ``lr_gamma=0`` in a later one); a run must not spend its compute
    and then die there.
    """
    for rnd in range(1, int(cfg["num_rounds"]) + 1):
        record = {**train_config(cfg, rnd, 2), C.KEY_SERVER_ROUND: rnd}
        # FedProx adds its mu to the round config itself; check it on the clients' path too.
        record[C.KEY_PROXIMAL_MU] = float(cfg["strategy"].get("proximal_mu", 0.0))
        try:
            to_train_config(record, 0)
        except FedvisionError as exc:
            raise FedvisionError(
                f"round {rnd} of {cfg['num_rounds']}: {exc} (from client.lr={cfg['client']['lr']}, "
                f"lr_schedule={cfg['client'].get('lr_schedule')}, "
                f"lr_min_factor={cfg['client'].get('lr_min_factor')}, "
                f"lr_gamma={cfg['client'].get('lr_gamma')})"
            ) from None
