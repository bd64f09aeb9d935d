"""Magnitude pruning through ``torch.nn.utils.prune``: global unstructured and per-layer channels.

Both functions leave torch's pruning re-parametrisation in place (``weight_orig`` times
``weight_mask`` in a forward-pre-hook), so a fine-tune that follows keeps the pruned weights at
zero; :func:`make_permanent` folds the masks into plain ``weight`` tensors before saving.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from fedvision.errors import FedvisionError
from fedvision.models import find_head

_PRUNABLE = (nn.Conv2d, nn.Linear)


def check_sparsity(value: float, what: str) -> float:
    """Return ``value`` if it is a fraction strictly between 0 and 1, else raise.

    Parameters
    ----------
    value
        Requested share of weights (or channels) to remove.
    what
        The option's name, for the message (e.g. ``--prune``).
    """
    if not 0.0 < float(value) < 1.0:
        raise FedvisionError(
            f"{what} {value:g} is not a sparsity: give the share to remove, strictly between "
            "0 and 1 (e.g. 0.5)"
        )
    return float(value)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolution and linear layers whose ``weight`` magnitude pruning acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def prune_global_unstructured(model: nn.Module, amount: float) -> None:
    """Zero the ``amount`` share of smallest-magnitude weights over all conv and linear layers.

    One global threshold (Han et al. 2015, "Learning both Weights and Connections"), so layers
    with many small weights lose more than others. Biases, norms and buffers are left alone.

    Parameters
    ----------
    model
        Pruned in place; the masks stay attached (see :func:`make_permanent`).
    amount
        Share of the conv and linear weights to zero, in (0, 1).
    """
    amount = check_sparsity(amount, "--prune")
    params = [(m, "weight") for _, m in prunable_layers(model)]
    if not params:
        raise FedvisionError(f"{type(model).__name__} has no conv or linear layer to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)


def prune_channels(model: nn.Module, amount: float, norm: float = 1) -> None:
    """Zero the ``amount`` share of output channels with the smallest Ln norm in every conv layer.

    Per layer, as torch's ``ln_structured`` does (Li et al. 2017, "Pruning Filters for Efficient
    ConvNets"). The classification head is left whole, even when it is a 1x1 conv (squeezenet):
    its output channels are the classes. The tensors keep their shape, so the model's size and
    speed stay the same until a tool that rewires layers drops the zeroed channels.

    Parameters
    ----------
    model
        Pruned in place; the masks stay attached (see :func:`make_permanent`).
    amount
        Share of each conv layer's output channels to zero, in (0, 1).
    norm
        The norm ranking channels (1: L1, 2: L2).
    """
    amount = check_sparsity(amount, "--structured")
    head_name, _ = find_head(model)
    convs = [m for n, m in prunable_layers(model) if isinstance(m, nn.Conv2d) and n != head_name]
    if not convs:
        raise FedvisionError(f"{type(model).__name__} has no conv layer to prune channels of")
    for conv in convs:
        prune.ln_structured(conv, "weight", amount=amount, n=norm, dim=0)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and drop the hooks (``prune.remove``), in place.

    Afterwards the state dict has plain ``weight`` keys again, so the model saves and loads like
    any unpruned one (``fedvision run model.weights=...``).
    """
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model
