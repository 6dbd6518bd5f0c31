"""What a sweep is, in one typed object: `SweepSpec`, the only reader and writer of `<sweep>/gensweep_sweep.json`.

    spec = SweepSpec.from_args(args, storage)   # a new sweep from the command line, every value checked
    spec.save(storage)                          # what --resume, the leaderboard and the report read back
    spec = SweepSpec.load(storage, name)        # no argv re-parsed: the file is the sweep

The CLI, the Tuner, ASHA, the FID ladder, the leaderboard and the report all read this object; ASHA's rungs come from
its `asha` settings and nowhere else. Importing this module imports no Ray: `from_args` alone needs the search
spaces (Ray Tune domains), and imports them when called.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from genmodels.registry import model_class
from sweeps import storage as sweep_storage
from sweeps.budgets import ASHASettings, FIDSettings, require
from sweeps.errors import UsageError

if TYPE_CHECKING:
    import argparse

__all__ = ["ASHASettings", "FIDSettings", "SWEEP_FILE", "SweepSpec", "UsageError"]

FORMAT_VERSION = 2  # 1: the untyped files written before SweepSpec (no "version" key); load() still reads them
SWEEP_FILE = "gensweep_sweep.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    space: str  # a key of sweeps.spaces.SPACES
    preset: str
    model_name: str
    constants: Mapping[str, Any]  # the param space's fixed values, flat section.field keys (prepared values included)
    searched: tuple[str, ...]  # the param space's searched keys
    objectives: tuple[str, ...]  # what Optuna optimises; ASHA stops and the leaderboard ranks on the first
    mode: str
    asha: ASHASettings
    fid: FIDSettings
    resources: Mapping[str, Any]  # per trial: {"cpu": n, "gpu": n or "auto" until measured}
    num_samples: int
    max_concurrent: int = 0  # 0: as many as resources allow
    seed: int = 0
    # --reproducible: batches of max_concurrent trials (sweeps/batched_asha.py); the driver sets max_concurrent to
    # the trials that fit when it is 0, before the sweep is saved
    reproducible: bool = False
    checkpoint_every_s: float = 300.0  # between milestones; a fault loses at most this much training
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # --fixed, as given (for the record)
    # --warm-start: {"sweep": name, "told": trials told to TPE, "rerun": [searched values rerun first]}
    warm_start: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    argv: tuple[str, ...] = ()
    # A new sweep's Ray Tune search domains. Tune keeps them in its own saved state, so they are not written here,
    # and a loaded spec has none (a resumed Tuner gets them back from Tune).
    domains: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for key in ("constants", "resources", "fixed", "warm_start", "domains"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))
        for key in ("searched", "objectives", "argv"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        _check_name(self.name)
        require(self.version == FORMAT_VERSION, f"sweep format version must be {FORMAT_VERSION}, got {self.version!r}")
        require(bool(self.space), f"space must be named, got {self.space!r}")
        require(self.preset in ("smoke", "full"), f"preset must be smoke or full, got {self.preset!r}")
        require(self.constants.get("model_name") == self.model_name,
                 f"constants must hold model_name={self.model_name!r}, got {self.constants.get('model_name')!r}")
        require(not set(self.searched) & set(self.constants),
                 f"a key is both searched and fixed: {sorted(set(self.searched) & set(self.constants))}")
        require(len(self.objectives) > 0 and len(set(self.objectives)) == len(self.objectives),
                 f"objectives must be one or more different metrics, got {list(self.objectives)}")
        require(self.mode in MODES, f"mode must be min or max, got {self.mode!r}")
        require(not self.warm_start or {"sweep", "told", "rerun"} <= set(self.warm_start),
                f"warm_start must name the sweep and what it told and reran, got {dict(self.warm_start)!r}")
        require(self.asha.max_t == self.constants.get("train.epochs"),
                 f"asha.max_t must be the trials' epochs ({self.constants.get('train.epochs')}), "
                 f"got {self.asha.max_t}")
        require(_number(self.resources.get("cpu")) and self.resources["cpu"] > 0,
                 f"--cpus-per-trial must be more than 0, got {self.resources.get('cpu')!r}")
        gpu = self.resources.get("gpu")
        require(gpu == "auto" or (_number(gpu) and gpu >= 0),
                 f"--gpus-per-trial must be a number >= 0 or auto, got {gpu!r}")
        # Ray shares a GPU between trials (a fraction) but gives a trial more than one only whole.
        require(gpu == "auto" or gpu <= 1 or float(gpu).is_integer(),
                 f"--gpus-per-trial {gpu:g}: more than one GPU per trial must be a whole number (Ray cannot give a "
                 f"trial part of a second GPU); pass {math.floor(gpu)} or {math.ceil(gpu)}" if _number(gpu) else "")
        require(isinstance(self.num_samples, int) and self.num_samples >= 1,
                 f"--num-samples must be at least 1, got {self.num_samples!r}")
        require(isinstance(self.max_concurrent, int) and self.max_concurrent >= 0,
                 f"--max-concurrent must not be negative, got {self.max_concurrent!r}")
        require(isinstance(self.seed, int) and self.seed >= 0, f"--seed must not be negative, got {self.seed!r}")
        require(isinstance(self.reproducible, bool), f"reproducible must be true or false, got {self.reproducible!r}")
        require(_number(self.checkpoint_every_s) and self.checkpoint_every_s >= 0,
                f"--checkpoint-every-s must be a number >= 0, got {self.checkpoint_every_s!r}")

    @property
    def metric(self) -> str:
        return self.objectives[0]

    @property
    def max_epochs(self) -> int:
        return self.asha.max_t

    @property
    def milestones(self) -> tuple[int, ...]:
        return self.asha.milestones

    @property
    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param space: the constants and, for a new sweep, the search domains."""
        return {**self.constants, **self.domains}

    def replace(self, **changes: Any) -> SweepSpec:
        """A copy with some fields changed (checked like any other value; domains kept)."""
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------------------------------------- storage

    def to_json(self) -> dict[str, Any]:
        require(self.resources["gpu"] != "auto", "--gpus-per-trial auto must be measured before the sweep is saved")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "domains"}
        out.update(asha=dataclasses.asdict(self.asha), fid=dataclasses.asdict(self.fid))
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in out.items()}

    @classmethod
    def from_json(cls, info: dict[str, Any], name: str) -> SweepSpec:
        info = dict(info)
        if "version" not in info:
            info = _upgrade_v1(info, name)
        require(info["version"] == FORMAT_VERSION,
                 f"{SWEEP_FILE} of sweep {name!r} has format version {info['version']}, and this gensweep reads "
                 f"{FORMAT_VERSION}: run it with the gensweep that wrote it")
        return cls(**{**info, "asha": ASHASettings(**info["asha"]), "fid": FIDSettings(**info["fid"])})

    def save(self, storage: str) -> None:
        sweep_storage.write_text(sweep_storage.join(storage, self.name, SWEEP_FILE),
                                 json.dumps(self.to_json(), indent=1, default=str))

    @classmethod
    def load(cls, storage: str, name: str) -> SweepSpec:
        """The saved sweep; UsageError (one line) when there is none, or its file is damaged."""
        text = sweep_storage.read_text(sweep_storage.join(storage, name, SWEEP_FILE))
        if text is None:
            raise UsageError(f"no sweep named {name!r} under {storage}; pass --storage-path if it lives elsewhere")
        try:
            info = json.loads(text)
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, not an object")
            if "space" not in info and "version" not in info:
                raise KeyError("space")  # an empty or foreign object: damaged, not a sweep of another gensweep
            return cls.from_json(info, name)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{sweep_storage.join(storage, name, SWEEP_FILE)} is damaged ({type(e).__name__}: "
                             f"{e}); its trials are still in that folder, but gensweep resume, leaderboard and "
                             f"report need this file") from None

    @staticmethod
    def exists(storage: str, name: str) -> bool:
        return sweep_storage.read_text(sweep_storage.join(storage, name, SWEEP_FILE)) is not None

    # -------------------------------------------------------------------------------------- command line

    @classmethod
    def from_args(cls, args: argparse.Namespace, storage: str) -> SweepSpec:
        """A new sweep from sweeps.cli's arguments: name, space, preset, param space (every value checked), ranking
        metrics, FID settings, resources. UsageError (one line) for anything wrong, before Ray starts."""
        import torch

        from sweeps import param_space as ps  # Ray Tune's search domains: the one place this module needs Ray
        from sweeps.spaces import FID_SETTINGS, SPACES

        space = SPACES[args.space]
        preset = args.preset if args.preset != "auto" else ("full" if torch.cuda.is_available() else "smoke")
        name = args.name if args.name is not None else f"{space.name}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        _check_name(name)  # before the name is used as a path
        require(not cls.exists(storage, name), f"a sweep named {name!r} already exists under {storage}; continue "
                                                f"it with --resume {name}, or start a new one with another --name")
        fixed = ps.parse_fixed(args.fixed)
        param_space = ps.build_param_space(space, preset, {**(space.seed_defaults if args.seed_defaults else {}),
                                                           **fixed}, ps.cli_overrides(space, args), args.seed)
        _refuse_unused(param_space, fixed, space.name)
        objectives = tuple(_metric(space, m.strip(), "--objectives") for m in args.objectives.split(",")) \
            if args.objectives else ()
        require(not objectives or (len(set(objectives)) >= 2 and not args.metric),
                 "--objectives takes two or more different metrics, and replaces --metric (the first objective is "
                 "the one ASHA stops on)")
        objectives = objectives or (_metric(space, args.metric),)
        model = model_class(space.model)  # its default final_eval_k counts too (vae's full preset names none)
        if hasattr(model.Config, "final_eval_k") and not model.ranks_on_full_evaluation(objectives) and not any(
                k.split(".")[-1] == "final_eval_k" for k in fixed):
            # The end-of-trial bound at final_eval_k (1000) costs about a third of a ResNet-VAE or DFC trial that
            # runs to its end: run where the bound ranks the trials, or where --fixed final_eval_k asks for it
            # (docs/sweeps.md, "What a sweep does").
            param_space["model.final_eval_k"] = 0
        require(not (args.no_rfid and "rfid" in objectives),
                 f"--no-rfid leaves nothing to rank by with {'--objectives' if args.objectives else '--metric'} "
                 f"rfid; drop one of them")
        p = space.presets[preset]
        defaults = p.fid or FID_SETTINGS[preset]
        fid = dataclasses.replace(defaults, network="inception" if args.fid_weights else (args.fid_network or
                                                                                          defaults.network),
                                  weights_path=ps.absolute(args.fid_weights),
                                  final=_given(args.final_fid_samples, defaults.final), rfid=not args.no_rfid)
        epochs = int(param_space["train.epochs"])
        gpus = _given(args.gpus_per_trial, float(torch.cuda.is_available()))
        # nothing is left to search with --seed-defaults: one trial unless asked for more
        num_samples = _given(args.num_samples, 1 if args.seed_defaults else p.num_samples)
        return cls(name=name, space=space.name, preset=preset, model_name=space.model,
                   constants=ps.constants(param_space), searched=tuple(ps.searched_keys(param_space)),
                   domains={k: param_space[k] for k in ps.searched_keys(param_space)}, objectives=objectives,
                   mode=space.mode, asha=ASHASettings(epochs, min(p.grace_period, epochs), p.reduction_factor),
                   fid=fid, resources={"cpu": _given(args.cpus_per_trial, 1.0), "gpu": gpus}, num_samples=num_samples,
                   max_concurrent=args.max_concurrent, seed=args.seed, reproducible=args.reproducible,
                   checkpoint_every_s=args.checkpoint_every_s,
                   fixed=fixed, argv=tuple(args.argv))


def _check_name(name: Any) -> None:
    require(isinstance(name, str) and bool(SAFE_NAME.fullmatch(name)),
             f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting with '.' or '-'), "
             f"so the printed --resume and wandb sync commands can be pasted as they are")


def _refuse_unused(param_space: dict[str, Any], fixed: dict[str, Any], space: str) -> None:
    """A --fixed value the trial would ignore (every value pinned must change what the trial computes)."""
    from genmodels.registry import qualified, trial_config
    from sweeps import param_space as ps

    unused = trial_config(ps.representative(param_space)).model.unused()
    for key, qualified_key in zip(fixed, qualified(param_space["model_name"], fixed)):
        name = qualified_key.partition(".")[2]
        require(not (qualified_key.startswith("model.") and name in unused),
                f"--fixed {key}={fixed[key]!r}: space {space!r} does not use {name} ({unused.get(name)}); drop it")


def _metric(space, requested: str | None, flag: str = "--metric") -> str:
    allowed = space.metrics or (space.metric,)
    require(not requested or requested in allowed,
            f"{flag} {requested} is not offered by space {space.name!r}; choose {', '.join(allowed)}")
    return requested or space.metric


def _given(value: Any, default: Any) -> Any:
    """A flag's value, or the default when the flag was not passed (0 is a value, and gets checked)."""
    return default if value is None else value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _upgrade_v1(info: dict[str, Any], name: str) -> dict[str, Any]:
    """A file written before SweepSpec (no version): the same facts under other keys, without ASHA's settings,
    which come from the space's preset (they have not changed since; this imports the spaces, so Ray)."""
    from sweeps.spaces import SPACES

    require(info.get("space") in SPACES, f"{SWEEP_FILE} of sweep {name!r} names no known space "
                                          f"({info.get('space')!r}); it was written by another gensweep")
    preset = SPACES[info["space"]].presets[info["preset"]]
    constants = info["param_space_constants"]
    epochs = int(info["max_epochs"])
    resources = info.get("resources") or {"cpu": 1.0, "gpu": 0.0}
    return {"version": FORMAT_VERSION, "name": name, "space": info["space"], "preset": info["preset"],
            "model_name": constants["model_name"], "constants": constants, "searched": info["searched"],
            "objectives": info.get("objectives") or [info["metric"]], "mode": info["mode"],
            "asha": {"max_t": epochs, "grace_period": min(preset.grace_period, epochs),
                     "reduction_factor": preset.reduction_factor},
            "fid": {k: v for k, v in info["fid"].items()
                    if k in {f.name for f in dataclasses.fields(FIDSettings)}},
            "resources": resources, "num_samples": preset.num_samples, "seed": int(constants.get("train.seed", 0)),
            "fixed": info.get("fixed", {}), "argv": info.get("argv", [])}
