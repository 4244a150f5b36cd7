"""Set up the environment's Jupyter so that opening a committed notebook in JupyterLab changes nothing.

Run by ``make venv`` and by Binder's ``postBuild`` with the environment's own Python:

1. ``scripts/jupyterlab-overrides.json`` is merged into ``<lab app dir>/settings/overrides.json``
   (``.venv/share/jupyter/lab/settings/overrides.json``; keys already there from elsewhere are kept).
   It pins jupyterlab_widgets' ``saveState`` to false: with it on, merely opening a notebook marks it
   modified (every widget model restored from the notebook calls ``setDirty``) and the next save,
   autosave included, replaces the committed widget state by the live kernel's, which is empty until
   the cells are run. Lab restores the committed state with ``saveState`` off; what it needs is a
   trusted notebook (``make lab`` and Binder run ``jupyter trust``).
2. The ``python3`` kernelspec is installed into this environment under the display name the committed
   notebooks carry (``Python 3``). ipykernel's own spec says ``Python 3 (ipykernel)``, and Lab writes
   the running kernel's display name into ``metadata.kernelspec`` when the kernel starts: that alone
   marked every notebook modified on open, and autosave then rewrote the .ipynb and its jupytext .py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = REPO / "scripts" / "jupyterlab-overrides.json"


def lab_settings_dir() -> Path:
    try:
        from jupyterlab.commands import get_app_dir
    except ImportError:  # JupyterLab not installed (yet): the standard location in this prefix
        return Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    return Path(get_app_dir()) / "settings"


def merge_overrides(target: Path, ours: dict) -> dict:
    current = json.loads(target.read_text()) if target.exists() else {}
    for plugin, values in ours.items():
        current.setdefault(plugin, {}).update(values)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(current, indent=2) + "\n")
    return current


def committed_display_name() -> str:
    """The kernelspec display name the committed notebooks carry (one for all of them)."""
    names = {json.loads(p.read_text()).get("metadata", {}).get("kernelspec", {}).get("display_name")
             for p in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    names.discard(None)
    if len(names) != 1:
        raise SystemExit(f"install_jupyter_settings: the notebooks carry kernelspec display names {sorted(names)}; "
                         "make them one (the jupytext header of each notebooks/*.py)")
    return names.pop()


def install_kernelspec(display_name: str) -> str:
    from ipykernel.kernelspec import install

    return install(kernel_name="python3", display_name=display_name, prefix=sys.prefix)


def main() -> None:
    target = lab_settings_dir() / "overrides.json"
    merge_overrides(target, json.loads(OVERRIDES.read_text()))
    name = committed_display_name()
    path = install_kernelspec(name)
    print(f"jupyter: lab settings overrides -> {target}; kernelspec python3 ({name!r}) -> {path}")


if __name__ == "__main__":
    main()
