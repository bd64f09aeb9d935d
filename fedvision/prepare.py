"""What a run needs before any process starts: its data, its partition, its initial weights.

``fedvision run`` (:mod:`fedvision.runner`), ``fedvision pretrain`` and ``fedvision data
partition`` share these steps; this module imports neither of them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedvision import constants as C
from fedvision.atomic import write_json_atomic
from fedvision.data.cache import PreparedDataset, prepare_dataset
from fedvision.data.folder import ClassSelection, selected_classes
from fedvision.data.generate import generate_dataset
from fedvision.data.partition import (
    Partition,
    PartitionSpec,
    client_class_counts,
    format_partition_table,
    holdout_split,
    make_partition,
    partition_stats,
    save_partition,
    summary_stats,
)
from fedvision.errors import FedvisionError
from fedvision.models import (
    LoadReport,
    build_model_reporting,
    imagenet_weights_file,
    read_checkpoint,
)
from fedvision.report.heatmap import plot_partition_heatmap

PRETRAINED = "pretrained"  # model.weights: the built-in source-class model, made on first use
# (architecture, image size, progress=...) -> the file of the built-in pretrained backbone.
MakePretrained = Callable[..., Path]


def prepare_data(data: DictConfig, *, progress: bool) -> PreparedDataset:
    """Generate (built-in only) and decode the dataset once; reuse the cache afterwards."""
    if data.root is None:
        subset = str(data.subset)
        if subset not in ("source", "target", "all"):  # checked before generating anything
            raise FedvisionError(f"data.subset={subset!r}: use source, target or all")
        root = generate_dataset(progress=progress)
        class_file = {"source": C.SOURCE_CLASSES, "target": C.TARGET_CLASSES}.get(subset)
        selection = (
            None if class_file is None else ClassSelection.from_config(file=root / class_file)
        )
    else:
        root = Path(str(data.root)).expanduser()
        selection = _selection(data)
    return prepare_dataset(
        root,
        size=int(data.size),
        selection=selection,
        max_per_class=data.max_per_class,
        workers=data.workers,
        progress=progress,
    )


def _selection(data: DictConfig) -> ClassSelection | None:
    if data.first_n is None and data.wnids is None and data.classes_file is None:
        return None
    return ClassSelection.from_config(
        first_n=data.first_n,
        wnids=list(data.wnids) if data.wnids is not None else None,
        file=data.classes_file,
    )


def check_data(data: DictConfig) -> None:
    """A user's data root exists and gives at least two classes (one directory listing).

    The built-in dataset is generated with its classes, so only ``data.root`` is looked at.
    """
    if data.root is None:
        return
    classes = selected_classes(Path(str(data.root)).expanduser(), "train", _selection(data))
    if classes is not None and len(classes) < 2:
        raise FedvisionError(
            f"data.root={data.root} gives {len(classes)} class ({', '.join(classes)}); a "
            "classifier needs at least 2 (check the folder or data.first_n/wnids/classes_file)"
        )


def partition_spec(cfg: DictConfig) -> PartitionSpec:
    """The partition spec: the ``partition`` group plus the one ``num_clients`` of the run."""
    if "num_clients" in cfg.partition:
        raise FedvisionError("set num_clients at the top level, not partition.num_clients")
    spec = dict(OmegaConf.to_container(cfg.partition, resolve=True))
    return PartitionSpec.from_mapping({**spec, "num_clients": int(cfg.num_clients)})


def write_partition(prepared: PreparedDataset, cfg: DictConfig, out_dir: Path) -> Partition:
    """Hold out the server's validation part, partition the rest, write files and plots.

    Writes ``server_val.npy`` (when ``server_val_fraction > 0``), ``partition.npz`` (indices into
    the training cache), its table and its heatmap.
    """
    labels = prepared.train.labels
    spec = partition_spec(cfg)
    held, rest = holdout_split(labels, float(cfg.server_val_fraction), spec.seed)
    local = make_partition(labels[rest], spec, num_classes=len(prepared.classes))
    partition = dataclasses.replace(
        local, train=[rest[i] for i in local.train], val=[rest[i] for i in local.val]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if held.size:
        np.save(out_dir / C.SERVER_VAL, held)
    save_partition(partition, out_dir / C.PARTITION_FILE)
    summary = summary_stats(partition, labels)
    table = format_partition_table(partition_stats(partition, labels), summary)
    # Machine-readable for `fedvision report`: the full fingerprint and how non-IID it is.
    write_json_atomic(
        out_dir / C.PARTITION_SUMMARY, {**summary, "fingerprint": partition.fingerprint}
    )
    (out_dir / C.PARTITION_STATS).write_text(
        f"partition fingerprint: {partition.fingerprint}\n"
        f"server validation part: {held.size} images (server_val_fraction="
        f"{float(cfg.server_val_fraction):g})\n\n{table}\n"
    )
    plot_partition_heatmap(
        client_class_counts(partition, labels),
        out_dir / C.PARTITION_HEATMAP,
        class_names=list(prepared.train.class_names),
        title=f"{spec.scheme} partition, {spec.num_clients} clients",
    )
    return partition


def check_weights(model: DictConfig, data: DictConfig) -> None:
    """Refuse a ``model.weights`` that cannot load, before any data work."""
    weights = str(model.weights)
    if weights in ("none", "imagenet"):
        return
    if weights == PRETRAINED:
        return  # with data.root: the best start available (resolve_weights)
    if not Path(weights).expanduser().is_file():
        raise FedvisionError(
            f"model.weights={weights}: no such file; use none, imagenet, pretrained or the path "
            "of a checkpoint (e.g. a `fedvision pretrain` run's checkpoint_best.pt)"
        )
    # Read once here, before any process starts, so that a truncated or foreign file fails now
    # (read again when the initial model is built: a few MB, against a run's minutes).
    read_checkpoint(Path(weights).expanduser())


def resolve_weights(cfg: DictConfig, make_pretrained: MakePretrained) -> str:
    """``model.weights`` as a path for the model factory (``pretrained``: the cached model).

    ``make_pretrained(arch, size, progress)`` returns the built-in backbone's file, made on first
    use (:func:`fedvision.pretrain.ensure_pretrained`; passed in, because pretraining itself
    resolves weights through this function).

    On the built-in dataset ``pretrained`` is the model pretrained on its source classes. On a
    user's own data (``data.root``) it is the best start on this machine: torchvision's ImageNet
    weights when their file is in the torch hub cache, else that built-in backbone (generic
    shapes and textures, disjoint from any user's classes); one line says which and how to pick.
    """
    if str(cfg.model.weights) != PRETRAINED:
        return str(cfg.model.weights)
    name = str(cfg.model.name)
    if cfg.data.root is not None:
        file = imagenet_weights_file(name)
        if file is not None and file.is_file():
            print(
                f"fedvision: model.weights=pretrained with data.root: starting from ImageNet "
                f"weights ({file}); model.weights=none or a checkpoint path picks another start",
                file=sys.stderr,
            )
            return "imagenet"
        print(
            f"fedvision: model.weights=pretrained with data.root: no ImageNet weights for {name} "
            f"on this machine ({file or 'torchvision has none'}), starting from the built-in "
            "backbone (pretrained on the generated source classes); model.weights=imagenet, none "
            "or a checkpoint path picks another start",
            file=sys.stderr,
        )
    path = make_pretrained(name, int(cfg.data.size), progress=bool(cfg.progress))
    return str(path)


def initial_weights(
    cfg: DictConfig, num_classes: int, weights: str | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport | None]:
    """The round-0 global model (configured architecture and weights, seeded) and its load report.

    ``weights`` overrides ``cfg.model.weights`` (the resolved path of ``pretrained``).
    """
    torch.manual_seed(int(cfg.seed))  # initialisation (a new head too) is part of the seeded run
    model, report = build_model_reporting(
        str(cfg.model.name),
        num_classes,
        weights=weights if weights is not None else str(cfg.model.weights),
        finetune=str(cfg.model.finetune),
        last_k=int(cfg.model.last_k),
        allow_head_mismatch=bool(cfg.model.get("allow_head_mismatch", True)),
    )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, report
