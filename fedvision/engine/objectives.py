"""Training objectives beyond cross-entropy: the FedProx proximal term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedvision.models import trainable_parameters


def proximal_term(params: Sequence[Tensor], global_params: Sequence[Tensor], mu: float) -> Tensor:
    """FedProx proximal term ``mu / 2 * sum_i ||w_i - w_global_i||^2``.

    Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys). Its gradient with
    respect to ``w`` is ``mu * (w - w_global)``.

    Parameters
    ----------
    params
        The local parameters being trained (with gradients).
    global_params
        Detached copies of the global parameters, in the same order, as a list: an iterator would
        be exhausted after the first batch (the bug in Flower's docstring example).
    mu
        Proximal coefficient, >= 0.

    Returns
    -------
    Tensor
        A scalar tensor on the parameters' device.
    """
    if not isinstance(global_params, Sequence) or not isinstance(params, Sequence):
        raise TypeError("params and global_params must be sequences (lists), not iterators")
    if len(params) != len(global_params):
        raise ValueError(
            f"params ({len(params)}) and global_params ({len(global_params)}) differ in length"
        )
    if not params:
        return torch.zeros(())
    total = torch.zeros((), device=params[0].device, dtype=torch.float32)
    for w, g in zip(params, global_params, strict=True):
        total = total + (w - g).float().square().sum()
    return total * (mu / 2.0)


def snapshot_params(model: nn.Module) -> list[Tensor]:
    """Detached clones of the trainable parameters (the global weights, before local training)."""
    return [p.detach().clone() for p in trainable_parameters(model)]
