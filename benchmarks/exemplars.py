"""Exemplar retrieval speed/memory and EGN v1 / v2 training throughput.

Run: ``.venv/bin/python benchmarks/exemplars.py [--her2st ../shared/data/her2st] [--quick]``.

1. Retrieval: exact k-NN (k = 9) of random queries against 10,000 and 100,000 random
   reference embeddings (2048-d Euclidean as EGN v1, 512-d L1 as EGN v2) with own-slide
   masking, in chunks. Each configuration runs in a fresh process; the peak resident memory
   added by the search (``ru_maxrss`` after minus before) is compared with the size of the
   ``Q x N`` distance matrix a brute-force search would allocate. For the 10k reference, the
   brute-force search (one ``torch.cdist``) runs side by side.
2. Training throughput at the paper configuration on real HER2+ sections (224 px patches at
   native resolution): the one-off reference build (frozen extractor over the training spots,
   then cached) and a few optimiser steps (batch 32 spots for v1, one slide for v2).
   Pretrained weights are not needed for timing (random-initialised extractors).
3. iStar (``--istar``), paper configuration on real HER2+ sections: the frozen HIPT feature
   extraction of one section timed per part (decode + rescale to 0.5 um/px, ViT-256 per 256 px
   region on real tissue, ViT-4K over the whole region grid, smoothing) and extrapolated to the
   paper's 16 shifted passes and to one pass (``--istar-full`` runs one complete pass to check
   the extrapolation), and MLP training time per epoch (4-member ensemble, 785 genes, the
   sections' real spot disks, random feature values) on one and on three sections.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _search_job(args: tuple) -> dict:
    n_ref, n_query, dim, p, brute = args
    from hest2sge.models.layers.exemplars import knn_search

    torch.manual_seed(0)
    ref = torch.randn(n_ref, dim)
    q = torch.randn(n_query, dim)
    rg = torch.randint(0, 30, (n_ref,))
    qg = torch.randint(0, 30, (n_query,))
    knn_search(q[:8], ref[:1000], 9, p=p, query_groups=qg[:8], reference_groups=rg[:1000])
    base = _rss_mb()
    t = time.perf_counter()
    dist, idx = knn_search(q, ref, 9, p=p, query_groups=qg, reference_groups=rg)
    out = {"time": time.perf_counter() - t, "extra_mb": _rss_mb() - base}
    if brute:
        base = _rss_mb()
        t = time.perf_counter()
        d = torch.cdist(q, ref, p=p)
        d[qg[:, None] == rg[None, :]] = float("inf")
        top = d.topk(9, dim=1, largest=False)
        rows_same = (top.indices == idx).all(1).float().mean().item()
        out.update(brute_time=time.perf_counter() - t, brute_extra_mb=_rss_mb() - base,
                   same=bool(torch.allclose(top.values, dist, rtol=1e-5)), rows_same=rows_same)
    return out


def retrieval(quick: bool) -> None:
    configs = [(10_000, 1_000, 2048, 2.0, True), (10_000, 10_000, 2048, 2.0, False),
               (100_000, 1_000, 2048, 2.0, False), (10_000, 1_000, 512, 1.0, True),
               (100_000, 1_000, 512, 1.0, False)]
    if quick:
        configs = [c for c in configs if c[0] == 10_000 and c[1] == 1_000]
    ctx = mp.get_context("spawn")
    print("[retrieval] exact k-NN, k=9, own-slide mask, chunks 1024 queries x 16384 refs")
    for cfg in configs:
        n_ref, n_q, dim, p, _ = cfg
        with ctx.Pool(1) as pool:
            r = pool.map(_search_job, [cfg])[0]
        dense_mb = n_q * n_ref * 4 / 2**20
        line = (f"  N={n_ref:>7,} Q={n_q:>6,} {dim}-d L{p:g}: {r['time']:6.2f} s "
                f"({n_q / r['time']:,.0f} queries/s), peak +{r['extra_mb']:.0f} MB "
                f"(a Q x N float32 matrix: {dense_mb:,.0f} MB)")
        if "brute_time" in r:
            line += (f"; brute force cdist: {r['brute_time']:.2f} s, +{r['brute_extra_mb']:.0f} MB,"
                     f" same distances: {r['same']}, identical index rows "
                     f"{100 * r['rows_same']:.1f}% (the rest: ties in another order)")
        print(line, flush=True)


def _steps(model, batches, steps: int) -> float:
    hp = model.hparams  # the model's AdamW (its cosine schedule needs a Trainer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.lr,
                            weight_decay=hp.weight_decay)
    model.train()

    def step(batch):
        opt.zero_grad()
        out = model(batch)
        loss = model.loss(out, batch)
        (loss["loss"] if isinstance(loss, dict) else loss).backward()
        opt.step()

    step(batches[0])  # warm-up
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[(i + 1) % len(batches)])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(her2st: Path, steps: int, n_train: int) -> None:
    import hest2sge
    from hest2sge.data import SpotDataModule, read_her2st
    from hest2sge.models.base import prepare_batch

    slides = read_her2st(her2st)[: n_train + 1]
    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    print(f"[throughput] HER2+ sections {ids[:n_train]} (train) + {ids[n_train]} (val), "
          f"224 px, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as cache:
        for name in ("egnv1", "egnv2"):
            dm = SpotDataModule(slides, split={"train": ids[:n_train], "val": ids[n_train:]},
                                genes="mean", n_genes=785, cache_dir=cache, augment=False,
                                allow_patient_overlap=True)
            torch.manual_seed(0)
            model = hest2sge.load(name, genes=dm.genes, pretrained=False)
            dm.configure_for(model)
            dm.setup("fit")
            t = time.perf_counter()
            model.build_reference(dm)
            t_ref = time.perf_counter() - t
            t = time.perf_counter()
            model.build_reference(dm)
            t_cached = time.perf_counter() - t
            loader = dm.train_dataloader()
            it = iter(loader)
            batches = [prepare_batch(next(it)) for _ in range(min(2, len(loader)))]
            n_spots = batches[0]["img"].shape[0]
            step = _steps(model, batches, steps)
            with torch.no_grad():
                model.eval()
                vb = prepare_batch(next(iter(dm.val_dataloader())))
                t_val = _timed(lambda m=model, b=vb: m(b))  # validation: cached embeddings
                # the same spots as a slide outside the data module: extractor on the fly
                new = {**vb, "slide": torch.full_like(vb["slide"], -1)}
                t_new = _timed(lambda m=model, b=new: m(b))
            n_ref, n_val = model.retriever.size, vb["img"].shape[0]
            n_emb = n_ref + sum(dm.table(s).n for s in dm.split.val)
            print(f"  {name}: {model.count_parameters() / 1e6:.1f} M trainable; reference of "
                  f"{n_ref} spots (+ validation queries, {n_emb} spots embedded) built in "
                  f"{t_ref:.1f} s ({n_emb / t_ref:.1f} spots/s), rebuilt from the cache in "
                  f"{t_cached:.2f} s; train step ({n_spots} spots) {step:.2f} s = "
                  f"{n_spots / step:.1f} spots/s (median of {steps}); inference on "
                  f"{n_val} validation spots {t_val:.2f} s, on the same spots as a new "
                  f"slide (extractor on the fly) {t_new:.2f} s", flush=True)


def _istar_epoch(model, slides, ids, n_sections: int, steps: int) -> tuple[float, int, int]:
    """Seconds per training epoch of ``model`` on the first ``n_sections`` sections, with
    the original batch rule min(128, n_spots // 16); (epoch time, spots, batch size)."""
    import math

    from hest2sge.data import SpotDataModule
    from hest2sge.models.base import prepare_batch

    n_spots = sum(s.n_obs for s in slides[:n_sections])
    bs = min(128, n_spots // 16)
    dm = SpotDataModule(slides, {"train": ids[:n_sections], "val": ids[n_sections:]},
                        genes="mean", n_genes=785, allow_patient_overlap=True, augment=False,
                        batch_size=bs, patch_size=16)
    dm.configure_for(model)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [prepare_batch(next(it)) for _ in range(2)]
    return math.ceil(n_spots / bs) * _steps(model, batches, steps), n_spots, bs


def istar(her2st: Path, steps: int, n_train: int, full: bool) -> None:
    """iStar at the paper configuration on real HER2+ sections (see the module docstring)."""
    import numpy as np
    from PIL import Image

    import hest2sge
    from hest2sge.data import read_her2st
    from hest2sge.data.slide import SlideImage
    from hest2sge.models.istar import _fullres_shape
    from hest2sge.models.layers.hipt import accumulate_grid, box_filter, disk_offsets

    slides = read_her2st(her2st)[: n_train + 1]
    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    torch.manual_seed(0)
    model = hest2sge.load("istar", n_genes=785, pretrained=False)
    enc, r = model.encoder, model.encoder.region_px
    scale, radius = model._geometry(slides[0])
    px = slides[0].uns["spatial"][ids[0]]["pixel_size_um"]
    print(f"[istar] paper configuration, random frozen HIPT, torch threads "
          f"{torch.get_num_threads()}; {ids[0]}: {px:.3f} um/px (reader estimate), spot radius "
          f"{radius:.2f} superpixels = {len(disk_offsets(radius))} superpixels per disk",
          flush=True)
    t = time.perf_counter()
    image = SlideImage(slides[0])
    h0, w0 = image.array.shape[:2]
    h, w = int(round(h0 * scale)), int(round(w0 * scale))
    arr = np.asarray(Image.fromarray(image.array).resize((w, h), Image.Resampling.BILINEAR))
    image.release()
    hp, wp = -(-h // r) * r, -(-w // r) * r
    padded = np.full((hp, wp, 3), 255, np.uint8)
    padded[:h, :w] = arr
    del arr
    t_load = time.perf_counter() - t
    rows, cols = hp // r, wp // r
    print(f"  image {w0} x {h0} px -> {w} x {h} px at 0.5 um/px: {cols} x {rows} regions of "
          f"256 px, feature map {wp // 16} x {hp // 16} x 579; decode + rescale + pad "
          f"{t_load:.1f} s", flush=True)
    # ViT-256 on 32 real regions from the middle of the section (ViT-4K on their 2 x 16 grid)
    k, r0, c0 = 32, rows // 2 - 1, max(cols // 2 - 8, 0)
    strip = padded[r0 * r:(r0 + 2) * r, c0 * r:(c0 + k // 2) * r]
    acc = [np.zeros((2 * r // 16, k // 2 * r // 16, d), np.float32) for d in (192, 384)]
    accumulate_grid(enc, strip[:, :2 * r], 0, 0, model.normalize_img, 16, *acc)  # warm-up
    t_region = statistics.median(
        _timed(lambda: accumulate_grid(enc, strip, 0, 0, model.normalize_img, 16, *acc))
        for _ in range(2)) / k
    with torch.no_grad():
        t_4k = _timed(lambda: enc.vit4k(torch.randn(1, enc.vit256.dim, rows + 1, cols + 1)))
    hs, ws = hp // 16, wp // 16
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((hs, ws, d), dtype=np.float32) for d in (192, 384)]
    t_smooth = _timed(lambda: (box_filter(maps[0], 16), box_filter(maps[1], 4)))
    maps.clear()
    del padded
    n1 = rows * cols
    n16 = sum(-(-(hp + (r - oy) % r) // r) * -(-(wp + (r - ox) % r) // r)
              for oy in range(0, r, r // 4) for ox in range(0, r, r // 4))
    est1 = t_load + n1 * t_region + t_4k + t_smooth
    est16 = t_load + n16 * t_region + 16 * t_4k + t_smooth
    print(f"  ViT-256 {t_region:.3f} s per 256 px region ({1 / t_region:.2f} regions/s, batches "
          f"of 16), ViT-4K over the whole {cols + 1} x {rows + 1} grid {t_4k:.1f} s, smoothing "
          f"{t_smooth:.1f} s, peak RSS {_rss_mb():.0f} MB", flush=True)
    print(f"  feature extraction per section, extrapolated from these parts: paper (4 x 4 "
          f"shifts, {n16} region passes) {est16 / 3600:.1f} h; one pass (shifts=1, {n1} "
          f"regions) {est1 / 60:.0f} min (16.5x less)", flush=True)
    if full:
        cheap = hest2sge.load("istar", n_genes=785, pretrained=False, shifts=1)
        cheap.load_state_dict(model.state_dict())
        t = time.perf_counter()
        fmap = cheap.compute_feature_map(slides[0])
        t_full = time.perf_counter() - t
        print(f"  measured: one complete single-pass extraction of {ids[0]} {t_full / 60:.1f} "
              f"min (extrapolated {est1 / 60:.1f} min), map {fmap.shape} = "
              f"{fmap.nbytes / 2**30:.2f} GiB float16, peak RSS {_rss_mb():.0f} MB; the paper's "
              f"16 passes at this pass's rate: {t_full * n16 / n1 / 3600:.1f} h", flush=True)
        del fmap

    # MLP training: the real spot disks; random features (values do not change the cost)
    def fake_map(slide):
        sc, _ = model._geometry(slide)
        fh, fw = _fullres_shape(slide)
        shape = (-(-round(fh * sc) // r) * r // 16, -(-round(fw * sc) // r) * r // 16, 579)
        return np.random.default_rng(0).standard_normal(shape, np.float32).astype(np.float16)

    model.compute_feature_map = fake_map
    for n_sec in (1, n_train):
        epoch, n_spots, bs = _istar_epoch(model, slides, ids, n_sec, steps)
        print(f"  MLP training ({model.hparams.n_states} members, 785 genes) on {n_sec} "
              f"section(s), {n_spots} spots, batch min(128, n // 16) = {bs}: {epoch:.0f} s per "
              f"epoch (400 epochs: {400 * epoch / 3600:.1f} h); the paper's efficiency unit "
              f"(extraction / 400 + one epoch): {n_sec * est16 / 400 + epoch:.0f} s at the "
              f"paper configuration, {n_sec * est1 / 400 + epoch:.0f} s with shifts=1",
              flush=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--her2st", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2, help="training sections for throughput")
    p.add_argument("--quick", action="store_true", help="10k reference only")
    p.add_argument("--skip-retrieval", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--istar", action="store_true", help="also benchmark iStar (section 3)")
    p.add_argument("--istar-full", action="store_true",
                   help="with --istar: also run one complete single-pass extraction (~30 min)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 avoids OpenMP stalls on an oversubscribed machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.skip_retrieval:
        retrieval(args.quick)
    if not args.skip_throughput:
        if args.her2st.exists():
            throughput(args.her2st, args.steps, args.n_train)
        else:
            print(f"[throughput] skipped: {args.her2st} not found")
    if args.istar:
        if args.her2st.exists():
            istar(args.her2st, args.steps, max(args.n_train, 3), args.istar_full)
        else:
            print(f"[istar] skipped: {args.her2st} not found")


if __name__ == "__main__":
    main()
