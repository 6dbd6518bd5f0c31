"""Whether W&B has credentials, as W&B itself finds them: WANDB_API_KEY (or an identity token file), the api_key
of a W&B settings file, or `wandb login`'s netrc entry for the configured host (WANDB_BASE_URL). No Ray in here:
the CLIs ask before Ray starts, and leaderboard.py and report.py never start it."""
from __future__ import annotations


def is_logged_in() -> bool:
    """True when W&B has credentials for its host. Offline: nothing is verified with the server, and no prompt.

    False too in offline or disabled mode (WANDB_MODE), where W&B uses none. Call it before any `wandb.init` of
    this process: it sets W&B up (silent, so no account lookup to print "logged in as") and tears it down again,
    so that W&B reads the environment anew on its next use (run.py and report.py set WANDB_MODE from the answer).
    """
    import wandb

    wandb.setup(wandb.Settings(silent=True))
    try:
        return wandb.login(prompt=False, verify=False)
    except wandb.errors.AuthenticationError:  # a malformed key, or both a key and a token file
        return False
    finally:
        wandb.teardown()
