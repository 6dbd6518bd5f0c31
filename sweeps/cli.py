"""gensweep: one command, with a subcommand per job.

    gensweep run --space vae --preset smoke       # start a sweep (python sweeps/run.py takes the same flags)
    gensweep resume vae-full-20261121-101203      # continue an interrupted sweep
    gensweep leaderboard --importance             # the ranking of the newest sweep, and what mattered
    gensweep report                               # plots, and the report logged to W&B
    gensweep study                                # (re)write the sweep's Optuna study, optuna.db
    gensweep spaces [NAME]                        # the search spaces; one space's domains, presets and metrics

`gensweep COMMAND --help` lists a command's flags. Every command refuses bad input in one line, exit code 2, before
Ray starts. This module imports only what parsing needs, so that --help answers at once; a command's module is
imported when it runs.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
import textwrap

from genmodels.config import ConfigError
from genmodels.errors import ResourceUnavailable
from sweeps.errors import CommandFailed, UsageError

# name -> (the module whose command(args) runs it, one line of help); each command's flags are below, so that
# parsing, --help and a refusal import no command module
COMMANDS = {
    "run": ("sweeps.driver", "start a sweep: Ray Tune + Optuna TPE + ASHA, a W&B run per trial, a leaderboard"),
    "resume": ("sweeps.driver", "continue an interrupted sweep: gensweep resume NAME"),
    "leaderboard": ("sweeps.leaderboard", "a sweep's trials ranked, from its results or from W&B"),
    "report": ("sweeps.report", "a sweep's plots and parameter importances, logged to W&B"),
    "study": ("sweeps.study", "(re)write a sweep's Optuna study (optuna.db) from its trials' results"),
    "spaces": ("sweeps.spaces_command", "the search spaces; with a NAME, its domains, presets, metrics"),
}
RAY_COMMANDS = ("run", "resume")  # they start Ray: its environment is set before anything imports it


def skip_final_collection() -> None:
    """Python's last collection at exit walks every object left, and a command's process holds millions (torch,
    Ray, Optuna, pandas): 1.4 s after a sweep's last line on a 2-core machine, before the shell's prompt. Frozen,
    they are left to the end of the process. Registered as this module loads, it runs after the exit handlers of
    what loads later (W&B's, logging's); gensweep leaves nothing to a finalizer (its files are written and
    closed, its W&B runs finished and Ray stopped before a command returns)."""
    gc.freeze()


atexit.register(skip_final_collection)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(f"{message} (see --help)")


def main(argv: list[str] | None = None, prog: str = "gensweep") -> int:
    """`gensweep COMMAND ...`; the scripts (sweeps/run.py, leaderboard.py, ...) call it with their command first and
    their own name as `prog`. The one place where bad input becomes one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{prog}: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    shown = prog if prog != "gensweep" else f"gensweep {name}"
    try:
        args = parse(name, rest, shown)
        if name in RAY_COMMANDS:
            from sweeps.ray_env import configure_environment

            # A cluster address means Ray is not local.
            configure_environment(local=not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")))
        return module(name).command(args)
    except CommandFailed as e:
        print(f"{shown}: error: {e}", file=sys.stderr)
        return 1
    except (UsageError, ConfigError, ResourceUnavailable) as e:
        print(f"{shown}: error: {e}", file=sys.stderr)
        return 2


def parse(name: str, argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """A command's arguments (UsageError, one line, for bad ones), with `prog` and the `argv` they came from."""
    prog = prog or f"gensweep {name}"
    args = command_parser(name, prog).parse_args(argv)
    args.prog, args.argv = prog, list(argv)
    return args


def command_parser(name: str, prog: str) -> argparse.ArgumentParser:
    """The parser of one command, as the command line meets it: `gensweep resume NAME` is `run --resume NAME`."""
    p = OneLineParser(prog=prog, description=DESCRIPTIONS.get(name, COMMANDS[name][1]),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    if name == "resume":
        p.add_argument("resume", metavar="NAME", help="the sweep to continue (its folder under --storage-path)")
        run_flags(p, resuming=True)
        p.set_defaults(warm_start=None)
    else:
        FLAGS[name](p)
    return p


def module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(["usage: gensweep COMMAND [FLAGS]   (gensweep COMMAND --help: its flags)", "", "commands:",
                      *lines, "", (__doc__ or "").split("\n\n")[1].rstrip()])


def run_flags(p: argparse.ArgumentParser, resuming: bool = False) -> None:
    """The flags of `gensweep run` (and python sweeps/run.py); `gensweep resume NAME` takes the same but --resume."""
    from genmodels.config import DATASETS
    from sweeps import storage as sweep_storage
    from sweeps.spaces import SPACES

    spaces = "\n".join(textwrap.fill(s.description, 118, initial_indent=f"  {s.name:14} ", subsequent_indent=" " * 17)
                        for s in SPACES.values())
    p.epilog = f"search spaces:\n{spaces}"
    def space(name: str) -> str:
        if name not in SPACES:
            raise argparse.ArgumentTypeError(f"unknown space {name!r}; choose one of {', '.join(SPACES)}")
        return name

    p.add_argument("--space", default="vae", type=space,
                   help=f"search space: {', '.join(SPACES)} (default vae; see below)")
    p.add_argument("--preset", default="auto", choices=["auto", "smoke", "full"],
                   help="budgets: smoke (tiny, CPU, minutes), full (paper scale, GPU); auto = full if a GPU is "
                        "visible, else smoke")
    p.add_argument("--dataset", choices=DATASETS, help="override the preset's dataset (smoke: synthetic, "
                                                        "full: cifar10)")
    p.add_argument("--data-dir", help="folder holding (or to download) the datasets; default ~/.cache/gensweep/data")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the preset's)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials running at once (0 = as resources allow)")
    p.add_argument("--gpus-per-trial", type=_gpus_per_trial, default=None,
                   help="GPUs per trial, fractions allowed (0.25 = four trials share a GPU), or auto: measure one "
                        "trial's peak GPU memory and pack as many as fit (at most 8); default 1 if a GPU is "
                        "visible, else 0 (with --resume: the sweep's own)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1; with --resume: the sweep's own)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (host:port or 'auto'); default: $RAY_ADDRESS (set inside a Ray job), "
                        "else start Ray in-process")
    p.add_argument("--name", help="sweep name: W&B group and results folder (default SPACE-PRESET-TIME)")
    p.add_argument("--storage-path", help=f"results root, local path or s3:// / gs:// URI (default "
                                          f"{sweep_storage.default_storage()})")
    p.add_argument("--checkpoint-every-s", type=float, default=300.0,
                   help="seconds between a trial's checkpoints, besides those at ASHA's milestones and at its end "
                        "(a fault loses at most this much training; 0 = every epoch; default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default 0)")
    p.add_argument("--reproducible", action="store_true",
                   help="make --seed fix the whole sweep (configs, ASHA's decisions, the leaderboard) whatever the "
                        "timing: trials run in batches of --max-concurrent (default: as many as fit; give it to "
                        "rerun on another machine), each suggested and cut by ASHA from earlier batches only; a "
                        "batch's slots wait for its last trial (docs/sweeps.md, 'Reproducible sweeps')")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a hyperparameter or config value, e.g. --fixed beta=4 --fixed epochs=20 (repeatable; "
                        "section.field keys such as model.beta or train.epochs work too)")
    p.add_argument("--metric", help="ranking metric, where the space offers a choice (e.g. vqvae: fid or rfid; "
                                    "vae: test_bpd, test_iwae_bpd or fid)")
    p.add_argument("--objectives", metavar="M1,M2",
                   help="search several ranking metrics at once (e.g. fid,test_iwae_bpd): Optuna's multi-objective "
                        "TPE gets all, ASHA stops trials on the first, the leaderboard shows the Pareto front")
    p.add_argument("--seed-defaults", action="store_true",
                   help="pin every searched value to the seed project's own configuration (one trial by default), "
                        "to compare a sweep with it at the same preset; --fixed still overrides")
    p.add_argument("--no-rfid", action="store_true",
                   help="skip the reconstruction FID at the end of each trial (it doubles the Inception cost); "
                        "not with --metric rfid")
    p.add_argument("--fid-network", choices=["inception", "standin"],
                   help="FID features: inception (TF 2015-12-05, comparable to papers; the full preset's) or standin "
                        "(a small fixed random network, only for smoke runs; the smoke preset's)")
    p.add_argument("--fid-weights", help="Inception weights file for offline machines (make one with "
                                         "`python -m genmodels.fid_weights --out PATH`); implies --fid-network "
                                         "inception")
    p.add_argument("--final-fid-samples", type=int, help="samples for the FID at the end of each completed trial "
                                                          "(full preset: 10000; 50000 to compare with papers)")
    p.add_argument("--checkpoint", help="a trained checkpoint (state.pt) to evaluate instead of training, for "
                                        "sampling-only spaces such as ncsn-sampling")
    p.add_argument("--vgg-weights", help="VGG-19 weights file for the DFC perceptual loss on offline machines")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "gensweep"), help="W&B project")
    p.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (user or team)")
    p.add_argument("--no-artifacts", action="store_true", help="do not log final checkpoints as W&B artifacts")
    if resuming:  # a resumed sweep keeps its own history
        return
    p.add_argument("--dry-run", action="store_true",
                   help="check every flag, print the sweep's plan (trials, trials at once, ASHA's milestones and "
                        "expected survivors, the FID ladder, checkpoints) and a forecast of its device-hours and wall "
                        "time measured by a short run here (about a minute); start nothing, write nothing")
    p.add_argument("--no-measure", action="store_true", help="with --dry-run: the plan only, no measurement (seconds)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME (under --storage-path)")
    p.add_argument("--warm-start", metavar="NAME",
                   help="start TPE from what sweep NAME (same space and metric, under --storage-path) learned: at the "
                        "same budgets its trials are told to TPE; at others (smoke -> full) its best are rerun first")


def _gpus_per_trial(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def leaderboard_flags(p: argparse.ArgumentParser) -> None:
    sweep_flags(p)
    p.add_argument("--source", choices=["local", "wandb"], help="default: wandb when logged in, else local")
    p.add_argument("--importance", action="store_true",
                   help="also print Optuna's parameter importances for the ranking metric (from the local results)")


def report_flags(p: argparse.ArgumentParser) -> None:
    sweep_flags(p)
    p.add_argument("--no-wandb", action="store_true", help="only write the PNGs")


def spaces_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", nargs="?", metavar="NAME", help="one space: its domains, presets, metrics, seed defaults")


def sweep_flags(p: argparse.ArgumentParser) -> None:
    """The flags that name a finished sweep, shared by leaderboard, report and study."""
    from sweeps.storage import default_storage

    p.add_argument("--name", help="sweep name (default: the newest sweep under --storage-path)")
    p.add_argument("--storage-path", default=str(default_storage()),
                   help="results root used by run (local path or s3:// / gs:// URI)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "gensweep"))
    p.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"))


FLAGS = {"run": run_flags, "leaderboard": leaderboard_flags, "report": report_flags, "study": sweep_flags,
         "spaces": spaces_flags}
DESCRIPTIONS = {
    "run": "Run a hyperparameter sweep: Ray Tune + Optuna (TPE) + ASHA, one W&B run per trial, a leaderboard at the "
           "end.\n\n    gensweep run --space vae --preset smoke\n    gensweep run --space vae --fixed beta=4 "
           "--num-samples 1\n    gensweep resume NAME\n\nEvery value is checked before Ray starts: bad input gets "
           "one line and exit code 2.",
}


def script(name: str, argv: list[str] | None, prog: str) -> int:
    """A script's main (python sweeps/leaderboard.py ...): the command, through the one error path."""
    return main([name, *(sys.argv[1:] if argv is None else argv)], prog=prog)


def exit_with(code: int) -> None:
    """End the process with a command's exit code. After a refusal in a process that imported wandb (a failed W&B
    API call), at once: wandb's service process can be left unresponsive, and wandb's exit handlers then wait for it
    (seen in CI: minutes after the error line). The error is printed; nothing is left to clean up."""
    if code == 2 and "wandb" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `gensweep` console script."""
    try:
        exit_with(main())
    except BrokenPipeError:  # `gensweep spaces | head`: the reader left; no traceback (Python's own advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


if __name__ == "__main__":
    entry()
