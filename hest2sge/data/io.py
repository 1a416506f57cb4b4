"""Resolve a slide specification (objects, a path, ``"synthetic"``, a reader dict) to slides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

READERS = ("her2st", "visium", "hest", "h5ad", "synthetic")


def load_slides(spec: Any) -> list:
    """Turn a slide specification into a list of slide AnnDatas.

    Accepted forms:

    * a list of AnnData (returned as is) or one AnnData;
    * ``"synthetic"``: :func:`~hest2sge.data.synthetic_slides` with its defaults;
    * a path: a her2st root (``ST-cnts/``), a Space Ranger folder (``spatial/``), a HEST-1k
      root (``st/``) or an ``.h5ad`` file, recognised from what it contains;
    * a dict ``{"reader": "her2st", "root": "...", **kwargs}`` (readers: ``her2st``,
      ``visium``, ``hest``, ``h5ad``, ``synthetic``), the form YAML configs use.

    Raises:
        FileNotFoundError / ValueError: naming the path or reader that could not be used.
    """
    from anndata import AnnData

    if isinstance(spec, AnnData):
        return [spec]
    if isinstance(spec, (list, tuple)) and all(isinstance(s, AnnData) for s in spec):
        if not spec:
            raise ValueError("no slides given")
        return list(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        reader = spec.pop("reader", None)
        if reader not in READERS:
            raise ValueError(f"slide spec needs 'reader' in {READERS}, got {reader!r}")
        return _read(reader, spec)
    if isinstance(spec, str) and spec == "synthetic":
        return _read("synthetic", {})
    if isinstance(spec, (str, os.PathLike)):
        return _read(_detect(Path(spec)), {"root": spec})
    raise TypeError(f"cannot load slides from a {type(spec).__name__}")


def _detect(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"slide path not found: {path}")
    if path.is_file() and path.suffix == ".h5ad":
        return "h5ad"
    if (path / "ST-cnts").is_dir():
        return "her2st"
    if (path / "st").is_dir():
        return "hest"
    if (path / "spatial").is_dir():
        return "visium"
    raise ValueError(
        f"{path} is not a recognised layout (her2st ST-cnts/, HEST-1k st/, Space Ranger "
        "spatial/, or an .h5ad file)"
    )


def _read(reader: str, kwargs: dict[str, Any]) -> list:
    from hest2sge.data import readers

    if reader == "synthetic":
        from hest2sge.data.synthetic import synthetic_slides

        return synthetic_slides(**kwargs)
    root = kwargs.pop("root", None) or kwargs.pop("path", None)
    if root is None:
        raise ValueError(f"the {reader!r} reader needs 'root'")
    if reader == "her2st":
        return readers.read_her2st(root, **kwargs)
    if reader == "visium":
        return [readers.read_visium(root, **kwargs)]
    if reader == "hest":
        return readers.read_hest(root, **kwargs)
    return readers.read_h5ad(root, **kwargs)
