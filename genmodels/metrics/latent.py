"""Latent-space pictures of a trained VAE-family model, written as PNG grids at the end of a trial.

- interpolation between the posterior means of pairs of test images, linear and spherical (slerp suits a
  Gaussian prior: straight lines pass through low-norm latents the decoder rarely saw); each row is
  [image a, decode(z_a), ..., decode(z_b), image b], and the end columns decode exactly z_a and z_b;
- a traversal of the most active latent units (largest variance of the posterior mean across test images), each
  moved over [-3, 3] prior standard deviations from one test image's encoding;
- for IWAE, best-weight reconstruction: rows of [image, decode(posterior mean), decode(z*)], where z* is the
  posterior sample with the largest importance weight of the model's `eval_k` samples.

`model` is a VAE-family model (encode, decode, log_weights), typed nn.Module: genmodels.models.vae imports this
module, not the other way round.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genmodels.data import dequantize, to_unit
from genmodels.images import save_grid


def linear_path(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps, L) points from z0 to z1; the end points are exactly z0 and z1."""
    t = torch.linspace(0, 1, steps, device=z0.device).view(1, steps, 1)
    path = (1 - t) * z0.unsqueeze(1) + t * z1.unsqueeze(1)
    path[:, 0], path[:, -1] = z0, z1
    return path


def slerp_path(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps, L) spherical interpolation (Shoemake 1985; White 2016 for generative models); falls back to
    linear for nearly parallel pairs; the end points are exactly z0 and z1."""
    t = torch.linspace(0, 1, steps, device=z0.device).view(1, steps, 1)
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1).view(-1, 1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    a, b = torch.sin((1 - t) * omega) / sin, torch.sin(t * omega) / sin
    parallel = sin.abs() < 1e-4
    a, b = torch.where(parallel, 1 - t, a), torch.where(parallel, t, b)
    path = a * z0.unsqueeze(1) + b * z1.unsqueeze(1)
    path[:, 0], path[:, -1] = z0, z1
    return path


@torch.no_grad()
def interpolate(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, steps: int,
                kind: str = "linear") -> torch.Tensor:
    """Decodings (N, steps, C, H, W) along the path between the posterior means of uint8 images x0 and x1."""
    path_fn = {"linear": linear_path, "slerp": slerp_path}[kind]
    z0, z1 = model.encode(to_unit(x0))[0], model.encode(to_unit(x1))[0]
    path = path_fn(z0, z1, steps)
    return model.decode(path.flatten(0, 1)).view(len(x0), steps, *x0.shape[1:])


@torch.no_grad()
def traversal(model: nn.Module, images: torch.Tensor, n_dims: int = 8, steps: int = 10,
              span: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodings (n_dims, steps, C, H, W) moving each of the n_dims most active units over [-span, span] from the
    encoding of images[0]; and the indices of those units, most active first."""
    mu = model.encode(to_unit(images))[0]
    dims = mu.var(0).argsort(descending=True)[:min(n_dims, mu.shape[1])]
    z = mu[0].repeat(len(dims), steps, 1)
    values = torch.linspace(-span, span, steps, device=mu.device)
    z[torch.arange(len(dims), device=mu.device), :, dims] = values
    return model.decode(z.flatten(0, 1)).view(len(dims), steps, *images.shape[1:]), dims


@torch.no_grad()
def best_weight_reconstruction(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Decoding of the posterior sample with the largest importance weight out of k, per uint8 image."""
    xd = dequantize(x)
    mu, logvar = model.encode(xd)
    log_w, z = model.log_weights(xd, mu, logvar, k)
    best = log_w.argmax(0)
    return model.decode(z[best, torch.arange(len(x), device=best.device)])


@torch.no_grad()
def latent_grids(model: nn.Module, test_images_uint8: torch.Tensor, out_dir: str | Path, n_pairs: int = 8,
                 steps: int = 10, best_weight: bool = False) -> dict[str, Path]:
    """Write the latent-space grids of `model` (in eval mode) for some test images; returns {name: PNG path}.
    `best_weight` adds the best-weight reconstructions (for models trained on an importance-weighted bound)."""
    out_dir = Path(out_dir)
    model.eval()
    images = test_images_uint8.to(model.device)
    n_pairs = max(1, min(n_pairs, len(images) // 2))
    x0, x1 = images[:n_pairs], images[n_pairs:2 * n_pairs]
    paths = {}
    for kind in ("linear", "slerp"):
        decoded = interpolate(model, x0, x1, steps, kind)
        rows = torch.cat([to_unit(x0).unsqueeze(1), decoded, to_unit(x1).unsqueeze(1)], 1)
        paths[f"interp_{kind}"] = save_grid(rows.flatten(0, 1), out_dir / f"interp_{kind}.png", nrow=steps + 2)
    span = 3.0
    decoded, dims = traversal(model, images, steps=steps, span=span)
    paths["traversal"] = save_grid(
        decoded.flatten(0, 1), out_dir / "traversal.png", nrow=steps,
        title=f"rows: the {len(dims)} most active latent units (z3: unit 3), most active first; columns: that "
              f"unit's value, -{span:g} to +{span:g} prior std, the other units at the first test image's encoding",
        row_labels=[f"z{d}" for d in dims.tolist()],
        column_labels=[f"{v:+.1f}" for v in torch.linspace(-span, span, steps).tolist()])
    if best_weight:
        x = images[:2 * n_pairs]
        best = best_weight_reconstruction(model, x, model.cfg.eval_k)
        rows = torch.stack([to_unit(x), model.reconstruct(x), best], 1)
        paths["best_weight_recon"] = save_grid(rows.flatten(0, 1), out_dir / "best_weight_recon.png", nrow=6)
    return paths
