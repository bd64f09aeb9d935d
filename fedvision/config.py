"""Composing the Hydra config outside ``fedvision run`` (for commands that share its settings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvision.errors import FedvisionError
from fedvision.paths import shared_data_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# `${shared_data:imagenette}` in a config: a path under the shared data folder (the experiments
# name their data this way, so they run from any working directory). OmegaConf's resolvers are
# process-wide by design; registering the same function again is a no-op.
OmegaConf.register_new_resolver(
    "shared_data", lambda sub="": str(shared_data_dir() / str(sub)), replace=True
)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (``key=value``)."""
    if not (CONF_DIR / "config.yaml").exists():
        raise FedvisionError(
            f"no Hydra config at {CONF_DIR}; install fedvision with pip install -e"
        )
    try:
        if GlobalHydra.instance().is_initialized():
            # Inside a Hydra task (fedvision run composing the pretraining recipe): Hydra is
            # already set up on this config directory and refuses a second initialisation.
            return compose(config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedvisionError(str(exc).strip().splitlines()[0]) from exc


def model_normalise(cfg: Mapping[str, Any]) -> str:
    """How the config's model expects its inputs normalised (``model.normalise``).

    ``imagenet`` (mean/std: torchvision's weights and the built-in pretraining) unless the model
    config says otherwise (``none`` for NIID-Bench's simple_cnn); configs saved before the key
    existed normalised with ImageNet's mean/std.
    """
    return str(cfg["model"].get("normalise", "imagenet"))
