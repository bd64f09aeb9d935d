"""Which state-dict entries of a model local training changes, and what kind each one is.

Federated fine-tuning sends only what changes (``head``/``last_k`` freeze the backbone) and FedBN
keeps BatchNorm layers on the clients. What does change is of three kinds with three rules:

- ``shared``: the *parameters* that train and travel: what the Flower strategy aggregates, DP
  clips and noises, robust rules compare, server optimisers step and update norms measure;
- ``stats``: the *running statistics* (mean, variance) of the BatchNorm layers that train: they
  travel in their own packed array and the server takes their example-weighted mean outside the
  strategy; never clipped, noised or stepped (they are no gradient step);
- ``counters``: BatchNorm's ``num_batches_tracked``: never sent. With a ``momentum`` (every
  torchvision model) BatchNorm never reads it; averaged as a float it would dominate every update
  norm and distance by the local step count.

and two that stay put:

- ``local``: entries that training changes but that stay with each client (FedBN: the BatchNorm
  layers that train, parameters and statistics);
- ``frozen``: entries that training never changes; both sides take them from the same base
  weights, which :func:`fingerprint` checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models.factory import set_train_mode

_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ModelParts:
    """A model's state-dict keys split by what happens to them in a round (state-dict order).

    Attributes
    ----------
    shared : trained parameters, sent both ways and aggregated by the strategy.
    stats : running statistics of trained BatchNorm layers, sent both ways, example-weighted mean.
    counters : ``num_batches_tracked`` of trained BatchNorm layers, never sent.
    local : changed by training but kept by each client (FedBN), never sent.
    frozen : never changed by training, never sent.
    """

    shared: tuple[str, ...]
    local: tuple[str, ...]
    frozen: tuple[str, ...]
    stats: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()

    @property
    def unsent(self) -> tuple[str, ...]:
        """Keys a client completes from its base weights (``local`` first seen, ``frozen``).

        Counters are not among them: no layer reads them (``momentum`` is set, checked by
        :func:`trained_keys`), so a client keeps whatever its model holds and needs no base file
        for them.
        """
        return self.local + self.frozen


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer (affine parameters and running statistics)."""
    keys = set(model.state_dict())
    out: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, _BATCHNORM):
            prefix = f"{name}." if name else ""
            out += [k for k in m.state_dict(prefix=prefix) if k in keys]
    return out


def trained_keys(model: nn.Module, *, bn_eval: bool = False) -> list[str]:
    """State-dict keys that local training changes, in state-dict order.

    These are the parameters with ``requires_grad`` and the buffers of the BatchNorm layers that
    :func:`~fedvision.models.set_train_mode` leaves in train mode (their running statistics
    move); frozen BatchNorm layers stay in eval mode, so their statistics do not, and with
    ``bn_eval`` (``client.bn_mode=eval``) no BatchNorm layer's statistics move.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        # The engine's own rule decides which BatchNorm layers update.
        set_train_mode(model, bn_eval=bn_eval)
        changing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        for name, m in model.named_modules():
            if isinstance(m, _BATCHNORM) and m.training:
                if m.momentum is None:
                    # A cumulative average reads num_batches_tracked, which never travels.
                    raise FedvisionError(
                        f"BatchNorm layer {name!r} has momentum=None (a cumulative average over "
                        "num_batches_tracked), which federated rounds do not keep; give it a "
                        "momentum or freeze it (model.finetune=head)"
                    )
                prefix = f"{name}." if name else ""
                changing |= {prefix + b for b, _ in m.named_buffers(recurse=False)}
    finally:
        for m, training in modes.items():
            m.training = training
    return [k for k in model.state_dict() if k in changing]


def split_parts(model: nn.Module, *, local_bn: bool = False, bn_eval: bool = False) -> ModelParts:
    """Split ``model``'s state dict into shared, stats, counters, local and frozen keys.

    Parameters
    ----------
    model
        A model with ``requires_grad`` set for its fine-tune mode (:func:`build_model` does).
    local_bn
        FedBN (Li et al., ICLR 2021): the BatchNorm layers that train stay with each client.
    bn_eval
        ``client.bn_mode=eval``: BatchNorm normalises with the statistics it was sent, so they
        never change and are ``frozen`` (not sent) rather than ``stats``.
    """
    trained = trained_keys(model, bn_eval=bn_eval)
    bn = set(batchnorm_keys(model)) if local_bn else set()
    buffers = {n for n, _ in model.named_buffers()}
    moving = [k for k in trained if k not in bn]
    return ModelParts(
        shared=tuple(k for k in moving if k not in buffers),
        stats=tuple(k for k in moving if k in buffers and not _is_counter(k)),
        counters=tuple(k for k in moving if k in buffers and _is_counter(k)),
        local=tuple(k for k in trained if k in bn),
        frozen=tuple(k for k in model.state_dict() if k not in set(trained)),
    )


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "num_batches_tracked"


def fingerprint(state: Mapping[str, torch.Tensor | np.ndarray], keys: Iterable[str]) -> str:
    """SHA-256 over the names, shapes and float32 values of ``state[k]`` for ``keys``.

    Values are compared as float32 because that is how weights travel and how the server keeps
    them (an int64 BatchNorm counter and its float32 copy give the same fingerprint). An empty
    key set gives ``""``.
    """
    keys = sorted(keys)
    if not keys:
        return ""
    h = hashlib.sha256()
    for k in keys:
        v = state[k]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        # asarray keeps a 0-d counter 0-d (ascontiguousarray would make it 1-d); tobytes is C order.
        arr = np.asarray(arr, dtype=np.float32)
        h.update(f"{k}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
