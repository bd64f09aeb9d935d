"""A real client's own data: its ImageFolder, decoded once, as a one-client partition.

On a real machine a client's partition is the data it holds (the realistic non-IID case). It is
decoded into the client's own cache like any dataset, with the federation's class list so that
label k means the same class on every client and on the server, and split into local train and
validation parts by a one-client IID partition, saved beside the cache.
"""

from __future__ import annotations

from pathlib import Path

from fedvision import constants as C
from fedvision.data.cache import prepare_dataset
from fedvision.data.folder import ClassSelection
from fedvision.data.partition import PartitionSpec, make_partition, save_partition
from fedvision.errors import FedvisionError


def prepare_client_data(
    root: Path,
    *,
    size: int,
    classes_file: Path | None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str | int]:
    """Decode ``root``'s train split, split it into local train/validation; return node config.

    The node config names the cache, the partition file and index 0 in it
    (``partition-index``: the file holds this one client, whatever its federation id).
    """
    if classes_file is None:
        raise FedvisionError(
            "--data needs --classes-file: the federation's class list (one wnid per line, the "
            "server's data.classes_file), so that labels mean the same class on every machine"
        )
    if not Path(classes_file).is_file():
        raise FedvisionError(f"--classes-file {classes_file}: no such file")
    if not 0.0 <= val_fraction < 1.0:
        raise FedvisionError(f"--val-fraction {val_fraction} must lie in [0, 1)")
    prepared = prepare_dataset(
        Path(root).expanduser(),
        size=size,
        selection=ClassSelection.from_config(file=Path(classes_file)),
        splits=("train",),
        progress=progress,
    )
    labels = prepared.train.labels
    spec = PartitionSpec(scheme="iid", num_clients=1, val_fraction=val_fraction, seed=seed)
    partition = make_partition(labels, spec, num_classes=len(prepared.classes))
    out = Path(prepared.train.path) / f"local_{partition.fingerprint[:16]}.npz"
    if not out.is_file():
        save_partition(partition, out)
    return {
        C.NODE_CACHE_DIR: str(Path(prepared.train.path).resolve()),
        C.NODE_PARTITION_FILE: str(out.resolve()),
        C.NODE_PARTITION_INDEX: 0,
    }
