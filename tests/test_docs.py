"""Every command line README.md and docs/ show parses with the real command's parser, so the docs cannot drift from
the flags; and README stays an entrance."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sweeps import cli
from sweeps.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"sweeps/run.py": "run", "sweeps/leaderboard.py": "leaderboard", "sweeps/report.py": "report",
           "sweeps/study.py": "study"}


def command_lines(page: Path) -> list[str]:
    """The commands of its ```bash blocks (continued lines joined, and the page's VAR="..." assignments
    substituted as the shell would, ${VAR/old/new} included) and its inline `gensweep ...` / `python ...` code."""
    text = page.read_text()
    lines, variables = [], {}

    def expand(line: str) -> str:
        def value(m: re.Match) -> str:
            text = variables.get(m[1] or m[2], m[0])
            return text.replace(m[3], m[4], 1) if m[3] else text

        return re.sub(r"\$(?:([A-Z_]+)|\{([A-Z_]+)(?:/([^/}]*)/([^}]*))?\})", value, line)

    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            assignment = re.fullmatch(r'([A-Z_]+)="([^"]*)"', line)
            if assignment:
                variables[assignment[1]] = expand(assignment[2])
            elif line and not line.startswith("#"):
                lines.append(expand(line))
    return lines + re.findall(r"`((?:gensweep|python3?|\.venv/bin/python) [^`]*)`", text)


def parse(words: list[str]) -> bool:
    """Parse one command's words with its parser; False for a command that is not gensweep's."""
    words = [w for w in words if "=" not in w or w.startswith("-") or words.index(w) > 0]  # VAR=value prefixes
    while words and re.fullmatch(r"(\S*/)?python3?|\S*/?bin/python3?", words[0]):
        words = words[1:]
    if not words:
        return False
    if words[0].endswith("gensweep"):
        if len(words) == 1 or words[1] in ("-h", "--help"):
            return True
        cli.parse(words[1], words[2:])
        return True
    script = next((name for path, name in SCRIPTS.items() if words[0].endswith(path)), None)
    if script:
        cli.parse(script, words[1:])
        return True
    if words[:2] == ["-m", "genmodels.train"]:
        from genmodels.train import parse_args

        parse_args(words[2:])
        return True
    if words[:2] == ["-m", "bench"] and len(words) > 2 and words[2] not in ("-h", "--help"):
        import bench

        bench.parse(words[2:])
        return True
    return False


CASES = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in command_lines(page)]


@pytest.mark.parametrize("page,line", CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_every_command_shown_parses(page, line, capsys):
    assert not re.search(r"<[A-Za-z_]+>", line), "a placeholder in angle brackets: give a concrete example"
    for part in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
        try:
            parse(shlex.split(part, comments=True))
        except UsageError as e:
            pytest.fail(f"{page}: {part!r}: {e}")
        except SystemExit as e:  # argparse's --help, or genmodels.train's own refusal
            assert e.code == 0, f"{page}: {part!r}: {capsys.readouterr().err.strip()}"


def test_the_docs_show_the_main_commands():
    shown = " ".join(line for _, line in CASES)
    for command in ("gensweep run", "gensweep resume", "gensweep leaderboard", "gensweep report", "gensweep spaces",
                    "python sweeps/run.py --space ncsn", "-m genmodels.train"):
        assert command in shown, command


def test_a_wrong_flag_in_a_docs_line_would_fail():
    with pytest.raises(UsageError, match="--trials"):
        parse(shlex.split("gensweep run --space vae --trials 4"))
    with pytest.raises(UsageError, match="unknown space"):
        parse(shlex.split("python sweeps/run.py --space nope"))


def test_readme_is_an_entrance():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16 * 1024
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / page).exists(), page
