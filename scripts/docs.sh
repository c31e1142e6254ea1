#!/usr/bin/env bash
# Build the documentation site (docs/mkdocs.yml) into docs/site, offline, with warnings as errors:
# a broken link or anchor, a page missing from the navigation or a reference that does not resolve stops it.
# Extra arguments pass to `mkdocs build` (e.g. --site-dir /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTBYOL_VENV:-.venv}"
export NO_MKDOCS_2_WARNING=1  # the theme's notice about its successor, printed on every build
exec "$venv/bin/mkdocs" build --strict --config-file docs/mkdocs.yml "$@"
