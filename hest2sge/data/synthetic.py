"""Synthetic H&E slides with spatial expression whose image dependence is known.

:func:`synthetic_slides` is the library's built-in demo and test data. Each slide is an
H&E-like RGB image held in memory plus spot counts that follow the slide contract of
:mod:`hest2sge.data.slide`. The generative model is fully known, so a model's ability to read
expression from morphology can be checked against the ground truth:

**Tissue.** Smooth latent fields (Gaussian-filtered noise, correlation length about one spot
pitch) decide, pixel by pixel, between tumour nests (dense, large, round, vesicular nuclei in
pale purple-pink cytoplasm), stroma (pink collagen fibres with sparse elongated fibroblast
nuclei aligned with the fibres), lymphocyte aggregates (small, round, very dark nuclei) and fat
(white adipocytes with thin pink membranes). The colour is produced by Beer-Lambert mixing of
haematoxylin and eosin optical densities, with a patient- and slide-specific stain style. The
tissue covers the whole spot grid and ends with a ragged edge in a white margin.

**Morphology under each spot.** Five features are *measured on the rendered image* within the
spot disc (diameter ``spot_diameter_px``) and stored in ``obs`` (:data:`FEATURES`):
``nuclei_density`` (nuclei per 10^4 um^2), ``nuclear_area`` (fraction of the disc covered by
nuclei), ``eosin`` (mean eosin optical density), ``fat`` (fraction of the disc that is fat or
glass) and ``lymphocyte_density`` (lymphocytes per 10^4 um^2). Latent labels (``tumour``:
mean tumour state in the disc; ``region``: dominant tissue class) are stored too.

**Expression.** With ``z`` the features standardised by fixed reference values
(:data:`FEATURE_REFERENCE`) and clipped to [-3, 3], an *image gene* g has

``eta_g = sum_k W[g, k] z_k + V[g] z_a(g) z_b(g)``

(one or two features with loadings of magnitude 0.6-1.2, and an interaction term of magnitude
0.3-0.6 for about a third of the image genes). The image genes are compositional: their log
means are shifted by the same per-spot constant so that their total stays fixed, which keeps
the library-size normalised expression of the other genes independent of the image. An
*image-independent gene* has ``eta_g = a[g] S_g(x)`` with ``S_g`` a Gaussian-process sample
over the spot positions (random Fourier features, length scale 1.5-3.5 spot pitches)
independent of the image; about a quarter of them have a tiny amplitude (constant-ish). Then

``log mu = log(base_mean) + eta + patient_offset + slide_offset + log(size_factor)``

with gene base means log-uniform in [0.5, 50] counts per spot (sparse and dense genes),
patient offsets N(0, 0.5), slide offsets N(0, 0.1), and per-spot size factors
log-normal (slide depth sd 0.25, spot sd 0.3; independent of the image). Counts are drawn from a
zero-inflated negative binomial: gene dispersions (NB size) log-uniform in [2, 30], and a
zero-inflation (dropout) probability ``U(0.05, 0.4) * exp(-base_mean / 5)`` that mostly hits the
lowly expressed genes.

A Ridge regression on simple colour statistics of 64 px patches, trained on other patients,
reaches a mean held-out per-gene PCC of about 0.5-0.6 on the image genes (about 0.6 with the
true features) and about 0 on the others (``tests/test_synthetic.py``).

**Ground truth.** ``var``: ``image_dependent`` (bool), ``base_mean``, ``dispersion``,
``zero_inflation``, ``spatial_sd`` (amplitude ``a``), ``patient_offset`` (of this slide's
patient), ``loading_<feature>`` (``W``), ``interaction`` (``V``) and ``interaction_features``
(``"a*b"``); ``obsm["true_log_mu"]``: the log mean of the negative binomial (before zero
inflation) per spot and gene; ``obs["size_factor"]``.

Example:
    >>> slides = synthetic_slides(n_patients=2, slides_per_patient=1, grid=(6, 6), n_genes=10)
    >>> [s.obs["slide_id"].iloc[0] for s in slides]
    ['P0_S0', 'P1_S0']
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from hest2sge.data.slide import make_slide

__all__ = ["FEATURES", "FEATURE_REFERENCE", "synthetic_slide", "synthetic_slides"]

#: Morphology features measured under each spot, in the column order of the loadings.
FEATURES: tuple[str, ...] = (
    "nuclei_density",
    "nuclear_area",
    "eosin",
    "fat",
    "lymphocyte_density",
)

#: Fixed (centre, scale) used to standardise each feature before it enters the expression model.
FEATURE_REFERENCE: dict[str, tuple[float, float]] = {
    "nuclei_density": (30.0, 25.0),
    "nuclear_area": (0.18, 0.18),
    "eosin": (0.26, 0.1),
    "fat": (0.08, 0.24),
    "lymphocyte_density": (6.0, 12.0),
}

# Stain optical-density vectors (R, G, B), unit length (haematoxylin: Ruifrok & Johnston).
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.15, 0.85, 0.45])
_GLASS_OD = 0.02
_FIELD_CELL = 8  # latent fields are drawn on a grid this many pixels coarser, then upsampled


def synthetic_slides(
    n_patients: int = 4,
    slides_per_patient: int = 2,
    grid: tuple[int, int] = (12, 12),
    n_genes: int = 50,
    n_image_genes: int | None = None,
    spot_pitch_px: int = 64,
    spot_diameter_px: float | None = None,
    pixel_size_um: float = 1.0,
    layout: Literal["square", "hex"] = "square",
    margin_px: int | None = None,
    seed: int = 0,
):
    """Generate synthetic H&E slides whose expression partly depends on local morphology.

    The recommended patch size is the spot pitch (``spot_pitch_px``, 64 px by default) at native
    resolution: such a patch contains the whole spot disc on which the morphology features are
    measured. Larger patches (e.g. 224 px) still carry the signal because the tissue fields are
    spatially smooth, and the white margin keeps a 224 px patch around every spot inside the
    image with the default geometry.

    Slides are reproducible: slide ``P{p}_S{s}`` depends only on ``seed``, ``p``, ``s`` and the
    geometry/gene arguments, so it is the same whatever ``n_patients`` is.

    Args:
        n_patients: Number of patients ("P0", "P1", ...).
        slides_per_patient: Sections per patient (slide ids "P0_S0", "P0_S1", ...).
        grid: Spot rows and spots per row.
        n_genes: Number of genes ("G000", "G001", ...).
        n_image_genes: How many genes depend on morphology (default ``n_genes // 2``); which
            ones is random and recorded in ``var["image_dependent"]``.
        spot_pitch_px: Centre-to-centre distance of neighbouring spots, in image pixels.
        spot_diameter_px: Diameter of the spot disc on which morphology is measured (default
            0.75 x pitch); stored as ``scalefactors["spot_diameter_fullres"]``.
        pixel_size_um: Micrometres per pixel. Cells have physical sizes (a tumour nucleus is
            about 10 um across), so this sets how large they look in pixels; the tissue
            architecture scales with the spot pitch.
        layout: ``"square"`` (array_col step 1) or ``"hex"`` (Visium-like: rows offset by half
            a pitch, array_col step 2 with ``array_col % 2 == array_row % 2``).
        margin_px: White margin around the spot grid (default: enough for a 224 px patch
            around every spot, at least one pitch).
        seed: Non-negative integer seed.

    Returns:
        A list of ``n_patients * slides_per_patient`` slides (AnnData), patient-major order.
    """
    return [
        synthetic_slide(
            patient=p,
            section=s,
            grid=grid,
            n_genes=n_genes,
            n_image_genes=n_image_genes,
            spot_pitch_px=spot_pitch_px,
            spot_diameter_px=spot_diameter_px,
            pixel_size_um=pixel_size_um,
            layout=layout,
            margin_px=margin_px,
            seed=seed,
        )
        for p in range(n_patients)
        for s in range(slides_per_patient)
    ]


def synthetic_slide(
    patient: int = 0,
    section: int = 0,
    grid: tuple[int, int] = (12, 12),
    n_genes: int = 50,
    n_image_genes: int | None = None,
    spot_pitch_px: int = 64,
    spot_diameter_px: float | None = None,
    pixel_size_um: float = 1.0,
    layout: Literal["square", "hex"] = "square",
    margin_px: int | None = None,
    seed: int = 0,
):
    """Generate one synthetic slide, ``P{patient}_S{section}``.

    Identical to the corresponding element of :func:`synthetic_slides` called with the same
    arguments; see there for the parameters.

    Returns:
        One slide (AnnData) following the hest2sge contract, with the image in
        ``uns["spatial"][slide_id]["images"]["fullres"]``.
    """
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must have at least one row and column, got {grid}")
    if n_genes < 1:
        raise ValueError(f"n_genes must be positive, got {n_genes}")
    n_img = n_genes // 2 if n_image_genes is None else int(n_image_genes)
    if not 0 <= n_img <= n_genes:
        raise ValueError(f"n_image_genes must be in [0, {n_genes}], got {n_image_genes}")
    if layout not in ("square", "hex"):
        raise ValueError(f"layout must be 'square' or 'hex', got {layout!r}")
    if spot_pitch_px < 8:
        raise ValueError(f"spot_pitch_px must be at least 8, got {spot_pitch_px}")
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um}")
    if seed < 0 or patient < 0 or section < 0:
        raise ValueError("seed, patient and section must be non-negative integers")
    pitch = float(spot_pitch_px)
    diameter = 0.75 * pitch if spot_diameter_px is None else float(spot_diameter_px)
    if margin_px is None:
        margin_px = max(int(spot_pitch_px), int(math.ceil(112 - pitch / 2)))

    sid, pid = f"P{patient}_S{section}", f"P{patient}"
    genes = _gene_model(seed, n_genes, n_img)
    pstyle = _patient_model(seed, patient, n_genes)
    rng = np.random.default_rng([seed, 2, patient, section])

    array_row, array_col, xy, (height, width) = _spot_grid(rows, cols, pitch, layout, margin_px)
    tissue = _render_tissue(rng, height, width, xy, pitch, pixel_size_um, pstyle)
    feats, extra = _measure(tissue, xy, diameter, pixel_size_um)

    # --- expression ---------------------------------------------------------------------
    n = len(xy)
    z = np.column_stack(
        [
            (feats[:, k] - FEATURE_REFERENCE[f][0]) / FEATURE_REFERENCE[f][1]
            for k, f in enumerate(FEATURES)
        ]
    )
    z = np.clip(z, -3.0, 3.0)
    img = genes["image_dependent"]
    eta = z @ genes["W"].T + genes["V"] * z[:, genes["ia"]] * z[:, genes["ib"]]
    if img.any():
        b = genes["base"][img]
        comp = np.log(np.exp(eta[:, img]) @ b / b.sum())
        eta[:, img] -= comp[:, None]
    pos = xy / pitch
    spatial = np.zeros((n, n_genes))
    for g in np.flatnonzero(~img):
        om, ph, w = genes["rff"][g]
        spatial[:, g] = math.sqrt(2.0 / len(w)) * np.cos(pos @ om.T + ph) @ w
    eta += genes["spatial_sd"] * spatial
    size_factor = np.exp(rng.normal(0.0, 0.25) + rng.normal(0.0, 0.3, n))
    slide_offset = rng.normal(0.0, 0.1, n_genes)
    log_mu = (
        np.log(genes["base"]) + eta + pstyle["offset"] + slide_offset + np.log(size_factor)[:, None]
    )
    mu = np.exp(log_mu)
    theta = genes["dispersion"]
    lam = rng.gamma(theta, mu / theta)
    counts = rng.poisson(lam)
    counts[rng.random(counts.shape) < genes["zero_inflation"]] = 0

    barcodes = [f"{sid}_{r}x{c}" for r, c in zip(array_row, array_col)]
    obs = {f: feats[:, k] for k, f in enumerate(FEATURES)}
    obs.update(extra)
    obs["size_factor"] = size_factor
    adata = make_slide(
        counts.astype(np.float32),
        genes["names"],
        barcodes,
        xy,
        array_row,
        array_col,
        slide_id=sid,
        patient_id=pid,
        image=tissue["rgb"],
        pixel_size_um=pixel_size_um,
        spot_diameter_fullres=diameter,
        extra_obs=obs,
        metadata={
            "synthetic": True,
            "seed": int(seed),
            "layout": layout,
            "spot_pitch_px": pitch,
            "recommended_patch_px": int(spot_pitch_px),
            "features": list(FEATURES),
            "feature_reference": {k: list(v) for k, v in FEATURE_REFERENCE.items()},
        },
    )
    adata.obs["region"] = adata.obs["region"].astype("category")
    var = adata.var
    var["image_dependent"] = img
    var["base_mean"] = genes["base"]
    var["dispersion"] = theta
    var["zero_inflation"] = genes["zero_inflation"]
    var["spatial_sd"] = genes["spatial_sd"]
    var["patient_offset"] = pstyle["offset"]
    for k, f in enumerate(FEATURES):
        var[f"loading_{f}"] = genes["W"][:, k]
    var["interaction"] = genes["V"]
    var["interaction_features"] = [
        f"{FEATURES[a]}*{FEATURES[b]}" if v != 0 else ""
        for a, b, v in zip(genes["ia"], genes["ib"], genes["V"])
    ]
    adata.obsm["true_log_mu"] = log_mu.astype(np.float32)
    return adata


# ---------------------------------------------------------------------------------------------
# ground-truth parameters


def _gene_model(seed: int, n_genes: int, n_img: int) -> dict:
    rng = np.random.default_rng([seed, 0, n_genes, n_img])
    img = np.zeros(n_genes, dtype=bool)
    img[rng.permutation(n_genes)[:n_img]] = True
    k = len(FEATURES)
    base = np.exp(rng.uniform(math.log(0.5), math.log(50.0), n_genes))
    dispersion = np.exp(rng.uniform(math.log(2.0), math.log(30.0), n_genes))
    zero_inflation = rng.uniform(0.05, 0.4, n_genes) * np.exp(-base / 5.0)
    w = np.zeros((n_genes, k))
    v = np.zeros(n_genes)
    ia = np.zeros(n_genes, dtype=int)
    ib = np.zeros(n_genes, dtype=int)
    spatial_sd = np.zeros(n_genes)
    rff: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for g in range(n_genes):
        if img[g]:
            chosen = rng.choice(k, size=int(rng.integers(1, 3)), replace=False)
            w[g, chosen] = rng.choice([-1.0, 1.0], len(chosen)) * rng.uniform(0.6, 1.2, len(chosen))
            a, b = rng.choice(k, size=2, replace=False)
            ia[g], ib[g] = a, b
            if rng.random() < 1 / 3:
                v[g] = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6)
        else:
            spatial_sd[g] = rng.uniform(0.5, 1.2) if rng.random() < 0.75 else rng.uniform(0, 0.1)
            length = rng.uniform(1.5, 3.5)  # in spot pitches
            m = 64
            rff[g] = (
                rng.normal(0.0, 1.0 / length, (m, 2)),
                rng.uniform(0.0, 2 * math.pi, m),
                rng.normal(0.0, 1.0, m),
            )
    return {
        "names": [f"G{i:03d}" for i in range(n_genes)],
        "image_dependent": img,
        "base": base,
        "dispersion": dispersion,
        "zero_inflation": zero_inflation,
        "W": w,
        "V": v,
        "ia": ia,
        "ib": ib,
        "spatial_sd": spatial_sd,
        "rff": rff,
    }


def _patient_model(seed: int, patient: int, n_genes: int) -> dict:
    rng = np.random.default_rng([seed, 1, patient, n_genes])
    return {
        "offset": rng.normal(0.0, 0.5, n_genes),
        "tumour_threshold": 0.3 + rng.normal(0.0, 0.3),
        "immune_shift": rng.normal(0.0, 0.3),
        "h_scale": rng.uniform(0.85, 1.15),
        "e_scale": rng.uniform(0.85, 1.15),
        "h_vec": _unit(_H_VEC + rng.normal(0.0, 0.04, 3)),
        "e_vec": _unit(_E_VEC + rng.normal(0.0, 0.04, 3)),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def _spot_grid(rows: int, cols: int, pitch: float, layout: str, margin: int):
    r = np.repeat(np.arange(rows), cols)
    j = np.tile(np.arange(cols), rows)
    x0 = margin + pitch / 2
    if layout == "hex":
        c = 2 * j + (r % 2)
        x = x0 + c * pitch / 2
        dy = pitch * math.sqrt(3) / 2
        y = x0 + r * dy
        width = int(math.ceil(2 * margin + cols * pitch + pitch / 2))
        height = int(math.ceil(2 * margin + (rows - 1) * dy + pitch))
    else:
        c = j
        x = x0 + c * pitch
        y = x0 + r * pitch
        width = int(2 * margin + cols * pitch)
        height = int(2 * margin + rows * pitch)
    return r, c, np.column_stack([x, y]), (height, width)


# ---------------------------------------------------------------------------------------------
# image


def _latent_fields(
    rng: np.random.Generator, shape: tuple[int, int], sigmas_px: list[float]
) -> np.ndarray:
    """Unit-variance Gaussian random fields, one per correlation length, shape (n, H, W).

    Drawn on a grid ``_FIELD_CELL`` times coarser and bilinearly upsampled (two matrix products,
    much faster than ``ndimage.zoom``).
    """
    cell = _FIELD_CELL
    hc, wc = shape[0] // cell + 2, shape[1] // cell + 2
    coarse = np.empty((len(sigmas_px), hc, wc), dtype=np.float32)
    for i, sigma in enumerate(sigmas_px):
        f = ndi.gaussian_filter(rng.standard_normal((hc, wc)), sigma / cell, mode="reflect")
        coarse[i] = (f - f.mean()) / (f.std() + 1e-12)
    ry = _interp_matrix(shape[0], hc, cell)
    rx = _interp_matrix(shape[1], wc, cell)
    return ry @ (coarse @ rx.T)


def _interp_matrix(n_out: int, n_in: int, cell: int) -> np.ndarray:
    pos = np.clip((np.arange(n_out) + 0.5) / cell - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    out = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(out, (np.arange(n_out), i0), 1 - frac)
    np.add.at(out, (np.arange(n_out), i1), frac)
    return out


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _fibres(rng: np.random.Generator, shape: tuple[int, int], theta: np.ndarray, um: float):
    """Wavy collagen-like streaks following the orientation field ``theta`` (radians)."""
    h, w = shape
    along = max(int(round(16.0 / um)), 3)
    across = 1.1 / um

    def streaks(axis: int) -> np.ndarray:
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise = ndi.uniform_filter1d(noise, along, axis=axis, mode="wrap")
        return ndi.gaussian_filter1d(noise, across, axis=1 - axis, mode="wrap")

    horiz, vert = streaks(1), streaks(0)
    # crimp: sample the streak textures through a gentle sinusoidal warp
    yy = np.arange(h)[:, None]
    xx = np.arange(w)[None, :]
    ph = rng.uniform(0, 2 * math.pi, 2)
    wy = np.rint(2.5 / um * np.sin(2 * math.pi * xx / (45.0 / um) + ph[0])).astype(int)
    wx = np.rint(2.5 / um * np.sin(2 * math.pi * yy / (45.0 / um) + ph[1])).astype(int)
    horiz = horiz[(yy + wy) % h, xx % w]
    vert = vert[yy % h, (xx + wx) % w]
    diag_dn = vert[yy, (xx - yy) % w]  # streaks along (1, 1): angle +pi/4 (y points down)
    diag_up = vert[yy, (xx + yy) % w]  # streaks along (1, -1): angle -pi/4
    out = np.zeros(shape, dtype=np.float32)
    norm = np.zeros(shape, dtype=np.float32)
    for angle, tex in (
        (0.0, horiz),
        (math.pi / 2, vert),
        (math.pi / 4, diag_dn),
        (-math.pi / 4, diag_up),
    ):
        wgt = np.clip(np.cos(2 * (theta - angle)), 0, None) ** 2
        out += wgt * tex
        norm += wgt * wgt
    out /= np.sqrt(norm) + 1e-6
    return out / (out.std() + 1e-6)


def _render_tissue(rng, height, width, xy, pitch, um, style) -> dict:
    shape = (height, width)
    corr = 1.2 * pitch
    g_tumour, g_fat, g_immune, g_dens, g_grade, g_eosin, g_angle, g_edge = _latent_fields(
        rng, shape, [corr, corr, 0.8 * pitch, corr, 2 * pitch, corr, 1.5 * pitch, 0.7 * pitch]
    )

    # tissue outline: the spot grid's bounding box grown by about 3/4 pitch, ragged
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    (x0, y0), (x1, y1) = xy.min(0).astype(np.float32), xy.max(0).astype(np.float32)
    dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0)
    dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0)
    tissue = (dx * dx + dy * dy < (pitch * (0.75 + 0.2 * g_edge)) ** 2).astype(np.float32)

    tumour = _sigmoid(6.0 * (g_tumour - style["tumour_threshold"]))
    fat = (g_fat - 1.5 * tumour > 1.0) & (tissue > 0)
    cellular = tissue * (1.0 - fat.astype(np.float32))
    immune = np.clip(np.exp(2.0 * (g_immune + style["immune_shift"]) - 3.0), 0, 1)
    immune *= 1 - 0.6 * tumour
    theta = 1.3 * g_angle

    # --- nuclei -------------------------------------------------------------------------
    nuclei = []  # (x, y, a, b, angle, h, rim, kind)
    # tumour: jittered lattice thinned by tumour state x density
    step = 11.0 / um
    gy, gx = np.mgrid[0:height:step, 0:width:step]
    px = (gx + rng.uniform(-0.35, 0.35, gx.shape) * step).ravel()
    py = (gy + rng.uniform(-0.35, 0.35, gy.shape) * step).ravel()
    ok = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    px, py = px[ok], py[ok]
    iy, ix = py.astype(int), px.astype(int)
    dens = np.clip(0.75 + 0.25 * g_dens[iy, ix], 0.3, 1.2)
    p_keep = 0.9 * tumour[iy, ix] * cellular[iy, ix] * dens
    keep = rng.random(len(px)) < np.clip(p_keep, 0, 1)
    px, py, iy, ix = px[keep], py[keep], iy[keep], ix[keep]
    m = len(px)
    radius = 5.0 / um * (1 + 0.18 * g_grade[iy, ix]) * rng.uniform(0.85, 1.15, m)
    aspect = rng.uniform(1.0, 1.4, m)
    nuclei.append(
        (
            px,
            py,
            radius * np.sqrt(aspect),
            radius / np.sqrt(aspect),
            rng.uniform(0, math.pi, m),
            rng.uniform(0.95, 1.25, m),
            np.full(m, 0.35),
            np.zeros(m),
        )
    )

    def poisson_points(intensity_max_per_um2, accept):
        lam = intensity_max_per_um2 * height * width * um * um
        k = rng.poisson(lam)
        qx, qy = rng.uniform(0, width, k), rng.uniform(0, height, k)
        jy, jx = qy.astype(int), qx.astype(int)
        sel = rng.random(k) < accept(jy, jx)
        return qx[sel], qy[sel], jy[sel], jx[sel]

    # fibroblasts in stroma, elongated along the fibres
    qx, qy, jy, jx = poisson_points(0.0008, lambda j, i: (1 - tumour[j, i]) * cellular[j, i])
    m = len(qx)
    nuclei.append(
        (
            qx,
            qy,
            rng.uniform(5.0, 8.0, m) / um,
            rng.uniform(1.5, 2.3, m) / um,
            theta[jy, jx] + rng.normal(0, 0.2, m),
            rng.uniform(1.0, 1.3, m),
            np.zeros(m),
            np.ones(m),
        )
    )
    # lymphocytes: small, round, dark
    qx, qy, jy, jx = poisson_points(0.006, lambda j, i: immune[j, i] * cellular[j, i])
    m = len(qx)
    r = rng.uniform(2.8, 3.5, m) / um
    nuclei.append(
        (
            qx,
            qy,
            r,
            r * rng.uniform(0.85, 1.0, m),
            rng.uniform(0, math.pi, m),
            rng.uniform(1.5, 1.8, m),
            np.zeros(m),
            np.full(m, 2.0),
        )
    )
    nx, ny, na, nb, nang, nh, nrim, nkind = (np.concatenate(c) for c in zip(*nuclei))
    h_nuc = _stamp_nuclei(rng, shape, nx, ny, na, nb, nang, nh, nrim)

    # --- stains ---------------------------------------------------------------------------
    fib = _fibres(rng, shape, theta, um)
    collagen = np.clip(0.55 + 0.3 * fib, 0.0, 1.0)
    fine = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.2 / um)
    fine /= fine.std() + 1e-6
    eosin_level = np.exp(0.2 * g_eosin)
    stroma_e = 0.14 + 0.36 * collagen
    tumour_e = 0.24 + 0.04 * fine
    e_map = cellular * (tumour * tumour_e + (1 - tumour) * stroma_e) * eosin_level
    e_map *= 1.0 - 0.6 * np.clip(h_nuc, 0, 1)
    if fat.any():
        e_map += _adipocyte_membranes(rng, fat, pitch, um) * 0.45
    h_bg = cellular * (0.03 + 0.12 * tumour + 0.02 * fine)
    h_map = h_bg + h_nuc

    h_map = ndi.gaussian_filter(h_map, 0.5 / um) * style["h_scale"]
    e_map = ndi.gaussian_filter(e_map, 0.5 / um) * style["e_scale"]
    od = (
        h_map[..., None] * style["h_vec"].astype(np.float32)
        + e_map[..., None] * style["e_vec"].astype(np.float32)
        + np.float32(_GLASS_OD)
    )
    rgb = 255.0 * np.exp(-od) + 2.5 * rng.standard_normal((height, width, 1), dtype=np.float32)
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return {
        "rgb": rgb,
        "nuclear_mask": h_nuc > 0.35,
        "eosin": e_map,
        "white": (tissue == 0) | fat,
        "tumour": tumour,
        "nuclei_xy": np.column_stack([nx, ny]),
        "nuclei_kind": nkind,
    }


def _stamp_nuclei(rng, shape, x, y, a, b, angle, h, rim) -> np.ndarray:
    """Render soft ellipses of haematoxylin density with a chromatin texture."""
    out = np.zeros(shape, dtype=np.float32)
    if len(x) == 0:
        return out
    half = int(math.ceil(a.max())) + 2
    off = np.arange(-half, half + 1)
    cx, cy = np.floor(x).astype(int), np.floor(y).astype(int)
    pxs = cx[:, None, None] + off[None, None, :]  # (N, 1, S)
    pys = cy[:, None, None] + off[None, :, None]  # (N, S, 1)
    u = pxs + 0.5 - x[:, None, None]
    v = pys + 0.5 - y[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    ur = u * c + v * s
    vr = -u * s + v * c
    rr = np.sqrt((ur / a[:, None, None]) ** 2 + (vr / b[:, None, None]) ** 2)
    edge = np.clip((1.0 - rr) * b[:, None, None] + 0.5, 0.0, 1.0)
    texture = 0.7 + 0.6 * rng.random(edge.shape, dtype=np.float32)
    vesicular = 1.0 - rim[:, None, None] * (1.0 - np.clip(rr, 0, 1) ** 2)
    val = (h[:, None, None] * edge * texture * vesicular).astype(np.float32)
    pxs, pys = np.broadcast_to(pxs, val.shape), np.broadcast_to(pys, val.shape)
    inside = (val > 0) & (pxs >= 0) & (pxs < shape[1]) & (pys >= 0) & (pys < shape[0])
    np.maximum.at(out.ravel(), (pys[inside] * shape[1] + pxs[inside]), val[inside])
    return out


def _adipocyte_membranes(rng, fat: np.ndarray, pitch: float, um: float) -> np.ndarray:
    """Thin membranes between adipocytes (Voronoi edges of jittered seeds) inside ``fat``."""
    h, w = fat.shape
    step = 45.0 / um
    gy, gx = np.mgrid[-step : h + step : step, -step : w + step : step]
    seeds = np.column_stack(
        [
            (gx + rng.uniform(-0.4, 0.4, gx.shape) * step).ravel(),
            (gy + rng.uniform(-0.4, 0.4, gy.shape) * step).ravel(),
        ]
    )
    yy, xx = np.nonzero(fat)
    d, _ = cKDTree(seeds).query(np.column_stack([xx, yy]), k=2)
    out = np.zeros(fat.shape, dtype=np.float32)
    out[yy, xx] = np.exp(-(((d[:, 1] - d[:, 0]) / (1.2 / um)) ** 2))
    return out


# ---------------------------------------------------------------------------------------------
# measurement


def _measure(tissue: dict, xy: np.ndarray, diameter: float, um: float):
    """Morphology features within the disc of each spot, measured on the rendered maps."""
    h, w = tissue["eosin"].shape
    rad = diameter / 2
    k = int(math.ceil(rad))
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    inside = ox**2 + oy**2 <= rad**2
    oy, ox = oy[inside], ox[inside]
    cx, cy = np.round(xy[:, 0]).astype(int), np.round(xy[:, 1]).astype(int)
    py = np.clip(cy[:, None] + oy[None, :], 0, h - 1)
    px = np.clip(cx[:, None] + ox[None, :], 0, w - 1)
    area = inside.sum() * um * um / 1e4  # disc area in units of 10^4 um^2

    def disc_mean(a):
        return a[py, px].mean(1)

    def count_within(points):
        if len(points) == 0:
            return np.zeros(len(xy))
        return cKDTree(points).query_ball_point(xy, rad, return_length=True).astype(np.float64)

    nxy, kind = tissue["nuclei_xy"], tissue["nuclei_kind"]
    feats = np.column_stack(
        [
            count_within(nxy) / area,
            disc_mean(tissue["nuclear_mask"]),
            disc_mean(tissue["eosin"]),
            disc_mean(tissue["white"]),
            count_within(nxy[kind == 2]) / area,
        ]
    ).astype(np.float64)
    tum = disc_mean(tissue["tumour"]).astype(np.float64)
    region = np.where(
        feats[:, 3] > 0.5,
        "fat",
        np.where(feats[:, 4] > 15.0, "immune", np.where(tum > 0.5, "tumour", "stroma")),
    )
    return feats, {"tumour": tum, "region": region.tolist()}
