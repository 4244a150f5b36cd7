"""A notebook's results: metrics, claims and provenance, written as one ``metrics.json``.

Every notebook ends with a claims table computed from its own measurements. The schema is the
same for all notebooks (``SCHEMA``), so the runner, the README report and the tests read any of them::

    {"schema": "fedlib.metrics/1", "notebook": str, "scale": str | None,
     "params": {...}, "seed": ..., "metrics": {...},
     "claims": [{"name", "paper", "measured", "holds", "note", "required"}],
     "provenance": {"git_commit", "git_dirty", "python", "packages", "device",
                    "hostname", "started", "finished", "wall_time_s"}}

``holds`` is True / False, or None where the claim could not be tested at this scale.
A claim marked ``required`` makes ``python -m fedlib reproduce`` exit non-zero when it fails;
paper claims that may honestly fail at CPU scale are not required, sanity claims are.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .utils import REPO_ROOT

SCHEMA = "fedlib.metrics/1"
CLAIM_KEYS = ("name", "paper", "measured", "holds", "note", "required")
_PACKAGES = ("fedlib", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "matplotlib",
             "papermill", "flwr", "diffusers", "torchmetrics")


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    holds: bool | None
    note: str = ""
    required: bool = False


def _jsonable(x: Any) -> Any:
    """Tensors, numpy scalars/arrays, paths and tuples -> plain JSON; NaN/inf -> None."""
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().tolist()
    if np is not None and isinstance(x, np.ndarray):
        x = x.tolist()
    if np is not None and isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(device: str | None = None) -> dict:
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    if device is None:
        try:
            import torch

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except Exception:  # pragma: no cover
            device = "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": device,
        "hostname": socket.gethostname(),
    }


def run_dir(notebook: str) -> Path:
    """``$FEDLIB_RUN_DIR`` (the runner sets it) or ``results/interactive/<notebook>``."""
    path = Path(os.environ.get("FEDLIB_RUN_DIR", REPO_ROOT / "results" / "interactive" / notebook))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Run:
    """Collects one notebook run. ``run.metrics[...] = ...``; ``run.claim(...)``; ``run.finish()``."""

    notebook: str
    params: dict
    seed: Any = None
    metrics: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def claim(self, name: str, paper: str, measured: str, holds: bool | None, note: str = "",
              required: bool = False) -> Claim:
        if holds is not None:
            holds = bool(holds)
        c = Claim(name=name, paper=str(paper), measured=str(measured), holds=holds, note=note,
                  required=bool(required))
        self.claims = [old for old in self.claims if old.name != name] + [c]
        return c

    def claims_frame(self):
        import pandas as pd

        rows = [asdict(c) for c in self.claims]
        frame = pd.DataFrame(rows, columns=list(CLAIM_KEYS))
        frame["holds"] = frame["holds"].map({True: "yes", False: "no", None: "n/a"})
        return frame

    def to_dict(self, device: str | None = None) -> dict:
        finished = time.time()
        return _jsonable({
            "schema": SCHEMA,
            "notebook": self.notebook,
            "scale": os.environ.get("FEDLIB_SCALE"),
            "params": self.params,
            "seed": self.seed if self.seed is not None else self.params.get("seed", self.params.get("seeds")),
            "metrics": self.metrics,
            "claims": [asdict(c) for c in self.claims],
            "provenance": {
                **provenance(device),
                "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
                "finished": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
                "wall_time_s": round(finished - self.started, 3),
            },
        })

    def finish(self, device: str | None = None) -> Path:
        path = run_dir(self.notebook) / "metrics.json"
        path.write_text(json.dumps(self.to_dict(device), indent=2) + "\n")
        return path


def validate_metrics(doc: dict) -> list[str]:
    """Problems with a metrics.json document (empty list when it follows the schema)."""
    problems = []
    for key in ("schema", "notebook", "params", "metrics", "claims", "provenance"):
        if key not in doc:
            problems.append(f"missing key {key!r}")
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for i, c in enumerate(doc.get("claims", [])):
        missing = [k for k in CLAIM_KEYS if k not in c]
        if missing:
            problems.append(f"claim {i} misses {missing}")
        elif c["holds"] not in (True, False, None):
            problems.append(f"claim {c['name']!r}: holds must be true/false/null, got {c['holds']!r}")
    for key in ("git_commit", "packages", "device", "wall_time_s"):
        if key not in doc.get("provenance", {}):
            problems.append(f"provenance misses {key!r}")
    return problems


def load_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def device_label(device) -> str:
    """``cpu`` or the GPU's name with underscores: the suffix of a benchmark's result file."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"


def write_benchmark(benchmark: str, doc: dict, device, out: str | Path | None = None) -> Path:
    """Write a benchmark's JSON (its numbers, peer and ratios in ``doc``) with the machine facts that
    make it comparable, to ``out`` or ``benchmarks/results/<benchmark>-<device>.json``."""
    import torch

    name = device_label(device)
    full = {"benchmark": benchmark, "device": name, **doc, "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__}
    path = Path(out) if out else REPO_ROOT / "benchmarks" / "results" / f"{benchmark}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(full), indent=1) + "\n")
    print("wrote", path)
    return path
