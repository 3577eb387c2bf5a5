"""The README and the guides stay true to the tree: every relative link and `#anchor` resolves,
the layout table names every module (and only modules that exist), and users read "the book"
or "the reference", never the word the project used internally for it."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#+\s+(.+)$", text, flags=re.M)}


def _links(path: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+://", link)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for link in _links(doc):
        target, _, anchor = link.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.exists():
            broken.append(f"{link}: no {file.relative_to(ROOT) if ROOT in file.parents else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.name}")
    assert not broken, broken
    assert len(DOCS) >= 7  # the README and its guides are all read


def test_a_broken_link_is_found(tmp_path):
    # Positive control for the link check.
    doc = tmp_path / "a.md"
    doc.write_text("# Real heading\n[ok](#real-heading) [bad](#nothing) [gone](missing.md)\n")
    assert _anchors(doc) == {"real-heading"}
    broken = [link for link in _links(doc)
              if (link.startswith("#") and link[1:] not in _anchors(doc))
              or (not link.startswith("#") and not (tmp_path / link).exists())]
    assert broken == ["#nothing", "missing.md"]


def test_the_layout_names_every_module():
    layout = (ROOT / "docs" / "development.md").read_text()
    named = set(re.findall(r"^\| `(jaxgpt/[\w/]+\.py)` \|", layout, flags=re.M))
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "jaxgpt").rglob("*.py")}
    # A folder's __init__.py says what the folder holds; the table lists the modules.
    faces = {p for p in package if p.endswith("/__init__.py") and p != "jaxgpt/__init__.py"}
    assert named - package == set(), "the layout names modules that do not exist"
    assert package - faces - named == set(), "modules missing from docs/development.md"


def test_readme_is_a_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160


def test_users_read_the_book_and_the_reference():
    word = "se" + "eds"  # the internal word, not written out so this file passes its own check
    files = DOCS + sorted((ROOT / "jaxgpt").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    found = [str(f.relative_to(ROOT)) for f in files
             if re.search(rf"\b{word}\b", f.read_text(errors="replace"))]
    assert not found, found
