"""Ray's and Tune's environment for a sweep: set before anything imports Ray (some of it is read at import)."""
from __future__ import annotations

import os
import sys


def configure_environment(local: bool) -> None:
    """Ray and Tune settings, before Ray is imported by anything."""
    # The classic reporter prints one compact table with the columns we choose; the new engine prints every metric.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # FID is reported only at ASHA milestones (the fidelity ladder) and a diverged trial's last report has no ranking
    # metric at all: both are intended, so Tune must not insist on the metric in every result.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Every trial checkpoints every epoch by design (resumable sweeps); Tune's "snapshotting often" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not sys.stdout.isatty():  # Ray colours the lines it forwards from trials: no escape codes in log files
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if local:
        # Ray turns token authentication on for a new local cluster and warns that it did, on every sweep; asking
        # for it explicitly keeps it on, without the warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # Local Ray on one machine: makes Ray's node-IP lookup answer loopback instead of the external address
        # (read when ray is first imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
