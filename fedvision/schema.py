"""The run config's types: one typed schema per config group, checked in one place.

Hydra composes plain YAML; :func:`check_types` merges the resolved config into these
dataclasses (OmegaConf's typed nodes), so a wrong type or an unknown key is refused in one line
that names the key, the value and what it takes, before any work. Groups whose keys depend on
the option chosen (``strategy``, ``runtime``, ``tracking``, ``secagg``: keyword arguments of a
``_target_``) are typed as mappings; their values are checked where they are built. Ranges and
cross-field rules stay with the code that owns them (``runner.check_config`` and the checks it
calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedvision.errors import FedvisionError


@dataclass
class DataSchema:
    root: str | None = None
    subset: str = "target"
    size: int = 64
    first_n: int | None = None
    wnids: list[str] | None = None
    classes_file: str | None = None
    max_per_class: int | None = None
    workers: int | None = None


@dataclass
class PartitionSchema:
    scheme: str = "dirichlet"
    alpha: float | None = None
    min_size: int = 0
    val_fraction: float = 0.0
    seed: int = 0
    classes_per_client: int | None = None
    quantity_dist: str | None = None
    quantity_sigma: float | None = None
    quantity_exponent: float | None = None


@dataclass
class ModelSchema:
    name: str = "shufflenet_v2_x0_5"
    weights: str = "none"  # none | imagenet | pretrained | a checkpoint path
    finetune: str = "full"
    last_k: int = 1
    allow_head_mismatch: bool = True
    normalise: str = "imagenet"


@dataclass
class ClientSchema:
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_horizon: int | None = None
    lr_min_factor: float = 0.0
    lr_step_rounds: int = 10
    lr_gamma: float = 0.5
    bn_mode: str = "train"
    backbone_lr_factor: float = 1.0
    head_warmup_rounds: int = 0
    augment: str = "none"
    local_bn: bool = False


@dataclass
class DPWrapperSchema:
    """Flower's client-level DP wrappers (fixed and adaptive clipping, server or client side)."""

    _target_: str = ""
    noise_multiplier: float = 1.0
    clipping_norm: float | None = None
    initial_clipping_norm: float | None = None
    target_clipped_quantile: float | None = None
    clip_norm_lr: float | None = None
    clipped_count_stddev: float | None = None


@dataclass
class DPSGDSchema:
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0


@dataclass
class PrivacySchema:
    wrapper: DPWrapperSchema | None = None
    dpsgd: DPSGDSchema | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None


@dataclass
class SystemSchema:
    """Simulated devices; empty under ``system=none``."""

    distribution: str | None = None
    tiers: list[float] | None = None
    tier_weights: list[float] | None = None
    median_speed: float | None = None
    sigma: float | None = None
    trace: str | None = None
    down_mb_s: float | None = None
    up_mb_s: float | None = None
    bandwidth_sigma: float | None = None
    deadline_s: float | None = None
    deadline_policy: str | None = None
    dropout: float | None = None
    local_steps: list[int] | None = None
    seed: int | None = None


@dataclass
class RunSchema:
    seed: int = 0
    num_clients: int = 10
    num_rounds: int = 12
    device: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 256
    min_train_replies: int = 1
    server_val_fraction: float = 0.1
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False
    data: DataSchema = field(default_factory=DataSchema)
    partition: PartitionSchema = field(default_factory=PartitionSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    client: ClientSchema = field(default_factory=ClientSchema)
    privacy: PrivacySchema = field(default_factory=PrivacySchema)
    system: SystemSchema = field(default_factory=SystemSchema)
    strategy: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    secagg: dict[str, Any] = field(default_factory=dict)


_TYPE_WORDS = {
    "Integer": "an integer",
    "Float": "a number",
    "Boolean": "true or false",
    "String": "a string",
}


def check_types(cfg: DictConfig | dict[str, Any]) -> None:
    """Refuse a wrong type or an unknown key anywhere in the run config, in one line.

    Raises
    ------
    FedvisionError
        Naming the key, the value given and what the key takes.
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    try:
        OmegaConf.merge(OmegaConf.structured(RunSchema), plain)
    except ConfigKeyError as exc:
        raise FedvisionError(f"{_where(exc)}: no such setting (a typo?)") from None
    except ValidationError as exc:
        key = _where(exc)
        value = OmegaConf.select(OmegaConf.create(plain), key) if key else None
        wants = next((w for t, w in _TYPE_WORDS.items() if f"to {t}" in exc.msg), None)
        if wants is None and "valid bool" in exc.msg:
            wants = "true or false"
        what = f"takes {wants}" if wants else exc.msg.splitlines()[0]
        raise FedvisionError(f"{key}={value!r}: {what}") from None
    except OmegaConfBaseException as exc:  # anything else the merge refuses
        raise FedvisionError(f"{_where(exc)}: {str(exc).splitlines()[0]}") from None


def _where(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    return str(key) if key else "config"
