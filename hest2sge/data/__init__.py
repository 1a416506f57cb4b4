"""Data: the slide contract, readers, synthetic slides, patches, gene panels, target
transforms, splits, graphs and the :class:`SpotDataModule`.

Names are imported on first use so that ``import hest2sge.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_slide": "slide",
    "validate_slide": "slide",
    "SlideImage": "slide",
    "SlideError": "slide",
    "as_slide": "scverse",
    "add_scverse_images": "scverse",
    "read_her2st": "readers",
    "read_visium": "readers",
    "read_hest": "readers",
    "write_hest": "readers",
    "read_h5ad": "readers",
    "read_cscc": "readers",
    "download_hest": "readers",
    "extract_features": "features",
    "load_slides": "io",
    "synthetic_slides": "synthetic",
    "extract_patches": "patches",
    "cached_patches": "patches",
    "PatchStore": "patches",
    "select_genes": "genes",
    "paper_gene_panel": "genes",
    "top_mean_genes": "genes",
    "highly_variable_genes": "genes",
    "published_panel": "genes",
    "TargetTransform": "transforms",
    "Split": "splits",
    "patient_kfold": "splits",
    "patient_folds": "splits",
    "check_split": "splits",
    "LeakageError": "splits",
    "knn_graph": "graphs",
    "radius_graph": "graphs",
    "SpotDataModule": "datamodule",
    "open_image": "images",
    "StainNormalizer": "stain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"hest2sge.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hest2sge.data' has no attribute {name!r}")
