"""VQ-VAE encoder/decoder stacks and the vector quantizer (EMA or loss-trained codebook, dead-code restarts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KMEANS_ITERS = 10
RESTARTS_PER_CALL = 16  # dead codes re-seeded per restart_dead_codes call (one at a time)
LAPLACE_EPS = 1e-5  # pseudo-count added to every cluster size, so a code that loses its vectors never divides by 0

def code_counts(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code occurs. torch.bincount on CUDA reads the indices' min and max on the host first (two syncs
    per training step); an index_add into a fixed-size histogram never leaves the device."""
    flat = codes.flatten()
    return torch.zeros(num_codes, dtype=torch.long, device=codes.device).index_add_(0, flat, torch.ones_like(flat))


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code usage histogram: K when all codes are used equally, 1 when one code takes all."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))). The activations are not in-place: the seed's in-place ReLU turned the
    skip into relu(x) and the block into relu(x) + F(relu(x))."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.residual = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


def vq_encoder(channels: int, width: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """32x32 images -> (code_dim, 8, 8): two stride-2 4x4 convs, a 3x3 conv, residual blocks, a 1x1 to code_dim."""
    hidden = max(width // 4, 1)  # residual hidden channels: 32 for width 128, as in Sonnet's VQ-VAE example
    return nn.Sequential(
        nn.Conv2d(channels, width // 2, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width // 2, width, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        *[ResidualBlock(width, hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.Conv2d(width, code_dim, 1))


def vq_decoder(channels: int, width: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """Mirror of `vq_encoder`; linear output (images in [0, 1] are clamped only when returned)."""
    hidden = max(width // 4, 1)
    return nn.Sequential(
        nn.Conv2d(code_dim, width, 3, padding=1),
        *[ResidualBlock(width, hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(width // 2, channels, 4, 2, 1))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser of (N, D, H, W) vectors with a K x D codebook and straight-through gradients.

    `forward` is the training path (updates the EMA codebook and the usage counters when in training mode);
    `nearest` and `embed` have no side effects and serve evaluation, reconstruction and the prior.
    """

    def __init__(self, num_codes: int, dim: int, mode: str = "ema", decay: float = 0.99, kmeans_init: bool = False,
                 restart_window: int = 100):
        super().__init__()
        if mode not in ("ema", "loss"):
            raise ValueError(f"unknown codebook {mode!r}; choose ema or loss")
        self.num_codes, self.dim, self.mode, self.decay = num_codes, dim, mode, decay
        self.restart_window = restart_window
        # Small codes near the origin: the nearest one to an encoder output is then decided by direction, not by
        # which random code happens to have the smallest norm (a unit-normal codebook gives 1 code in use at init).
        init = (torch.rand(num_codes, dim) * 2 - 1) / num_codes
        if mode == "ema":
            self.register_buffer("codebook", init)
            # As if every code had been assigned once at its initial position: an unused code then stays put
            # (its count and sum decay together) instead of collapsing to 0 on the first update.
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("code_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("codes_restarted", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self._kmeans_pending = kmeans_init  # host-side flag, so the buffer is read (a sync) only once
        self._recent: torch.Tensor | None = None  # encoder outputs of the latest training batch, for restarts

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of (M, D)."""
        return _sq_dist(flat.detach().float(), self.codebook.detach().float()).argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, H, W) code indices -> (N, D, H, W) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) encoder outputs -> (N, H, W) code indices."""
        n, d, h, w = z_e.shape
        return self.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantised vectors with straight-through gradients, code indices (N, H, W), and the loss terms
        `commitment` (||z_e - sg(e)||^2, to be weighted by beta) and `codebook` (||sg(z_e) - e||^2; 0 for EMA)."""
        with torch.autocast(z_e.device.type, enabled=False):  # distances and averages in fp32 under bf16 autocast
            z = z_e.float()
            n, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and self._kmeans_pending:
                self._kmeans_pending = False
                if not bool(self.initialised):
                    self.kmeans_init_(flat.detach())
            codes = self.nearest(flat)
            z_q = self.embed(codes.view(n, h, w))
            if self.training:
                self._track(flat.detach(), codes)
            terms = {"commitment": F.mse_loss(z, z_q.detach())}
            terms["codebook"] = F.mse_loss(z_q, z.detach()) if self.mode == "loss" else torch.zeros((), device=z.device)
            z_st = z + (z_q - z).detach()
        return z_st, codes.view(n, h, w), terms

    @torch.no_grad()
    def _track(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts = code_counts(codes, self.num_codes)
        self.unused_steps.add_(1).mul_(counts == 0)
        self._recent = flat
        if self.mode == "ema":
            sums = torch.zeros_like(self.code_sum).index_add_(0, codes, flat)
            self.cluster_size.lerp_(counts.float(), 1 - self.decay)
            self.code_sum.lerp_(sums, 1 - self.decay)
            self.codebook.copy_(self.code_sum / self._smoothed_sizes()[:, None])

    def _smoothed_sizes(self) -> torch.Tensor:
        n = self.cluster_size.sum()
        return (self.cluster_size + LAPLACE_EPS) / (n + self.num_codes * LAPLACE_EPS) * n

    @torch.no_grad()
    def kmeans_init_(self, flat: torch.Tensor, iters: int = KMEANS_ITERS) -> None:
        """Set the codebook to k-means centroids of `flat` (M, D), seeded by K random rows."""
        m = len(flat)
        pick = torch.randperm(m, device=flat.device)[:self.num_codes] if m >= self.num_codes else \
            torch.randint(m, (self.num_codes,), device=flat.device)
        centroids = flat[pick].clone()
        counts = torch.zeros(self.num_codes, device=flat.device)
        for _ in range(iters):
            codes = _sq_dist(flat, centroids).argmin(1)
            counts = torch.bincount(codes, minlength=self.num_codes).float()
            sums = torch.zeros_like(centroids).index_add_(0, codes, flat)
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        self.codebook.copy_(centroids)
        if self.mode == "ema":
            self.cluster_size.copy_(counts.clamp_min(1))
            self.code_sum.copy_(centroids * self.cluster_size[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, max_restarts: int = RESTARTS_PER_CALL) -> None:
        """Re-seed codes unused for `restart_window` training steps, one at a time, k-means++ style: each restarted
        code is an encoder output of the latest batch drawn with probability proportional to its squared distance
        to the nearest live (or just restarted) code. Outputs of a cluster that no code serves, or that one code
        serves at the mean of several clusters, are far from every code and get picked; two restarts rarely land
        in one cluster, since the first one makes that cluster near. At most `max_restarts` codes per call, with
        no host sync: the picks are masked out once no dead code is left, and every index stays a tensor (indexing
        with a 0-dim tensor reads it on the host, and so do torch.multinomial's checks). (With codebook=loss,
        Adam's moments of a restarted row are left as they are.)"""
        if self._recent is None:
            return
        recent = self._recent
        dead = self.unused_steps >= self.restart_window
        codebook = self.codebook.detach().float()
        nearest = _sq_dist(recent, codebook).masked_fill(dead[None], float("inf")).amin(1)  # (M,) to live codes
        restarted = torch.zeros_like(dead)
        for _ in range(min(max_restarts, self.num_codes)):
            pending = dead & ~restarted
            code = pending & (pending.cumsum(0) == 1)  # one-hot of the first dead code not yet restarted, or none
            weights = torch.where(torch.isfinite(nearest), nearest, torch.ones_like(nearest)).clamp_min(0)
            weights = weights + (weights.sum() == 0).float()  # all outputs on codes: draw uniformly
            pick = recent.index_select(0, _draw(weights))[0]
            codebook = torch.where(code[:, None], pick, codebook)
            restarted |= code
            nearest = torch.minimum(nearest, torch.where(code.any(), _sq_dist(recent, pick[None])[:, 0], nearest))
        self.codebook.copy_(torch.where(restarted[:, None], codebook, self.codebook))
        if self.mode == "ema":
            self.cluster_size.copy_(torch.where(restarted, torch.ones_like(self.cluster_size), self.cluster_size))
            self.code_sum.copy_(torch.where(restarted[:, None], codebook, self.code_sum))
        self.unused_steps.masked_fill_(restarted, 0)
        self.codes_restarted.add_(restarted.sum())

    def dead_codes(self) -> torch.Tensor:
        """Codes no training vector was assigned to in the last `restart_window` steps."""
        return (self.unused_steps >= self.restart_window).sum()


def _draw(weights: torch.Tensor) -> torch.Tensor:
    """One index drawn with probability proportional to `weights` (>= 0, not all 0), as a 1-element tensor, without
    the host reads of torch.multinomial's validity checks. It is multinomial's own one-sample path (weights over
    Exponential(1) noise, the argmax), so with the same RNG state it draws the same index and consumes the same
    random numbers; a zero weight is never drawn, whatever the noise."""
    q = weights / torch.empty_like(weights).exponential_()
    return torch.where(weights > 0, q, -1).argmax().view(1)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a (M, D) and b (K, D), as (M, K)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(1)).clamp_min(0)
