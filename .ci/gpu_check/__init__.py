"""The GPU check (README.md): gpu_check.py runs the calls, harness.py what a call needs beyond bench/processes.py."""
