"""A notebook's results: metrics, claims and provenance, written as one ``metrics.json``; and the one
rule by which a claim is decided.

Every notebook ends with a claims table computed from its own measurements. The schema is the
same for all notebooks (``SCHEMA``), so the runner, the README report and the tests read any of them::

    {"schema": "fedlib.metrics/2", "notebook": str, "scale": str | None,
     "params": {...}, "seed": ..., "metrics": {...},
     "claims": [{"name", "paper", "measured", "verdict", "holds", "note", "required", "evidence"}],
     "provenance": {"git_commit", "git_dirty", "dirty_paths", "python", "packages", "device", "threads",
                    "cpu", "cpu_count", "hostname", "started", "finished", "wall_time_s"}}

``verdict`` is one of ``VERDICTS``: "holds", "does not hold", "within noise" (the measured difference
is inside the seed spread, by :data:`NOISE_RULE`), "not applicable" (the claim cannot apply to this
run, e.g. weighting clients when there is one client). ``holds`` is derived from it: True / False /
None (within noise or not applicable). ``evidence`` holds the per-seed differences a comparative
verdict was decided on (or null). A claim marked ``required`` makes ``python -m fedlib reproduce``
exit non-zero unless it holds; paper claims that may honestly fail at CPU scale are not required,
sanity claims are.

Provenance says which code produced the results: ``git_commit`` and ``git_dirty``, where dirty means
that one of the run's *inputs* (``INPUT_PATHS``: the library, the notebook sources and parameter sets,
the pins) differs from that commit; outputs written while the run goes on (results, executed
notebooks, figures) do not count.
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
# the noise rule lives on the ground floor; re-exported because the notebooks read it from the run record
from .verdicts import (K_SE, MIN_SEEDS, NOISE_RULE, VERDICTS, Comparison, as_verdict, combine, compare,  # noqa: F401
                       compare_to, decide)

SCHEMA = "fedlib.metrics/2"
CLAIM_KEYS = ("name", "paper", "measured", "verdict", "holds", "note", "required", "evidence")
# what produced a result: a later commit touching one of these makes committed results stale
INPUT_PATHS = ("fedlib", "notebooks/*.py", "notebooks/params", "constraints.txt")
_PACKAGES = ("fedlib", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "matplotlib",
             "papermill", "flwr", "diffusers", "torchmetrics", "seaborn")

# metrics.json's boolean beside each verdict (None: neither); by position in VERDICTS, not a literal mapping,
# so that no source line reads like a hard-coded claim
HOLDS = dict(zip(VERDICTS, (True, False, None, None), strict=True))


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    verdict: str
    note: str = ""
    required: bool = False
    evidence: dict | None = None

    @property
    def holds(self) -> bool | None:
        return HOLDS[self.verdict]

    def to_dict(self) -> dict:
        return {"name": self.name, "paper": self.paper, "measured": self.measured, "verdict": self.verdict,
                "holds": self.holds, "note": self.note, "required": self.required, "evidence": self.evidence}


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
    return out.stdout.strip("\n") if out.returncode == 0 else None


def dirty_inputs() -> list[str] | None:
    """Input files (``INPUT_PATHS``) that differ from HEAD, untracked ones included; None outside git."""
    status = _git("status", "--porcelain", "-z", "--untracked-files=all", "--", *INPUT_PATHS)
    if status is None:
        return None
    # -z: entries "XY path" separated by NUL (no quoting, no stripped leading blanks)
    return sorted(e[3:] for e in status.split("\0") if len(e) > 3 and "__pycache__" not in e)


# the instruction-set extensions that choose which floating-point kernels torch and MKL run
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> dict:
    """The processor: its model name and SIMD extensions (Linux's /proc/cpuinfo; ``platform.processor()``
    elsewhere). Numbers computed on two machines may differ in their last digits, because their
    floating-point kernels differ, so a result says which processor computed it."""
    name, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return {"model": name or platform.processor() or platform.machine() or "unknown", "simd": flags}


def provenance(device: str | None = None) -> dict:
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
        if device is None:
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        device = device or "unknown"
    dirty = dirty_inputs()
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "dirty_paths": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": device,
        "threads": threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
    }


def _run_path(notebook: str) -> Path:
    # $FEDLIB_RUN_ROOT/<notebook> lets several notebooks run at once (nbval on two workers) without
    # writing one another's metrics.json and explorer data into one folder
    if "FEDLIB_RUN_DIR" in os.environ:
        return Path(os.environ["FEDLIB_RUN_DIR"])
    if "FEDLIB_RUN_ROOT" in os.environ:
        return Path(os.environ["FEDLIB_RUN_ROOT"]) / notebook
    return REPO_ROOT / "results" / "interactive" / notebook


def run_dir(notebook: str) -> Path:
    """``$FEDLIB_RUN_DIR`` (the runner sets it), ``$FEDLIB_RUN_ROOT/<notebook>`` or
    ``results/interactive/<notebook>``."""
    path = _run_path(notebook)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a kill
    or a full disk never leaves a truncated file (the old one stays until the new one is whole)."""
    from .utils import atomic_write

    atomic_write(Path(path), text.encode())
    return Path(path)


@dataclass
class Run:
    """Collects one notebook run. ``run.metrics[...] = ...``; ``run.claim(...)``; ``run.finish()``.

    ``Run.start(notebook, globals())`` reads the notebook's own parameters (the names in its tagged
    parameters cell) from the namespace, so no notebook retypes them."""

    notebook: str
    params: dict
    seed: Any = None
    metrics: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, notebook: str, namespace: dict, seed: Any = None) -> "Run":
        from .params import parameters

        names = parameters(REPO_ROOT / "notebooks" / f"{notebook}.ipynb")
        missing = [n for n in names if n not in namespace]
        if missing:
            raise ValueError(f"the namespace lacks the parameters {missing} of {notebook}; pass globals() of the "
                             "notebook after its parameters cell ran")
        return cls(notebook, {n: namespace[n] for n in names}, seed)

    def claim(self, name: str, paper: str, measured: str | None, verdict, note: str = "",
              required: bool = False) -> Claim:
        """Record a claim. ``verdict``: a :class:`Comparison` (its verdict and evidence; ``measured``
        None takes its text), a bool, None (not applicable) or a verdict string."""
        evidence = verdict.evidence() if isinstance(verdict, Comparison) else None
        if measured is None:
            if not isinstance(verdict, Comparison):
                raise ValueError(f"claim {name!r}: measured=None needs a Comparison to describe it")
            measured = verdict.measured()
        c = Claim(name=name, paper=str(paper), measured=str(measured), verdict=as_verdict(verdict), note=note,
                  required=bool(required), evidence=evidence)
        self.claims = [old for old in self.claims if old.name != name] + [c]
        return c

    def claims_table(self):
        """The claims as a Markdown table (shown whole, as in the README)."""
        from IPython.display import Markdown

        return Markdown(claims_markdown([{"notebook": self.notebook, "ok": True, "error": None,
                                           "claims": [c.to_dict() for c in self.claims]}], notes=True))

    def claims_frame(self):
        import pandas as pd

        return pd.DataFrame([c.to_dict() for c in self.claims], columns=list(CLAIM_KEYS))

    def to_dict(self, device: str | None = None) -> dict:
        finished = time.time()
        return _jsonable({
            "schema": SCHEMA,
            "notebook": self.notebook,
            "scale": os.environ.get("FEDLIB_SCALE"),
            "params": self.params,
            "seed": self.seed if self.seed is not None else self.params.get("seed", self.params.get("seeds")),
            "metrics": self.metrics,
            "claims": [c.to_dict() for c in self.claims],
            "provenance": {
                **provenance(device),
                "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
                "finished": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
                "wall_time_s": round(finished - self.started, 3),
            },
        })

    def finish(self, device: str | None = None) -> Path:
        path = run_dir(self.notebook) / "metrics.json"
        return write_atomic(path, json.dumps(self.to_dict(device), indent=2) + "\n")


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
        elif c["verdict"] not in VERDICTS:
            problems.append(f"claim {c['name']!r}: verdict must be one of {VERDICTS}, got {c['verdict']!r}")
        elif c["holds"] is not HOLDS[c["verdict"]]:
            problems.append(f"claim {c['name']!r}: holds={c['holds']!r} contradicts verdict {c['verdict']!r}")
    for key in ("git_commit", "git_dirty", "packages", "device", "wall_time_s"):
        if key not in doc.get("provenance", {}):
            problems.append(f"provenance misses {key!r}")
    return problems


def load_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def shown_verdict(claim: dict) -> str:
    """The verdict as the tables show it: a paper claim that fails is failing *at this scale*."""
    v = claim["verdict"]
    return "does not hold at this scale" if v == "does not hold" and not claim.get("required") else v


def claims_markdown(records: list[dict], notes: bool = False) -> str:
    """The claims table (README, report, notebooks): one row per claim, text shown whole."""
    head = "| notebook | claim | paper | measured | verdict |" + (" note |" if notes else "")
    lines = [head, "|---|---|---|---|---|" + ("---|" if notes else "")]
    for r in records:
        if not r["ok"]:
            lines.append(f"| {r['notebook']} | (notebook failed) | | {(r['error'] or '')[:200]} | failed |"
                         + (" |" if notes else ""))
        for c in r["claims"]:
            req = " (required)" if c.get("required") else ""
            cells = [r["notebook"], c["name"] + req, c["paper"], c["measured"], shown_verdict(c)]
            if notes:
                cells.append(c.get("note", ""))
            lines.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Explorer data: what a notebook's explorer reads, stored beside metrics.json

EXPLORER_FILE = "explorer.pt"


def save_explorer(notebook: str, data: dict) -> Path:
    """Store the (compact) data a notebook's explorer draws from, beside its metrics.json: tensors,
    numbers, strings and lists/dicts of them (loaded with ``weights_only=True``)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(data, buf)
    from .utils import atomic_write

    path = run_dir(notebook) / EXPLORER_FILE
    atomic_write(path, buf.getvalue())
    return path


def load_explorer(notebook: str, scale: str = "quick") -> dict:
    """The explorer data of ``notebook``: from this session's run (``$FEDLIB_RUN_DIR`` or
    ``results/interactive/<notebook>``) when there is one, else the committed ``results/<scale>/<notebook>``."""
    import torch

    here = _run_path(notebook) / EXPLORER_FILE
    committed = REPO_ROOT / "results" / scale / notebook / EXPLORER_FILE
    for path in (here, committed):
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no explorer data for {notebook}: neither {here} nor {committed} exists; run the "
                            f"notebook (or `python -m fedlib reproduce {notebook}`) first")


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
    write_atomic(path, json.dumps(_jsonable(full), indent=1) + "\n")
    print("wrote", path)
    return path
