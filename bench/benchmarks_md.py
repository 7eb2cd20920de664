"""What every bench script shares: writing its own section of BENCHMARKS.md, the commit it measured."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def _number(title: str) -> int:
    m = re.match(r"## (\d+)\.", title)
    return int(m.group(1)) if m else 10**6


def write_section(section: str, path: Path = BENCHMARKS) -> None:
    """Replace the section whose first line (``## N. title``) ``section`` starts with; a new section goes before
    the first one with a higher number. Other sections are left untouched."""
    title = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        path.write_text(pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n")
        return
    later = [m.start() for m in re.finditer(r"^## .*$", text, re.M) if _number(m.group(0)) > _number(title)]
    if later:
        text = text[:later[0]] + section.rstrip("\n") + "\n\n" + text[later[0]:]
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)


def publish(section: str, *, write: bool) -> None:
    """Print the section; with ``write``, also put it into BENCHMARKS.md."""
    print(section)
    if write:
        write_section(section)
        print(f"written to {BENCHMARKS}")


def git_commit() -> str:
    """The checkout's short commit, "+changes" when tracked files differ from it; "?" without git."""
    here = str(Path(__file__).parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return (head.stdout.strip() or "?") + ("+changes" if dirty else "")
