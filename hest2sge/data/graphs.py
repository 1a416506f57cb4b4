"""Spot neighbour graphs (edge_index in PyG convention: row 0 source, row 1 target)."""

from __future__ import annotations

import numpy as np
import torch


def knn_graph(coords: np.ndarray, k: int = 4, max_dist: float | None = None) -> torch.Tensor:
    """Directed k-nearest-neighbour graph on spot coordinates, without self loops.

    Each spot ``i`` receives edges from its ``k`` nearest spots ``j`` (ties broken by index,
    so the result is deterministic); with ``max_dist`` edges longer than it are dropped (the
    "Grid" pruning of Hist2ST uses array coordinates and ``max_dist=2``).

    Args:
        coords: (N, 2) coordinates (array grid or pixels).
        k: Neighbours per spot.
        max_dist: Optional maximum edge length.

    Returns:
        ``edge_index`` (2, E) long tensor; ``edge_index[1]`` is the receiving spot.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return torch.zeros(2, 0, dtype=torch.long)
    dist, idx = cKDTree(coords).query(coords, k=min(n, kk + 1 + 4))
    src, dst = [], []
    for i in range(n):
        order = [(d, j) for d, j in zip(dist[i], idx[i]) if j != i and j < n]
        order.sort()
        for d, j in order[:kk]:
            if max_dist is None or d <= max_dist + 1e-9:
                src.append(j)
                dst.append(i)
    return torch.tensor([src, dst], dtype=torch.long).reshape(2, -1)


def radius_graph(coords: np.ndarray, radius: float, max_neighbors: int | None = None) -> torch.Tensor:
    """Directed radius graph without self loops (each spot receives from spots within ``radius``)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    tree = cKDTree(coords)
    src, dst = [], []
    for i, nb in enumerate(tree.query_ball_point(coords, r=radius + 1e-9)):
        nb = sorted((float(np.linalg.norm(coords[j] - coords[i])), j) for j in nb if j != i)
        if max_neighbors is not None:
            nb = nb[:max_neighbors]
        for _, j in nb:
            src.append(j)
            dst.append(i)
    return torch.tensor([src, dst], dtype=torch.long).reshape(2, -1)
