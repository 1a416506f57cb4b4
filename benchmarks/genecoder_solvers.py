"""GeneCodeR: the published gcode coordinate descent against the closed-form solver on real
HER2+ sections, and (optionally) the port against the published R code itself.

Fit quality::

    nice -n 19 .venv/bin/python benchmarks/genecoder_solvers.py fit \\
        [--her2st ../shared/data/her2st] [--panel ../shared/data/panels/her2st_785.txt] \\
        [--train C2 C3 C5 C6] [--test C4] [--solvers lstsq gcode] [--patch-size 224] \\
        [--dim 500] [--json genecoder.jsonl]

Each solver is fitted once on the training sections (paper configuration unless ``--dim`` /
``--patch-size`` say otherwise: i_dim = j_dim = 500, 20 iterations, tolerance 5, learning rate
0.1, raw counts, 224 px patches centred on the spots, no augmentation) and evaluated on every
section. Figure: mean over genes of the per-gene PCC over the spots of one section (genes with
constant prediction or truth in that section left out), on the published 785-gene HER2+ panel
(genes missing from a section are dropped from the panel for all sections).

Agreement with the published R implementation (needs ``Rscript`` with the MASS and irlba
packages and a local checkout of AskExplain/gcode_R at branch beta_test_v2022.3; nothing of it
is copied here, its R files are sourced from the checkout)::

    .venv/bin/python benchmarks/genecoder_solvers.py r-check --gcode-r /path/to/gcode_R

fits the same tiny seeded problem with this port and with R's ``gcode()`` from the same
initial alpha/beta (passed through gcode's ``transfer`` framework), and prints the relative
differences of beta_img, beta_genes, the convergence scores and of the predictions of
GeneCodeR's ``genecoder.transform``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    from hest2sge.metrics.functional import pcc

    return float(np.nanmean(pcc(torch.from_numpy(pred), torch.from_numpy(truth)).numpy()))


def _sections(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Pixels (n, 3 P^2) uint8 and raw counts per section, on the published panel."""
    import functools

    import hest2sge
    from hest2sge.data import SpotDataModule, read_her2st

    names = list(dict.fromkeys(args.train + args.test))
    slides = read_her2st(args.her2st, sections=names)
    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    panel = [g.strip() for g in Path(args.panel).read_text().splitlines() if g.strip()]
    common = functools.reduce(set.intersection, [set(s.var_names) for s in slides])
    genes = [g for g in panel if g in common]
    dm = SpotDataModule(slides, split={"train": ids, "val": [], "test": []}, genes=genes,
                        batch_size=64, augment=False, cache_dir=args.cache,
                        allow_patient_overlap=True, patch_size=args.patch_size)
    dm.configure_for(hest2sge.load("genecoder", genes=genes, patch_size=args.patch_size,
                                   i_dim=2, j_dim=2))
    dm.setup("fit")
    data = {}
    for name, sid in zip(names, ids, strict=True):
        px = torch.from_numpy(dm.tables[sid].patches.load()).permute(0, 3, 1, 2)
        data[name] = (np.ascontiguousarray(px.flatten(1).numpy()),
                      np.asarray(dm.tables[sid].expr, dtype=np.float64))
    return data, genes


def cmd_fit(args: argparse.Namespace) -> None:
    import hest2sge

    data, genes = _sections(args)
    x = np.concatenate([data[s][0] for s in args.train])
    y = np.concatenate([data[s][1] for s in args.train])
    print(f"[genecoder] train {'+'.join(args.train)} ({len(y)} spots), {len(genes)} genes, "
          f"{args.patch_size} px ({x.shape[1]} features), i_dim = j_dim = {args.dim}", flush=True)
    for solver in args.solvers:
        model = hest2sge.load("genecoder", genes=genes, patch_size=args.patch_size,
                              i_dim=args.dim, j_dim=args.dim, solver=solver)
        t = time.perf_counter()
        model.fit_arrays(x.copy(), y)  # a copy: uint8 input is modified in place
        fit_s = time.perf_counter() - t
        row = {"solver": solver, "train": "+".join(args.train), "n_train": len(y),
               "genes": len(genes), "patch_size": args.patch_size, "dim": args.dim,
               "fit_s": round(fit_s, 1), "iterations": len(model.history)}
        for s in args.train + args.test:
            img = torch.from_numpy(data[s][0]).view(-1, 3, args.patch_size, args.patch_size)
            with torch.no_grad():
                pred = model({"img": img.float().div_(255.0)}).double().numpy()
            kind = "train" if s in args.train else "test"
            row[f"pcc_{kind}_{s}"] = round(_mean_pcc(pred, data[s][1]), 4)
        print("  " + json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


_R_DRIVER = r"""
args <- commandArgs(trailingOnly = TRUE)
src <- args[1]; d <- args[2]
for (f in c("gcode", "initialise.gcode", "extract_config", "prepare_data")) {
  code <- gsub("gcode::", "", readLines(file.path(src, "R", paste0(f, ".R"))), fixed = TRUE)
  eval(parse(text = code))
}
rd <- function(n) as.matrix(read.csv(file.path(d, paste0(n, ".csv")), header = FALSE))
X <- rd("X"); Y <- rd("Y"); Xt <- rd("Xtest")
cfg <- as.list(read.csv(file.path(d, "config.csv")))
config <- extract_config(F)
config$init <- list(alpha_sample = "rnorm", beta_sample = "irlba")
config$i_dim <- cfg$dim; config$j_dim <- cfg$dim; config$batch_size <- cfg$dim
config$max_iter <- cfg$max_iter; config$tol <- cfg$tol; config$learn_rate <- cfg$lr
config$n.cores <- 1; config$verbose <- FALSE
join <- extract_join_framework(F)
join$complete$data_list <- c(1, 2); join$complete$alpha_sample <- c(1, 1)
join$complete$beta_sample <- c(1, 2); join$complete$code <- c(1, 1); join$covariance <- c(0, 0)
ref <- extract_references_framework(F); ref$data_list <- c(1)
transfer <- extract_transfer_framework(F)
transfer$main.parameters$alpha_sample <- list(rd("alpha"))
transfer$main.parameters$beta_sample <- list(rd("b1"), rd("b2"))
model <- gcode(data_list = list(X, Y), config = config, transfer = transfer, join = join,
               references = ref)
b1 <- model$main.parameters$beta_sample[[1]]; b2 <- model$main.parameters$beta_sample[[2]]
wr <- function(m, n) write.table(m, file.path(d, paste0(n, ".out.csv")), sep = ",",
                                 row.names = FALSE, col.names = FALSE)
wr(b1, "b1"); wr(b2, "b2"); wr(model$convergence.parameters$score.vec, "scores")
wr(Xt %*% b1 %*% MASS::ginv(t(b1) %*% b1) %*% t(b2), "pred")
"""


def cmd_r_check(args: argparse.Namespace) -> None:
    from hest2sge.models.genecoder import _init_image_basis, _top_eig, gcode_fit

    rng = np.random.default_rng(args.seed)
    n, p, g, dim, iters, seed = 40, 25, 6, 5, 4, 7
    x, xt = rng.uniform(size=(n, p)), rng.uniform(size=(10, p))
    y = rng.poisson(3.0, size=(n, g)).astype(float)
    k, yt = torch.from_numpy(x @ x.T), torch.from_numpy(y)
    w, _, beta2, _, scores = gcode_fit(k, yt, dim, dim, max_iter=iters, tol=-1.0, seed=seed)
    b1, b2 = x.T @ w.numpy(), beta2.numpy()
    pred = xt @ b1 @ np.linalg.pinv(b1.T @ b1) @ b2.T
    # the port's initialisation, handed to R through gcode's transfer framework
    alpha0 = torch.randn(dim, n, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64).numpy()
    b1_0 = x.T @ _init_image_basis(k, dim, 4000, seed)[0].numpy()
    b2_0 = _top_eig(yt.T @ yt, dim, 4000, seed)[1].numpy()
    with tempfile.TemporaryDirectory() as d:
        for name, m in dict(X=x, Y=y, Xtest=xt, alpha=alpha0, b1=b1_0, b2=b2_0).items():
            np.savetxt(f"{d}/{name}.csv", m, delimiter=",", fmt="%.17g")
        Path(d, "config.csv").write_text(f"dim,max_iter,tol,lr\n{dim},{iters},-1,0.1\n")
        Path(d, "driver.R").write_text(_R_DRIVER)
        out = subprocess.run(["Rscript", f"{d}/driver.R", str(args.gcode_r), d],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(out.stderr[-3000:])

        def rd(name: str) -> np.ndarray:
            return np.loadtxt(f"{d}/{name}.out.csv", delimiter=",", ndmin=2)

        ref = {"beta_img": rd("b1"), "beta_genes": rd("b2"), "scores": rd("scores").ravel(),
               "prediction": rd("pred")}
    ours = {"beta_img": b1, "beta_genes": b2, "scores": np.asarray(scores), "prediction": pred}
    for key, r in ref.items():
        rel = np.abs(ours[key] - r).max() / np.abs(r).max()
        print(f"  {key}: max |port - R| / max |R| = {rel:.2e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit quality of the solvers on real HER2+ sections")
    f.add_argument("--her2st", type=Path, default=SHARED / "her2st")
    f.add_argument("--panel", type=Path, default=SHARED / "panels" / "her2st_785.txt")
    f.add_argument("--train", nargs="+", default=["C2", "C3", "C5", "C6"])
    f.add_argument("--test", nargs="+", default=["C4"])
    f.add_argument("--solvers", nargs="+", default=["lstsq", "gcode"])
    f.add_argument("--patch-size", type=int, default=224)
    f.add_argument("--dim", type=int, default=500, help="i_dim = j_dim")
    f.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gc_patches")
    f.add_argument("--json", type=Path)
    r = sub.add_parser("r-check", help="port against the published R gcode on a tiny problem")
    r.add_argument("--gcode-r", type=Path, required=True,
                   help="checkout of AskExplain/gcode_R at branch beta_test_v2022.3")
    r.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    (cmd_fit if args.cmd == "fit" else cmd_r_check)(args)


if __name__ == "__main__":
    main()
