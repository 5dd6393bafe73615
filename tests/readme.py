"""The README's commands, parsed once, and a ledger of the ones a test really ran.

Tests take a command from here (never a copy of its text), run it, and record it. When the
whole scenario tier has run, conftest checks that every command of the README was recorded:
a command no test runs fails the run, whatever section it is in.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
README_PORT = 8000  # the port the README's commands name; tests substitute a free one


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end != -1 else None]


def blocks_in(title: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(title), flags=re.S)


def titles() -> list[str]:
    return re.findall(r"^## .+$", README, flags=re.M)


def commands_with_answers(block: str) -> list[tuple[str, str | None]]:
    """Each command line of a bash block, with the `# {...}` answer shown under it, if any."""
    pairs: list[tuple[str, str | None]] = []
    for line in block.splitlines():
        if line.startswith("# ") and pairs:
            pairs[-1] = (pairs[-1][0], line[2:])
        elif line.strip() and not line.startswith("#"):
            pairs.append((line, None))
    return pairs


def every_command() -> set[str]:
    """Each bash command line and each Python block of the README."""
    found: set[str] = set()
    for title in titles():
        for block in blocks_in(title, "bash"):
            found |= {command for command, _ in commands_with_answers(block)}
        found |= set(blocks_in(title, "python"))
    return found


def command_starting(prefix: str) -> str:
    """The one README command line that starts with `prefix`."""
    (found,) = [c for c in every_command() if c.startswith(prefix)]
    return found


def on_port(text: str, port: int) -> str:
    """A command or block aimed at `port` instead of the README's 8000."""
    return text.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}")


def _ledger() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "readme-commands-run.txt"


def record(command: str) -> None:
    """Notes that a test ran this README command (as written there, before any substitution)."""
    assert command in every_command(), f"not a README command: {command!r}"
    with _ledger().open("a") as ledger:
        ledger.write(json.dumps(command) + "\n")


def recorded() -> set[str]:
    if not _ledger().is_file():
        return set()
    return {json.loads(line) for line in _ledger().read_text().splitlines()}
