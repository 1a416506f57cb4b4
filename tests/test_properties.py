"""Property-based tests (hypothesis) of readers, slide validation and metrics on small random
inputs: a reader returns exactly the table it read or raises Hest2sgeInputError, never
anything else and never NaN; validation accepts exactly the finite non-negative counts; the
metrics never hand a NaN/inf from a degenerate slide to the monitored mean."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hest2sge.errors import Hest2sgeInputError

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

CELL = st.one_of(
    st.integers(0, 50).map(str),
    st.sampled_from(["", "nan", "inf", "-inf", "-1", "abc", "2.5", "1e3", " 7 "]),
)


@st.composite
def tables(draw):
    n_spots = draw(st.integers(1, 5))
    n_genes = draw(st.integers(1, 4))
    genes = draw(st.lists(st.sampled_from(["GA", "GB", "GC", "GD", "GE"]), min_size=n_genes,
                          max_size=n_genes))
    cells = draw(st.lists(st.lists(CELL, min_size=n_genes, max_size=n_genes),
                          min_size=n_spots, max_size=n_spots))
    return genes, cells


def _expected(genes, cells):
    """The table a correct reader returns, or None when the input is bad."""
    if len(set(genes)) != len(genes):
        return None
    try:
        arr = np.array([[float(c) for c in row] for row in cells], dtype=np.float64)
    except ValueError:
        return None
    if not np.isfinite(arr).all() or (arr < 0).any():
        return None
    return arr


@SETTINGS
@given(tables())
def test_legacy_reader_returns_the_table_or_a_named_error(table):
    from PIL import Image

    from hest2sge.data.readers import read_legacy_st

    genes, cells = table
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        pos = [(x + 1, 1) for x in range(len(cells))]
        (d / "c.tsv").write_text("\t" + "\t".join(genes) + "\n" + "".join(
            f"{x}x{y}\t" + "\t".join(row) + "\n" for (x, y), row in zip(pos, cells)))
        (d / "s.tsv").write_text("x\ty\tpixel_x\tpixel_y\n" + "".join(
            f"{x}\t{y}\t{20.0 * x}\t20.0\n" for x, y in pos))
        Image.fromarray(np.full((60, 200, 3), 200, np.uint8)).save(d / "i.jpg")
        expected = _expected(genes, cells)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if expected is None:
                with pytest.raises(Hest2sgeInputError, match="c.tsv"):
                    read_legacy_st(d / "c.tsv", d / "s.tsv", d / "i.jpg", "S", "P")
                return
            slide = read_legacy_st(d / "c.tsv", d / "s.tsv", d / "i.jpg", "S", "P")
    np.testing.assert_array_equal(slide.X.toarray(), expected.astype(np.float32))
    assert list(slide.var_names) == genes


VALUES = st.sampled_from([0.0, 1.0, 3.0, 0.5, -1.0, math.nan, math.inf, -math.inf])


@SETTINGS
@given(st.lists(st.lists(VALUES, min_size=3, max_size=3), min_size=1, max_size=4),
       st.booleans())
def test_validate_accepts_exactly_finite_nonnegative_counts(rows, sparse):
    import scipy.sparse as sp

    from hest2sge.data.slide import SlideError, make_slide, validate_slide

    x = np.array(rows, dtype=np.float32)
    n = len(x)
    slide = make_slide(sp.csr_matrix(x) if sparse else x, genes=["A", "B", "C"],
                       barcodes=[f"s{i}" for i in range(n)],
                       spatial=np.c_[np.arange(n) * 4.0 + 2, np.full(n, 2.0)],
                       array_row=[0] * n, array_col=list(range(n)), slide_id="s", patient_id="p",
                       image=np.zeros((8, 8 * n, 3), np.uint8))
    if np.isfinite(x).all() and (x >= 0).all():
        validate_slide(slide)
    else:
        with pytest.raises(SlideError, match="count"):
            validate_slide(slide)


@st.composite
def validation_sets(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    constant = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    return sizes, seed, constant


@SETTINGS
@given(validation_sets())
def test_monitored_metrics_ignore_degenerate_slides(data):
    from hest2sge.metrics.callback import drop_degenerate_slides, evaluate_predictions, summarise

    sizes, seed, constant = data
    rng = np.random.default_rng(seed)
    slide = np.repeat(np.arange(len(sizes)), sizes)
    truth = rng.random((len(slide), 3))
    for k, c in enumerate(constant):
        if c:
            truth[slide == k] = 0.5
    pred = truth + rng.normal(0, 0.3, truth.shape)
    counts = rng.integers(0, 4, truth.shape).astype(float)
    kept, excluded = drop_degenerate_slides(
        {"pred": pred, "expr": truth, "counts": counts, "slide": slide})
    degenerate = {str(k) for k, (n, c) in enumerate(zip(sizes, constant)) if n < 2 or c}
    assert set(excluded) == degenerate
    if len(degenerate) == len(sizes):
        assert len(kept["slide"]) == 0
        return
    table = evaluate_predictions(kept["pred"], kept["expr"], kept["counts"], kept["slide"])
    summary = summarise(table, ["pcc", "js", "rmse", "nrmse_range"])
    # every kept slide has >= 2 spots and a varying target, so its means are defined
    assert all(math.isfinite(summary[m]) for m in ("js", "rmse"))
    assert -1.0 <= summary["pcc"] <= 1.0 or math.isnan(summary["pcc"])
    assert set(table["slide_id"]) == {str(k) for k in range(len(sizes))} - degenerate


@SETTINGS
@given(st.integers(2, 12), st.integers(1, 3), st.integers(0, 2**16),
       st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_pcc_bounded_symmetric_and_affine_invariant(n, g, seed, scale, shift):
    import torch

    from hest2sge.metrics.functional import pcc

    rng = np.random.default_rng(seed)
    a = torch.as_tensor(rng.normal(size=(n, g)))
    b = torch.as_tensor(rng.normal(size=(n, g)))
    r = pcc(a, b)
    assert r.shape == (g,) and r.dtype == torch.float64
    finite = torch.isfinite(r)
    assert bool(((r[finite] >= -1 - 1e-12) & (r[finite] <= 1 + 1e-12)).all())
    torch.testing.assert_close(pcc(b, a), r, equal_nan=True)
    torch.testing.assert_close(pcc(a * scale + shift, b), r, equal_nan=True, atol=1e-9,
                               rtol=1e-7)
    # a constant gene has no correlation: NaN, never a number
    const = a.clone()
    const[:, 0] = 3.0
    assert torch.isnan(pcc(const, b)[0])
