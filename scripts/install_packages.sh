#!/usr/bin/env bash
# fedlib's packages into a virtual environment, through the one lock (constraints.txt): with uv from
# PyPI when it can be had (it downloads and installs in parallel: about a minute for a fresh .venv on
# this 2-core machine, against about three and a half with pip), else with pip, saying so in one line.
#   scripts/install_packages.sh .venv test,flower,diffusers,fid,lab
# FEDLIB_INSTALLER=pip forces pip.
set -euo pipefail
venv=${1:?usage: install_packages.sh VENV EXTRAS}
extras=${2:?usage: install_packages.sh VENV EXTRAS}
py="$venv/bin/python"
if [ "${FEDLIB_INSTALLER:-uv}" != pip ] && "$py" -m pip install -q -c constraints.txt uv >/dev/null 2>&1 \
   && "$venv/bin/uv" --version >/dev/null 2>&1; then
  if "$venv/bin/uv" pip install --quiet --python "$py" -c constraints.txt -e ".[$extras]"; then
    exit 0
  fi
  echo "install: uv could not install the packages (above); trying pip instead (slower)" >&2
else
  echo "install: uv is not available here (FEDLIB_INSTALLER=${FEDLIB_INSTALLER:-uv}, or PyPI has no uv for this machine); installing with pip (slower)" >&2
fi
"$py" -m pip install -q -c constraints.txt -e ".[$extras]"
