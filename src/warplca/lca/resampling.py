"""Atom usage and dead-atom resampling for dictionary learning (pure torch).

An atom LCA hardly ever activates gets no gradient and stays random. Replacing it with the image patch
where the residual x − Φa is largest (the K-SVD / sparse-autoencoder "resampling" trick) makes it useful.
The patch comes from the image, not the residual: residual patches are unstructured leftovers that LCA
never selects, so the atom would die again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from warplca.lca.dictionary import ConvDictionary

__all__ = ["atom_usage", "dead_atoms", "resample_atoms", "used_atoms"]

#: an atom is "used" when it takes at least this fraction of a uniform share of all activations
USAGE_FRACTION = 1.0 / 20.0


def atom_usage(a: Tensor) -> Tensor:
    """Number of non-zero activations of each atom in codes ``a`` (B, K, H', W') → (K,) float64."""
    return (a != 0).sum(dim=(0, 2, 3)).to(torch.float64)


def dead_atoms(usage: Tensor, fraction: float = USAGE_FRACTION) -> Tensor:
    """Indices of atoms with less than ``fraction`` of a uniform share (total / K) of the activations
    (every atom when there are none)."""
    total = usage.sum()
    share = total / usage.numel()
    return torch.nonzero(usage < fraction * share).flatten() if total > 0 else torch.arange(usage.numel())


def used_atoms(usage: Tensor, fraction: float = USAGE_FRACTION) -> int:
    """How many atoms take at least ``fraction`` of a uniform share of the activations."""
    return int(usage.numel() - dead_atoms(usage, fraction).numel())


@torch.no_grad()
def resample_atoms(dictionary: ConvDictionary, residual: Tensor, atoms: Tensor,
                   images: Tensor | None = None, noise: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Replace ``atoms`` of ``dictionary`` by k×k patches where ``residual`` (B, C, H, W) has most energy.

    Patches come from ``images`` (same shape) when given, else the residual. Each image gives its best
    place first, then the next-best places overall; new atoms get optional relative Gaussian ``noise``
    and unit norm. Returns the indices replaced.
    """
    atoms = torch.as_tensor(atoms, dtype=torch.int64).flatten()
    if atoms.numel() == 0:
        return atoms
    w, k = dictionary.weight, dictionary.kernel_size
    if residual.ndim != 4 or residual.shape[1] != dictionary.in_channels:
        raise ValueError(f"residual must have shape (B, {dictionary.in_channels}, H, W), got "
                         f"{tuple(residual.shape)}")
    if min(residual.shape[-2:]) < k:
        raise ValueError(f"residual images ({tuple(residual.shape[-2:])}) are smaller than the atoms ({k})")
    if images is not None and images.shape != residual.shape:
        raise ValueError(f"images {tuple(images.shape)} and residual {tuple(residual.shape)} differ in shape")
    energy = F.unfold(residual.detach().to(w.dtype), k).pow(2).sum(dim=1)  # (B, P)
    patches = F.unfold((residual if images is None else images).detach().to(w.dtype), k)  # (B, C·k², P)
    per_image = energy.argmax(dim=1)
    best = energy.gather(1, per_image[:, None]).squeeze(1)
    order = torch.argsort(best, descending=True)
    picks = [patches[b, :, per_image[b]] for b in order.tolist()]
    if len(picks) < atoms.numel():  # more dead atoms than images: the next-best patches overall
        flat = torch.topk(energy.flatten(), min(energy.numel(), atoms.numel() + len(picks))).indices
        rows, cols = flat // energy.shape[1], flat % energy.shape[1]
        taken = {(int(b), int(per_image[b])) for b in order}
        picks += [patches[r, :, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
                  if (r, c) not in taken]
    new = torch.stack(picks[: atoms.numel()])
    if noise > 0:
        new = new + noise * new.norm(dim=1, keepdim=True) / new.shape[1] ** 0.5 * torch.randn(
            new.shape, generator=generator, dtype=new.dtype).to(new.device)
    norms = new.norm(dim=1, keepdim=True)
    fallback = torch.randn(new.shape, generator=generator, dtype=new.dtype).to(new.device)
    new = torch.where(norms > 1e-12, new, fallback)  # a zero residual: a random atom instead
    new = new / new.norm(dim=1, keepdim=True)
    atoms = atoms[: new.shape[0]]
    w[atoms] = new.view(-1, *w.shape[1:])
    return atoms
