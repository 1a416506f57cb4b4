"""Exemplar retrieval shared by EGN v1 and EGN v2.

A frozen image extractor (an ImageNet CNN from timm) embeds every spot patch once. The
*reference* is the set of training spots: their embeddings, their targets on the model's target
scale and the slide each comes from. For a query spot, the ``k`` nearest reference spots of
OTHER slides are its exemplars (own-slide exclusion); validation, test and new slides are never
in the reference, so no held-out spot or expression can be retrieved.

* :func:`knn_search`: exact k-nearest-neighbour search in chunks (``torch.cdist`` on a block of
  queries against a block of references, then a running top-k), with same-group pairs masked
  out. Memory is ``query_chunk x reference_chunk`` distances, never ``N x N``.
* :class:`ExemplarRetriever`: the frozen extractor plus the reference, kept in buffers so a
  checkpoint holds everything needed to predict new slides (a load pre-hook resizes the buffers
  to the checkpoint's reference).
* :func:`cached_embeddings`: per-slide embeddings cached beside the patch cache (HDF5, keyed by
  slide id, patch size, pixel size, extractor name and a fingerprint of the patches and the
  extractor weights; written atomically).
* :func:`batch_pcc_loss`: ``1 - mean over genes of the Pearson correlation across the batch``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from hest2sge.models.layers.backbones import create_backbone

log = logging.getLogger(__name__)

#: Tag of embedding cache files (part of their fingerprint).
EMB_FORMAT = "hest2sge.embeddings"
#: Bump when the way embeddings are computed changes: older cache files are rebuilt.
EMB_VERSION = 1
#: Group id of a query that excludes nothing (a slide outside the data module).
NO_GROUP = torch.iinfo(torch.int64).min
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def slide_key(slide_id: str) -> int:
    """A stable signed 64-bit key of a slide id (stored in the reference buffers)."""
    key = int.from_bytes(hashlib.blake2b(str(slide_id).encode(), digest_size=8).digest(),
                         "little", signed=True)
    return key + 1 if key == NO_GROUP else key


# --------------------------------------------------------------------------------------------
# exact chunked k-NN
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_search(
    query: Tensor,
    reference: Tensor,
    k: int,
    *,
    p: float = 2.0,
    query_groups: Tensor | None = None,
    reference_groups: Tensor | None = None,
    query_chunk: int = 1024,
    reference_chunk: int = 16384,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of each query row among the reference rows.

    Distances are computed block by block (``query_chunk x reference_chunk``; Euclidean ones
    as ``|q|^2 + |r|^2 - 2 q.r`` with one matrix product, others with ``torch.cdist``) and a
    running top-k is kept, so no ``Q x N`` matrix is ever allocated. Tied distances may come
    in any order. A reference row whose group equals
    the query's group is never returned (own-slide exclusion; pass ``NO_GROUP`` for queries that
    exclude nothing, or ``torch.arange`` on both sides to exclude self matches).

    Args:
        query: (Q, D) query vectors.
        reference: (N, D) reference vectors.
        k: Neighbours per query.
        p: Minkowski order of the distance (2: Euclidean as in EGN v1, 1: L1 as in EGN v2).
        query_groups: (Q,) int64 group of each query.
        reference_groups: (N,) int64 group of each reference row.
        query_chunk: Queries per block.
        reference_chunk: Reference rows per block.

    Returns:
        ``(distances, indices)``, both (Q, k), nearest first; where fewer than ``k`` allowed
        rows exist, the missing entries have distance ``inf`` and index ``-1``.
    """
    if query.dim() != 2 or reference.dim() != 2:
        raise ValueError(f"query and reference must be 2-D, got {tuple(query.shape)} and "
                         f"{tuple(reference.shape)}")
    if reference.shape[0] and query.shape[1] != reference.shape[1]:
        raise ValueError(f"query width {query.shape[1]} != reference width {reference.shape[1]}")
    if (query_groups is None) != (reference_groups is None):
        raise ValueError("give both query_groups and reference_groups, or neither")
    if k < 1 or query_chunk < 1 or reference_chunk < 1:
        raise ValueError("k, query_chunk and reference_chunk must be positive")
    nq, nr = query.shape[0], reference.shape[0]
    dev = query.device
    out_d = torch.full((nq, k), float("inf"), device=dev)
    out_i = torch.full((nq, k), -1, dtype=torch.long, device=dev)
    if nq == 0 or nr == 0:
        return out_d, out_i
    query = query.float()
    reference = reference.to(dev, torch.float32)
    euclid = float(p) == 2.0
    for qs in range(0, nq, query_chunk):
        q = query[qs: qs + query_chunk]
        qn = torch.linalg.vector_norm(q, dim=1, keepdim=True).square_() if euclid else None
        qg = None if query_groups is None else query_groups[qs: qs + query_chunk].to(dev)
        best_d = out_d[qs: qs + query_chunk]
        best_i = out_i[qs: qs + query_chunk]
        for rs in range(0, nr, reference_chunk):
            r = reference[rs: rs + reference_chunk]
            if euclid:  # squared distances |q|^2 + |r|^2 - 2 q.r without copying the chunk
                rn = torch.linalg.vector_norm(r, dim=1).square_()
                d = torch.addmm(rn[None, :], q, r.t(), alpha=-2.0)
                d.add_(qn).clamp_(min=0.0)
            else:
                d = torch.cdist(q, r, p=p)
            if qg is not None:
                rg = reference_groups[rs: rs + reference_chunk].to(dev)
                d.masked_fill_(qg[:, None] == rg[None, :], float("inf"))
            top = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            cand_d = torch.cat([best_d, top.values], 1)
            cand_i = torch.cat([best_i, top.indices + rs], 1)
            merged = cand_d.topk(k, dim=1, largest=False)
            best_d = merged.values
            best_i = cand_i.gather(1, merged.indices)
            del d
        best_i = best_i.masked_fill(torch.isinf(best_d), -1)
        out_d[qs: qs + query_chunk] = best_d.sqrt() if euclid else best_d
        out_i[qs: qs + query_chunk] = best_i
    return out_d, out_i


def batch_pcc_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean_g r_g`` with ``r_g`` the Pearson correlation of gene ``g`` over the batch
    (EGN's correlation loss; a gene constant in the batch contributes ``r = 0``)."""
    pc = pred - pred.mean(0, keepdim=True)
    tc = target - target.mean(0, keepdim=True)
    r = (pc * tc).sum(0) / (pc.norm(dim=0) * tc.norm(dim=0) + eps)
    return 1.0 - r.mean()


# --------------------------------------------------------------------------------------------
# embedding cache
# --------------------------------------------------------------------------------------------
def module_digest(module: nn.Module) -> str:
    """Hash of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embedding_cache_name(slide_id: str, patch_size: int, pixel_size_um: float | None,
                         extractor: str, fingerprint: str) -> str:
    """``<slide>_p<size>_<native|Xum>.<extractor>-<fingerprint[:12]>.emb.h5``."""
    from hest2sge.data.patches import cache_file_name

    base = cache_file_name(slide_id, patch_size, pixel_size_um)[: -len(".h5")]
    ext = re.sub(r"[^A-Za-z0-9._-]", "_", extractor)
    return f"{base}.{ext}-{fingerprint[:12]}.emb.h5"


def cached_embeddings(
    embed: Any,
    store: Any,
    *,
    slide: Any,
    slide_id: str,
    patch_size: int,
    pixel_size_um: float | None,
    extractor: str,
    extractor_digest: str,
    cache_dir: str | os.PathLike | None,
    batch_size: int = 64,
) -> np.ndarray:
    """Embeddings of every patch of a slide, computed once and cached on disk.

    Args:
        embed: Callable mapping a float (B, 3, H, W) batch in [0, 1] to (B, D) embeddings.
        store: The slide's :class:`~hest2sge.data.patches.PatchStore`.
        slide: The slide AnnData (for the patch fingerprint).
        slide_id: Its id.
        patch_size: Patch side in pixels.
        pixel_size_um: Patch pixel size (None: native).
        extractor: Extractor name (part of the file name).
        extractor_digest: Hash of the extractor weights and input normalisation.
        cache_dir: Cache folder (None: compute without caching).
        batch_size: Patches per extractor call.

    Returns:
        (N, D) float32 embeddings in slide order.
    """
    from hest2sge.cache import digest, load_cached
    from hest2sge.data.features import embed_patches, patch_source_fingerprint

    n = len(store)
    fp = digest(EMB_FORMAT, EMB_VERSION, extractor, extractor_digest,
                patch_source_fingerprint(slide, store, patch_size, pixel_size_um),
                int(patch_size), pixel_size_um, n)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / embedding_cache_name(slide_id, patch_size, pixel_size_um,
                                                      extractor, fp)
    arrays = load_cached(
        path, kind="exemplar_embeddings", fingerprint=fp,
        build=lambda: {"emb": embed_patches(embed, store, batch_size,
                                            desc=f"exemplar embeddings {slide_id}")},
        shapes={"emb": (n, None)},
        attrs={"slide_id": slide_id, "extractor": extractor, "patch_size": int(patch_size)},
    )
    return np.asarray(arrays["emb"], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the retriever: frozen extractor + reference
# --------------------------------------------------------------------------------------------
class Exemplars(NamedTuple):
    """Retrieved exemplars of a batch of query spots."""

    query: Tensor  # (B, D) the queries' own embeddings
    index: Tensor  # (B, k) reference rows, -1 where missing
    valid: Tensor  # (B, k) bool
    embeddings: Tensor  # (B, k, D) zeros where missing
    targets: Tensor  # (B, k, G) zeros where missing


_REF_BUFFERS = ("ref_embeddings", "ref_targets", "ref_slides", "ref_spots")


class ExemplarRetriever(nn.Module):
    """Frozen extractor + training-spot reference + exact exemplar search.

    The reference lives in buffers (``ref_embeddings`` (N, D), ``ref_targets`` (N, G),
    ``ref_slides`` (N,) slide keys, ``ref_spots`` (N,) spot rows) that start empty and are
    resized when a checkpoint is loaded, so ``cls(**hparams)`` + strict ``load_state_dict``
    restores a model that can predict new slides. The exemplars of the reference spots
    themselves (the training queries) are searched once in :meth:`build` and kept in the
    non-persistent ``ref_neighbours`` (N, k); other spots are searched on the fly. The
    extractor is frozen (``requires_grad`` False, always in eval mode) and is not counted as
    trainable. With multi-GPU DDP, pass ``DDPStrategy(broadcast_buffers=False)``: every rank
    builds the same reference, and broadcasting it before each forward pass is wasted traffic.

    Args:
        extractor: timm model name of the frozen extractor.
        pretrained: ``True`` (ImageNet weights from the hub), ``False`` or a local weights file.
        n_genes: Width of the reference targets.
        k: Exemplars per spot.
        p: Distance order (2: Euclidean, 1: L1).
        query_chunk: Queries per distance block.
        reference_chunk: Reference rows per distance block.
        embed_batch_size: Patches per extractor call when building the reference.
    """

    def __init__(self, extractor: str, pretrained: bool | str | os.PathLike, n_genes: int,
                 k: int = 9, p: float = 2.0, query_chunk: int = 1024,
                 reference_chunk: int = 16384, embed_batch_size: int = 64) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"n_exemplars must be >= 1, got {k}")
        self.extractor_name = str(extractor)
        self.extractor = create_backbone(extractor, pretrained)
        self.extractor.requires_grad_(False)
        self.extractor.eval()
        self.dim = int(self.extractor.num_features)
        self.n_genes = int(n_genes)
        self.k, self.p = int(k), float(p)
        self.query_chunk, self.reference_chunk = int(query_chunk), int(reference_chunk)
        self.embed_batch_size = int(embed_batch_size)
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET[0]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET[1]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("ref_embeddings", torch.zeros(0, self.dim))
        self.register_buffer("ref_targets", torch.zeros(0, self.n_genes))
        self.register_buffer("ref_slides", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ref_spots", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ref_neighbours", torch.zeros(0, self.k, dtype=torch.long),
                             persistent=False)
        self._register_load_state_dict_pre_hook(self._resize_reference)
        self._slide_keys: list[int] | None = None
        self._blocks: dict[int, tuple[int, int]] | None = None
        self._warned_empty = False
        # embeddings of held-out (validation) spots: queries only, never in the reference
        self._query_cache: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ state
    def _resize_reference(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in _REF_BUFFERS:
            t = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if t is not None and t.shape != cur.shape:
                setattr(self, name, torch.empty(t.shape, dtype=cur.dtype, device=cur.device))
        self.ref_neighbours = self.ref_neighbours[:0]
        self._query_cache = {}  # the extractor may change with the loaded weights
        self._blocks = None

    def train(self, mode: bool = True) -> ExemplarRetriever:
        super().train(mode)
        self.extractor.eval()  # frozen: BatchNorm statistics never change
        return self

    @property
    def size(self) -> int:
        """Number of reference spots."""
        return int(self.ref_embeddings.shape[0])

    def set_reference(self, embeddings: Tensor, targets: Tensor, slides: Tensor,
                      spots: Tensor) -> None:
        """Replace the reference (rows of one slide must be contiguous)."""
        n = embeddings.shape[0]
        if embeddings.shape != (n, self.dim) or targets.shape != (n, self.n_genes):
            raise ValueError(f"reference shapes {tuple(embeddings.shape)}, "
                             f"{tuple(targets.shape)} do not fit ({n}, {self.dim}), "
                             f"({n}, {self.n_genes})")
        dev = self.ref_embeddings.device
        self.ref_embeddings = embeddings.to(dev, torch.float32).contiguous()
        self.ref_targets = targets.to(dev, torch.float32).contiguous()
        self.ref_slides = slides.to(dev, torch.long).contiguous()
        self.ref_spots = spots.to(dev, torch.long).contiguous()
        self.ref_neighbours = self.ref_neighbours[:0]
        self._blocks = None

    def search(self, query: Tensor, keys: Tensor) -> Tensor:
        """(Q, k) reference rows nearest to ``query`` (rows of slide ``keys`` excluded)."""
        return knn_search(query, self.ref_embeddings, self.k, p=self.p, query_groups=keys,
                          reference_groups=self.ref_slides, query_chunk=self.query_chunk,
                          reference_chunk=self.reference_chunk)[1]

    def precompute_neighbours(self, device: torch.device | str | None = None) -> None:
        """Search the exemplars of every reference spot once (they never change), on
        ``device`` (default: where the reference is)."""
        q = self.ref_embeddings if device is None else self.ref_embeddings.to(device)
        rows = self.search(q, self.ref_slides.to(q.device))
        self.ref_neighbours = rows.to(self.ref_embeddings.device)

    def set_slide_ids(self, slide_ids: Sequence[str] | None) -> None:
        """Map batch slide indices (positions in ``dm.slide_ids``) to slide keys."""
        self._slide_keys = None if slide_ids is None else [slide_key(s) for s in slide_ids]

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> (B, D) frozen-extractor embeddings (computed in
        chunks of ``embed_batch_size``)."""
        self.extractor.eval()
        out = []
        for s in range(0, img.shape[0], self.embed_batch_size):
            x = img[s: s + self.embed_batch_size].to(self.pixel_mean.device, torch.float32)
            out.append(self.extractor((x - self.pixel_mean) / self.pixel_std).float())
        return torch.cat(out) if out else img.new_zeros(0, self.dim)

    def build(self, dm: Any, device: torch.device | str | None = None) -> None:
        """Embed the training slides of a set-up data module (cached in ``dm.cache_dir``)
        and make them the reference, with targets on the data module's target scale.

        The validation slides are embedded too (cached the same way), but only as queries:
        their spots never enter the reference.
        """
        if device is not None:
            self.extractor.to(device)
            self.pixel_mean, self.pixel_std = self.pixel_mean.to(device), self.pixel_std.to(device)
        digest = module_digest(self.extractor) + repr(_IMAGENET)

        def embed_slide(sid: str) -> np.ndarray:
            return cached_embeddings(
                self.embed, dm.table(sid).patches, slide=dm.slides[dm.slide_ids.index(sid)],
                slide_id=sid, patch_size=dm.patch_size, pixel_size_um=dm.pixel_size_um,
                extractor=self.extractor_name, extractor_digest=digest, cache_dir=dm.cache_dir,
                batch_size=self.embed_batch_size)

        embs, targets, slides, spots = [], [], [], []
        for sid in dm.split.train:
            table = dm.table(sid)
            embs.append(torch.from_numpy(embed_slide(sid)))
            targets.append(torch.from_numpy(np.asarray(table.expr, dtype=np.float32)))
            slides.append(torch.full((table.n,), slide_key(sid), dtype=torch.long))
            spots.append(torch.arange(table.n))
        if not embs:
            raise ValueError("the data module has no training slides to build exemplars from")
        self.set_reference(torch.cat(embs), torch.cat(targets), torch.cat(slides),
                           torch.cat(spots))
        self.precompute_neighbours(device)
        self._query_cache = {slide_key(sid): torch.from_numpy(embed_slide(sid))
                             for sid in dm.split.val}
        self.set_slide_ids(dm.slide_ids)

    def _slide_blocks(self) -> dict[int, tuple[int, int]]:
        if self._blocks is None:
            blocks: dict[int, tuple[int, int]] = {}
            keys = self.ref_slides.cpu().numpy()
            spots = self.ref_spots.cpu().numpy()
            if len(keys):
                starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
                ends = np.r_[starts[1:], len(keys)]
                for s, e in zip(starts, ends):
                    if np.array_equal(spots[s:e], np.arange(e - s)):
                        blocks[int(keys[s])] = (int(s), int(e - s))
            self._blocks = blocks
        return self._blocks

    def query_keys(self, slide_index: Tensor) -> Tensor:
        """Slide keys of batch slide indices (``NO_GROUP`` for -1 or an unknown mapping)."""
        keys = torch.full(slide_index.shape, NO_GROUP, dtype=torch.long)
        if self._slide_keys is not None:
            idx = slide_index.detach().cpu().long()
            ok = (idx >= 0) & (idx < len(self._slide_keys))
            table = torch.tensor(self._slide_keys, dtype=torch.long)
            keys[ok] = table[idx[ok]]
        return keys.to(slide_index.device)

    def reference_rows(self, keys: Tensor, spots: Tensor) -> Tensor:
        """Reference row of each (slide key, spot), -1 where the spot is not in it."""
        rows = torch.full(keys.shape, -1, dtype=torch.long)
        blocks = self._slide_blocks()
        keys_c, spots_c = keys.cpu(), spots.cpu().long()
        for key in keys_c.unique().tolist():
            if key in blocks:
                start, n = blocks[key]
                sel = (keys_c == key) & (spots_c >= 0) & (spots_c < n)
                rows[sel] = start + spots_c[sel]
        return rows.to(keys.device)

    def query_embeddings(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Own embeddings of a batch's spots, their slide keys and reference rows (-1: none).

        Spots of reference (training) slides reuse their stored embedding (of the
        unaugmented patch), validation spots their embedding cached by :meth:`build`; other
        spots are embedded from ``batch["img"]``.
        """
        img = batch["img"]
        b = img.shape[0]
        slide = batch.get("slide")
        if slide is None:
            slide = torch.full((b,), -1, dtype=torch.long, device=img.device)
        keys = self.query_keys(slide)
        spot = batch.get("spot", torch.full((b,), -1, dtype=torch.long, device=img.device))
        rows = self.reference_rows(keys, spot) if self.size else torch.full_like(keys, -1)
        q = torch.empty(b, self.dim, device=img.device)
        have = rows >= 0
        if have.any():
            q[have] = self.ref_embeddings[rows[have]].to(img.device)
        for key in keys[~have].unique().tolist() if self._query_cache else []:
            sel = (keys == key) & ~have & (spot >= 0)
            cached = self._query_cache.get(key)
            if cached is not None and sel.any() and int(spot[sel].max()) < cached.shape[0]:
                q[sel] = cached[spot[sel].cpu()].to(img.device)
                have = have | sel
        if (~have).any():
            q[~have] = self.embed(img[~have]).to(img.device)
        return q, keys, rows

    def retrieve(self, batch: dict[str, Tensor]) -> Exemplars:
        """The ``k`` exemplars of every spot of a batch (own slide excluded)."""
        if not self.size and not self._warned_empty:
            warnings.warn("the exemplar reference is empty: fit the model with a data module "
                          "(or call build_reference(dm)) first; predicting without exemplars",
                          stacklevel=3)
            self._warned_empty = True
        q, keys, rows = self.query_embeddings(batch)
        idx = torch.full((q.shape[0], self.k), -1, dtype=torch.long, device=q.device)
        known = rows >= 0
        if self.size and self.ref_neighbours.shape[0] == self.size:
            idx[known] = self.ref_neighbours[rows[known]].to(q.device)
        else:
            known = torch.zeros_like(known)
        if (~known).any():
            idx[~known] = self.search(q[~known], keys[~known])
        valid = idx >= 0
        safe = idx.clamp(min=0)
        if self.size:
            emb = self.ref_embeddings[safe] * valid[..., None]
            tgt = self.ref_targets[safe] * valid[..., None]
        else:
            emb = q.new_zeros(*idx.shape, self.dim)
            tgt = q.new_zeros(*idx.shape, self.n_genes)
        return Exemplars(q, idx, valid, emb, tgt)
