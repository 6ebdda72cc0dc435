"""mkdocs hook: pages made from the code and the repository at build time, so they cannot
drift from it.

- ``configuration-reference.md``: every shipped config with every field, what it does and
  the code's comments on it (``emim.config_doc.describe``, as ``--print_config`` prints it);
- ``benchmarks.md``: the repository's BENCHMARKS.md (its figure links rewritten to the
  site's ``figures/``).
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

REPO = pathlib.Path(__file__).resolve().parents[2]


def config_reference() -> str:
  from emim.config_base import load_config_file
  from emim.config_doc import describe

  parts = ["# Configuration reference\n",
           "Every shipped config, resolved, with every field, what it does and the comments the "
           "code gives it: the same text as `python -m emim.main --config=FILE --print_config`, "
           "generated from the code when this site is built. A variant (`FILE:byol,runlocal`) "
           "or an override (`--config.FIELD=VALUE`) changes fields as `--print_config` shows.\n"]
  for path in sorted((REPO / "configs").glob("*.py")):
    config = load_config_file(str(path), None)
    name = f"configs/{path.name}"
    parts += [f"## `{name}`\n", "```", describe(config, path, title=name).rstrip(), "```\n"]
  return "\n".join(parts)


def benchmarks() -> str:
  text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
  return text.replace("](docs/figures/", "](figures/")


def on_files(files, config):
  for name, content in (("configuration-reference.md", config_reference()), ("benchmarks.md", benchmarks())):
    files.append(File.generated(config, name, content=content))
  return files
