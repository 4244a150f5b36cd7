"""The set-up agrees with itself: one lock (constraints.txt) behind make venv, environment.yml and
Binder; the Python the pins allow is the one pyproject.toml and the README state; the Jupyter settings
that keep committed notebooks unchanged on open are installed; interactive figures stay out of git."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            out[canonicalize_name(name)] = version
    return out


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def minimum_python() -> tuple[int, int]:
    return runpy.run_path(str(REPO / "scripts" / "check_python.py"))["minimum"](str(REPO / "pyproject.toml"))


def pip_commands(script: str) -> list[str]:
    """The `pip install` commands of a shell script, continuation lines joined."""
    joined = script.replace("\\\n", " ")
    return [line for line in joined.splitlines() if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#")]


def named_versions(text: str) -> dict[str, str]:
    """Every NAME==VERSION (pip) or NAME=VERSION (conda) a file names."""
    found = {}
    for name, version in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)\s*==?\s*(\d[\w.+!-]*)", text):
        found[canonicalize_name(name)] = version
    return found


def test_constraints_are_exact_pins_and_hold_every_dependency():
    locked = pins()
    project = pyproject()["project"]
    for req in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(req)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is a dependency of fedlib but has no pin in constraints.txt (make lock)"
        assert req.specifier.contains(locked[name], prereleases=True), f"pin {name}=={locked[name]} is outside {req}"
    assert {"jupyterlab", "playwright", "torch", "torchvision"} <= set(locked)


def test_every_installed_pin_admits_the_minimum_python():
    """requires-python states the truth: each pinned package installed here runs on its lowest version."""
    low = "%d.%d.0" % minimum_python()
    locked, refused = pins(), []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        requires = dist.metadata.get("Requires-Python")
        if name in locked and requires and not SpecifierSet(requires).contains(low):
            refused.append(f"{name}=={dist.version} (Requires-Python {requires})")
    assert not refused, f"pins that refuse Python {low}, requires-python of pyproject.toml: {refused}"


def test_python_version_is_stated_the_same_everywhere():
    major, minor = minimum_python()
    assert pyproject()["project"]["requires-python"] == f">={major}.{minor}"
    assert sys.version_info[:2] >= (major, minor)
    readme = (REPO / "README.md").read_text()
    assert f"Python {major}.{minor}" in readme and "3.10+" not in readme
    for env in ("environment.yml", "binder/environment.yml"):
        deps = yaml.safe_load((REPO / env).read_text())["dependencies"]
        python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
        assert tuple(int(x) for x in python.split("=")[1].split(".")[:2]) >= (major, minor), f"{env}: {python}"


@pytest.mark.parametrize("version, refused", [((3, 10, 13), True), ((2, 7, 18), True), ((3, 11, 0), False),
                                              ((3, 13, 1), False)])
def test_make_venv_refuses_an_older_python_in_one_line(version, refused):
    check = runpy.run_path(str(REPO / "scripts" / "check_python.py"))
    why = check["message"](version, minimum_python(), "/usr/bin/python3")
    assert (why is not None) == refused
    if refused:
        assert "\n" not in why and "3.11" in why and ".".join(map(str, version)) in why


def test_make_venv_refuses_an_older_python_before_installing():
    recipe = (REPO / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    steps = [line.strip() for line in recipe.splitlines()[1:]]
    assert "check_python.py" in steps[0], "the Python check must come before the venv and pip"
    assert any("install_jupyter_settings.py" in s for s in steps)
    assert any("install_browser.sh" in s and s.startswith("-") for s in steps), "installing Chromium is never fatal"


def test_environment_yml_installs_through_the_lock():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-c constraints.txt" in pip
    extras = set(pyproject()["project"]["optional-dependencies"])
    for line in pip:
        if line.startswith("-e"):
            wanted = set(re.search(r"\[(.*)\]", line).group(1).split(","))
            assert wanted <= extras and "lab" in wanted, line
    locked = pins()
    for name, version in named_versions("\n".join(pip)).items():
        assert locked.get(name) == version, f"environment.yml names {name} {version}, constraints.txt {locked.get(name)}"


def test_binder_installs_cpu_torch_pinned_lab_and_only_the_extras_the_notebooks_use():
    post = (REPO / "binder" / "postBuild").read_text()
    commands = pip_commands(post)
    assert commands and all("-c constraints.txt" in c for c in commands), "every pip install goes through the lock"
    torch = [c for c in commands if re.search(r"\btorch\b", c) and re.search(r"\btorchvision\b", c)]
    assert len(torch) == 1 and f"--index-url {CPU_INDEX}" in torch[0], "torch and torchvision from the CPU index"
    fedlib = [c for c in commands if " -e " in c]
    assert len(fedlib) == 1 and CPU_INDEX not in fedlib[0] and commands.index(torch[0]) < commands.index(fedlib[0])
    extras = set(re.search(r"\[(.*)\]", fedlib[0]).group(1).split(","))
    # flower: the notebooks' backend="flower"; lab: JupyterLab. diffusers, fid and test serve tests and
    # users with weights on disk, not the notebooks.
    assert extras == {"flower", "lab"}, extras
    notebooks = "\n".join(p.read_text() for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py"))
    assert re.search(r"^backend = .*flower", notebooks, re.M), "no notebook offers backend='flower' any more"
    assert not re.search(r"import diffusers|from diffusers|from_diffusers|diffusion\.interop", notebooks)
    assert "install_jupyter_settings.py" in post and "jupyter trust" in post
    locked = pins()
    named = {**named_versions(post), **named_versions((REPO / "binder" / "environment.yml").read_text())}
    named.pop("python", None)
    for name, version in named.items():
        assert locked.get(name) == version, f"binder/ names {name} {version}, constraints.txt {locked.get(name)}"
    binder_env = yaml.safe_load((REPO / "binder" / "environment.yml").read_text())
    assert not any(isinstance(d, str) and d.split("=")[0] in ("jupyterlab", "pytorch", "torch") for d in binder_env["dependencies"]), \
        "JupyterLab and torch come from pip, pinned"


def test_lab_settings_are_installed_in_this_environment():
    """make venv ran scripts/install_jupyter_settings.py: Lab's overrides and the kernel's display name."""
    pytest.importorskip("jupyterlab")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyterlab.commands import get_app_dir

    installed = json.loads((Path(get_app_dir()) / "settings" / "overrides.json").read_text())
    for plugin, values in json.loads((REPO / "scripts" / "jupyterlab-overrides.json").read_text()).items():
        assert {k: installed.get(plugin, {}).get(k) for k in values} == values
    assert installed["@jupyter-widgets/jupyterlab-manager:plugin"]["saveState"] is False
    spec = KernelSpecManager().get_kernel_spec("python3")
    names = {json.loads(p.read_text())["metadata"]["kernelspec"]["display_name"]
             for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert names == {spec.display_name}, f"kernel {spec.display_name!r} vs notebooks {names} (run make venv)"


def test_interactive_figures_stay_out_of_the_tracked_figures(monkeypatch):
    from fedlib import plots

    monkeypatch.delenv("FEDLIB_FIGURES_DIR", raising=False)
    where = plots.figures_dir()
    assert where == REPO / "results" / "interactive" / "figures"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(where / "x.png")], cwd=REPO)
    if ignored.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{where} must be ignored by git"
    monkeypatch.setenv("FEDLIB_FIGURES_DIR", str(REPO / ".test-output" / "figures-env"))
    assert plots.figures_dir() == REPO / ".test-output" / "figures-env"


def test_nbval_waits_a_minute_for_a_cells_last_output():
    """conftest.py (the repository's): nbval's own 5 s made a loaded machine skip half a notebook."""
    import nbval.plugin

    assert nbval.plugin.IPyNbCell.__init__.__name__ == "_patient_cell_init"


def test_make_venv_installs_through_the_lock_with_uv_and_falls_back_to_pip_in_one_line():
    recipe = (REPO / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "scripts/install_packages.sh $(VENV) $(EXTRAS)" in recipe
    script = (REPO / "scripts" / "install_packages.sh").read_text()
    installs = [ln for ln in script.splitlines() if re.search(r"\b(uv pip|pip) install\b", ln) and not ln.lstrip().startswith("#")]
    assert any("uv\" pip install" in ln for ln in installs) and any("-m pip install -q -c constraints.txt -e" in ln for ln in installs)
    assert all("-c constraints.txt" in ln for ln in installs), "uv, pip and uv itself install through the lock"
    assert "uv==" in (REPO / "constraints.txt").read_text(), "uv's own version is pinned"
    assert script.count('echo "install:') == 2, "each fall-back to pip says so in one line"


def test_the_pip_fall_back_is_taken_when_uv_is_refused(tmp_path):
    """FEDLIB_INSTALLER=pip: the script says so and calls pip (a stand-in venv records the call)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    fake = venv / "bin" / "python"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "scripts" / "install_packages.sh"), str(venv), "test"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "FEDLIB_INSTALLER": "pip"})
    assert done.returncode == 0, done.stderr
    assert "installing with pip (slower)" in done.stderr and done.stderr.count("\n") == 1
    assert log.read_text().strip() == "-m pip install -q -c constraints.txt -e .[test]"
