"""Super-resolution prediction: run a slide-level model on a grid of patch centres denser than
the measured spots (HisToGene's "super-resolution"; reusable by any model whose design allows
it, e.g. DeepSpaCE or Hist2ST).

The grid and its positions are built once here:

* a least-squares affine map from array coordinates ``(array_col, array_row)`` to pixels
  ``(x, y)`` is fitted on the slide's spots, so every sub-spot gets *fractional array
  coordinates* consistent with the spot grid (legacy ST, Visium hex and rotated images alike);
* the spot pitch is the median nearest-neighbour distance of the spot centres placed on that
  fitted lattice (the jitter of legacy ST spot positions would bias it low);
* sub-spot centres lie on a square grid of step ``resolution`` pixels aligned to the first
  spot's lattice position, over the spots' bounding box widened by half a pitch, keeping the
  centres within ``pitch / sqrt(2)`` of a measured spot (the spots' Voronoi cells: the
  tissue) and inside the image;
* the integer position fed to a model's x/y embedding tables is the fractional array
  coordinate rounded half up and clipped to the range of the slide's measured coordinates;
* graph models get :func:`subspot_graph`: k nearest sub-spots at least one spot spacing away,
  the scale of the graph they were trained on.

:func:`predict_subspots` returns an AnnData of sub-spot predictions and
:func:`aggregate_subspots` averages the sub-spots inside each measured spot's disc.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Named resolutions: the sub-spot step as a fraction of the spot pitch.
NAMED_RESOLUTIONS = {"full": 1.0, "half": 0.5, "third": 1.0 / 3.0, "quarter": 0.25}


@dataclass
class SubspotGrid:
    """Sub-spot patch centres of one slide.

    Attributes:
        pos: (M, 2) centres (x, y) in full-resolution pixels.
        grid: (M, 2) integer grid indices (column, row) relative to the first spot.
        array_frac: (M, 2) fractional array coordinates (array_col, array_row).
        coord: (M, 2) integer array coordinates for position embeddings.
        spot: (M,) index of the nearest measured spot.
        dist: (M,) distance to that spot in pixels.
        in_spot: (M,) whether the centre lies inside that spot's disc.
        step: Grid step in pixels.
        pitch: Spot pitch in pixels.
        radius: Spot disc radius in pixels.
        array_nn: Nearest-neighbour distance of the measured spots in array units (1 on
            legacy ST grids, sqrt(2) on Visium's doubled-column hex grid).
    """

    pos: np.ndarray
    grid: np.ndarray
    array_frac: np.ndarray
    coord: np.ndarray
    spot: np.ndarray
    dist: np.ndarray
    in_spot: np.ndarray
    step: float
    pitch: float
    radius: float
    array_nn: float = 1.0

    def __len__(self) -> int:
        return len(self.pos)


def spot_pitch(pos: np.ndarray) -> float:
    """Centre-to-centre spot distance: the median nearest-neighbour distance (pixels)."""
    from scipy.spatial import cKDTree

    pos = np.asarray(pos, dtype=np.float64)
    if len(pos) < 2:
        raise ValueError("a super-resolution grid needs at least 2 spots to measure the pitch")
    d, _ = cKDTree(pos).query(pos, k=2)
    pitch = float(np.median(d[:, 1]))
    if not pitch > 0:
        raise ValueError("spot centres coincide: cannot measure the spot pitch")
    return pitch


def fit_array_to_pixel(coord: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Least-squares affine map ``[col, row, 1] @ A = (x, y)``; returns A (3, 2).

    Raises:
        ValueError: when the array coordinates are collinear (the map is not determined).
    """
    coord = np.asarray(coord, dtype=np.float64)
    design = np.column_stack([coord, np.ones(len(coord))])
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError("array coordinates are collinear: cannot relate sub-spots to the grid")
    a, *_ = np.linalg.lstsq(design, np.asarray(pos, dtype=np.float64), rcond=None)
    return a


def pixel_to_array(a: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Fractional array coordinates (col, row) of pixel positions under the map ``a``."""
    return (np.asarray(xy, dtype=np.float64) - a[2]) @ np.linalg.inv(a[:2])


def resolve_step(resolution: str | float, pitch: float) -> float:
    """Sub-spot step in pixels from a number (pixels) or a name (fraction of the pitch)."""
    if isinstance(resolution, str):
        key = resolution.strip().lower()
        if key not in NAMED_RESOLUTIONS:
            raise ValueError(
                f"resolution {resolution!r} is not understood: give a sub-spot step in "
                f"full-resolution pixels or one of {sorted(NAMED_RESOLUTIONS)} (fractions of "
                "the spot pitch); 'spot' predicts the measured spots"
            )
        return pitch * NAMED_RESOLUTIONS[key]
    step = float(resolution)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"resolution must be a positive step in pixels, got {resolution!r}")
    if pitch / step > 64:
        raise ValueError(
            f"resolution={step:g} px is {pitch / step:.0f}x finer than the spot pitch "
            f"({pitch:.1f} px): that would make {(pitch / step) ** 2:.0f} sub-spots per spot"
        )
    return step


def _image_shape_fullres(slide) -> tuple[float, float] | None:
    """(height, width) of a slide's image in full-resolution pixels, without decoding it."""
    from hest2sge.data.slide import spatial_entry

    entry = spatial_entry(slide)
    scale = float(entry.get("image_scale", 1.0))
    arr = entry.get("images", {}).get("fullres")
    if arr is not None:
        h, w = arr.shape[:2]
    else:
        path = str(entry.get("image_path") or "")
        if not path or not os.path.exists(path):
            return None
        try:
            from hest2sge.data.images import image_dimensions

            w, h = image_dimensions(path)
        except Exception:  # unreadable header: let patch cutting report the problem
            return None
    return h / scale, w / scale


def subspot_grid(slide, resolution: str | float) -> SubspotGrid:
    """The sub-spot centres of a slide (see the module docstring for the construction).

    Args:
        slide: A slide AnnData.
        resolution: Sub-spot step in full-resolution pixels, or ``"half"``, ``"third"``,
            ``"quarter"``, ``"full"`` (fractions of the spot pitch).
    """
    from scipy.spatial import cKDTree

    from hest2sge.data.slide import spatial_entry

    pos = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    coord = np.stack([slide.obs["array_col"].to_numpy(), slide.obs["array_row"].to_numpy()], 1)
    coord = coord.astype(np.float64)
    amap = fit_array_to_pixel(coord, pos)
    ideal = coord @ amap[:2] + amap[2]  # spot centres on the fitted lattice (no jitter)
    pitch = spot_pitch(ideal)
    step = resolve_step(resolution, pitch)
    margin, reach = pitch / 2.0, pitch / math.sqrt(2.0) + 1e-6 * pitch
    origin = ideal[0]
    lo, hi = pos.min(0) - margin, pos.max(0) + margin
    i0 = np.ceil((lo - origin) / step - 1e-9).astype(int)
    i1 = np.floor((hi - origin) / step + 1e-9).astype(int)
    gx, gy = np.meshgrid(np.arange(i0[0], i1[0] + 1), np.arange(i0[1], i1[1] + 1))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)  # row-major: y outer, x inner
    centres = origin + grid * step
    dist, spot = cKDTree(pos).query(centres, k=1)
    keep = dist <= reach
    shape = _image_shape_fullres(slide)
    if shape is not None:
        h, w = shape
        keep &= (centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (
            centres[:, 1] < h)
    grid, centres, dist, spot = grid[keep], centres[keep], dist[keep], spot[keep]
    frac = pixel_to_array(amap, centres)
    rounded = np.floor(frac + 0.5)
    rounded = np.clip(rounded, coord.min(0), coord.max(0)).astype(np.int64)
    diameter = float(spatial_entry(slide).get("scalefactors", {}).get("spot_diameter_fullres",
                                                                     float("nan")))
    radius = diameter / 2.0 if math.isfinite(diameter) and diameter > 0 else pitch / 4.0
    array_nn = spot_pitch(coord)
    return SubspotGrid(pos=centres, grid=grid.astype(np.int64), array_frac=frac, coord=rounded,
                       spot=spot.astype(np.int64), dist=dist, in_spot=dist <= radius + 1e-9,
                       step=step, pitch=pitch, radius=radius, array_nn=array_nn)


def subspot_graph(grid: SubspotGrid, k: int = 4, max_dist: float | None = None,
                  min_dist: float = 1.0):
    """k-NN graph of sub-spots at the scale of the spot graph.

    A graph model is trained on spots whose neighbours are one lattice step away; a plain
    k-NN over a sub-spot grid would connect sub-spots half a step (or less) apart, a scale the
    model never saw. Here each sub-spot receives edges from its ``k`` nearest sub-spots at
    least ``min_dist`` away in array units (the spots' own nearest-neighbour distance), so a
    sub-spot coinciding with a spot gets exactly that spot's lattice neighbours.

    Args:
        grid: The sub-spot grid.
        k: Neighbours per sub-spot.
        max_dist: Optional maximum edge length (array units), as for spots.
        min_dist: Minimum edge length (array units).

    Returns:
        ``edge_index`` (2, E), ``edge_index[1]`` the receiving sub-spot.
    """
    import torch
    from scipy.spatial import cKDTree

    pts = np.asarray(grid.array_frac, dtype=np.float64)
    lo = min_dist * (1.0 - 1e-6)
    radius = max(3.0 * min_dist, 0.0 if max_dist is None else float(max_dist))
    tree = cKDTree(pts)
    src, dst = [], []
    for i, nb in enumerate(tree.query_ball_point(pts, r=radius)):
        nb = np.asarray(nb, dtype=np.int64)
        d = np.linalg.norm(pts[nb] - pts[i], axis=1)
        ok = d >= lo
        nb, d = nb[ok], d[ok]
        # ties (exact on a lattice) go to the lower measured-spot index, as in knn_graph
        order = np.lexsort((nb, grid.spot[nb], np.round(d, 6)))[:k]
        for j, dj in zip(nb[order], d[order]):
            if max_dist is None or dj <= max_dist + 1e-9:
                src.append(int(j))
                dst.append(i)
    return torch.tensor([src, dst], dtype=torch.long).reshape(2, -1)


def subspot_slide(slide, grid: SubspotGrid):
    """A count-free slide AnnData whose "spots" are the sub-spots (for patch cutting/caching).

    It shares the image reference of ``slide``; its slide id is ``<slide>__sr<step>px``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from hest2sge.data.slide import slide_id_of, spatial_entry

    sid = f"{slide_id_of(slide)}__sr{grid.step:.4g}px"
    m = len(grid)
    obs = pd.DataFrame(
        {
            "slide_id": pd.Categorical([sid] * m),
            "patient_id": pd.Categorical([str(slide.obs["patient_id"].iloc[0])] * m),
            "array_row": grid.coord[:, 1],
            "array_col": grid.coord[:, 0],
        },
        index=pd.Index([f"sub_{c}_{r}" for c, r in grid.grid], name=None),
    )
    sub = ad.AnnData(X=sp.csr_matrix((m, 0), dtype=np.float32), obs=obs)
    sub.obsm["spatial"] = grid.pos.copy()
    sub.uns["spatial"] = {sid: dict(spatial_entry(slide))}
    return sub


def predict_subspots(
    model: Any,
    slide,
    resolution: str | float,
    pixel_size_um: float | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Predict a slide-level model on the sub-spot grid of a slide.

    All sub-spots form one sequence (one forward pass), as HisToGene's super-resolution does.
    Graph models get :func:`subspot_graph` (``model.graph_k`` neighbours at the scale of the
    spot graph) on the sub-spots' fractional array coordinates.

    Args:
        model: A slide-level hest2sge model.
        slide: A slide AnnData (counts are not needed).
        resolution: Sub-spot step in full-resolution pixels or a name (``"half"``, ...).
        pixel_size_um: Patch pixel size used in training (None: native resolution).
        cache_dir: Patch cache directory (None: in memory).

    Returns:
        AnnData (sub-spots x genes): predictions in ``X`` and ``layers["pred"]`` (model target
        scale); ``obsm["spatial"]`` sub-spot centres (x, y) in full-resolution pixels;
        ``obs``: ``grid_col``/``grid_row`` (sub-spot grid indices), ``array_col``/``array_row``
        (integer positions given to the model), ``array_col_frac``/``array_row_frac``,
        ``spot`` (barcode of the nearest measured spot), ``spot_index``, ``dist_to_spot``
        (pixels) and ``in_spot`` (inside that spot's disc); ``uns["hest2sge"]`` records the
        step, pitch and spot radius.
    """
    import torch

    from hest2sge.data.patches import cached_patches
    from hest2sge.data.slide import validate_slide
    from hest2sge.models.base import prepare_batch

    validate_slide(slide)
    grid = subspot_grid(slide, resolution)
    store = cached_patches(subspot_slide(slide, grid), patch_size=model.patch_size,
                           pixel_size_um=pixel_size_um, cache_dir=cache_dir)
    img = torch.from_numpy(np.ascontiguousarray(store.load())).permute(0, 3, 1, 2)
    m = len(grid)
    batch = {
        "img": img,
        "coord": torch.as_tensor(grid.coord),
        "pos": torch.as_tensor(grid.pos, dtype=torch.float32),
        "slide": torch.full((m,), -1, dtype=torch.long),
        "spot": torch.arange(m),
    }
    if getattr(model, "needs_graph", False) or model.input_mode == "slide":
        batch["edge_index"] = subspot_graph(grid, k=model.graph_k, max_dist=model.graph_max_dist,
                                            min_dist=grid.array_nn)
    batch = prepare_batch(batch, keep_uint8=getattr(model, "accepts_uint8_img", False))
    was_training = model.training
    model.eval()
    dev = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            pred = model.prediction(model({k: v.to(dev) for k, v in batch.items()}))
    finally:
        model.train(was_training)
    return subspot_anndata(model, slide, grid, pred.float().cpu().numpy(), resolution)


def subspot_anndata(model: Any, slide, grid: SubspotGrid, pred: np.ndarray,
                    resolution: str | float):
    """Wrap sub-spot predictions ``pred`` (M, G) of ``model`` on ``grid`` as an AnnData (the
    layout :func:`predict_subspots` documents); shared by every super-resolution model."""
    import anndata as ad
    import pandas as pd

    from hest2sge.data.slide import slide_id_of

    genes = model.genes or [f"g{i}" for i in range(pred.shape[1])]
    barcodes = np.asarray(slide.obs_names)[grid.spot]
    obs = pd.DataFrame(
        {
            "grid_col": grid.grid[:, 0], "grid_row": grid.grid[:, 1],
            "array_col": grid.coord[:, 0], "array_row": grid.coord[:, 1],
            "array_col_frac": grid.array_frac[:, 0], "array_row_frac": grid.array_frac[:, 1],
            "spot": barcodes, "spot_index": grid.spot, "dist_to_spot": grid.dist,
            "in_spot": grid.in_spot,
        },
        index=pd.Index([f"sub_{c}_{r}" for c, r in grid.grid], name=None),
    )
    out = ad.AnnData(X=pred.copy(), obs=obs)
    out.var_names = list(genes)
    out.layers["pred"] = pred
    out.obsm["spatial"] = grid.pos.copy()
    sid = slide_id_of(slide)
    out.uns["spatial"] = {sid: slide.uns["spatial"][sid]}
    out.uns["hest2sge"] = {
        "model": model.model_name, "resolution": str(resolution), "step_px": grid.step,
        "pitch_px": grid.pitch, "spot_radius_px": grid.radius, "slide_id": sid,
        "target_transform": model.fitted_target_transform or model.target_transform_spec(),
    }
    return out


def aggregate_subspots(sr, n_spots: int | None = None, layer: str = "pred") -> np.ndarray:
    """Average the sub-spot predictions inside each measured spot's disc.

    A spot whose disc contains no sub-spot centre takes its nearest sub-spot.

    Args:
        sr: Output of :func:`predict_subspots`.
        n_spots: Number of measured spots (default: largest ``spot_index`` + 1).
        layer: Layer to aggregate.

    Returns:
        (n_spots, G) array; rows of spots with no sub-spot at all are NaN.
    """
    values = np.asarray(sr.layers[layer], dtype=np.float64)
    idx = sr.obs["spot_index"].to_numpy()
    inside = sr.obs["in_spot"].to_numpy().astype(bool)
    dist = sr.obs["dist_to_spot"].to_numpy()
    n = int(idx.max()) + 1 if n_spots is None else int(n_spots)
    out = np.full((n, values.shape[1]), np.nan)
    for s in range(n):
        rows = np.where((idx == s) & inside)[0]
        if len(rows) == 0:
            cand = np.where(idx == s)[0]
            if len(cand) == 0:
                continue
            rows = cand[[int(np.argmin(dist[cand]))]]
        out[s] = values[rows].mean(0)
    return out


class SuperResolutionMixin:
    """Adds ``predict_slide`` (used by ``hest2sge.predict(model, slide, resolution=...)``) to a
    slide-level :class:`~hest2sge.models.base.SpotModel`."""

    def predict_slide(self, slide, resolution: str | float = "half",
                      pixel_size_um: float | None = None,
                      cache_dir: str | os.PathLike | None = None):
        """Sub-spot predictions of ``slide`` on a grid of step ``resolution`` (pixels or
        ``"half"``/``"third"``/``"quarter"`` of the spot pitch); see :func:`predict_subspots`."""
        return predict_subspots(self, slide, resolution, pixel_size_um=pixel_size_um,
                                cache_dir=cache_dir)
