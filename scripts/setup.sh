#!/usr/bin/env bash
# Set up .venv from nothing: torch from the machine's disk (never a newer download), then fastbyol
# with the extras given as $1 (default "gpu,dev": every part, as the tests need). Idempotent: a stamp
# of pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-gpu,dev}"
venv="${FASTBYOL_VENV:-.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.fastbyol-setup-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
# Debian's chromium + chromium-driver for the report's browser test (tests/test_report.py). Checked before the
# stamp, since a .venv kept from another machine does not bring the browser; two file tests when it is there.
# Not fatal: without root or apt-get the test skips (outside CI), so say so once, at the first set-up.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    mkdir -p "$venv"
    browser_log="$venv/chromium-setup.log"
    echo "setup: installing Debian's chromium and chromium-driver for the browser test (log: $browser_log)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver; } >"$browser_log" 2>&1; then
      echo "setup: apt-get install chromium chromium-driver failed (see $browser_log): the browser test will be" \
        "skipped (and fails under CI)" >&2
    fi
  elif [ ! -f "$stamp" ]; then
    echo "setup: no /usr/bin/chromium or /usr/bin/chromedriver, and no root with apt-get to install them: the" \
      "browser test will be skipped (as root: apt-get install chromium chromium-driver)" >&2
  fi
fi
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/setup.log"
pip_install() {
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "setup: pip install $* failed (log above); see ../shared/RECIPES.md" >&2
    exit 1
  fi
}
echo "setup: installing into $venv (torch from this machine's disk, then fastbyol[$extras])" >&2
# torch 2.14.1 (CUDA 13.0 build) and torchvision 0.29.1 lie on this machine's disk; pinning them keeps
# pip from resolving a newer torch (a 3+ GB download). Elsewhere pip fetches this same pair.
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[${extras}]" "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -c "import fastbyol.cli, fastbyol.kernels" \
  || { echo "setup: fastbyol does not import after install" >&2; exit 1; }
rm -f "$venv"/.fastbyol-setup-*
touch "$stamp"
