"""Zero-inflated negative binomial (ZINB) heads and negative log-likelihood, DCA style.

The formulation follows DCA (Eraslan et al., Nat Commun 2019) as used by Hist2ST's
``NB_module.py``: a spot embedding ``h`` gives per-gene

* mean ``mu = clamp(exp(W_mu h), 1e-5, 1e6)`` (then multiplied by the spot's size factor),
* dispersion ``theta = clamp(softplus(W_theta h), 1e-4, 1e4)``,
* dropout probability ``pi = sigmoid(W_pi h)``,

and the loss is the mean over spots and genes of

* ``x > 0``: ``-log(1 - pi) - log NB(x; mu, theta)``
* ``x = 0``: ``-log(pi + (1 - pi) (theta / (theta + mu))^theta)``

with ``NB(x; mu, theta) = Gamma(x + theta) / (Gamma(theta) x!) (theta / (theta + mu))^theta
(mu / (theta + mu))^x`` (``theta`` is the number of failures, ``mu`` the mean). A small
``eps`` (1e-10) guards the logarithms exactly as in the original code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZINBHead(nn.Module):
    """Three linear heads giving the ZINB mean, dispersion and dropout probability.

    Args:
        dim: Width of the input embedding.
        n_genes: Number of genes.
        mean_range: Clamp of ``exp(.)`` for the mean (original: 1e-5, 1e6).
        disp_range: Clamp of ``softplus(.)`` for the dispersion (original: 1e-4, 1e4).

    Input: (..., dim). Output: a tuple ``(mean, disp, pi)``, each (..., n_genes).
    """

    def __init__(self, dim: int, n_genes: int, mean_range: tuple[float, float] = (1e-5, 1e6),
                 disp_range: tuple[float, float] = (1e-4, 1e4)) -> None:
        super().__init__()
        self.mean = nn.Linear(dim, n_genes)
        self.disp = nn.Linear(dim, n_genes)
        self.pi = nn.Linear(dim, n_genes)
        self.mean_range = tuple(float(v) for v in mean_range)
        self.disp_range = tuple(float(v) for v in disp_range)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = torch.clamp(torch.exp(self.mean(h)), *self.mean_range)
        disp = torch.clamp(F.softplus(self.disp(h)), *self.disp_range)
        return mean, disp, torch.sigmoid(self.pi(h))


def zinb_nll(
    x: Tensor,
    mean: Tensor,
    disp: Tensor,
    pi: Tensor,
    size_factor: Tensor | float | None = None,
    eps: float = 1e-10,
    ridge_lambda: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of raw counts under a zero-inflated negative binomial.

    Args:
        x: (N, G) raw counts (non-negative).
        mean: (N, G) NB mean before size-factor scaling.
        disp: (N, G) NB dispersion ``theta`` (> 0).
        pi: (N, G) zero-inflation probability in [0, 1].
        size_factor: (N,) per-spot size factors (multiplying ``mean``), a scalar, or None (1).
        eps: Numerical guard inside the logarithms (DCA/Hist2ST: 1e-10).
        ridge_lambda: Optional ridge penalty ``lambda * pi^2`` (DCA; 0 in Hist2ST).
        reduction: ``"mean"`` (Hist2ST: mean over all entries), ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss (a scalar) or the (N, G) element-wise negative log-likelihood.

    Raises:
        ValueError: when shapes disagree or ``reduction`` is unknown.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, t in (("mean", mean), ("disp", disp), ("pi", pi)):
        if t.shape != x.shape:
            raise ValueError(
                f"zinb_nll: {name} has shape {tuple(t.shape)} but the counts have "
                f"{tuple(x.shape)}"
            )
    x = x.to(mean.dtype)
    if size_factor is not None:
        sf = torch.as_tensor(size_factor, dtype=mean.dtype, device=mean.device)
        if sf.dim() == 1:
            if sf.shape[0] != x.shape[0]:
                raise ValueError(
                    f"zinb_nll: size_factor has {sf.shape[0]} entries for {x.shape[0]} spots"
                )
            sf = sf.unsqueeze(-1)
        mean = mean * sf
    t1 = torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
    t2 = (disp + x) * torch.log1p(mean / (disp + eps)) + x * (
        torch.log(disp + eps) - torch.log(mean + eps)
    )
    nb_case = t1 + t2 - torch.log(1.0 - pi + eps)
    zero_nb = torch.pow(disp / (disp + mean + eps), disp)
    zero_case = -torch.log(pi + (1.0 - pi) * zero_nb + eps)
    nll = torch.where(x <= 1e-8, zero_case, nb_case)
    if ridge_lambda > 0:
        nll = nll + ridge_lambda * pi.square()
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll
