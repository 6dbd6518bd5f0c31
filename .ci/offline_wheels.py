"""Wheels of the sweep stack (Ray Tune, Optuna, W&B and what they need) for a machine with no package index, cut to
fit a transfer limit:

    python .ci/offline_wheels.py --python 3.12 --out wheels --part-mib 60
    # on the machine, after carrying every wheels/part-N folder there:
    pip install --no-index --find-links wheels/part-1 --find-links wheels/part-2 -r wheels/requirements.txt

pip downloads the wheels for the target Python and platform. Packages the target already has (`--skip`, by
default what a PyTorch GPU image ships: torch, numpy and the like) are left out. Ray's and pyarrow's wheels are
re-packed without what a Tune sweep never loads (Java jars, the dashboard's web client, RLlib, Serve, Arrow Flight
and S3; SLIMMED lists them), which takes Ray from 79 MB to 42 MB and pyarrow from 55 MB to 33 MB. The wheels are
then split into part folders of at most `--part-mib`, one per transfer. Checked on Python 3.11: the slimmed stack
installs with --no-index and runs an Optuna + ASHA Tune sweep with checkpoints.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

STACK = ["ray[tune]", "optuna", "wandb"]
# What a PyTorch GPU image ships already (torch's own CUDA wheels included): never carried.
ON_TARGET = ("torch", "torchvision", "torchmetrics", "numpy", "pillow", "matplotlib", "tqdm", "triton", "nvidia-",
             "sympy", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "typing-extensions", "mpmath",
             "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "packaging",
             "lightning-utilities", "setuptools")
# package -> path prefixes inside its wheel that a Tune sweep never imports or runs
SLIMMED = {
    "ray": ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/"),
    # pyarrow.lib links Substrait, Parquet, Acero and Dataset: they stay; Flight and S3 are loaded only on use.
    "pyarrow": ("pyarrow/libarrow_flight", "pyarrow/_flight", "pyarrow/libarrow_s3", "pyarrow/_s3fs",
                "pyarrow/include/", "pyarrow/src/", "pyarrow/tests/"),
}


def project_name(wheel: Path) -> str:
    """The normalised project name of a wheel file (`ray-2.60.0-cp312-...whl` -> `ray`)."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def slim(wheel: Path, drop: tuple[str, ...], out: Path) -> Path:
    """A copy of `wheel` without the files under `drop`, with their lines taken out of its RECORD too."""
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(line for line in lines if not line.startswith(drop)).encode() + b"\n"
            dst.writestr(info, data)
    return target


def split_into_parts(wheels: list[Path], part_bytes: int, out: Path) -> list[Path]:
    """Move the wheels into out/part-1, part-2, ... of at most `part_bytes` each (largest first, first fit)."""
    parts: list[tuple[Path, int]] = []
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        size = wheel.stat().st_size
        if size > part_bytes:
            raise SystemExit(f"offline_wheels: {wheel.name} is {size / 2**20:.0f} MiB, over --part-mib; slim it "
                             f"(SLIMMED) or raise --part-mib")
        for i, (folder, used) in enumerate(parts):
            if used + size <= part_bytes:
                parts[i] = (folder, used + size)
                break
        else:
            folder = out / f"part-{len(parts) + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            parts.append((folder, size))
        wheel.rename(folder / wheel.name)
    return [folder for folder, _ in parts]


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.12", help="the target's Python version (default 3.12)")
    p.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="the target's newest manylinux tag; older compatible tags are accepted too")
    p.add_argument("--out", type=Path, default=Path("wheels"))
    p.add_argument("--part-mib", type=float, default=60.0, help="largest part folder, MiB (default 60)")
    p.add_argument("--skip", default=",".join(ON_TARGET), help="comma-separated packages (or prefixes) the target "
                                                               "has already")
    p.add_argument("--requirement", action="append", default=None,
                   help="what to bundle, pip-style, repeatable (default: ray[tune], optuna, wandb at this machine's "
                        "versions)")
    args = p.parse_args(argv)
    requirements = args.requirement or [pinned(r) for r in STACK]
    download = args.out / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
                    args.python, *[f"--platform={tag}" for tag in _compatible_platforms(args.platform)], "-d",
                    str(download), *requirements], check=True)
    skip = tuple(s.strip().lower() for s in args.skip.split(",") if s.strip())
    kept = []
    for wheel in sorted(download.glob("*.whl")):
        name = project_name(wheel)
        if name.startswith(skip):
            continue
        kept.append(slim(wheel, SLIMMED[name], args.out) if name in SLIMMED else wheel.rename(args.out / wheel.name))
    parts = split_into_parts(kept, int(args.part_mib * 2**20), args.out)
    (args.out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    for leftover in download.glob("*"):
        leftover.unlink()
    download.rmdir()
    for folder in parts:
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder}: {len(list(folder.iterdir()))} wheels, {size / 2**20:.1f} MiB")
    return parts


def pinned(requirement: str) -> str:
    """`ray[tune]` -> `ray[tune]==2.60.0`: the version installed here, so both machines run the same stack."""
    from importlib.metadata import PackageNotFoundError, version

    name = requirement.split("[")[0]
    try:
        return f"{requirement}=={version(name)}"
    except PackageNotFoundError:
        return requirement


def _compatible_platforms(newest: str) -> list[str]:
    """manylinux_2_28_x86_64 -> itself and every older glibc tag of that architecture that pip may pick."""
    if not newest.startswith("manylinux_2_"):
        return [newest]
    glibc, arch = newest[len("manylinux_2_"):].split("_", 1)
    return [f"manylinux_2_{minor}_{arch}" for minor in range(int(glibc), 4, -1)] + \
        [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


if __name__ == "__main__":
    main()
