"""A notebook's parameters: the tagged ``parameters`` cell, its parameter sets, and the rules each
value must satisfy, declared once, next to the parameter.

A parameter line is ``name = default  # help [rule; rule; ...]``: papermill reads the comment as help,
and the bracketed group at its end (optional) says what is allowed. Rules:

=========================  =====================================================================
``min 1``, ``max rounds``   at least / at most an expression (``max train_size(dataset) // 4``)
``> 0``, ``< 1``            strictly greater / smaller
``each > 0``, ``each min 1``  every element of a list, likewise
``one of a, b, c``          the value is one of these literals (``each one of 2, 4, 8``: every element)
``in sampler_names()``      the value is in what an expression gives (``each in method_names()``)
``non-empty``               a list with at least one element
``distinct``                a list without repeats
``subset of nfes``          every element of the list is in the list parameter ``nfes``
=========================  =====================================================================

(No ``=`` in a rule: papermill's reader of the parameters cell splits on it.) Expressions may use
the other parameters, integers, arithmetic and the helpers in ``HELPERS``
(``train_size(dataset, cap=0)``: the number of training images of a dataset, at most ``cap`` if
``cap`` > 0; ``len``, ``min``, ``max``: ``> max(ld3_nfes)``). A parameter named ``device`` is also
checked against the machine (``cuda`` only where a GPU exists). :func:`check` returns one line per
violation: the value, what is allowed, an example.

Conventions of the notebooks' cells (``tests/test_refusals.py`` checks them): every integer or float
parameter that sizes work (steps, rounds, epochs, pairs, samples, widths, threads) declares a ``max``,
about 100 times the largest value any parameter set uses, so that a typo is refused rather than run
for ever; every seed declares ``min 0; max 2**31 - 1``. Whatever the rules, :func:`coerce` refuses
inf and nan anywhere in a value (inf passes ``> 0``).
"""

from __future__ import annotations

import ast
import math
import operator
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml


class UsageError(ValueError):
    """Bad input from the command line: reported before anything runs."""


# ---------------------------------------------------------------------------------------------
# reading the parameters cell and the parameter sets


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


_RULES_AT_END = re.compile(r"\[([^\[\]]*)\]\s*$")


def split_help(help_text: str) -> tuple[str, str]:
    """(help without the rule group, the rule group's text or '')."""
    m = _RULES_AT_END.search(help_text or "")
    if not m:
        return (help_text or "").strip(), ""
    return help_text[: m.start()].strip(), m.group(1).strip()


def _inspect_parameters_cell(path) -> dict[str, dict]:
    """What ``papermill.inspect_notebook`` gives for a Python notebook ({name: {name, default (its source
    text), inferred_type_name, help}}; ``tests/test_notebooks_meta.py`` checks the two agree on every
    notebook), read with json and ast: every kernel calls this through ``Run.start``, and importing
    papermill pulls in nbformat's schema validator, whose URI grammar alone took 6 of the 11 s the import
    cost a kernel on the 2-core machine (issue 23's profile)."""
    import io
    import json
    import tokenize

    cells = json.loads(Path(path).read_text()).get("cells", [])
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    comments = {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(src).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if not isinstance(target, ast.Name):
            continue
        annotation = ast.get_source_segment(src, node.annotation) if isinstance(node, ast.AnnAssign) else None
        found[target.id] = {"name": target.id, "inferred_type_name": annotation or "None",
                            "default": ast.get_source_segment(src, node.value),
                            "help": comments.get(node.end_lineno, "")}
    return found


def parameters(path: Path) -> dict[str, dict]:
    """name -> {type, default (a Python value), help, rules (text), checks (parsed)} from the notebook's
    tagged parameters cell. Raises UsageError when the cell is missing or a rule does not parse."""
    found = _inspect_parameters_cell(path)
    if not found:
        raise UsageError(f"{Path(path).name} has no cell tagged 'parameters'")
    out = {}
    for name, p in found.items():
        default = _literal(p["default"])
        help_text, rules = split_help((p.get("help") or "").strip())
        try:
            checks = parse_rules(rules)
        except UsageError as err:
            raise UsageError(f"{Path(path).name}: parameter {name}: {err}") from None
        out[name] = {"type": type(default).__name__ if default is not None else p["inferred_type_name"],
                     "default": default, "help": help_text, "rules": rules, "checks": checks}
    return out


def parameter_sets(name: str, notebooks_dir: Path) -> dict[str, dict]:
    """{scale: overrides} for a notebook: ``quick`` = {} plus the sets in its yaml file."""
    sets = {"quick": {}}
    path = Path(notebooks_dir) / "params" / f"{name}.yaml"
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) or v is None for v in loaded.values()):
            raise UsageError(f"{path} must map set names (smoke, paper, ...) to parameter dicts")
        sets.update({k: v or {} for k, v in loaded.items()})
    return sets


def parse_value(text: str):
    """A command-line value: a Python/YAML literal where it parses as one, else the string."""
    value = _literal(text)
    if isinstance(value, str) and value == text:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if not isinstance(value, (bool, int, float, list, dict)) and value is not None:
            value = text
    return value


def _non_finite(value, where: tuple = ()) -> tuple[tuple, object] | None:
    """(the path of keys, the element) of the first inf or nan in ``value`` (nested lists and dicts), else
    None: inf passes every ``> 0`` rule and then stalls or overflows deep inside a run. An integer beyond
    the float range counts too (float() of it raises OverflowError)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, (*where, key))
        if found:
            return found
    return None


def _fits(value, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


def coerce(name: str, value, spec: dict, notebook: str):
    """``value`` converted to the type of the parameter's default, or a UsageError in one line that
    names the bad value (the element and its index, in a list)."""
    default, want = spec["default"], spec["type"]
    example = f"e.g. -p {name}={default!r}"
    bad = _non_finite(value)
    if bad:
        where, item = bad
        element = f"element {where[0]!r}" if len(where) == 1 else "element " + "".join(f"[{k!r}]" for k in where)
        if isinstance(item, int):
            why = "is beyond the float range"
        else:
            why = f"is {item!r}" if where else "is not a finite number"
        what = f"{name}={value!r}: {element} {why}" if where else f"{name}={value!r} {why}"
        raise UsageError(f"{notebook}: parameter {what}; allowed: finite numbers within the float range (no inf "
                         f"or nan); {example}")
    if default is None or want in ("None", "NoneType"):
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            value = [value]  # -p seeds=3 means [3]
        value = list(value)
        elem = type(default[0]) if default else None
        for i, item in enumerate(value if elem else ()):
            if not _fits(item, elem):
                raise UsageError(
                    f"{notebook}: parameter {name}={value!r}: element {i} ({item!r}) has type "
                    f"{type(item).__name__}; {name} must be list of {elem.__name__}; {example}")
        return [float(v) for v in value] if elem is float else value
    ok = _fits(value, type(default)) if isinstance(default, (bool, int, float, str, dict)) else True
    if not ok:
        raise UsageError(
            f"{notebook}: parameter {name}={value!r} has type {type(value).__name__} but must be "
            f"{want} (default {default!r}); {example}"
        )
    return float(value) if isinstance(default, float) else value


# ---------------------------------------------------------------------------------------------
# rules

_OPS = {"min": operator.ge, "max": operator.le, ">": operator.gt, "<": operator.lt}
_COMPARE = re.compile(r"^(each\s+)?(min\b|max\b|>|<)\s*(.+)$")
_ALLOWED_NODES = (ast.Expression, ast.Name, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call,
                  ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
                  ast.List, ast.Tuple, ast.keyword)


def train_size(dataset: str, cap: int = 0) -> float:
    """Training images of ``dataset`` (inf when unknown), at most ``cap`` when ``cap`` > 0."""
    from .data import TRAIN_SIZES

    n = TRAIN_SIZES.get(dataset, math.inf)
    return min(n, cap) if cap and cap > 0 else n


def sampler_names(one_per_step: bool = False) -> tuple:
    """Names of fedlib's ODE samplers (``one_per_step``: those taking one network evaluation per step)."""
    from .diffusion.samplers import SAMPLERS, nfe_for_steps

    return tuple(n for n in SAMPLERS if not one_per_step or nfe_for_steps(n, 3) == 3)


def step_sampler_names() -> tuple:
    """The samplers that take exactly one network evaluation per step (Heun takes two)."""
    return sampler_names(one_per_step=True)


def schedule_names() -> tuple:
    from .diffusion.schedules import SCHEDULES

    return tuple(SCHEDULES)


def ld3_solver_names() -> tuple:
    # LD3 learns the times of one-evaluation-per-step samplers (its LD3_SOLVERS, equal by
    # tests/test_layers.py); read from the samplers, so that params does not import the LD3 layer
    return step_sampler_names()


def method_names() -> tuple:
    from .methods import METHODS

    return tuple(METHODS)


HELPERS = {"train_size": train_size, "sampler_names": sampler_names,
           "step_sampler_names": step_sampler_names, "schedule_names": schedule_names,
           "ld3_solver_names": ld3_solver_names, "method_names": method_names, "len": len, "max": max, "min": min}


@dataclass(frozen=True)
class Rule:
    kind: str      # compare | member | within | nonempty | distinct | subset
    text: str      # as declared
    each: bool = False
    op: str = ""
    expr: object = None     # compiled expression (compare)
    names: tuple = ()       # parameters the expression reads
    choices: tuple = ()     # member
    other: str = ""         # subset


def _compile(expr: str, rule: str):
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise UsageError(f"rule {rule!r}: {expr!r} is not an expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise UsageError(f"rule {rule!r}: {type(node).__name__} is not allowed in a rule expression")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in HELPERS):
            raise UsageError(f"rule {rule!r}: only {', '.join(HELPERS)} may be called")
    names = tuple(sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(HELPERS)))
    return compile(tree, "<rule>", "eval"), names


def parse_rules(text: str) -> tuple[Rule, ...]:
    """The rules of one parameter, from the text inside its ``[...]`` group."""
    rules = []
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        if part == "non-empty":
            rules.append(Rule("nonempty", part))
        elif part == "distinct":
            rules.append(Rule("distinct", part))
        elif part.startswith("subset of "):
            rules.append(Rule("subset", part, other=part[len("subset of "):].strip()))
        elif re.match(r"^(each\s+)?one of\s", part):
            each = part.startswith("each")
            items = part.split("one of", 1)[1]
            rules.append(Rule("member", part, each=each,
                              choices=tuple(_literal(c.strip()) for c in items.split(",") if c.strip())))
        elif m := re.match(r"^(each\s+)?in\s+(.+)$", part):
            code, names = _compile(m.group(2), part)
            rules.append(Rule("within", part, each=bool(m.group(1)), expr=code, names=names))
        elif m := _COMPARE.match(part):
            code, names = _compile(m.group(3), part)
            rules.append(Rule("compare", part, each=bool(m.group(1)), op=m.group(2), expr=code, names=names))
        else:
            raise UsageError(f"cannot read the rule {part!r}; rules are 'min 1', 'max rounds', '> 0', '< 1', "
                             "'each > 0', 'one of a, b', 'in sampler_names()', 'non-empty', 'distinct', "
                             "'subset of NAME' (separated by ';')")
    return tuple(rules)


def _violation(rule: Rule, value, params: dict) -> str | None:
    """Why ``value`` breaks ``rule`` (None when it does not)."""
    if rule.kind == "nonempty":
        return "it is empty" if isinstance(value, (list, tuple)) and not value else None
    if rule.kind == "distinct":
        return "it has repeated elements" if isinstance(value, (list, tuple)) and len(set(map(repr, value))) != len(value) else None
    if rule.kind == "subset":
        other = params.get(rule.other, [])
        extra = [v for v in value if v not in other]
        return f"{extra} are not in {rule.other}={other!r}" if extra else None
    items = value if rule.each and isinstance(value, (list, tuple)) else [value]
    if rule.kind == "member":
        bad = [v for v in items if v not in rule.choices]
        return f"{bad[0]!r} is not one of {', '.join(map(str, rule.choices))}" if bad else None
    missing = [n for n in rule.names if n not in params]
    if missing:
        raise UsageError(f"rule {rule.text!r} names {missing}, which are not parameters of this notebook")
    try:
        # parsed and whitelisted above
        bound = eval(rule.expr, {"__builtins__": {}}, {**params, **HELPERS})  # noqa: S307
    except (ArithmeticError, ValueError, TypeError):
        # the parameters it reads are themselves broken (max of an empty list, a division by a 0 that
        # must be >= 4): their own rules report that, and this bound means nothing until they are fixed
        return None
    if isinstance(bound, float) and math.isnan(bound):  # inf // 2 of a dataset train_size does not know
        return None
    if rule.kind == "within":
        bad = [v for v in items if v not in bound]
        return f"{bad[0]!r} is not one of {', '.join(map(str, bound))}" if bad else None
    for v in items:
        try:
            ok = _OPS[rule.op](v, bound)
        except TypeError:
            return f"{v!r} cannot be compared with {bound!r}"
        if not ok:
            where = f" ({rule.text.split(maxsplit=2 if rule.each else 1)[-1]} = {bound})" if rule.names else ""
            what = {"min": "at least", "max": "at most", ">": "greater than", "<": "smaller than"}[rule.op]
            return f"{v!r} is not {what} {bound}{where}" if rule.each else f"it is not {what} {bound}{where}"
    return None


def check(notebook: str, params: dict, specs: dict) -> list[str]:
    """One line per broken rule: '<notebook>: name=value is not allowed: why; allowed: rules; e.g. ...'."""
    lines = []
    for name, spec in specs.items():
        value = params.get(name, spec["default"])
        for rule in spec["checks"]:
            why = _violation(rule, value, {k: params.get(k, s["default"]) for k, s in specs.items()})
            if why:
                lines.append(f"{notebook}: {name}={value!r} is not allowed ({why}); allowed: [{spec['rules']}]; "
                             f"e.g. -p {name}={spec['default']!r}")
                break
        if name == "device" and isinstance(value, str) and value.split(":")[0] == "cuda" and not cuda_available():
            lines.append(f"{notebook}: device={value!r} is not available: this machine has no CUDA GPU "
                         "(torch.cuda.is_available() is False); allowed here: auto, cpu; e.g. -p device=auto")
    return lines


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
