"""``fedvision data download`` against small archives served from a loopback HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from fedvision.cli import main
from fedvision.data import download as D
from fedvision.errors import FedvisionError

# CIFAR-10's label_names, in label order (which is also their sorted order).
CIFAR_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with Range support; can ignore Range or cut once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []  # the Range header of every GET, in order
        self.ignore_range = False
        self.cut_once: dict[str, int] = {}  # path -> bytes of body to send before hanging up

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        srv = self.server
        body = srv.files.get(self.path)
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        cut = srv.cut_once.pop(self.path, None)
        if cut is not None:
            payload = payload[:cut]  # then the connection closes short of Content-Length
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # Only 127.0.0.1 is ever contacted: no proxy from the environment may take the request.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _closed_port_url(path: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def _tgz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def nette() -> bytes:
    """A tiny imagenette2-160.tgz: 2 classes, 3 train and 2 val JPEGs each (no folder entries)."""
    entries = {"imagenette2-160/noisy_imagenette.csv": b"path,noisy_labels_0\n"}
    for c, wnid in enumerate(("n01440764", "n02102040")):
        for split, n in (("train", 3), ("val", 2)):
            for i in range(n):
                entries[f"imagenette2-160/{split}/{wnid}/{split}{i}.JPEG"] = _jpeg(10 * c + i)
    return _tgz(entries)


def _cifar_batches() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    batches = {}
    for name in (*D.CIFAR10_TRAIN_BATCHES, D.CIFAR10_TEST_BATCH):
        per_class = 2 if name.startswith("data") else 1
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        batches[name] = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in labels],
            b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
        }
    return batches


@pytest.fixture(scope="module")
def cifar() -> tuple[bytes, dict[str, dict]]:
    """A tiny cifar-10-python.tar.gz in the official format (Python 2 pickles, bytes keys)."""
    batches = _cifar_batches()
    meta = {b"num_cases_per_batch": 20, b"label_names": [n.encode() for n in CIFAR_NAMES]}
    entries = {f"cifar-10-batches-py/{k}": pickle.dumps(v, protocol=2) for k, v in batches.items()}
    entries["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=2)
    entries["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return _tgz(entries), batches


def _pin(monkeypatch, archive: str, value: tuple[str, str] | None) -> None:
    monkeypatch.setattr(D, "CHECKSUMS", {**D.CHECKSUMS, archive: value})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _left(out) -> list[str]:
    """What a failed call left in ``out`` (it should be nothing)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_imagenette_downloads_verifies_extracts_and_then_skips(
    server, nette, tmp_path, capsys, monkeypatch
):
    _pin(monkeypatch, "imagenette2-160.tgz", None)  # checked as a complete archive only
    server.files["/nette.tgz"] = nette
    out = tmp_path / "data"
    args = ["data", "download", "imagenette", "--out", str(out), "--quiet"]
    assert main([*args, "--url", server.url("/nette.tgz")]) == 0
    root = out / "imagenette2-160"
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == ["n01440764", "n02102040"]
        assert all(len(list(p.glob("*.JPEG"))) == n for p in (root / split).iterdir())
    # Nothing but the tree and the pinnable sha256 is left next to it.
    assert sorted(p.name for p in out.iterdir()) == [
        "imagenette2-160",
        "imagenette2-160.tgz.sha256",
    ]
    assert (out / "imagenette2-160.tgz.sha256").read_text().split()[0] == _sha(nette)
    text = capsys.readouterr().out
    assert "6 train / 4 val images in 2 classes" in text and "no published checksum" in text
    assert _sha(nette) in text

    server.ranges.clear()
    assert main([*args, "--url", server.url("/nette.tgz")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert server.ranges == []  # skipped without a request


def test_interrupted_download_resumes_with_a_range_request(server, nette, tmp_path, monkeypatch):
    _pin(monkeypatch, "imagenette2-160.tgz", ("sha256", _sha(nette)))
    server.files["/nette.tgz"] = nette
    cut = len(nette) // 3
    server.cut_once["/nette.tgz"] = cut
    result = D.download_dataset(
        "imagenette", tmp_path, url=server.url("/nette.tgz"), progress=False
    )
    assert server.ranges == [None, f"bytes={cut}-"] and cut > 0
    assert result.verified == "sha256" and result.sha256 == _sha(nette)  # byte-identical
    assert result.images == {"train": 6, "val": 4}


def test_a_partial_file_from_an_earlier_run_is_continued(server, nette, tmp_path, monkeypatch):
    _pin(monkeypatch, "imagenette2-160.tgz", ("sha256", _sha(nette)))
    server.files["/nette.tgz"] = nette
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "imagenette2-160.tgz.part").write_bytes(nette[:100])
    result = D.download_dataset(
        "imagenette", tmp_path, url=server.url("/nette.tgz"), progress=False
    )
    assert server.ranges == ["bytes=100-"] and result.sha256 == _sha(nette)
    assert not (tmp_path / ".partial").exists()


def test_a_server_that_ignores_range_restarts_from_zero(server, nette, tmp_path, monkeypatch):
    _pin(monkeypatch, "imagenette2-160.tgz", ("sha256", _sha(nette)))
    server.files["/nette.tgz"] = nette
    server.ignore_range = True
    (tmp_path / ".partial").mkdir()
    # Wrong bytes: appending the 200's full body to them would fail the checksum.
    (tmp_path / ".partial" / "imagenette2-160.tgz.part").write_bytes(b"x" * 100)
    result = D.download_dataset(
        "imagenette", tmp_path, url=server.url("/nette.tgz"), progress=False
    )
    assert server.ranges == ["bytes=100-"] and result.sha256 == _sha(nette)


def test_a_complete_partial_file_is_taken_on_416(server, nette, tmp_path, monkeypatch):
    _pin(monkeypatch, "imagenette2-160.tgz", ("sha256", _sha(nette)))
    server.files["/nette.tgz"] = nette
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "imagenette2-160.tgz.part").write_bytes(nette)
    result = D.download_dataset(
        "imagenette", tmp_path, url=server.url("/nette.tgz"), progress=False
    )
    assert server.ranges == [f"bytes={len(nette)}-"] and result.images["train"] == 6


def test_checksum_mismatch_fails_in_one_line_and_leaves_nothing(
    server, nette, tmp_path, monkeypatch
):
    _pin(monkeypatch, "imagenette2-160.tgz", ("sha256", "0" * 64))
    server.files["/nette.tgz"] = nette
    with pytest.raises(FedvisionError, match="is not the published 0000") as excinfo:
        D.download_dataset("imagenette", tmp_path, url=server.url("/nette.tgz"), progress=False)
    assert "was removed" in _one_line_error(excinfo)
    assert _left(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "random", "not_tar", "escapes", "no_val"])
def test_a_corrupt_archive_is_refused_in_one_line_and_leaves_nothing(
    server, nette, tmp_path, damage
):
    bad = {
        "truncated": nette[: len(nette) * 2 // 3],
        "random": np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "not_tar": gzip.compress(b"hello " * 1000),
        "escapes": _tgz({"imagenette2-160/train/n1/a.JPEG": b"x", "imagenette2-160/../evil": b"x"}),
        "no_val": _tgz({"imagenette2-160/train/n1/a.JPEG": b"x"}),
    }[damage]
    server.files["/nette.tgz"] = bad  # imagewoof has no known checksum: the structure decides
    with pytest.raises(FedvisionError) as excinfo:
        D.download_dataset("imagewoof", tmp_path, url=server.url("/nette.tgz"), progress=False)
    msg = _one_line_error(excinfo)
    assert "was removed" in msg
    assert _left(tmp_path) == []
    assert not (tmp_path.parent / "evil").exists()


def test_cifar10_becomes_an_imagenet_style_png_tree(server, cifar, tmp_path, monkeypatch):
    data, batches = cifar
    _pin(monkeypatch, "cifar-10-python.tar.gz", ("md5", hashlib.md5(data).hexdigest()))
    server.files["/cifar.tar.gz"] = data
    result = D.download_dataset(
        "cifar10", tmp_path, url=server.url("/cifar.tar.gz"), progress=False
    )
    root = tmp_path / "cifar10"
    assert result.root == root and result.verified == "md5" and result.classes == 10
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CIFAR_NAMES)
    for split, per_class in (("train", 10), ("val", 1)):
        for name in CIFAR_NAMES:
            assert len(list((root / split / name).glob("*.png"))) == per_class
    assert result.images == {"train": 100, "val": 10}
    # Channel-major rows become HWC pixels, losslessly; index 23 = batch 2, row 3.
    for split, batch, row, index in (("val", "test_batch", 4, 4), ("train", "data_batch_2", 3, 23)):
        b = batches[batch]
        path = root / split / CIFAR_NAMES[b[b"labels"][row]] / f"{index:05d}.png"
        expected = b[b"data"][row].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar-10-python.tar.gz.sha256",
        "cifar10",
    ]


def test_cifar10_without_a_published_checksum_is_never_unpickled(cifar, tmp_path, monkeypatch):
    _pin(monkeypatch, "cifar-10-python.tar.gz", None)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(cifar[0])
    monkeypatch.setattr(D.pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(FedvisionError, match="no published checksum"):
        D.download_dataset("cifar10", tmp_path / "out", archive=archive, progress=False)
    assert archive.is_file() and not (tmp_path / "out").exists()


def test_archive_option_works_offline_and_keeps_the_file(cifar, tmp_path, monkeypatch):
    data = cifar[0]
    _pin(monkeypatch, "cifar-10-python.tar.gz", ("md5", hashlib.md5(data).hexdigest()))
    archive = tmp_path / "downloaded-elsewhere.tar.gz"
    archive.write_bytes(data)
    out = tmp_path / "out"
    url = _closed_port_url("/never-contacted")
    args = ["data", "download", "cifar10", "--out", str(out), "--archive", str(archive)]
    assert main([*args, "--url", url, "--quiet"]) == 0
    assert (out / "cifar10" / D.DOWNLOAD_RECORD).is_file() and archive.is_file()


def test_an_archive_copied_into_partial_is_used_offline(nette, tmp_path):
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "imagewoof2-320.tgz").write_bytes(_rename_top(nette, "imagewoof2-320"))
    result = D.download_dataset(
        "imagewoof", tmp_path, size=320, url=_closed_port_url("/x"), progress=False
    )
    assert result.root == tmp_path / "imagewoof2-320" and result.verified is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "imagewoof2-320",
        "imagewoof2-320.tgz.sha256",
    ]


def _rename_top(tgz: bytes, top: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        entries = {
            top + m.name.removeprefix("imagenette2-160"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }
    return _tgz(entries)


def test_a_corrupt_archive_option_is_refused_but_kept(tmp_path):
    archive = tmp_path / "mine.tgz"
    archive.write_bytes(b"definitely not gzip")
    with pytest.raises(FedvisionError, match="not a complete gzip/tar archive") as excinfo:
        D.download_dataset("imagewoof", tmp_path / "out", archive=archive, progress=False)
    assert "is left as it is" in _one_line_error(excinfo)
    assert archive.is_file() and not (tmp_path / "out").exists()


def test_unreachable_url_fails_in_one_line_naming_the_manual_route(tmp_path, capsys):
    url = _closed_port_url("/imagenette2-160.tgz")
    out = tmp_path / "data"
    assert main(["data", "download", "imagenette", "--out", str(out), "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedvision: error: cannot reach 127.0.0.1:")
    assert f"copy it to {out}/.partial/imagenette2-160.tgz" in err[0]
    assert "--archive FILE" in err[0] and "then run this again" in err[0]
    assert not out.exists()


def test_http_error_is_one_line(server, tmp_path, capsys):
    url = server.url("/missing.tgz")
    assert main(["data", "download", "imagewoof", "--out", str(tmp_path), "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answered HTTP 404" in err[0] and "--archive FILE" in err[0]


def test_a_folder_in_the_way_is_not_touched(tmp_path):
    (tmp_path / "imagenette2-160" / "train").mkdir(parents=True)
    with pytest.raises(FedvisionError, match=r"holds no fedvision_download\.json"):
        D.download_dataset("imagenette", tmp_path, url=_closed_port_url("/x"), progress=False)
    assert (tmp_path / "imagenette2-160" / "train").is_dir()


def test_sources_and_bad_arguments():
    assert D.source_for("imagewoof", "320").url.endswith("/fast-ai-imageclas/imagewoof2-320.tgz")
    assert D.source_for("imagenette", "full").top == "imagenette2"
    assert D.source_for("cifar10").url == D.CIFAR10_URL
    with pytest.raises(FedvisionError, match="--size applies"):
        D.source_for("cifar10", 160)
    with pytest.raises(FedvisionError, match="http:// or https://"):
        D.source_for("imagenette", url="file:///etc/passwd")
