"""MkDocs hooks of fastbyol's documentation site (``docs/mkdocs.yml``): the reference pages are generated from the
code at build time, never written twice, and images the pages take from the repository (the benchmark plots under
``benchmarks/results/``) are copied into the site.

A page asks for a generated part with a marker line:

- ``<!-- fastbyol:config -->``: every config key, section by section, with its type, default and docstring
  (``fastbyol.config_parse.config_keys``: the same list ``fastbyol train --help`` prints);
- ``<!-- fastbyol:presets -->``: every named preset, its one-line description and the keys it sets;
- ``<!-- fastbyol:cli -->``: every command's ``--help``, from the real parser (``fastbyol.cli.command_helps``);
- ``<!-- fastbyol:results -->``: the files under ``benchmarks/results/``, by date and machine.

A link in a page to a file of the repository outside ``docs/`` (written relative to the page, so that it also works
on the repository's web view) is rewritten to a copy of the file under ``_repo/`` in the site.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
DOCS = Path(__file__).resolve().parent / "pages"
COPIED = "_repo"
"""Where the repository's files that pages link to go in the site."""
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)(#[^)]*)?\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _escape(text: str) -> str:
    """Markdown-safe text: ``<``, ``>`` and ``|`` escaped outside code spans."""
    out, last = [], 0
    for m in CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[last:m.start()]))
        out.append(m.group(0).replace("|", "\\|"))
        last = m.end()
    out.append(_escape_plain(text[last:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def config_reference() -> str:
    """A section per config section, a heading per key (so each has its own anchor: ``#optimbase_lr``)."""
    from fastbyol.config_parse import config_keys

    lines: list[str] = []
    section = None
    for k in config_keys():
        name = k.key.split(".")[0] if "." in k.key else "top level"
        if name != section:
            section = name
            lines += ["", f"## `{name}`" if name != "top level" else "## Top level", ""]
        resumable = " May change on resume." if k.resumable else ""
        lines += [f"### `{k.key}`", "", f"`{k.type}`, default `{k.default!r}`.{resumable}", "", _escape(k.doc), ""]
    return "\n".join(lines) + "\n"


def presets_reference() -> str:
    from fastbyol.presets import PRESET_DESCRIPTIONS, PRESETS, preset_names

    lines = ["| preset | what it is | what it sets |", "|---|---|---|"]
    for name in preset_names():
        sets = json.dumps(PRESETS[name], sort_keys=False)
        lines.append(f"| `{name}` | {_escape(PRESET_DESCRIPTIONS[name])} | `{sets}` |")
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    from fastbyol.cli import command_helps

    parts = []
    for path, text in command_helps().items():
        title = "fastbyol " + " ".join(path) if path else "fastbyol"
        parts += [f"## `{title}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


def results_reference() -> str:
    """The committed result files, newest date first: date, machine and what each measured (from its name)."""
    lines = ["| date | machine | result | files |", "|---|---|---|---|"]
    stems: dict[str, list[str]] = {}
    for path in sorted((REPO / "benchmarks" / "results").iterdir()):
        if path.is_file():
            stems.setdefault(path.name.split(".", 1)[0], []).append(path.name)
    for stem in sorted(stems, reverse=True):
        m = re.match(r"(\d{4}-\d{2}-\d{2})-([^-]+)-(.*)", stem)
        date, machine, what = m.groups() if m else ("", "", stem)
        files = ", ".join(f"`{name}`" for name in stems[stem])
        lines.append(f"| {date} | {machine} | {what} | {files} |")
    return "\n".join(lines) + "\n"


GENERATED = {"config": config_reference, "presets": presets_reference, "cli": cli_reference,
             "results": results_reference}


def _repo_links(markdown: str, page_path: Path) -> list[tuple[str, Path]]:
    """(link as written, the repository file it names) for each relative link that leaves ``docs/pages``."""
    found = []
    for m in LINK.finditer(markdown):
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            continue
        resolved = (page_path.parent / target).resolve()
        if not resolved.is_relative_to(DOCS) and resolved.is_relative_to(REPO):
            found.append((target, resolved))
    return found


def on_files(files: Files, config: Any) -> Files:
    """Copy each repository file a page links to into the site, under ``_repo/``."""
    added: set[Path] = set()
    for page in DOCS.rglob("*.md"):
        for _, path in _repo_links(page.read_text(), page):
            if path.is_file() and path not in added:
                added.add(path)
                uri = f"{COPIED}/{path.relative_to(REPO).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    for name, build in GENERATED.items():
        marker = f"<!-- fastbyol:{name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    src = DOCS / page.file.src_uri
    for target, path in _repo_links(markdown, src):
        uri = f"{COPIED}/{path.relative_to(REPO).as_posix()}"
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri))
        markdown = markdown.replace(f"]({target}", f"]({relative}")
    return markdown
