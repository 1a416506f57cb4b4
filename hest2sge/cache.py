"""The one on-disk cache layer of hest2sge.

Everything hest2sge computes once and reuses (patches, DeepPT trunk features, EGN exemplar
embeddings, iStar feature maps, :func:`hest2sge.data.features.extract_features`) is stored
through this module, as one HDF5 file per (slide, parameters):

* **fingerprinted**: the file records a ``fingerprint`` of everything its content depends on
  (callers build it with :func:`digest`; images enter through :func:`file_fingerprint`, which
  samples the file's bytes, or :func:`array_digest`); a file whose fingerprint, ``kind`` or
  layout version differs is stale and rebuilt;
* **atomic**: written under a temporary name in the same folder, marked ``complete``, flushed,
  ``fsync``-ed and renamed into place (then the folder is synced), so an interrupted run never
  leaves a file that is later trusted; temporary files of dead writers are removed;
* **content-checked**: every dataset carries a BLAKE2b checksum of its bytes, recomputed each
  time the file is opened through :func:`open_cached`; a file whose bytes changed (bit rot,
  a partial copy, random bytes written into it) or that cannot be read is never served: it is
  reported with a ``UserWarning`` and rebuilt. Within one process a file already verified is
  not hashed again while its identity is unchanged (device, inode, size, mtime and ctime: any
  write to the file changes its ctime, which cannot be set back).

File attributes: ``format = "hest2sge.cache"``, ``format_version``, ``kind`` (e.g.
``"patches"``), ``fingerprint``, ``complete`` and the caller's own attributes; dataset
attribute ``blake2b``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: ``format`` attribute of every cache file written by hest2sge.
CACHE_FORMAT = "hest2sge.cache"
#: Layout version of the cache files; older files are rebuilt.
CACHE_VERSION = 2
#: Image files up to this size are hashed whole; larger ones are sampled.
FULL_HASH_BYTES = 64 << 20
_SAMPLE_BLOCKS = 64
_SAMPLE_BYTES = 64 << 10
_CHECK_BLOCK_BYTES = 32 << 20
_STALE_SECONDS = 24 * 3600

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------
def _feed(h: Any, part: Any) -> None:
    if isinstance(part, (bytes, bytearray, memoryview)):
        h.update(b"b")
        h.update(bytes(part))
    elif isinstance(part, np.ndarray):
        arr = np.ascontiguousarray(part)
        h.update(f"a{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    elif isinstance(part, Mapping):
        h.update(b"{")
        for k in sorted(part, key=str):
            _feed(h, str(k))
            _feed(h, part[k])
        h.update(b"}")
    elif isinstance(part, (list, tuple)):
        h.update(b"[")
        for p in part:
            _feed(h, p)
        h.update(b"]")
    else:
        h.update(repr(part).encode())
    h.update(b"\0")


def digest(*parts: Any, size: int = 20) -> str:
    """A BLAKE2b hex digest of ``parts`` (bytes, numpy arrays, mappings, sequences, scalars).

    Arrays enter with their dtype and shape; mappings with sorted keys; everything else by
    ``repr``. Used to build cache fingerprints.
    """
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def array_digest(arr: np.ndarray) -> str:
    """Digest of an in-memory array (dtype, shape and every byte)."""
    return digest(np.asarray(arr), size=16)


def file_fingerprint(path: PathLike) -> dict[str, Any]:
    """Identity of a file that also depends on its content.

    Files up to :data:`FULL_HASH_BYTES` are hashed whole. Larger files (whole-slide images)
    are sampled: the first and last 64 KiB and 64 blocks of 64 KiB evenly spaced in between,
    so an image rewritten with the same size and modification time still changes the
    fingerprint (unless the change falls entirely between samples of a very large file).

    Args:
        path: The file.

    Returns:
        ``{"path", "size", "mtime_ns", "content"}``.

    Raises:
        FileNotFoundError: naming the file.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    h = hashlib.blake2b(digest_size=16)
    size = st.st_size
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            offsets = np.linspace(0, size - _SAMPLE_BYTES, _SAMPLE_BLOCKS + 2).astype(np.int64)
            for off in offsets:
                fh.seek(int(off))
                h.update(fh.read(_SAMPLE_BYTES))
    return {"path": str(path.resolve()), "size": int(size), "mtime_ns": int(st.st_mtime_ns),
            "content": h.hexdigest()}


# --------------------------------------------------------------------------------------------
# temporary files
# --------------------------------------------------------------------------------------------
def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def temp_path(path: PathLike) -> Path:
    """A unique temporary name beside ``path`` (``.<name>.<host>.<pid>.<random>.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: PathLike) -> None:
    """Delete temporary files of ``path`` left by dead writers on this host (or older than a
    day). They are never read."""
    path = Path(path)
    host = _host()
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}\.tmp$")
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        m = pat.match(tmp.name)
        try:
            old = now - tmp.stat().st_mtime > _STALE_SECONDS
            dead = m is not None and m["host"] == host and not _pid_alive(int(m["pid"]))
            if old or dead:
                tmp.unlink()
                log.info("removed stale temporary cache file %s", tmp)
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(tmp: PathLike, path: PathLike) -> None:
    """``fsync`` a finished temporary file, rename it onto ``path`` and sync the folder."""
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp)`` on a temporary file beside ``path`` and move it into place
    atomically; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        writer(tmp)
        replace_atomically(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------
def dataset_checksum(dset: Any) -> str:
    """BLAKE2b of a dataset's (or array's) dtype, shape and bytes, read in row blocks."""
    h = hashlib.blake2b(digest_size=16)
    shape = tuple(dset.shape)
    dtype = np.dtype(dset.dtype)
    h.update(f"{dtype.str}{shape}".encode())
    if not shape:
        h.update(np.ascontiguousarray(np.asarray(dset[()], dtype=dtype)).tobytes())
        return h.hexdigest()
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _CHECK_BLOCK_BYTES // row)
    for start in range(0, shape[0], step):
        block = np.ascontiguousarray(np.asarray(dset[start : start + step], dtype=dtype))
        h.update(block.tobytes())
    return h.hexdigest()


class CacheCorruptedError(OSError):
    """A cache file whose stored bytes do not match their checksum."""


#: Files verified in this process: identity -> fingerprint.
_VERIFIED: dict[tuple, str] = {}


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# --------------------------------------------------------------------------------------------
# writing and opening
# --------------------------------------------------------------------------------------------
def write_cache(
    path: PathLike,
    *,
    kind: str,
    fingerprint: str,
    arrays: Mapping[str, np.ndarray] | None = None,
    empty: Mapping[str, tuple[tuple[int, ...], Any, tuple[int, ...] | None]] | None = None,
    fill: Callable[[dict[str, Any]], None] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a cache file atomically, with a checksum per dataset.

    Args:
        path: Destination file.
        kind: What the file holds (``"patches"``, ``"deeppt_features"``, ...); part of the
            validity check.
        fingerprint: Digest of everything the content depends on.
        arrays: Datasets written as given.
        empty: Datasets created empty, ``name -> (shape, dtype, chunks)``, then filled by
            ``fill`` (for content streamed to disk, e.g. patches).
        fill: Called with ``{name: h5py dataset}`` of the ``empty`` datasets.
        attrs: Extra file attributes.

    Returns:
        ``path``.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)

    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = CACHE_FORMAT
            f.attrs["format_version"] = CACHE_VERSION
            f.attrs["kind"] = str(kind)
            f.attrs["fingerprint"] = str(fingerprint)
            f.attrs["complete"] = False
            for k, v in (attrs or {}).items():
                f.attrs[k] = float("nan") if v is None else v
            for name, arr in (arrays or {}).items():
                f.create_dataset(name, data=np.asarray(arr))
            dsets = {name: f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
                     for name, (shape, dtype, chunks) in (empty or {}).items()}
            if dsets:
                if fill is None:
                    raise ValueError("empty datasets given without a fill function")
                fill(dsets)
            f.flush()
            for name in f:
                if isinstance(f[name], h5py.Dataset):
                    f[name].attrs["blake2b"] = dataset_checksum(f[name])
            f.attrs["complete"] = True
            f.flush()

    return atomic_write(path, _write)


def open_cached(
    path: PathLike,
    *,
    kind: str,
    fingerprint: str,
    shapes: Mapping[str, tuple[int | None, ...]] | None = None,
    verify: bool = True,
) -> Any:
    """Open a cache file if it is complete, current and intact.

    Args:
        path: The cache file.
        kind: Expected ``kind`` attribute.
        fingerprint: Expected fingerprint.
        shapes: Expected dataset shapes (``None`` entries match any size).
        verify: Recompute every dataset checksum (the default; a file is never served
            unchecked).

    Returns:
        The open ``h5py.File`` (the caller closes it), or None when the file is absent, stale
        (logged) or damaged (a ``UserWarning`` names the file and the problem; the caller
        rebuilds it).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        return None
    try:
        f = h5py.File(path, "r")
    except Exception as err:
        warnings.warn(f"cache file {path} is unreadable ({type(err).__name__}: {err}); "
                      "rebuilding it", stacklevel=3)
        return None
    try:
        a = f.attrs
        reason = None
        if a.get("format") != CACHE_FORMAT or int(a.get("format_version", -1)) != CACHE_VERSION:
            reason = "written by another hest2sge cache version"
        elif a.get("kind") != kind:
            reason = f"holds {a.get('kind')!r}, not {kind!r}"
        elif a.get("fingerprint") != fingerprint:
            reason = "its inputs changed"
        elif not bool(a.get("complete", False)):
            reason = "it is incomplete"
        else:
            for name, shape in (shapes or {}).items():
                if name not in f:
                    reason = f"has no dataset {name!r}"
                    break
                got = tuple(f[name].shape)
                if len(got) != len(shape) or any(s is not None and s != g
                                                 for s, g in zip(shape, got)):
                    reason = f"dataset {name!r} has shape {got}, expected {tuple(shape)}"
                    break
        if reason is not None:
            log.info("cache file %s is stale (%s); rebuilding it", path, reason)
            f.close()
            return None
        ident = _identity(path)
        if verify and _VERIFIED.get(ident) != fingerprint:
            for name in f:
                if not isinstance(f[name], h5py.Dataset):
                    continue
                stored = f[name].attrs.get("blake2b")
                if stored is None or dataset_checksum(f[name]) != stored:
                    raise CacheCorruptedError(f"the bytes of dataset {name!r} do not match "
                                              "their checksum")
            _VERIFIED[ident] = fingerprint
        return f
    except Exception as err:
        f.close()
        warnings.warn(f"cache file {path} is unreadable or corrupted ({type(err).__name__}: "
                      f"{err}); rebuilding it", stacklevel=3)
        return None


def load_cached(
    path: PathLike | None,
    *,
    kind: str,
    fingerprint: str,
    build: Callable[[], Mapping[str, np.ndarray]],
    shapes: Mapping[str, tuple[int | None, ...]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Arrays read from a valid cache file, else built by ``build()`` and written there.

    Args:
        path: Cache file (None: build without caching).
        kind: What the file holds.
        fingerprint: Digest of the inputs.
        build: Computes ``{name: array}``.
        shapes: Expected shapes, checked on open.
        attrs: Extra file attributes.

    Returns:
        ``{name: numpy array}``.
    """
    if path is not None:
        f = open_cached(path, kind=kind, fingerprint=fingerprint, shapes=shapes)
        if f is not None:
            with f:
                log.debug("cache hit: %s", path)
                return {name: f[name][()] for name in f}
    out = {k: np.asarray(v) for k, v in build().items()}
    if path is not None:
        write_cache(path, kind=kind, fingerprint=fingerprint, arrays=out, attrs=attrs)
    return out


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (a short hash is appended when characters had to
    be replaced, so distinct names never collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))
    if safe != str(name):
        safe += "-" + hashlib.blake2b(str(name).encode(), digest_size=4).hexdigest()
    return safe
