"""The documentation site (issue 32): ``bash scripts/docs.sh`` builds it offline with warnings as errors; its
generated config reference lists every key ``fastbyol train --help`` lists; every ``fastbyol`` command shown in
the docs and the README parses with the real CLI (a ``train`` command's preset and overrides build a valid
config); and the built index, a how-to page and the config reference render in headless Chromium without a
console error, a screenshot of each written to the test's folder."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import chromium

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The test's virtual environment: its mkdocs and fastbyol."""
PAGES = ROOT / "docs" / "pages"
DOCUMENTS = [ROOT / "README.md", *sorted(PAGES.rglob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), "--site-dir", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FASTBYOL_VENV": str(BIN.parent)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_site_builds_strict_with_every_page_in_its_navigation(site: Path) -> None:
    pages = {p.relative_to(PAGES).with_suffix("").as_posix() for p in PAGES.rglob("*.md")}
    built = {p.parent.relative_to(site).as_posix() for p in site.rglob("index.html")} - {"."}
    assert pages - {"index"} <= built, sorted(pages - built)
    assert (site / "_repo" / "benchmarks" / "results").is_dir()  # the curve's plot, copied from the repository


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The build is the check: a page with a link to nothing stops it (the same for a page left out of the nav)."""
    import shutil

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("site"))
    (docs / "pages" / "development.md").write_text("# Development\n\nSee [the missing page](missing.md).\n")
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--config-file",
                           str(docs / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode != 0 and "missing.md" in done.stderr


def test_the_config_reference_lists_every_key_of_train_help(site: Path) -> None:
    help_text = subprocess.run([str(BIN / "fastbyol"), "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    keys = re.findall(r"^  ([a-z_]+(?:\.[a-z_0-9]+)?) = ", help_text, re.M)
    assert len(keys) > 60 and "optim.base_lr" in keys
    page = (site / "reference" / "config" / "index.html").read_text()
    listed = set(re.findall(r"<code>([a-z_]+(?:\.[a-z_0-9]+)?)</code>", page))
    assert set(keys) <= listed, sorted(set(keys) - listed)


LAUNCHERS = {"scripts/launch_torchrun.sh": 1, "scripts/launch_deepspeed.sh": 2, "scripts/slurm/srun.sbatch": 0,
             "scripts/slurm/torchrun.sbatch": 0}
"""The launch scripts that pass their arguments to ``fastbyol train``, and how many of their own come first."""


def _shell_blocks(text: str) -> Iterator[str]:
    """The contents of the fenced code blocks that are shell (```bash, ```sh, or no language)."""
    block: list[str] | None = None
    shell = False
    for line in text.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and block is None:
            block, shell = [], fence.group(1) in ("", "bash", "sh", "shell", "console")
        elif fence:
            if shell:
                yield "\n".join(block)
            block = None
        elif block is not None:
            block.append(line)


def _commands(text: str) -> Iterator[str]:
    """Each ``fastbyol ...`` command in the fenced code blocks of a Markdown text: typed as ``fastbyol``,
    ``python -m fastbyol`` or after a launcher's ``-m fastbyol``, or given to a launch script (as its ``train``
    arguments); continuation lines joined, comments and an environment prefix (``OMP_NUM_THREADS=1``) dropped."""
    for block in _shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if "fastbyol" not in line and not any(script in line for script in LAUNCHERS):
                continue
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words[:1] in (["bash"], ["sbatch"]) and len(words) > 1 and words[1] in LAUNCHERS:
                yield shlex.join(["train", *words[2 + LAUNCHERS[words[1]]:]])
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["fastbyol"]:
                yield shlex.join(words[words.index("-m") + 2:])
            elif words[:1] == ["fastbyol"] and len(words) > 1:
                yield shlex.join(words[1:])


def test_every_command_in_the_docs_parses_with_the_real_cli() -> None:
    from fastbyol.cli import _parser
    from fastbyol.config_parse import build_config

    parser, seen, bad = _parser(), 0, []
    for doc in DOCUMENTS:
        for command in _commands(doc.read_text()):
            seen += 1
            args, said = shlex.split(command), io.StringIO()
            try:
                with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                    ns = parser.parse_args(args)
                if ns.command == "train" and not ns.resume and not ns.config:
                    build_config(ns.preset or "byol-r50-1000ep", overrides=list(ns.overrides))
            except SystemExit as e:  # argparse: --help and --version exit 0, a bad argument 2
                if e.code != 0 or not {"--help", "-h", "--version"} & set(args):
                    bad.append(f"{doc.relative_to(ROOT)}: fastbyol {command}: {said.getvalue().strip()[-300:]}")
            except Exception as e:  # a bad key or value: ConfigError
                bad.append(f"{doc.relative_to(ROOT)}: fastbyol {command}: {e}")
    assert seen > 40, seen
    assert not bad, "\n".join(bad)


@contextlib.contextmanager
def _served(folder: Path) -> Iterator[str]:
    """The folder over http on localhost (the site's search and scripts fetch files, which file:// refuses)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


PAGES_SHOWN = {"index": "", "how-to": "how-to/imagenet/", "config-reference": "reference/config/"}


def test_the_site_renders_in_headless_chromium(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    with _served(site) as url, chromium(tmp_path, monkeypatch, height=1600) as driver:
        for name, path in PAGES_SHOWN.items():
            driver.get(f"{url}/{path}")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
            state = driver.execute_script("""
                return {title: document.title, h1: (document.querySelector('h1') || {}).textContent || '',
                        nav: document.querySelectorAll('nav.md-nav a.md-nav__link').length,
                        code: document.querySelectorAll('pre code').length,
                        keys: document.querySelectorAll('h3 code').length};""")
            assert state["title"].endswith("fastbyol") and state["h1"], (name, state)
            assert state["nav"] >= 20, (name, state)  # every page of the site is in the navigation
            assert (state["keys"] > 60) if name == "config-reference" else (state["code"] > 0), (name, state)
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, (name, errors)
            shot = Path(os.environ.get("FASTBYOL_SCREENSHOTS", tmp_path)) / f"docs-{name}.png"  # to look at by eye
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
