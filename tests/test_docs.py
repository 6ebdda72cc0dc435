"""The README's links and the documentation site's sources: a renamed or moved page must
not leave a dead link behind (CI also builds the site with `mkdocs build --strict`)."""

import re

import yaml
from conftest import REPO


def _relative_links(markdown: str) -> list[str]:
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", markdown)
  return [link for link in links if "://" not in link and not link.startswith("mailto:")]


def test_every_relative_link_of_the_readme_exists():
  links = _relative_links((REPO / "README.md").read_text(encoding="utf-8"))
  assert len(links) >= 10  # the landing page points into docs/
  missing = [link for link in links if not (REPO / link).exists()]
  assert missing == []


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
  config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
  entries = [next(iter(item.values())) for item in config["nav"]]
  generated = {"configuration-reference.md", "benchmarks.md"}  # docs/hooks/generated_pages.py
  pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").glob("*.md")}
  assert set(entries) - generated == pages
  for page in pages:
    for link in _relative_links((REPO / "docs" / page).read_text(encoding="utf-8")):
      target = (REPO / "docs" / page).parent / link
      assert target.exists() or link in generated, f"{page}: {link}"


def test_the_citation_names_both_papers():
  citation = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
  assert citation["cff-version"] == "1.2.0"
  arxiv = {ref["identifiers"][0]["value"] for ref in citation["references"]}
  assert arxiv == {"arXiv:2409.04747", "arXiv:2510.01345"}
