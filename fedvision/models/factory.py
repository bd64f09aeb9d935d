"""Build classifiers (torchvision's and a few more) with a new head, load weights offline, freeze
for fine-tuning."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models.registry import ARCHITECTURES

FINETUNE_MODES: tuple[str, ...] = ("full", "head", "last_k")
# Top-level attributes that hold the classification head, tried in this order.
_HEAD_ATTRS: tuple[str, ...] = ("fc", "classifier", "heads.head", "head", "heads")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# Builders whose default (no weights) adds auxiliary classifiers that change forward()'s output.
_AUX_LOGITS: frozenset[str] = frozenset({"googlenet", "inception_v3"})


def list_architectures() -> list[str]:
    """Return the names of every buildable architecture, sorted.

    torchvision's classification architectures plus the entries of
    :data:`fedvision.models.registry.ARCHITECTURES` (e.g. ``simple_cnn``).
    """
    return sorted({*torchvision.models.list_models(module=torchvision.models), *ARCHITECTURES})


def _check_name(name: str) -> None:
    names = list_architectures()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(names[:6])}"
    raise FedvisionError(
        f"unknown model architecture {name!r}; {hint} (fedvision.models.list_architectures() "
        "lists all)"
    )


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the qualified name and module of the final classification layer.

    Parameters
    ----------
    model
        A classifier from :func:`build_model` (torchvision's or a registered one).

    Returns
    -------
    tuple[str, nn.Module]
        The head's name in ``model.named_modules()`` (e.g. ``"fc"``, ``"classifier.3"``) and the
        ``nn.Linear`` (or squeezenet's 1x1 ``nn.Conv2d``) itself.
    """
    modules = dict(model.named_modules())
    for attr in _HEAD_ATTRS:
        mod = modules.get(attr)
        if isinstance(mod, nn.Linear):
            return attr, mod
        if isinstance(mod, nn.Sequential):
            # Sequential heads end in Linear (mobilenet, vgg, convnext) or, in squeezenet, in a
            # 1x1 conv followed by ReLU + pooling.
            for child_name, child in reversed(list(mod.named_children())):
                if isinstance(child, nn.Linear | nn.Conv2d):
                    return f"{attr}.{child_name}", child
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise FedvisionError(f"cannot find the classification head of {type(model).__name__}")
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name, old = find_head(model)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def _head_classes(head: nn.Module) -> int:
    return head.out_channels if isinstance(head, nn.Conv2d) else head.out_features


def imagenet_weights_file(name: str) -> Path | None:
    """Where torchvision's ImageNet weights of ``name`` live in the torch hub cache, or ``None``
    when the architecture has none (it may or may not be there: nothing is downloaded)."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _build_imagenet(name: str, num_classes: int, extra: dict) -> nn.Module:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file_name = Path(urlparse(weights.url).path).name
    path = folder / file_name
    if not path.is_file():
        raise FedvisionError(
            f"ImageNet weights for {name} are not on this machine: put {file_name} into {folder} "
            f"(download it from {weights.url} on a machine with internet), or use weights=none"
        )
    try:
        # The file exists, so torch.hub loads it from the cache (with its hash check), no download.
        model = torchvision.models.get_model(name, weights=weights, **extra)
    except Exception as exc:
        raise FedvisionError(
            f"cannot load ImageNet weights {path}: {exc}; delete the file and fetch it again from "
            f"{weights.url}"
        ) from exc
    _replace_head(model, num_classes)
    return model


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file (plain, or under ``model`` / ``state_dict``).

    Raises
    ------
    FedvisionError
        The file is missing, unreadable (truncated, not a torch file) or holds no state dict.
    """
    if not path.is_file():
        raise FedvisionError(
            f"checkpoint {path} does not exist; pass an existing file, 'imagenet' or 'none' as "
            "the model weights"
        )
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise FedvisionError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0].split('. ')[0]}); it must be a state dict saved with "
            "torch.save"
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FedvisionError(
            f"checkpoint {path} is not a state dict (name -> tensor), nor one wrapped as "
            '{"model": ...} or {"state_dict": ...}'
        )
    # DataParallel/DistributedDataParallel checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


@dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did: which tensors it kept and which it re-initialised."""

    path: str
    kept: tuple[str, ...]
    reinitialised: tuple[str, ...]
    checkpoint_classes: int
    num_classes: int

    def summary(self) -> str:
        """One line for the console, e.g. ``kept conv1, bn1, layer1-4 (120 tensors); ...``."""
        line = f"loaded {self.path}: kept {_layers(self.kept)} ({len(self.kept)} tensors)"
        if self.reinitialised:
            line += (
                f"; re-initialised {', '.join(self.reinitialised)} (the checkpoint's head has "
                f"{self.checkpoint_classes} classes, this model {self.num_classes})"
            )
        return line

    def to_dict(self) -> dict:
        """JSON-ready form (written into the run directory)."""
        return {
            "path": self.path,
            "kept": list(self.kept),
            "reinitialised": list(self.reinitialised),
            "checkpoint_classes": self.checkpoint_classes,
            "num_classes": self.num_classes,
        }


def _layers(keys: tuple[str, ...]) -> str:
    """Top-level module names of ``keys`` in order, e.g. ``conv1, bn1, layer1, ..., layer4``."""
    tops = list(dict.fromkeys(k.split(".", 1)[0] for k in keys))
    return ", ".join(tops) if len(tops) <= 8 else f"{', '.join(tops[:4])}, ..., {tops[-1]}"


def _load_checkpoint(
    model: nn.Module, path: Path, num_classes: int, allow_head_mismatch: bool
) -> LoadReport:
    state = read_checkpoint(path)
    own = model.state_dict()
    head_name, _ = find_head(model)
    head_keys = {k for k in own if k.startswith(head_name + ".")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise FedvisionError(
            f"checkpoint {path} does not fit this architecture: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}; was it saved from another model?"
        )
    head_mismatch = any(state[k].shape != own[k].shape for k in head_keys)
    for key, tensor in state.items():
        if key not in head_keys and tensor.shape != own[key].shape:
            raise FedvisionError(
                f"checkpoint {path} does not fit this architecture: layer {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(own[key].shape)} in the model"
            )
    if head_mismatch and not allow_head_mismatch:
        ckpt_classes = state[f"{head_name}.weight"].shape[0]
        raise FedvisionError(
            f"checkpoint {path}: the checkpoint's head ({head_name}) has {ckpt_classes} classes, "
            f"this run has {num_classes}; to fine-tune from it as a backbone checkpoint, pass "
            "allow_head_mismatch=True (config model.allow_head_mismatch=true) so that everything "
            "but the head is loaded and a new head is trained"
        )
    ckpt_classes = state[f"{head_name}.weight"].shape[0]
    if head_mismatch:
        state = {k: v for k, v in state.items() if k not in head_keys}
    model.load_state_dict(state, strict=not head_mismatch)
    return LoadReport(
        path=str(path),
        kept=tuple(k for k in own if k in state),
        reinitialised=tuple(k for k in own if k not in state),
        checkpoint_classes=int(ckpt_classes),
        num_classes=num_classes,
    )


def _blocks(model: nn.Module, head_name: str) -> list[tuple[str, nn.Module]]:
    """Top-level feature blocks in forward order (the units of ``finetune="last_k"``)."""
    modules = dict(model.named_modules())
    if all(f"layer{i}" in modules for i in range(1, 5)):  # resnet, resnext, wide_resnet
        blocks = [(f"layer{i}", modules[f"layer{i}"]) for i in range(1, 5)]
    else:
        # regnet: trunk_output; vit: encoder.layers; mobilenet/efficientnet/convnext/vgg/alexnet/
        # squeezenet/densenet/swin: features; mnasnet: layers.
        for container in ("trunk_output", "encoder.layers", "features", "layers", "blocks"):
            if isinstance(modules.get(container), nn.Sequential | nn.ModuleList):
                blocks = [(f"{container}.{n}", m) for n, m in modules[container].named_children()]
                break
        else:  # shufflenet, googlenet, inception and anything else: top-level children
            blocks = [(n, m) for n, m in model.named_children() if not head_name.startswith(n)]
    # A lone norm layer (mnasnet's last BN, densenet's norm5) belongs to the block before it;
    # dropping it from the list makes last_k count it with that block.
    return [
        (n, m) for n, m in blocks if any(True for _ in m.parameters()) and not isinstance(m, _NORMS)
    ]


def apply_finetune(model: nn.Module, finetune: str = "full", last_k: int = 1) -> None:
    """Set ``requires_grad`` for a fine-tune mode, in place.

    Parameters
    ----------
    model
        A classifier built by :func:`build_model`.
    finetune
        ``full`` (everything trains), ``head`` (only the classification head), or ``last_k`` (the
        last ``last_k`` feature blocks, everything registered after them, and the head).
    last_k
        Number of trailing blocks to train in ``last_k`` mode.
    """
    if finetune not in FINETUNE_MODES:
        raise FedvisionError(
            f"unknown finetune mode {finetune!r}; choose one of {', '.join(FINETUNE_MODES)}"
        )
    head_name, head = find_head(model)
    if finetune == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    head.requires_grad_(True)
    if finetune == "head":
        return
    blocks = _blocks(model, head_name)
    if not 1 <= last_k <= len(blocks):
        raise FedvisionError(
            f"last_k={last_k} is out of range: {type(model).__name__} has {len(blocks)} blocks "
            f"({blocks[0][0]} ... {blocks[-1][0]}); choose 1..{len(blocks)}"
        )
    # torchvision registers modules in forward order, so every parameter from the first one of
    # block[-k] on (later blocks, final norms, pre-logits layers, head) belongs to the tail.
    first = next(blocks[-last_k][1].parameters())
    trainable = False
    for p in model.parameters():
        trainable = trainable or p is first
        if trainable:
            p.requires_grad_(True)


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    finetune: str = "full",
    last_k: int = 1,
    allow_head_mismatch: bool = True,
) -> nn.Module:
    """Build a classifier with a ``num_classes`` head.

    Parameters
    ----------
    name
        Any name from :func:`list_architectures` (e.g. ``resnet18``, ``mobilenet_v3_small``,
        ``simple_cnn``).
    num_classes
        Number of output classes of the new head.
    weights
        ``none`` (random init; seed with ``torch.manual_seed`` first), ``imagenet`` (torchvision's
        DEFAULT weights read from ``torch.hub.get_dir()/checkpoints``, never downloaded; only
        torchvision architectures have them), or a path to a checkpoint saved with
        ``torch.save`` (a state dict, or ``{"model": ...}`` / ``{"state_dict": ...}``). A
        checkpoint whose head has other classes (e.g. ImageNet's 1000) loads as a backbone:
        see ``allow_head_mismatch``.
    finetune
        One of :data:`FINETUNE_MODES`, see :func:`apply_finetune`.
    last_k
        Number of trailing blocks trained in ``last_k`` mode.
    allow_head_mismatch
        Load a checkpoint whose head has another number of classes: everything but the head is
        loaded and the head keeps its fresh initialisation (transfer learning). ``False``
        refuses such a checkpoint.

    Returns
    -------
    nn.Module
        The model on the CPU, in train mode, with ``requires_grad`` set for ``finetune``.
    """
    return build_model_reporting(
        name,
        num_classes,
        weights=weights,
        finetune=finetune,
        last_k=last_k,
        allow_head_mismatch=allow_head_mismatch,
    )[0]


def build_model_reporting(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    finetune: str = "full",
    last_k: int = 1,
    allow_head_mismatch: bool = True,
) -> tuple[nn.Module, LoadReport | None]:
    """:func:`build_model`, also returning what a checkpoint load kept and re-initialised.

    The report is ``None`` unless ``weights`` is a checkpoint path.
    """
    _check_name(name)
    if num_classes < 1:
        raise FedvisionError(f"num_classes must be >= 1, got {num_classes}")
    if finetune not in FINETUNE_MODES:
        raise FedvisionError(
            f"unknown finetune mode {finetune!r}; choose one of {', '.join(FINETUNE_MODES)}"
        )
    extra = {"aux_logits": False} if name in _AUX_LOGITS else {}
    report = None
    if weights == "imagenet":
        if name in ARCHITECTURES:
            raise FedvisionError(
                f"{name} has no ImageNet weights ({ARCHITECTURES[name].reference}); use "
                "weights=none or the path of a checkpoint of it"
            )
        model = _build_imagenet(name, num_classes, extra)
    else:
        if name in ARCHITECTURES:
            model = ARCHITECTURES[name].build(num_classes)
        else:
            model = torchvision.models.get_model(
                name, weights=None, num_classes=num_classes, **extra
            )
        if _head_classes(find_head(model)[1]) != num_classes:
            _replace_head(model, num_classes)
        if weights != "none":
            report = _load_checkpoint(
                model, Path(weights).expanduser(), num_classes, allow_head_mismatch
            )
    apply_finetune(model, finetune, last_k)
    return model.train(), report


def set_train_mode(model: nn.Module, *, bn_eval: bool = False) -> nn.Module:
    """Put ``model`` in train mode but keep fully frozen BatchNorm layers in eval mode.

    Frozen BatchNorm layers must not update their running statistics either, otherwise a
    "frozen" backbone still drifts during local training. ``bn_eval`` keeps every BatchNorm
    layer in eval mode: normalised by the running statistics it came with, which stay.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if bn_eval or (params and not any(p.requires_grad for p in params)):
                m.eval()
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters with ``requires_grad=True``, in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def model_num_bytes(model: nn.Module) -> int:
    """Return the size in bytes of the model's state dict (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
