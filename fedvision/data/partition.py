"""Non-IID partitions of a label array into federated clients.

Schemes
-------
- ``iid``: a uniform random split into near-equal client sizes.
- ``dirichlet``: per class, client proportions drawn from Dir(alpha) (Hsu et al. 2019, "Measuring
  the Effects of Non-Identical Data Distribution for Federated Visual Classification").
- ``pathological``: each client holds at most ``classes_per_client`` classes (McMahan et al. 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data"; Li et al. 2022,
  "Federated Learning on Non-IID Data Silos: An Experimental Study").
- ``quantity``: client sizes drawn from a log-normal or power law, labels IID within each client.

A :class:`Partition` holds each client's sorted train and validation indices and a fingerprint of
(labels, spec); it is saved as one ``.npz`` and refused on load when made for other labels.

flwr-datasets' partitioners were measured and not used: they need an HF ``datasets.Dataset``
and return datasets rather than index arrays; ``DirichletPartitioner`` took 15-22 s on
1,281,167 labels / 1000 classes / 1000 clients (target: < 2 s; this module: ~0.3 s, measured by
``scripts/bench_partition.py --flwr-datasets``); see each scheme for its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedvision.errors import FedvisionError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "quantity")
QUANTITY_DISTS: tuple[str, ...] = ("lognormal", "powerlaw")
PARTITION_FORMAT_VERSION = 1

_INT_FIELDS = ("num_clients", "classes_per_client", "min_size", "seed", "max_attempts")
_FLOAT_FIELDS = ("alpha", "quantity_sigma", "quantity_exponent", "val_fraction")
_STR_FIELDS = ("scheme", "quantity_dist")


@dataclass(frozen=True)
class PartitionSpec:
    """How to split a labelled dataset into clients.

    Parameters
    ----------
    scheme : str
        One of ``"iid"``, ``"dirichlet"``, ``"pathological"``, ``"quantity"``.
    num_clients : int
        Number of clients (partitions).
    alpha : float
        Dirichlet concentration; small values give few classes per client.
    classes_per_client : int
        Classes each client holds under ``"pathological"``.
    quantity_dist : str
        ``"lognormal"`` or ``"powerlaw"`` client-size distribution under ``"quantity"``.
    quantity_sigma : float
        Log-normal sigma of client sizes.
    quantity_exponent : float
        Pareto tail exponent of client sizes (smaller is more skewed).
    min_size : int
        Minimum number of samples (train + val) per client.
    val_fraction : float
        Share of each client's samples kept for local validation.
    seed : int
        Seed of every random draw.
    max_attempts : int
        Bound on Dirichlet / pathological re-draws made to satisfy ``min_size``.
    """

    scheme: str
    num_clients: int
    alpha: float = 0.5
    classes_per_client: int = 2
    quantity_dist: str = "lognormal"
    quantity_sigma: float = 1.0
    quantity_exponent: float = 1.5
    min_size: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    max_attempts: int = 100

    def __post_init__(self) -> None:
        # Coerce numbers so that alpha=1 and alpha=1.0 give one canonical JSON and fingerprint.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer):
                raise FedvisionError(
                    f"partition.{name} must be an integer, got {value!r}; fix the partition config"
                )
            if isinstance(value, float) and not value.is_integer():
                raise FedvisionError(
                    f"partition.{name} must be an integer, got {value!r}; fix the partition config"
                )
            object.__setattr__(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise FedvisionError(
                    f"partition.{name} must be a number, got {value!r}; fix the partition config"
                )
            object.__setattr__(self, name, float(value))
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise FedvisionError(
                    f"partition.{name} must be a string, got {getattr(self, name)!r}"
                )
        self._check_values()

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PartitionSpec:
        """Build a spec from a mapping (e.g. a Hydra config group); unknown keys are refused.

        Parameters
        ----------
        d : Mapping[str, Any]
            Keys named like the fields; ``scheme`` and ``num_clients`` are required.

        Returns
        -------
        PartitionSpec
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise FedvisionError(
                f"unknown partition setting(s) {', '.join(unknown)}; valid keys: {', '.join(names)}"
            )
        missing = [k for k in ("scheme", "num_clients") if k not in d]
        if missing:
            raise FedvisionError(f"partition config lacks {', '.join(missing)}; add it")
        return cls(**{k: d[k] for k in d})

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """Return the spec as canonical JSON (sorted keys, no spaces); input of the fingerprint."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def _check_values(self) -> None:
        if self.scheme not in SCHEMES:
            raise FedvisionError(
                f"unknown partition scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}"
            )
        if self.num_clients < 1:
            raise FedvisionError(f"partition.num_clients must be >= 1, got {self.num_clients}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise FedvisionError(
                f"partition.alpha must be a finite number > 0, got {self.alpha}; "
                "use e.g. 0.1 (very non-IID) to 100 (near IID)"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise FedvisionError(
                f"partition.val_fraction must be in [0, 1), got {self.val_fraction}"
            )
        if self.classes_per_client < 1:
            raise FedvisionError(
                f"partition.classes_per_client must be >= 1, got {self.classes_per_client}"
            )
        if self.quantity_dist not in QUANTITY_DISTS:
            raise FedvisionError(
                f"unknown partition.quantity_dist {self.quantity_dist!r}; "
                f"choose one of {', '.join(QUANTITY_DISTS)}"
            )
        if not (self.quantity_sigma > 0 and math.isfinite(self.quantity_sigma)):
            raise FedvisionError(f"partition.quantity_sigma must be > 0, got {self.quantity_sigma}")
        if not (self.quantity_exponent > 0 and math.isfinite(self.quantity_exponent)):
            raise FedvisionError(
                f"partition.quantity_exponent must be > 0, got {self.quantity_exponent}"
            )
        if self.min_size < 0:
            raise FedvisionError(f"partition.min_size must be >= 0, got {self.min_size}")
        if self.seed < 0:
            raise FedvisionError(f"partition.seed must be >= 0, got {self.seed}")
        if self.max_attempts < 1:
            raise FedvisionError(f"partition.max_attempts must be >= 1, got {self.max_attempts}")

    def validate(self, num_samples: int, num_classes: int | None = None) -> None:
        """Refuse a spec that cannot partition ``num_samples`` samples of ``num_classes`` classes.

        Parameters
        ----------
        num_samples : int
            Number of labelled samples.
        num_classes : int, optional
            Number of classes present; checks ``classes_per_client`` when given.

        Raises
        ------
        FedvisionError
            With a message naming the setting to change.
        """
        self._check_values()
        if self.num_clients > num_samples:
            raise FedvisionError(
                f"partition.num_clients={self.num_clients} exceeds the {num_samples} samples; "
                "use fewer clients"
            )
        if self.min_size * self.num_clients > num_samples:
            raise FedvisionError(
                f"partition.min_size={self.min_size} x {self.num_clients} clients needs "
                f"{self.min_size * self.num_clients} samples but there are {num_samples}; "
                "lower min_size or use fewer clients"
            )
        if self.scheme == "pathological" and num_classes is not None:
            if self.classes_per_client > num_classes:
                raise FedvisionError(
                    f"partition.classes_per_client={self.classes_per_client} exceeds the "
                    f"{num_classes} classes present; lower it"
                )
            if self.num_clients * self.classes_per_client < num_classes:
                raise FedvisionError(
                    f"{self.num_clients} clients x {self.classes_per_client} classes cannot cover "
                    f"all {num_classes} classes; raise classes_per_client or num_clients"
                )


@dataclass
class Partition:
    """Per-client sorted int64 train and validation indices into one label array.

    Attributes
    ----------
    spec : PartitionSpec
        The spec that made it.
    train, val : list[np.ndarray]
        One sorted int64 index array per client; together they cover every sample once.
    num_classes : int
        Number of classes of the labels (``max label + 1`` unless given).
    fingerprint : str
        sha256 hex digest over the label bytes (int64) and the spec's canonical JSON.
    """

    spec: PartitionSpec
    train: list[np.ndarray]
    val: list[np.ndarray]
    num_classes: int
    fingerprint: str

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train)

    def sizes(self) -> np.ndarray:
        """Return each client's train + val size as an int64 array."""
        return np.array([len(t) + len(v) for t, v in zip(self.train, self.val, strict=True)])

    def client_indices(self, client: int) -> np.ndarray:
        """Return the sorted train + val indices of one client."""
        return np.sort(np.concatenate([self.train[client], self.val[client]]))


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise FedvisionError(
            f"labels must be a non-empty 1-D array, got shape {arr.shape}; check the dataset cache"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise FedvisionError(f"labels must be integers, got dtype {arr.dtype}; check the cache")
    if arr.min() < 0:
        raise FedvisionError("labels must be >= 0; check the dataset cache")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _small_int(values: np.ndarray, upper: int) -> np.ndarray:
    # numpy's stable sort is a radix sort for <= 16-bit ints: ~10x faster than int64 here.
    return values.astype(np.int16 if upper < 2**15 else np.int32, copy=False)


def _group_by_client(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn a per-sample client id into per-client sorted index arrays."""
    order = np.argsort(_small_int(client_of, num_clients), kind="stable").astype(np.int64)
    sizes = np.bincount(client_of, minlength=num_clients)
    return np.split(order, np.cumsum(sizes)[:-1])


def _class_blocks(
    labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (present classes, their counts, sample order grouped by class, shuffled within)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    perm = rng.permutation(labels.size)
    order = perm[np.argsort(_small_int(inverse[perm], classes.size), kind="stable")]
    return classes, counts, order


def _assign(order: np.ndarray, seg_clients: np.ndarray, seg_counts: np.ndarray) -> np.ndarray:
    """Give consecutive runs of ``order`` to clients: run i has seg_counts[i] samples."""
    client_of = np.empty(order.size, dtype=np.int64)
    client_of[order] = np.repeat(seg_clients, seg_counts)
    return client_of


def _even_sizes(total: int, parts: int) -> np.ndarray:
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _too_small_error(spec: PartitionSpec, smallest: int) -> FedvisionError:
    fix = {
        "dirichlet": "lower min_size, raise alpha or use fewer clients",
        "pathological": "lower min_size, raise classes_per_client or use fewer clients",
    }[spec.scheme]
    return FedvisionError(
        f"{spec.scheme} partition left a client with {smallest} < min_size={spec.min_size} "
        f"samples after {spec.max_attempts} attempts; {fix}"
    )


def _iid(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    # Own code: flwr-datasets' IidPartitioner shards an HF Dataset contiguously, without shuffling.
    sizes = _even_sizes(labels.size, spec.num_clients)
    return _assign(rng.permutation(labels.size), np.arange(spec.num_clients), sizes)


def _dirichlet(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    # Own code: DirichletPartitioner loops in Python per class and client (15-22 s on ImageNet).
    _, class_sizes, order = _class_blocks(labels, rng)
    k = spec.num_clients
    concentration = np.full(k, spec.alpha)
    for _ in range(spec.max_attempts):
        props = rng.dirichlet(concentration, size=class_sizes.size)  # [classes, clients]
        bounds = np.floor(np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds = np.minimum(bounds, class_sizes[:, None])
        bounds[:, -1] = class_sizes
        counts = np.diff(bounds, axis=1, prepend=0)
        smallest = int(counts.sum(axis=0).min())
        if smallest >= spec.min_size:
            return _assign(order, np.tile(np.arange(k), class_sizes.size), counts.ravel())
    raise _too_small_error(spec, smallest)


def _pathological(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    # Own code: PathologicalPartitioner's "random" mode may leave classes (and samples) unassigned.
    classes, class_sizes, order = _class_blocks(labels, rng)
    n_cls, k, per = classes.size, spec.num_clients, spec.classes_per_client
    for _ in range(spec.max_attempts):
        # Client j takes `per` consecutive classes of a cyclic random class order: every class is
        # held by floor/ceil(k*per/n_cls) clients and no client holds a class twice.
        slots = rng.permutation(n_cls)[np.arange(k * per) % n_cls]
        holders = np.repeat(rng.permutation(k), per)
        by_class = np.argsort(slots, kind="stable")
        slot_cls, slot_client = slots[by_class], holders[by_class]
        num_holders = np.bincount(slot_cls, minlength=n_cls)
        first = np.cumsum(num_holders) - num_holders
        rank = np.arange(slot_cls.size) - first[slot_cls]
        share = class_sizes[slot_cls] // num_holders[slot_cls]
        share += rank < class_sizes[slot_cls] % num_holders[slot_cls]
        smallest = int(np.bincount(slot_client, weights=share, minlength=k).min())
        if smallest >= spec.min_size:
            return _assign(order, slot_client, share)
    raise _too_small_error(spec, smallest)


def _quantity(labels: np.ndarray, spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    # Own code: flwr-datasets has no log-normal/power-law size partitioner over a label array.
    n, k = labels.size, spec.num_clients
    if spec.quantity_dist == "lognormal":
        weights = rng.lognormal(mean=0.0, sigma=spec.quantity_sigma, size=k)
    else:
        # Pareto with x_min = 1: P(w > x) = x ** -exponent.
        weights = rng.pareto(spec.quantity_exponent, size=k) + 1.0
    floor_size = max(1, spec.min_size)
    spare = n - floor_size * k
    exact = spare * weights / weights.sum()
    extra = np.floor(exact).astype(np.int64)
    # Largest-remainder rounding so that sizes sum to n exactly.
    extra[np.argsort(extra - exact, kind="stable")[: spare - int(extra.sum())]] += 1
    return _assign(rng.permutation(n), np.arange(k), floor_size + extra)


_SCHEME_FUNCS = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "quantity": _quantity,
}


def partition_labels(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    """Split sample indices into ``spec.num_clients`` disjoint clients.

    Parameters
    ----------
    labels : np.ndarray
        1-D non-negative integer class labels, one per sample.
    spec : PartitionSpec
        Scheme and its settings; ``spec.seed`` makes the result deterministic.

    Returns
    -------
    list[np.ndarray]
        Per-client sorted int64 indices; every index is in exactly one client.
    """
    labels = _as_labels(labels)
    spec.validate(labels.size, int(np.unique(labels).size))
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[0])
    client_of = _SCHEME_FUNCS[spec.scheme](labels, spec, rng)
    return _group_by_client(client_of, spec.num_clients)


def partition_fingerprint(labels: np.ndarray, spec: PartitionSpec) -> str:
    """Return the sha256 hex digest of the int64 label bytes followed by the spec's JSON."""
    digest = hashlib.sha256(_as_labels(labels).tobytes())
    digest.update(spec.canonical_json().encode())
    return digest.hexdigest()


def _split_val(
    clients: list[np.ndarray], val_fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sizes = np.array([c.size for c in clients], dtype=np.int64)
    # Round to nearest, but a client always keeps at least one training sample.
    n_val = np.minimum(np.floor(sizes * val_fraction + 0.5).astype(np.int64), sizes - 1)
    n_val = np.maximum(n_val, 0)
    flat = np.concatenate(clients)
    owner = np.repeat(np.arange(sizes.size), sizes)
    perm = rng.permutation(flat.size)
    shuffled = perm[np.argsort(_small_int(owner[perm], sizes.size), kind="stable")]
    rank = np.empty(flat.size, dtype=np.int64)
    rank[shuffled] = np.arange(flat.size) - (np.cumsum(sizes) - sizes)[owner[shuffled]]
    is_val = rank < n_val[owner]
    train = np.split(flat[~is_val], np.cumsum(sizes - n_val)[:-1])
    val = np.split(flat[is_val], np.cumsum(n_val)[:-1])
    return train, val


def make_partition(
    labels: np.ndarray, spec: PartitionSpec, num_classes: int | None = None
) -> Partition:
    """Partition labels and split each client into local train and validation indices.

    Parameters
    ----------
    labels : np.ndarray
        1-D non-negative integer class labels.
    spec : PartitionSpec
        Scheme and settings; the result is deterministic in ``spec.seed``.
    num_classes : int, optional
        Number of classes; defaults to ``labels.max() + 1``.

    Returns
    -------
    Partition
    """
    labels = _as_labels(labels)
    top = int(labels.max()) + 1
    if num_classes is None:
        num_classes = top
    elif num_classes < top:
        raise FedvisionError(
            f"num_classes={num_classes} but labels go up to {top - 1}; pass num_classes >= {top}"
        )
    clients = partition_labels(labels, spec)
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[1])
    train, val = _split_val(clients, spec.val_fraction, rng)
    return Partition(
        spec=spec,
        train=train,
        val=val,
        num_classes=int(num_classes),
        fingerprint=partition_fingerprint(labels, spec),
    )


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a stratified share of samples (the server's validation part) from the rest.

    Parameters
    ----------
    labels : np.ndarray
        1-D non-negative integer class labels.
    fraction : float
        Share of each class held out (rounded to nearest), in ``[0, 1)``.
    seed : int
        Seed of the draw (a stream apart from the partition's own).

    Returns
    -------
    held, rest : np.ndarray
        Sorted int64 indices; together they cover every sample once.
    """
    if not 0.0 <= fraction < 1.0:
        raise FedvisionError(f"server_val_fraction={fraction} must lie in [0, 1)")
    labels = _as_labels(labels)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    perm = rng.permutation(labels.size)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, shuffled within
    counts = np.bincount(labels)
    held_per_class = np.floor(counts * fraction + 0.5).astype(np.int64)
    rank = np.arange(labels.size) - np.repeat(np.cumsum(counts) - counts, counts)
    is_held = rank < np.repeat(held_per_class, counts)
    return np.sort(order[is_held]), np.sort(order[~is_held])


def _flatten(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.size for p in parts])
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return flat, offsets


def save_partition(p: Partition, path: Path) -> None:
    """Write a partition atomically to one ``.npz`` (flat indices + offsets + spec + fingerprint).

    Parameters
    ----------
    p : Partition
        The partition to save.
    path : Path
        Target file; its folder is created. A temporary file is renamed over it at the end.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train_flat, train_offsets = _flatten(p.train)
    val_flat, val_offsets = _flatten(p.val)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(PARTITION_FORMAT_VERSION),
                train_flat=train_flat,
                train_offsets=train_offsets,
                val_flat=val_flat,
                val_offsets=val_offsets,
                num_classes=np.int64(p.num_classes),
                spec_json=np.str_(p.spec.canonical_json()),
                fingerprint=np.str_(p.fingerprint),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    if (
        offsets.ndim != 1
        or offsets[0] != 0
        or offsets[-1] != flat.size
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError("offsets do not match the index array")
    return np.split(flat.astype(np.int64, copy=False), offsets[1:-1])


def load_partition(path: Path, labels: np.ndarray | None = None) -> Partition:
    """Read a partition saved by :func:`save_partition`.

    Parameters
    ----------
    path : Path
        The ``.npz`` file.
    labels : np.ndarray, optional
        When given, the partition's fingerprint must match these labels and the stored spec.

    Returns
    -------
    Partition

    Raises
    ------
    FedvisionError
        The file is missing or corrupt, or was made for other labels or another spec.
    """
    path = Path(path)
    if not path.is_file():
        raise FedvisionError(f"partition file {path} not found; run partition first")
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != PARTITION_FORMAT_VERSION:
                raise ValueError(f"format version {version} != {PARTITION_FORMAT_VERSION}")
            spec = PartitionSpec.from_mapping(json.loads(str(z["spec_json"])))
            train = _unflatten(z["train_flat"], z["train_offsets"])
            val = _unflatten(z["val_flat"], z["val_offsets"])
            num_classes = int(z["num_classes"])
            fingerprint = str(z["fingerprint"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, FedvisionError) as exc:
        raise FedvisionError(
            f"partition file {path} is unreadable or corrupt ({exc}); "
            "delete it and re-run partition"
        ) from exc
    if len(train) != spec.num_clients or len(val) != spec.num_clients:
        raise FedvisionError(
            f"partition file {path} holds {len(train)} clients but its spec says "
            f"{spec.num_clients}; delete it and re-run partition"
        )
    if labels is not None and partition_fingerprint(labels, spec) != fingerprint:
        raise FedvisionError(
            f"partition {path} was made for other labels/spec; delete it or re-run partition"
        )
    return Partition(spec, train, val, num_classes, fingerprint)


def client_class_counts(p: Partition, labels: np.ndarray) -> np.ndarray:
    """Return the int64 [clients, classes] matrix of train + val sample counts.

    Parameters
    ----------
    p : Partition
        The partition.
    labels : np.ndarray
        The labels it indexes.
    """
    labels = _as_labels(labels)
    flat = np.concatenate([*p.train, *p.val])
    owner = np.concatenate(
        [
            np.repeat(np.arange(p.num_clients), [t.size for t in p.train]),
            np.repeat(np.arange(p.num_clients), [v.size for v in p.val]),
        ]
    )
    if flat.size and int(flat.max()) >= labels.size:
        raise FedvisionError(
            f"partition indexes sample {int(flat.max())} but there are {labels.size} labels; "
            "it was made for another dataset, re-run partition"
        )
    sample_labels = labels[flat]
    if sample_labels.size and int(sample_labels.max()) >= p.num_classes:
        raise FedvisionError(
            f"labels exceed the partition's num_classes={p.num_classes}; re-run partition"
        )
    counts = np.bincount(
        owner * p.num_classes + sample_labels, minlength=p.num_clients * p.num_classes
    )
    return counts.reshape(p.num_clients, p.num_classes).astype(np.int64)


def partition_stats(p: Partition, labels: np.ndarray) -> list[dict]:
    """Return one dict per client describing its size and label skew.

    Keys: ``client``, ``train``, ``val``, ``size``, ``num_classes`` (classes present),
    ``dominant_class`` (-1 when empty), ``dominant_share`` (its share of the client's samples).
    """
    counts = client_class_counts(p, labels)
    sizes = counts.sum(axis=1)
    dominant = counts.argmax(axis=1)
    top = counts.max(axis=1)
    rows = []
    for c in range(p.num_clients):
        size = int(sizes[c])
        rows.append(
            {
                "client": c,
                "train": int(p.train[c].size),
                "val": int(p.val[c].size),
                "size": size,
                "num_classes": int(np.count_nonzero(counts[c])),
                "dominant_class": int(dominant[c]) if size else -1,
                "dominant_share": float(top[c] / size) if size else 0.0,
            }
        )
    return rows


def summary_stats(p: Partition, labels: np.ndarray) -> dict:
    """Summarise a partition in a few numbers.

    Returns
    -------
    dict
        ``clients``, ``samples``, ``min_size``, ``median_size``, ``max_size``, ``size_cv``
        (std / mean of sizes), ``mean_classes``, ``mean_dominant_share`` and ``mean_tv``: the mean
        total-variation distance between each non-empty client's label distribution and the
        global one (0 = IID, near 1 = disjoint); plus ``max_tv``, ``scheme`` and ``fingerprint``.
    """
    counts = client_class_counts(p, labels).astype(np.float64)
    sizes = counts.sum(axis=1)
    nonempty = sizes > 0
    global_dist = counts.sum(axis=0) / counts.sum()
    client_dist = counts[nonempty] / sizes[nonempty, None]
    tv = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
    share = counts.max(axis=1)[nonempty] / sizes[nonempty]
    return {
        "scheme": p.spec.scheme,
        "clients": int(p.num_clients),
        "samples": int(sizes.sum()),
        "min_size": int(sizes.min()),
        "median_size": float(np.median(sizes)),
        "max_size": int(sizes.max()),
        "size_cv": float(sizes.std() / sizes.mean()),
        "mean_classes": float(np.count_nonzero(counts, axis=1).mean()),
        "mean_dominant_share": float(share.mean()),
        "mean_tv": float(tv.mean()),
        "max_tv": float(tv.max()),
        "fingerprint": p.fingerprint[:16],
    }


def format_partition_table(stats: list[dict], summary: dict, max_rows: int = 20) -> str:
    """Render per-client stats as a markdown table followed by a one-line summary.

    Parameters
    ----------
    stats : list[dict]
        From :func:`partition_stats`.
    summary : dict
        From :func:`summary_stats`.
    max_rows : int
        With more clients than this, only the first and last ``max_rows // 2`` rows are shown.
    """
    header = [
        "| client | train | val | size | classes | dominant class | dominant share |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(s: dict) -> str:
        return (
            f"| {s['client']} | {s['train']} | {s['val']} | {s['size']} | {s['num_classes']} "
            f"| {s['dominant_class']} | {s['dominant_share']:.3f} |"
        )

    if len(stats) > max_rows:
        half = max(1, max_rows // 2)
        elided = len(stats) - 2 * half
        body = [
            *map(row, stats[:half]),
            f"| ... | {elided} clients elided | | | | | |",
            *map(row, stats[-half:]),
        ]
    else:
        body = [row(s) for s in stats]
    line = (
        f"{summary['clients']} clients, {summary['samples']} samples "
        f"({summary.get('scheme', '?')}); size min/median/max "
        f"{summary['min_size']}/{summary['median_size']:g}/{summary['max_size']} "
        f"(cv {summary['size_cv']:.2f}); mean classes {summary['mean_classes']:.1f}; "
        f"mean dominant share {summary['mean_dominant_share']:.3f}; "
        f"mean TV to global {summary['mean_tv']:.3f}; fingerprint {summary.get('fingerprint', '')}"
    )
    return "\n".join([*header, *body, "", line]) + "\n"
