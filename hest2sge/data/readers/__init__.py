"""Readers for spatial transcriptomics slides: legacy ST (HER2+, cSCC), Visium, HEST-1k and h5ad.

Every reader returns one AnnData per tissue section following the slide contract of
:mod:`hest2sge.data.slide` (``validate_slide`` passes). Images are never decoded here: slides
hold a path (or, for h5ad files with embedded images, an in-memory array) and patches are cut
later by :mod:`hest2sge.data.patches`.

One module per format: :mod:`.legacy_st` (HER2+, cSCC), :mod:`.visium`, :mod:`.h5ad` and
:mod:`.hest`; shared helpers in :mod:`._common`. Every reader is re-exported here.
"""

from __future__ import annotations

from hest2sge.data.readers._common import (
    HEST_WRITER_VERSION,
    ST_SPOT_DIAMETER_UM,
    ST_SPOT_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    estimate_st_pixel_size,
    grid_from_coords,
)
from hest2sge.data.readers.h5ad import (
    read_h5ad,
    slides_from_anndata,
)
from hest2sge.data.readers.hest import (
    download_hest,
    read_hest,
    write_hest,
)
from hest2sge.data.readers.legacy_st import (
    read_cscc,
    read_her2st,
    read_legacy_st,
)
from hest2sge.data.readers.visium import (
    read_10x_h5,
    read_visium,
)

__all__ = [
    "HEST_WRITER_VERSION",
    "ST_SPOT_DIAMETER_UM",
    "ST_SPOT_PITCH_UM",
    "VISIUM_SPOT_DIAMETER_UM",
    "download_hest",
    "estimate_st_pixel_size",
    "grid_from_coords",
    "read_10x_h5",
    "read_cscc",
    "read_h5ad",
    "read_her2st",
    "read_hest",
    "read_legacy_st",
    "read_visium",
    "slides_from_anndata",
    "write_hest",
]
