# Refuse, in one line, a Python older than pyproject.toml's requires-python (run by `make venv` before
# anything is installed). Plain syntax on purpose: it must run on the old Pythons it refuses.
import re
import sys
from os.path import abspath, dirname, join


def minimum(pyproject):
    text = open(pyproject).read()
    found = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', text, re.M)
    if not found:
        raise SystemExit("check_python: no requires-python = \">=X.Y\" in %s" % pyproject)
    return int(found.group(1)), int(found.group(2))


def message(version, need, executable):
    if tuple(version[:2]) >= need:
        return None
    return ("fedlib needs Python %d.%d or newer (the pinned numpy, pandas, scipy and ipython have no wheels for "
            "older ones); %s is Python %d.%d.%d: run `make venv PYTHON=python3.%d` or newer"
            % (need[0], need[1], executable, version[0], version[1], version[2], need[1]))


if __name__ == "__main__":
    why = message(sys.version_info, minimum(join(dirname(dirname(abspath(__file__))), "pyproject.toml")),
                  sys.executable)
    if why:
        sys.stderr.write(why + "\n")
        sys.exit(1)
