"""FID of a trained trial at several sample counts, each against as many test images: how far FID at N = 500 (the
count docs/QUALITY.md's sweeps rank by) sits above FID at a larger N for the same model.

    python docs/quality/fid_at_n.py --checkpoint RUN/TRIAL/checkpoint_000002/state.pt --data-dir DATA \
        --fid-weights ~/inception-2015-12-05.pth --n 500 2000

One JSON line per N: {"n", "fid", "checkpoint"}. Samples are drawn from the EMA weights where the run kept them,
seeded by --seed, so a rerun gives the same figures.
"""
from __future__ import annotations

import argparse
import json

from genmodels.data import load_images
from genmodels.experiment import Experiment
from genmodels.io import load_checkpoint
from genmodels.metrics.fid import FIDScorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--fid-weights", required=True)
    p.add_argument("--n", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dataset = load_checkpoint(args.checkpoint)["config"]["data.dataset"]
    test = load_images(dataset, "test", args.data_dir, limit=max(args.n))
    exp = Experiment.from_checkpoint(args.checkpoint, test[:64], test, overrides={"data.data_dir": args.data_dir})
    scorer = FIDScorer("inception", args.fid_weights)
    for n in args.n:
        ref = scorer.reference(test[:n], key=f"{dataset}-test-first{n}")
        fid = scorer.sample_fid(exp.eval_model, n, ref, seed=args.seed)
        print(json.dumps({"n": n, "fid": round(float(fid["fid"]), 1), "checkpoint": args.checkpoint}), flush=True)


if __name__ == "__main__":
    main()
