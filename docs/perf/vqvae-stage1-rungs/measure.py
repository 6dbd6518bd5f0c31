"""Does a VQ-VAE's stage-1 ranking at an early epoch predict its final ranking? (issue #20, item 5)

Measurement only, no product change. Samples configs from the vqvae space's searched params (fixed seed) plus the
space's seed configuration, trains each with one fixed CPU-sized schedule on real Fashion-MNIST, and records per
config the stage-1 measures at every stage-1 epoch, the reconstruction FID at an early stage-1 epoch and at the end
of stage 1, and the final sample FID (prior codes, decoded) and rFID. One JSON line per config, flushed as each one
finishes. Then `analyse` computes Spearman rank correlations of each early measure against the final ones, and
whether ASHA (reduction factor 3) at that rung would have kept the final best.

    .venv/bin/python docs/perf/vqvae-stage1-rungs/measure.py run      # trains, appends to results.jsonl
    .venv/bin/python docs/perf/vqvae-stage1-rungs/measure.py analyse  # writes analysis.json, prints tables

`run` skips configs already in results.jsonl (a killed run continues where it stopped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # a Ray trial's one thread; the machine is shared

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
ANALYSIS = HERE / "analysis.json"

SAMPLE_SEED = 20  # numpy seed of the config draws
NUM_RANDOM = 10  # random configs (plus the seed configuration)
DATA = {"dataset": "fashion_mnist", "data_dir": "/work/data", "train_size": 10000, "test_size": 500}
# The smoke preset's network sizes; one schedule for every config.
STAGE1_EPOCHS, PRIOR_EPOCHS, STEPS = 6, 3, 125
FIXED = {**DATA, "width": 32, "res_blocks": 1, "prior_width": 16, "prior_layers": 4, "restart_window": 20,
         "batch_size": 64, "steps_per_epoch": STEPS, "stage1_epochs": STAGE1_EPOCHS,
         "epochs": STAGE1_EPOCHS + PRIOR_EPOCHS, "eval_subset": 0, "seed": 0}
FID_N = 200  # Inception costs ~0.19 s per image on one CPU thread (95 s for 500): every FID here is at N = 200
EARLY_RFID_EPOCH = 2  # the candidate rung-1 epoch for the reconstruction FID (1/3 of stage 1)
WEIGHTS = "~/inception-2015-12-05.pth"


def draw_configs() -> list[dict]:
    from ray.tune.search.sample import Domain

    from sweeps.spaces import VQVAE_SPACE

    rng = np.random.RandomState(SAMPLE_SEED)
    configs = [{"name": "seed", **VQVAE_SPACE.seed_defaults}]
    for i in range(NUM_RANDOM):
        c = {}
        for k, v in VQVAE_SPACE.params.items():  # dict order: the same draws every time
            if isinstance(v, Domain):
                x = v.sample(random_state=rng)
                c[k] = x.item() if hasattr(x, "item") else x
            else:
                c[k] = v
        configs.append({"name": f"r{i:02d}", **c})
    return configs


def run() -> None:
    from genmodels.data import load_images
    from genmodels.experiment import Experiment
    from genmodels.metrics.fid import FIDScorer
    from genmodels.registry import trial_config

    done = set()
    if RESULTS.exists():
        done = {json.loads(line)["name"] for line in RESULTS.read_text().splitlines() if line.strip()}
    t_start = time.time()
    train = load_images(DATA["dataset"], "train", DATA["data_dir"], download=False, limit=DATA["train_size"])
    test = load_images(DATA["dataset"], "test", DATA["data_dir"], download=False, limit=DATA["test_size"])
    scorer = FIDScorer("inception", WEIGHTS, device="cpu", kid_subsets=0)
    t = time.time()
    ref = scorer.reference(test[:FID_N], key="fashion_mnist-test")  # disk-cached after the first run
    print(f"reference statistics of {FID_N} test images: {time.time() - t:.0f} s", flush=True)
    seed = FIXED["seed"] + 1  # the trainable's FID seed: the same prior noise for every config

    for cfg in draw_configs():
        if cfg["name"] in done:
            continue
        t0 = time.time()
        flat = {**FIXED, **{k: v for k, v in cfg.items() if k != "name"}}
        exp = Experiment.setup(trial_config(flat, "vqvae"), train, test, "cpu")
        rec: dict = {"name": cfg["name"], "config": {k: v for k, v in cfg.items() if k != "name"}, "epochs": []}
        fid_s = 0.0
        while not exp.done:
            m = exp.train_epoch()
            m.update(exp.evaluate(True))
            e = exp.epoch  # epochs completed
            row = {"epoch": e, "stage": 1 if e <= STAGE1_EPOCHS else 2,
                   **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
            if e == EARLY_RFID_EPOCH or e == STAGE1_EPOCHS:
                tf = time.time()
                row[f"rfid_{FID_N}"] = scorer.reconstruction_fid(exp.eval_model, exp.test_images(FID_N), ref)["fid"]
                fid_s += time.time() - tf
            rec["epochs"].append(row)
            print(f"{cfg['name']} epoch {e}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                         if k not in ("epoch",)), flush=True)
        tf = time.time()
        rec[f"final_fid_{FID_N}"] = scorer.sample_fid(exp.eval_model, FID_N, ref, seed=seed)["fid"]
        # The autoencoder is frozen in stage 2, so the final rFID is the end-of-stage-1 one (checked: test_mse of the
        # last epoch equals the end of stage 1's).
        s1_end = rec["epochs"][STAGE1_EPOCHS - 1]
        rec[f"final_rfid_{FID_N}"] = s1_end[f"rfid_{FID_N}"]
        rec["autoencoder_unchanged_in_stage2"] = rec["epochs"][-1]["test_mse"] == s1_end["test_mse"]
        fid_s += time.time() - tf
        rec["wall_s"] = round(time.time() - t0, 1)
        rec["fid_s"] = round(fid_s, 1)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        print(f"{cfg['name']} done in {rec['wall_s']} s (FID {rec['fid_s']} s): "
              f"final FID {rec[f'final_fid_{FID_N}']:.1f}, "
              f"rFID {rec[f'final_rfid_{FID_N}']:.1f}; total {time.time() - t_start:.0f} s", flush=True)


# -- analysis ------------------------------------------------------------------------------------------------------

def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 1 = smallest."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray, permutations: int = 20000) -> tuple[float, float]:
    """Spearman's rho and a two-sided permutation p-value (seeded)."""
    ra, rb = ranks(a), ranks(b)
    rho = float(np.corrcoef(ra, rb)[0, 1])
    rng = np.random.default_rng(0)
    perm = np.array([np.corrcoef(ra, rng.permutation(rb))[0, 1] for _ in range(permutations)])
    p = float((np.sum(np.abs(perm) >= abs(rho) - 1e-12) + 1) / (permutations + 1))
    return rho, p


def asha_kept(values: np.ndarray, lower_is_better: bool, rf: int = 3) -> np.ndarray:
    """Which trials ASHA keeps at a rung when all have reported (its cutoff: the (1 - 1/rf) percentile of the
    rewards, reward = -metric for a metric to minimise; a trial below it is stopped)."""
    reward = -values if lower_is_better else values
    cutoff = np.nanpercentile(reward, (1 - 1 / rf) * 100)
    return reward >= cutoff


EARLY = [  # (label, key, epoch, lower is better)
    *[(f"test_mse@{e}", "test_mse", e, True) for e in (1, 2, 3)],
    *[(f"test_psnr@{e}", "test_psnr", e, False) for e in (1, 2, 3)],
    *[(f"test_perplexity@{e}", "test_perplexity", e, False) for e in (1, 2)],
    (f"rfid_{FID_N}@{EARLY_RFID_EPOCH}", f"rfid_{FID_N}", EARLY_RFID_EPOCH, True),
    (f"test_mse@{STAGE1_EPOCHS} (end of stage 1)", "test_mse", STAGE1_EPOCHS, True),
    (f"rfid_{FID_N}@{STAGE1_EPOCHS} (end of stage 1)", f"rfid_{FID_N}", STAGE1_EPOCHS, True),
]


def analyse() -> None:
    recs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    n = len(recs)
    finals = {"final sample FID": np.array([r[f"final_fid_{FID_N}"] for r in recs]),
              "final rFID": np.array([r[f"final_rfid_{FID_N}"] for r in recs])}
    out = {"n_configs": n, "fid_n": FID_N, "rows": []}
    print(f"{n} configs\n")
    print("| early measure | rho vs final sample FID (p) | rho vs final rFID (p) | ASHA rf=3 keeps | keeps best by "
          "sample FID? | keeps best by rFID? | kept set's best final sample FID (regret) "
          "| final top-k kept (FID; rFID) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, key, epoch, lower in EARLY:
        x = np.array([r["epochs"][epoch - 1][key] for r in recs])
        sign = 1 if lower else -1  # correlate "badness" with badness: both sides lower is better
        row = {"measure": label, "values": x.tolist()}
        kept = asha_kept(x, lower)
        row["kept"] = [r["name"] for r, k in zip(recs, kept) if k]
        cells = []
        for fname, f in finals.items():
            rho, p = spearman(sign * x, f)
            best = int(np.argmin(f))
            top = set(np.argsort(f)[:kept.sum()].tolist())  # the final top-k, k = how many the rung keeps
            row[fname] = {"rho": rho, "p": p, "best": recs[best]["name"], "best_kept": bool(kept[best]),
                          "best_rank_at_rung": float(ranks(sign * x)[best]),
                          "best_final_among_kept": float(f[kept].min()), "regret": float(f[kept].min() - f[best]),
                          "final_top_k_kept": len(top & set(np.flatnonzero(kept).tolist()))}
            cells.append(f"{rho:+.2f} ({p:.2g})")
        out["rows"].append(row)
        print(f"| {label} | {cells[0]} | {cells[1]} | {kept.sum()} of {n} | "
              f"{'yes' if row['final sample FID']['best_kept'] else 'no'} (best {row['final sample FID']['best']} "
              f"rung rank {row['final sample FID']['best_rank_at_rung']:g}) | "
              f"{'yes' if row['final rFID']['best_kept'] else 'no'} (best {row['final rFID']['best']} rung rank "
              f"{row['final rFID']['best_rank_at_rung']:g}) | "
              f"{row['final sample FID']['best_final_among_kept']:.1f} (+{row['final sample FID']['regret']:.1f}) | "
              f"{row['final sample FID']['final_top_k_kept']} of {kept.sum()}; "
              f"{row['final rFID']['final_top_k_kept']} of {kept.sum()} |")
    rho, p = spearman(finals["final rFID"], finals["final sample FID"])
    out["final_rfid_vs_final_fid"] = {"rho": rho, "p": p}
    print(f"\nfinal rFID vs final sample FID: rho {rho:+.2f} (p {p:.2g})\n")
    print("| config | K | D | commitment | EMA decay | restarts | codebook | lr | mse@1 | mse@2 | mse@6 | perpl@2 | "
          f"perpl@6 | dead@6 | rFID@{EARLY_RFID_EPOCH} | rFID@6 = final rFID | final sample FID | prior bits/code | "
          "wall s |")
    print("|" + "---|" * 19)
    for r in sorted(recs, key=lambda r: r[f"final_fid_{FID_N}"]):
        c, ep = r["config"], r["epochs"]
        print(f"| {r['name']} | {c['codebook_size']} | {c['code_dim']} | {c['commitment']:.3g} | "
              f"{c['ema_decay_codebook']} | {c['restarts']} | {c.get('codebook', 'ema')} | {c['lr']:.2g} | "
              f"{ep[0]['test_mse']:.4f} | {ep[1]['test_mse']:.4f} | {ep[STAGE1_EPOCHS - 1]['test_mse']:.4f} | "
              f"{ep[1]['test_perplexity']:.0f} | {ep[STAGE1_EPOCHS - 1]['test_perplexity']:.0f} | "
              f"{ep[STAGE1_EPOCHS - 1]['test_dead_codes']} | {ep[EARLY_RFID_EPOCH - 1][f'rfid_{FID_N}']:.1f} | "
              f"{r[f'final_rfid_{FID_N}']:.1f} | {r[f'final_fid_{FID_N}']:.1f} | "
              f"{ep[-1].get('test_prior_bits_per_code', float('nan')):.2f} | {r['wall_s']:.0f} |")
    ANALYSIS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "analyse", "configs"])
    what = ap.parse_args().what
    if what == "configs":
        for c in draw_configs():
            print(c)
    else:
        {"run": run, "analyse": analyse}[what]()
