"""Fetch pinned packages through the registries' ordinary clients and pull files out of them.

Each package is fetched once into ``<cache>/archives`` and checked against its pinned sha256;
a cached archive whose digest matches is never fetched again. Clients used:

- ``apt``: ``apt-get download NAME=VERSION`` (runs ``apt-get update`` once if the package is
  unknown and we are root), unpacked with ``dpkg-deb -x``;
- ``pip-wheel`` / ``pip-sdist``: ``python -m pip download --no-deps`` with ``--only-binary :all:``
  or ``--no-binary NAME`` (pip prepares the sdist's metadata in an isolated build env);
  ``pip-sdist-nobuild``: ``--no-binary :all: --no-build-isolation`` (pyradiomics, whose metadata
  step then uses this interpreter's numpy and setuptools);
- ``npm``: ``npm pack NAME@VERSION``;
- ``file``: copy a local file (``name`` is its path); used by tests and offline rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

Log = Callable[[str], None]

CLIENTS = ("apt", "pip-wheel", "pip-sdist", "pip-sdist-nobuild", "npm", "file")


class FetchError(RuntimeError):
    """A package could not be fetched, verified or unpacked."""


@dataclass(frozen=True)
class Archive:
    """One registry package, pinned by version and by the sha256 of the downloaded file."""

    client: str
    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    prefix: str = ""  # top folder inside a tarball that member paths are relative to

    @property
    def label(self) -> str:
        return f"{self.name}=={self.version} ({self.client})"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$NAPARI_DRDM_KIT_CACHE`` (formerly ``$DRDM_CACHE``) or ``~/.cache/napari-drdm/kit``."""
    from napari_drdm.core.environment import get
    env = get("KIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "napari-drdm" / "kit"


def fetch_archive(archive: Archive, cache_dir: Path, log: Log = print) -> Path:
    """Return the verified cached archive, downloading it first when missing or corrupt."""
    target = cache_dir / "archives" / archive.filename
    if target.exists() and sha256_file(target) == archive.sha256:
        log(f"  cached {archive.filename}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
        log(f"  fetching {archive.label}")
        _download(archive, Path(tmp))
        got = Path(tmp) / archive.filename
        if not got.exists():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise FetchError(f"{archive.label}: expected {archive.filename}, got {found}")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise FetchError(
                f"{archive.label}: sha256 {digest} differs from the pinned {archive.sha256}"
            )
        os.replace(got, target)
    return target


def _download(archive: Archive, dest: Path) -> None:
    """Run the client for ``archive`` so that its file lands in ``dest``."""
    if archive.client == "file":
        shutil.copy2(Path(archive.name).expanduser(), dest / archive.filename)
    elif archive.client == "apt":
        _apt_download(archive, dest)
    elif archive.client.startswith("pip-"):
        _run(_pip_command(archive, dest), archive, cwd=dest)
    elif archive.client == "npm":
        _run(["npm", "pack", f"{archive.name}@{archive.version}"], archive, cwd=dest)
    else:
        raise FetchError(f"{archive.label}: unknown client (known: {', '.join(CLIENTS)})")


def _pip_command(archive: Archive, dest: Path) -> list[str]:
    """The ``pip download`` command line for a wheel or an sdist."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    if archive.client == "pip-wheel":
        cmd += ["--only-binary", ":all:"]
    elif archive.client == "pip-sdist":  # the sdist itself; its build deps may be wheels
        cmd += ["--no-binary", archive.name]
    else:  # metadata prepared with this interpreter's numpy/setuptools, nothing built
        cmd += ["--no-binary", ":all:", "--no-build-isolation"]
    return cmd + [f"{archive.name}=={archive.version}"]


def _apt_download(archive: Archive, dest: Path) -> None:
    """``apt-get download``; refresh the package lists once if the version is unknown."""
    cmd = ["apt-get", "download", f"{archive.name}={archive.version}"]
    try:
        _run(cmd, archive, cwd=dest)
    except FetchError as first:
        unknown = any(s in str(first) for s in ("Unable to locate", "not found", "Can't select"))
        if not (unknown and hasattr(os, "geteuid") and os.geteuid() == 0):
            raise
        _run(["apt-get", "update"], archive, cwd=dest)
        _run(cmd, archive, cwd=dest)


def _run(cmd: list[str], archive: Archive, cwd: Path) -> None:
    """Run a client command; raise :class:`FetchError` naming the source on any failure."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as exc:
        raise FetchError(f"{archive.label}: client '{cmd[0]}' is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{archive.label}: '{' '.join(cmd[:3])}' timed out") from exc
    if proc.returncode != 0:
        text = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        tail = _gist(text.splitlines())
        hint = ""
        if archive.client == "pip-sdist-nobuild":
            hint = " (this interpreter needs numpy, setuptools and wheel installed)"
        raise FetchError(
            f"{archive.label}: '{' '.join(cmd[:3])}' failed{hint}: " + " | ".join(tail)
        )


def _gist(lines: list[str]) -> list[str]:
    """The first line that mentions an error, then the last three lines."""
    first = [ln for ln in lines if "error" in ln.lower()][:1]
    return first + [ln for ln in lines[-3:] if ln not in first]


def extract_members(
    archive: Archive, path: Path, members: Iterable[str], dest: Path
) -> dict[str, Path]:
    """Unpack ``members`` (paths inside the package) under ``dest``; map each to its file.

    Extraction is skipped when ``dest`` already holds them from an archive with the same digest.
    """
    members = list(members)
    files = {m: dest / m for m in members}
    stamp = dest / ".archive_sha256"
    if stamp.exists() and stamp.read_text() == archive.sha256 and all(
        f.exists() for f in files.values()
    ):
        return files
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    name = path.name
    if name.endswith(".deb"):
        _extract_deb(path, members, dest)
    elif name.endswith(".whl") or name.endswith(".zip"):
        _extract_zip(path, members, dest)
    elif name.endswith((".tar.gz", ".tgz")):
        _extract_tar(path, members, dest, archive.prefix)
    else:
        _copy_single(path, members, dest)
    missing = [m for m, f in files.items() if not f.exists()]
    if missing:
        raise FetchError(f"{archive.label}: not in the package: {', '.join(missing)}")
    stamp.write_text(archive.sha256)
    return files


def _extract_deb(path: Path, members: list[str], dest: Path) -> None:
    """``dpkg-deb -x`` into a scratch folder, then keep only ``members``."""
    with tempfile.TemporaryDirectory(dir=dest, prefix=".deb-") as tmp:
        try:
            subprocess.run(["dpkg-deb", "-x", str(path), tmp], check=True, capture_output=True)
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            raise FetchError(f"{path.name}: dpkg-deb -x failed ({exc})") from exc
        for member in members:
            src = Path(tmp) / member
            if src.exists():
                _move(src, dest / member)


def _extract_zip(path: Path, members: list[str], dest: Path) -> None:
    """Copy ``members`` out of a wheel or zip file."""
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for member in members:
            if member in names:
                _write(dest / member, zf.read(member))


def _extract_tar(path: Path, members: list[str], dest: Path, prefix: str) -> None:
    """Copy ``members`` (relative to ``prefix``) out of a gzipped tarball, regular files only."""
    wanted = {prefix + m: m for m in members}
    with tarfile.open(path, "r:gz") as tf:
        for info in tf:
            if info.name in wanted and info.isfile():
                handle = tf.extractfile(info)
                if handle is not None:
                    _write(dest / wanted[info.name], handle.read())


def _copy_single(path: Path, members: list[str], dest: Path) -> None:
    """A plain file is its own single member."""
    if len(members) != 1:
        raise FetchError(f"{path.name}: a plain file holds exactly one member")
    _write(dest / members[0], path.read_bytes())


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _move(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), target)
