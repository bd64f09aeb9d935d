"""Partitioners, partition files, statistics and the partition heatmap."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedvision.data.partition import (
    SCHEMES,
    Partition,
    PartitionSpec,
    client_class_counts,
    format_partition_table,
    load_partition,
    make_partition,
    partition_fingerprint,
    partition_labels,
    partition_stats,
    save_partition,
    summary_stats,
)
from fedvision.errors import FedvisionError
from fedvision.report.heatmap import plot_partition_heatmap


def _labels(num_classes: int = 10, per_class: int = 200, seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order, like a real dataset."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def _tv_to_global(counts: np.ndarray) -> np.ndarray:
    dist = counts / counts.sum(axis=1, keepdims=True)
    glob = counts.sum(axis=0) / counts.sum()
    return 0.5 * np.abs(dist - glob).sum(axis=1)


def _spec(scheme: str, **kw) -> PartitionSpec:
    return PartitionSpec(scheme=scheme, num_clients=kw.pop("num_clients", 8), **kw)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_index_in_exactly_one_client(scheme: str) -> None:
    labels = _labels()
    p = make_partition(labels, _spec(scheme))
    allidx = np.concatenate([*p.train, *p.val])
    assert allidx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(allidx), np.arange(labels.size))
    assert p.sizes().sum() == labels.size
    assert len(p.train) == len(p.val) == 8
    for t, v in zip(p.train, p.val, strict=True):
        assert np.all(np.diff(t) > 0) and np.all(np.diff(v) > 0)
        assert np.intersect1d(t, v).size == 0
    # partition_labels alone: sorted, disjoint, complete
    clients = partition_labels(labels, _spec(scheme))
    assert sum(c.size for c in clients) == labels.size
    np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(labels.size))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_in_seed(scheme: str) -> None:
    labels = _labels()
    a = make_partition(labels, _spec(scheme, seed=3))
    b = make_partition(labels, _spec(scheme, seed=3))
    c = make_partition(labels, _spec(scheme, seed=4))
    for x, y in zip(a.train + a.val, b.train + b.val, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert any(
        not np.array_equal(x, y) for x, y in zip(a.train + a.val, c.train + c.val, strict=True)
    )


def test_val_split_sizes_and_single_sample_client() -> None:
    labels = _labels(num_classes=4, per_class=25)  # 100 samples
    p = make_partition(labels, _spec("iid", num_clients=10, val_fraction=0.2))
    assert [v.size for v in p.val] == [2] * 10 and [t.size for t in p.train] == [8] * 10
    # one sample per client: it must stay in train even with a large val_fraction
    tiny = make_partition(np.arange(3), _spec("iid", num_clients=3, val_fraction=0.9))
    assert [t.size for t in tiny.train] == [1, 1, 1] and [v.size for v in tiny.val] == [0, 0, 0]
    nov = make_partition(labels, _spec("iid", num_clients=4, val_fraction=0.0))
    assert all(v.size == 0 for v in nov.val)


def test_dirichlet_large_alpha_is_near_iid() -> None:
    labels = _labels(num_classes=10, per_class=1000)
    p = make_partition(labels, _spec("dirichlet", num_clients=5, alpha=1e4))
    tv = _tv_to_global(client_class_counts(p, labels))
    assert tv.max() < 0.1
    assert summary_stats(p, labels)["mean_tv"] < 0.05


def test_dirichlet_small_alpha_is_concentrated() -> None:
    labels = _labels(num_classes=10, per_class=200)
    p = make_partition(labels, _spec("dirichlet", num_clients=10, alpha=0.01))
    summary = summary_stats(p, labels)
    assert summary["mean_dominant_share"] > 0.8
    iid = summary_stats(make_partition(labels, _spec("iid", num_clients=10)), labels)
    assert summary["mean_tv"] > 0.5 > iid["mean_tv"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_at_most_k_classes(k: int) -> None:
    labels = _labels(num_classes=10, per_class=100)
    p = make_partition(labels, _spec("pathological", num_clients=12, classes_per_client=k))
    present = (client_class_counts(p, labels) > 0).sum(axis=1)
    assert present.max() <= k
    assert present.min() >= 1


def test_pathological_refuses_uncoverable_classes() -> None:
    with pytest.raises(FedvisionError, match="classes_per_client"):
        partition_labels(
            _labels(10, 10), _spec("pathological", num_clients=4, classes_per_client=2)
        )
    with pytest.raises(FedvisionError, match="classes_per_client"):
        partition_labels(_labels(3, 10), _spec("pathological", num_clients=4, classes_per_client=5))


@pytest.mark.parametrize("dist", ["lognormal", "powerlaw"])
def test_quantity_skew_sizes_vary_labels_iid(dist: str) -> None:
    labels = _labels(num_classes=5, per_class=4000)
    spec = _spec("quantity", num_clients=10, quantity_dist=dist, min_size=300, seed=1)
    p = make_partition(labels, spec)
    sizes = p.sizes()
    iid_sizes = make_partition(labels, _spec("iid", num_clients=10)).sizes()
    cv = sizes.std() / sizes.mean()
    assert cv > 0.3 and cv > 50 * (iid_sizes.std() / iid_sizes.mean())
    assert sizes.min() >= 300
    tv = _tv_to_global(client_class_counts(p, labels))
    assert tv.max() < 0.15  # smallest client has >= 300 samples over 5 classes


def test_quantity_every_client_nonempty_without_min_size() -> None:
    spec = _spec("quantity", num_clients=50, quantity_sigma=3.0, val_fraction=0.0)
    sizes = make_partition(_labels(2, 100), spec).sizes()
    assert sizes.min() >= 1 and sizes.sum() == 200


@pytest.mark.parametrize("scheme", SCHEMES)
def test_min_size_honoured(scheme: str) -> None:
    labels = _labels(num_classes=10, per_class=100)
    kw = {"alpha": 0.5} if scheme == "dirichlet" else {}
    p = make_partition(labels, _spec(scheme, num_clients=10, min_size=40, **kw))
    assert p.sizes().min() >= 40


def test_min_size_impossible_refused_up_front() -> None:
    with pytest.raises(FedvisionError, match="min_size"):
        partition_labels(_labels(10, 10), _spec("dirichlet", num_clients=10, min_size=11))


def test_min_size_unreachable_gives_up_quickly() -> None:
    # Feasible in total but practically never met at alpha 0.001: bounded retries, clear error.
    labels = _labels(num_classes=10, per_class=100)
    spec = _spec("dirichlet", num_clients=100, alpha=0.001, min_size=9, max_attempts=100)
    start = time.perf_counter()
    with pytest.raises(FedvisionError, match=r"lower min_size, raise alpha"):
        partition_labels(labels, spec)
    assert time.perf_counter() - start < 2.0


def test_pathological_min_size_unreachable_gives_up() -> None:
    # class 1 has 2 samples shared by 2 clients: one client always ends with 1 < min_size=2
    labels = np.array([0] * 10 + [1] * 2)
    spec = _spec("pathological", num_clients=4, classes_per_client=1, min_size=2)
    with pytest.raises(FedvisionError, match="raise classes_per_client"):
        partition_labels(labels, spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "dirichlet", "num_clients": 4, "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "num_clients": 4, "alpha": -1.0}, "alpha"),
        ({"scheme": "shards", "num_clients": 4}, "iid, dirichlet, pathological, quantity"),
        ({"scheme": "iid", "num_clients": 0}, "num_clients"),
        ({"scheme": "iid", "num_clients": 4, "val_fraction": 1.0}, "val_fraction"),
        ({"scheme": "quantity", "num_clients": 4, "quantity_dist": "zipf"}, "quantity_dist"),
        ({"scheme": "iid", "num_clients": 2.5}, "integer"),
    ],
)
def test_bad_spec_values_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(FedvisionError, match=match):
        PartitionSpec(**kwargs)


def test_more_clients_than_samples_refused() -> None:
    with pytest.raises(FedvisionError, match="fewer clients"):
        partition_labels(np.arange(5), _spec("iid", num_clients=6))


def test_bad_labels_refused() -> None:
    with pytest.raises(FedvisionError, match="1-D"):
        make_partition(np.zeros((2, 3), dtype=np.int64), _spec("iid", num_clients=2))
    with pytest.raises(FedvisionError, match="integers"):
        make_partition(np.zeros(4), _spec("iid", num_clients=2))
    with pytest.raises(FedvisionError, match="num_classes"):
        make_partition(np.arange(4), _spec("iid", num_clients=2), num_classes=2)


def test_spec_mapping_round_trip_and_unknown_key() -> None:
    spec = PartitionSpec.from_mapping({"scheme": "dirichlet", "num_clients": 5, "alpha": 1})
    assert spec.alpha == 1.0 and isinstance(spec.alpha, float)
    assert PartitionSpec.from_mapping(spec.to_dict()) == spec
    assert spec.canonical_json() == PartitionSpec("dirichlet", 5, alpha=1.0).canonical_json()
    with pytest.raises(FedvisionError, match=r"unknown partition setting.*alhpa"):
        PartitionSpec.from_mapping({"scheme": "dirichlet", "num_clients": 5, "alhpa": 0.1})
    with pytest.raises(FedvisionError, match="num_clients"):
        PartitionSpec.from_mapping({"scheme": "iid"})


def test_save_load_round_trip(tmp_path) -> None:
    labels = _labels()
    p = make_partition(labels, _spec("dirichlet", alpha=0.3))
    path = tmp_path / "sub" / "partition.npz"
    save_partition(p, path)
    assert [f.name for f in path.parent.iterdir()] == ["partition.npz"]  # no temp file left
    q = load_partition(path, labels)
    assert q.spec == p.spec and q.fingerprint == p.fingerprint and q.num_classes == 10
    for x, y in zip(p.train + p.val, q.train + q.val, strict=True):
        np.testing.assert_array_equal(x, y)
        assert y.dtype == np.int64
    assert load_partition(path).fingerprint == p.fingerprint  # no labels: no check


def test_load_refuses_other_labels_or_spec(tmp_path) -> None:
    labels = _labels()
    path = tmp_path / "partition.npz"
    save_partition(make_partition(labels, _spec("iid")), path)
    other = labels.copy()
    other[0] = (other[0] + 1) % 10
    with pytest.raises(FedvisionError, match="made for other labels/spec"):
        load_partition(path, other)


def test_load_missing_or_corrupt_refused(tmp_path) -> None:
    with pytest.raises(FedvisionError, match="not found"):
        load_partition(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(FedvisionError, match="corrupt"):
        load_partition(bad)
    good = tmp_path / "good.npz"
    save_partition(make_partition(_labels(), _spec("iid")), good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FedvisionError, match="corrupt"):
        load_partition(truncated)


def _tiny_partition() -> tuple[Partition, np.ndarray]:
    #          index: 0  1  2  3  4  5  6  7  8  9
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0, 2, 1])
    spec = PartitionSpec("iid", num_clients=3)
    train = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([7])]
    val = [np.array([6]), np.array([8]), np.array([9])]
    p = Partition(spec, train, val, 3, partition_fingerprint(labels, spec))
    return p, labels


def test_stats_on_hand_made_partition() -> None:
    p, labels = _tiny_partition()
    # client 0: labels 0,0,1 + 1 -> counts [2,2,0]; client 1: 2,2,2 + 2 -> [0,0,4];
    # client 2: 0 + 1 -> [1,1,0]
    np.testing.assert_array_equal(client_class_counts(p, labels), [[2, 2, 0], [0, 0, 4], [1, 1, 0]])
    stats = partition_stats(p, labels)
    assert stats[0] == {
        "client": 0,
        "train": 3,
        "val": 1,
        "size": 4,
        "num_classes": 2,
        "dominant_class": 0,
        "dominant_share": 0.5,
    }
    assert stats[1]["dominant_class"] == 2 and stats[1]["dominant_share"] == 1.0
    assert stats[2]["size"] == 2 and stats[2]["num_classes"] == 2
    s = summary_stats(p, labels)
    assert (s["clients"], s["samples"], s["min_size"], s["max_size"]) == (3, 10, 2, 4)
    assert s["median_size"] == 4.0
    assert s["mean_classes"] == pytest.approx(5 / 3)
    assert s["mean_dominant_share"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # global [0.3, 0.3, 0.4]; TV: c0 [.5,.5,0] -> 0.4, c1 [0,0,1] -> 0.6, c2 [.5,.5,0] -> 0.4
    assert s["mean_tv"] == pytest.approx((0.4 + 0.6 + 0.4) / 3)
    assert s["max_tv"] == pytest.approx(0.6)


def test_format_table_elides_many_clients() -> None:
    p, labels = _tiny_partition()
    text = format_partition_table(partition_stats(p, labels), summary_stats(p, labels))
    assert text.count("\n| ") == 4 and "| 1 | 3 | 1 | 4 | 1 | 2 | 1.000 |" in text
    assert "3 clients, 10 samples" in text and "mean TV to global 0.467" in text
    labels = _labels(4, 100)
    big = make_partition(labels, _spec("iid", num_clients=50))
    text = format_partition_table(partition_stats(big, labels), summary_stats(big, labels), 10)
    lines = text.splitlines()
    assert "| ... | 40 clients elided |" in text
    assert lines[2].startswith("| 0 |") and lines[-3].startswith("| 49 |")
    assert sum(line.startswith("| ") and line[2].isdigit() for line in lines) == 10


@pytest.mark.parametrize("shape", [(10, 10), (300, 250)])
def test_heatmap_png_written(tmp_path, shape: tuple[int, int]) -> None:
    counts = np.random.default_rng(0).integers(0, 50, size=shape)
    names = [f"n{i:08d}" for i in range(shape[1])]
    out = plot_partition_heatmap(counts, tmp_path / "plots" / "heat.png", class_names=names)
    data = out.read_bytes()
    assert out == tmp_path / "plots" / "heat.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_server_holdout_is_stratified_disjoint_and_seeded():
    from fedvision.data.partition import holdout_split

    labels = np.repeat(np.arange(3), [10, 20, 5])
    held, rest = holdout_split(labels, 0.2, seed=1)
    # Per class round(0.2 * n): 2, 4 and 1 (0.2 * 5 = 1.0).
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 4, 1]
    assert sorted(np.concatenate([held, rest]).tolist()) == list(range(35))
    assert np.array_equal(held, holdout_split(labels, 0.2, seed=1)[0])
    assert not np.array_equal(held, holdout_split(labels, 0.2, seed=2)[0])
    assert holdout_split(labels, 0.0, seed=1)[0].size == 0
    with pytest.raises(FedvisionError, match="server_val_fraction"):
        holdout_split(labels, 1.0, seed=1)
