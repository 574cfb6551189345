#!/usr/bin/env bash
# Set-up of the peer tools for benchmarks/peers/run.py, idempotent: installs only what is missing.
#   R with nlme  : Debian/Ubuntu packages r-base-core and r-cran-nlme (apt-get; root or sudo needed)
#   pynlme (SAEM) and numpyro (NUTS, opt-in tool): from PyPI into the Python that runs the benchmark
# Usage: benchmarks/peers/setup.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! command -v Rscript >/dev/null 2>&1 || ! Rscript -e 'suppressPackageStartupMessages(library(nlme))' >/dev/null 2>&1; then
  SUDO=""
  if [[ "$(id -u)" != "0" ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "setup.sh: R nlme missing and neither root nor sudo: install r-base-core r-cran-nlme yourself" >&2; exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: no apt-get here; install R (>= 4.0) and the nlme package yourself" >&2; exit 1
  fi
  echo "setup.sh: installing r-base-core r-cran-nlme" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends r-base-core r-cran-nlme
fi
Rscript -e 'cat("R", format(getRversion()), "nlme", format(packageVersion("nlme")), "\n")'

if ! "$PY" -c 'import pynlme' >/dev/null 2>&1; then
  echo "setup.sh: installing pynlme into $PY" >&2
  "$PY" -m pip install -q "pynlme>=0.5.1"
fi
if ! "$PY" -c 'import numpyro' >/dev/null 2>&1; then
  echo "setup.sh: installing numpyro into $PY" >&2
  "$PY" -m pip install -q "numpyro>=0.15"
fi
"$PY" -c 'import importlib.metadata as m; print("pynlme", m.version("pynlme"), "numpyro", m.version("numpyro"))'
