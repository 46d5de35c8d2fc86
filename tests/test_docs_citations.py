"""Citations of the docs pages hold: every "docs/<page>.md §N" in the repository names a page that
exists and a section it has, and the README links every page under docs/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# "docs/protocol.md §7.3", and the sections listed after it: "§9, §10", "§2-§9", "§4.1 and §6".
CITATION = re.compile(r"docs/(\w+)\.md((?:(?:,| and|-|\u2013)? ?§\d+(?:\.\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".json", ".sh", ".ts", ".js", ".html", ".toml"}


def _sections(page: str) -> set[str]:
    return set(HEADING.findall((DOCS / f"{page}.md").read_text(encoding="utf-8")))


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if Path(name).suffix in TEXT_SUFFIXES]


def test_every_section_citation_resolves() -> None:
    seen = 0
    wrong = []
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for found in CITATION.finditer(text):
            page = found.group(1)
            where = f"{path.relative_to(ROOT)}: {found.group(0)!r}"
            if not (DOCS / f"{page}.md").is_file():
                wrong.append(f"{where}: no such page")
                continue
            sections = _sections(page)
            for number in SECTION.findall(found.group(2)):
                seen += 1
                if number not in sections:
                    wrong.append(f"{where}: no section {number}")
    assert seen > 50, "the citation pattern finds nothing: it no longer matches how code cites"
    assert wrong == []


def test_the_readme_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(docs/(\w+\.md)\)", readme))
    pages = {path.name for path in DOCS.glob("*.md")}
    assert sorted(pages - linked) == []


def test_sections_a_page_cites_of_itself_exist() -> None:
    wrong = []
    for path in DOCS.glob("*.md"):
        own = CITATION.sub("", path.read_text(encoding="utf-8"))
        sections = _sections(path.stem)
        wrong += [f"{path.name}: §{n}" for n in SECTION.findall(own) if n not in sections]
    assert wrong == []
