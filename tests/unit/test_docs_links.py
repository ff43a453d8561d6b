"""Every relative link in README.md and docs/ (markdown links and images) names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses, mail, anchors in the same page
        if not (path.parent / target.split("#", 1)[0]).exists():
            bad.append(f"{path.relative_to(REPO)}: {target}")
    return bad


def test_every_link_points_to_a_file():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    assert [b for page in pages for b in broken_links(page)] == []
