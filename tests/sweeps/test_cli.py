"""The command line's process: what it does as it exits."""
from __future__ import annotations

from conftest import run_cli

LEFT_IN_A_CYCLE = """
class Cycle:
    def __del__(self):
        print("collected at exit", flush=True)

c = Cycle()
c.me = c
del c
"""


def test_a_commands_process_skips_pythons_last_collection_at_exit():
    # that collection walks every object a command's process holds (seconds after a sweep's last line): with the
    # CLI loaded, an object left in a cycle is not collected at exit; without it, it is (the control)
    plain = run_cli(["-c", LEFT_IN_A_CYCLE])
    with_cli = run_cli(["-c", "import sweeps.cli\n" + LEFT_IN_A_CYCLE])
    assert plain.returncode == 0 and "collected at exit" in plain.stdout, plain.stderr
    assert with_cli.returncode == 0 and "collected at exit" not in with_cli.stdout, with_cli.stderr
