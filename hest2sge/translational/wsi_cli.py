"""``hest2sge predict-wsi``: whole-slide prediction from the command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hest2sge predict-wsi``."""
    p = argparse.ArgumentParser(
        prog="hest2sge predict-wsi",
        description="Predict gene expression on every tissue tile of a whole-slide image "
        "(pyramidal TIFF, SVS, NDPI, MRXS, JPEG/PNG) and write an .h5ad of tiles.",
    )
    p.add_argument("slide", help="the whole-slide image file")
    p.add_argument("--checkpoint", help="a hest2sge checkpoint (.ckpt)")
    p.add_argument("--model", help="registry name (with --checkpoint: checked against it; "
                   "without: an UNTRAINED model, for smoke tests only)")
    p.add_argument("--genes", help="gene panel for an untrained --model: a file, one gene a line")
    p.add_argument("--tiny", action="store_true",
                   help="untrained --model in its tiny test configuration")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of level 0 (required when the file does not record it)")
    p.add_argument("--pixel-size-um", default=None,
                   help="µm per pixel of the model's input patches, or 'native' "
                   "(default: what the model records)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--white", type=float, default=220.0,
                   help="drop tiles whiter than RGB (W, W, W) (paper: 220)")
    p.add_argument("--min-tissue", type=float, default=0.05)
    p.add_argument("--mask-mpp", type=float, default=8.0)
    p.add_argument("--graph-window", type=int, default=32)
    p.add_argument("--stain-norm", default=None,
                   help="'macenko', or a JSON file of StainNormalizer.to_dict() (default: off)")
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hest2sge predict-wsi``."""
    args = build_parser().parse_args(argv)
    import hest2sge
    from hest2sge.translational.wsi import predict_wsi

    if args.checkpoint:
        model = hest2sge.load(args.model, checkpoint=args.checkpoint)
    elif args.model:
        if not args.genes:
            raise SystemExit("an untrained --model needs --genes FILE (or give --checkpoint)")
        with open(args.genes) as fh:
            genes = [g.strip() for g in fh if g.strip()]
        kw = dict(hest2sge.registry.get_model_class(args.model).tiny_config) if args.tiny else {}
        model = hest2sge.load(args.model, genes=genes, **kw)
        print(f"warning: {args.model} is UNTRAINED (random weights): smoke test only")
    else:
        raise SystemExit("give --checkpoint (or --model with --genes for an untrained model)")
    px = args.pixel_size_um
    if px is not None and px != "native":
        px = float(px)
    stain = args.stain_norm
    if stain and stain.endswith(".json"):
        with open(stain) as fh:
            stain = json.load(fh)
    out = predict_wsi(
        model, args.slide, mpp=args.mpp, pixel_size_um=px, batch_size=args.batch_size,
        white=args.white, min_tissue=args.min_tissue, mask_mpp=args.mask_mpp,
        graph_window=args.graph_window, stain_norm=stain, device=args.device,
        progress=args.progress,
    )
    out.write_h5ad(args.out)
    info = out.uns["hest2sge"]
    print(f"{info['n_tiles']} tiles ({info['n_tiles_tissue']} under the tissue mask, "
          f"{info['n_tiles_white_dropped']} dropped as white) x {out.n_vars} genes, "
          f"{info['tile_px']} px tiles at {info['tile_pixel_size_um']:g} µm/px, "
          f"{info['tiles_per_second']:.1f} tiles/s -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
