"""``lowbit data fetch``: download datasets from their canonical hosts, verified by SHA-256.

Each file is streamed to a temporary file beside its target, hashed while downloading, and
renamed into place only when the digest matches, so an interrupted or tampered download never
leaves a file that looks complete. Archives are unpacked into a temporary folder first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lowbit.config import unknown_name_error
from lowbit.data.checksum import check_sha256
from lowbit.data.storage import raw_dir
from lowbit.errors import DataError
from lowbit.io import atomic_path, sha256_file

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name under the base URL (and on disk) and its SHA-256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live; ``unpack`` names tar archives to extract after download."""

    base_url: str
    files: tuple[RemoteFile, ...]
    unpack: bool = False


IDX_FILE_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_files(*sha256s: str) -> tuple[RemoteFile, ...]:
    """The four standard IDX files with their SHA-256 digests, in IDX_FILE_NAMES order."""
    return tuple(RemoteFile(name, digest) for name, digest in zip(IDX_FILE_NAMES, sha256s, strict=True))


SOURCES: dict[str, Source] = {
    "mnist": Source("https://ossci-datasets.s3.amazonaws.com/mnist/", _idx_files(
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    )),
    "fashion-mnist": Source("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _idx_files(
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    )),
    "cifar10": Source("https://www.cs.toronto.edu/~kriz/", (RemoteFile(
        "cifar-10-binary.tar.gz", "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ), unpack=True),
}
NOT_FETCHABLE = {
    "digits": "digits ships inside scikit-learn; nothing to fetch, just use it",
    "celeba": "CelebA is distributed through Google Drive after accepting its terms: download "
              "img_align_celeba.zip and list_eval_partition.txt from "
              "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzip them and pass --root DIR",
    "folder": "an image folder is your own data; pass --root DIR",
}


def download(url: str, target: Path, sha256: str) -> Path:
    """Stream ``url`` into ``target`` (atomically), failing with ChecksumError on a digest mismatch."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, atomic_path(target) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as handle, tqdm(total=total, unit="B", unit_scale=True, desc=target.name,
                                                 disable=total is None or total < 10 * CHUNK_BYTES) as bar:
                for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                    digest.update(block)
                    handle.write(block)
                    bar.update(len(block))
            check_sha256(digest.hexdigest(), sha256, url,
                         "the download is corrupted or the mirror changed the file; retry, or use "
                         "--base-url with a trusted mirror")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        is_http = isinstance(exc, urllib.error.HTTPError)
        reason = f"HTTP {exc.code}" if is_http else getattr(exc, "reason", exc)
        raise DataError(f"{url}: download failed ({reason}); check the network connection or pass "
                        "--base-url with a reachable mirror") from None
    return target


def _safe_members(archive: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    """The archive's members, refusing links, devices, absolute paths and '..' components."""
    members = archive.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
            raise DataError(f"{path}: unsafe archive member '{member.name}'; the archive is not genuine, "
                            "delete it and fetch again")
    return members


def unpack(archive_path: Path, dest: Path) -> None:
    """Extract a tar archive's top-level entries into ``dest``, via a temporary folder and renames."""
    with tempfile.TemporaryDirectory(dir=dest, prefix=".unpack-") as tmp:
        try:
            with tarfile.open(archive_path) as archive:
                members = _safe_members(archive, archive_path)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive_path}: cannot extract ({exc}); delete it and fetch again") from None
        for entry in Path(tmp).iterdir():
            final = dest / entry.name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(entry, final)


def get_source(name: str) -> Source:
    """The download source of dataset ``name`` (DataError explaining datasets that cannot be fetched)."""
    if name in NOT_FETCHABLE:
        raise DataError(NOT_FETCHABLE[name])
    if name not in SOURCES:
        raise unknown_name_error("dataset", name, [*SOURCES, *NOT_FETCHABLE])
    return SOURCES[name]


def fetch_files(source: Source, dest: Path, base_url: str | None = None) -> list[Path]:
    """Download every file of ``source`` into ``dest`` (skipping verified ones), unpacking archives."""
    dest.mkdir(parents=True, exist_ok=True)
    base = (base_url or source.base_url).rstrip("/") + "/"
    paths = []
    for remote in source.files:
        target = dest / remote.name
        if not (target.is_file() and sha256_file(target) == remote.sha256):
            download(base + remote.name, target, remote.sha256)
        if source.unpack:
            unpack(target, dest)
        paths.append(target)
    return paths


def fetch_dataset(name: str, dest: Path | None = None, base_url: str | None = None) -> Path:
    """Fetch dataset ``name`` into ``dest`` (default ``<cache>/raw/NAME``, where ``load`` looks)."""
    folder = Path(dest) if dest is not None else raw_dir(name)
    fetch_files(get_source(name), folder, base_url)
    return folder
