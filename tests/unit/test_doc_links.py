"""Every relative link in the repository's markdown leads somewhere.

The README, docs/*.md, bench/README.md and deploy/README.md point at each other and at files of the
repository; a file moved or a section renamed leaves a link that leads nowhere. Each relative
link must name a file or directory that exists, and its ``#anchor``, when it has one into a
markdown file, a heading of that file (as GitHub makes anchors of headings).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are no links."""
    return CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = CODE.sub(lambda m: m.group(0).strip("`"), heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


def broken(path: Path) -> list[str]:
    out = []
    for target in relative_links(path):
        file, _, fragment = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            out.append(f"{target}: no such file")
        elif fragment and where.suffix == ".md" and fragment not in anchors(where):
            out.append(f"{target}: no heading #{fragment} in {where.name}")
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.exists()
    assert broken(path) == []


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nowhere)\n"
                   "`[in code](missing.md)` [web](https://example.org/x.md)\n", encoding="utf-8")
    problems = broken(doc)
    assert len(problems) == 2
    assert problems[0].startswith("missing.md") and problems[1].startswith("there.md#nowhere")


def test_anchors_follow_github() -> None:
    assert anchor("12.1 Metrics") == "121-metrics"
    assert anchor("3. Error codes") == "3-error-codes"
    assert anchor("Testing the stack: `deploy/test-deploy.sh`") == "testing-the-stack-deploytest-deploysh"
