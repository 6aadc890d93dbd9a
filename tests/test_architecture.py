"""The package structure described in docs/architecture.md, checked from the source (ast only)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.numerics import compare_output, make_grid, take_batch
from mmgen_deploy.runtime.backends import REGISTRY
from mmgen_deploy.specs import COMPONENTS, PRECISIONS, RUN_PRECISIONS

PACKAGE = Path(__file__).resolve().parents[1] / "mmgen_deploy"


def _unit(path: Path) -> str:
    """A subpackage ('runtime') or a top-level module ('specs') of mmgen_deploy."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The mmgen_deploy modules a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmgen_deploy.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mmgen_deploy."):
            found.add(str(node.module))
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _edges() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: a file that imports it}."""
    edges: dict[str, dict[str, str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _unit(path)
        for module in _imports(path):
            target = module.split(".")[1]
            if target != source:
                edges.setdefault(source, {}).setdefault(target, str(path.relative_to(PACKAGE)))
    return edges


def test_no_two_packages_import_each_other() -> None:
    edges = _edges()
    cycles = sorted(f"{a} <-> {b} ({edges[a][b]}, {edges[b][a]})"
                    for a in edges for b in edges[a] if a < b and a in edges.get(b, {}))
    assert not cycles, cycles


def test_the_import_direction_of_the_deployment_path() -> None:
    """models -> export -> engines -> runtime -> sampling; nothing below the CLI imports it.
    (export may use the sampling package's noise schedule and loop, for calibration.)"""
    edges = _edges()
    lower_than = {"export": {"engines", "runtime"}, "engines": {"runtime", "sampling"}, "runtime": {"sampling"},
                  "specs": {"models", "export", "engines", "runtime", "sampling"}, "rundir": {"cli"}}
    for unit, above in lower_than.items():
        assert not set(edges.get(unit, {})) & above, (unit, edges.get(unit))
    assert not [u for u, targets in edges.items() if "cli" in targets and u not in ("cli", "__main__")]


def test_the_cli_never_calls_itself_back() -> None:
    """Only the entry point knows the Typer app; commands and the quickstart call the library."""
    for path in (PACKAGE / "cli").glob("*.py"):
        if path.name != "app.py":
            assert not {m for m in _imports(path) if m.startswith("mmgen_deploy.cli.app")}, path.name


def test_cli_modules_never_import_each_others_private_helpers() -> None:
    """What two commands share is public: in cli/common.py, or a public name of the command that owns it."""
    offenders = []
    for path in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmgen_deploy.cli."):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_component_and_precision_lists_are_spelled_out_once() -> None:
    """No module but specs.py writes the component list or the precision list as a literal."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "specs.py":
            continue
        tree = ast.parse(path.read_text())
        # A choice between two orders (serve's "fp32 first for the CPU wrapper") is a preference, not the list.
        preferences = {id(n) for node in ast.walk(tree) if isinstance(node, ast.IfExp)
                       for n in (node.body, node.orelse)}
        for node in ast.walk(tree):
            if id(node) in preferences:
                continue
            if isinstance(node, ast.Tuple | ast.List) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = {e.value for e in node.elts}  # type: ignore[attr-defined]
                # The list itself (every component, or a class model's four), not a subset with a meaning
                # of its own such as "the VQ model's components".
                if (len(values) >= len(COMPONENTS) - 1 and values <= set(COMPONENTS)) or values == set(PRECISIONS):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {sorted(values)}")
    assert not offenders, offenders


def _sampling_default_key(name: str) -> str | None:
    """The `SAMPLING` field a parameter, field, option or Triton parameter named `name` takes its default
    from ("default_steps", "_STEPS_OPT" and "max_batch_size" included), or None."""
    key = name.lower().strip("_").removesuffix("_opt").removeprefix("default_")
    key = {"max_batch": "batch_size", "max_batch_size": "batch_size"}.get(key, key)
    return key if key in SAMPLING.__dataclass_fields__ else None


def _literal(node: ast.AST | None) -> object:
    """The constant `node` spells (also the default of a `typer.Option(...)`), else None."""
    called = getattr(node, "func", None)
    if isinstance(node, ast.Call) and node.args and getattr(called, "attr", getattr(called, "id", "")) == "Option":
        node = node.args[0]
    return node.value if isinstance(node, ast.Constant) and not isinstance(node.value, bool) else None


def _same_value(literal: object, default: object) -> bool:
    if isinstance(default, str):
        return literal == default
    try:
        return float(literal) == float(default)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def test_sampling_defaults_are_written_once() -> None:
    """No module but defaults.py gives a sampling setting (steps, cfg scale, sampler, eta, batch size, the
    server's limits) its default value as a literal: signatures, dataclass fields, CLI options, keyword
    arguments and `params.get(name, fallback)` all read `SAMPLING`."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            pairs: list[tuple[str, ast.AST | None]] = []
            if isinstance(node, ast.arguments):
                positional = [*node.posonlyargs, *node.args]
                pairs += [(a.arg, d) for a, d in zip(positional[len(positional) - len(node.defaults):], node.defaults,
                                                     strict=True)]
                pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)]
            elif isinstance(node, ast.AnnAssign | ast.Assign):
                targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
                pairs += [(getattr(t, "id", getattr(t, "attr", "")), node.value) for t in targets]
            elif isinstance(node, ast.keyword) and node.arg:
                pairs.append((node.arg, node.value))
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get" and len(node.args) == 2
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                pairs.append((node.args[0].value, node.args[1]))
            for name, value in pairs:
                key = _sampling_default_key(name)
                literal = _literal(value)
                if key and literal is not None and _same_value(literal, getattr(SAMPLING, key)):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{getattr(value, 'lineno', '?')} {name}={literal!r}")
    assert not offenders, offenders


def test_one_comparison_serves_export_validation_and_parity() -> None:
    ref = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    close = compare_output(ref, ref * (1 + 1e-7), is_float=True, rel_l2=1e-5, min_agreement=1.0)
    assert close.metric == "rel_l2" and close.passed and close.direction == "<="
    far = compare_output(ref, ref + 1, is_float=True, rel_l2=1e-5, min_agreement=1.0)
    assert not far.passed and far.max_abs == 1.0 and far.details["rel_l2"] == far.value
    codes = compare_output(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]), is_float=False, rel_l2=1e-5,
                           min_agreement=0.75)
    assert (codes.metric, codes.value, codes.max_abs, codes.passed, codes.direction) == ("agreement", 0.75, 1.0,
                                                                                          True, ">=")
    assert not compare_output(ref, ref * np.nan, is_float=True, rel_l2=1.0, min_agreement=1.0).passed


def test_shared_batch_and_grid_helpers() -> None:
    batch = take_batch({"x": np.arange(3)}, 5)["x"]
    assert batch.tolist() == [0, 1, 2, 0, 1] and batch.flags["C_CONTIGUOUS"]
    tiles = np.full((3, 2, 2, 3), 7, dtype=np.uint8)
    grid = make_grid(tiles, 2, pad=1, fill=40)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert grid[1, 1, 0] == 7 and grid[0, 0, 0] == 40 and grid[4, 4, 0] == 40  # the empty fourth tile stays fill


# What backends are, run and in which order `auto` tries them is owned by the registry (and the
# precision names by specs.py); export/ owns which sets an export step writes.
_BACKEND_OWNERS = ("specs.py", "runtime/backends.py")
_BACKEND_WORDS = re.compile(r"\b(torch|onnxruntime|openvino|tensorrt|PyTorch|ONNX Runtime|OpenVINO|TensorRT)\b")
# Modules that decide or report per backend by asking the registry: no backend name in them at all.
_ASKS_THE_REGISTRY = ("runtime/select.py", "runtime/base.py", "parity/bench.py")
# Where help texts and selection errors are written (elsewhere, prose may name packages to install).
_HELP_AND_ERRORS = ("cli/", "runtime/", "parity/", "sampling/", "doctor.py")


def _docstring_ids(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)  # type: ignore[attr-defined]
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_backend_names_precisions_and_the_auto_order_have_one_owner() -> None:
    """Outside the registry and specs.py no module writes a list of backend names or of precisions,
    nor a text naming three or more backends (a backend list or the auto order in help or errors);
    the selection policy, the runners and bench do not spell a backend name at all."""
    backends = set(REGISTRY)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        if relative in _BACKEND_OWNERS:
            continue
        tree = ast.parse(path.read_text())
        docstrings = _docstring_ids(tree)
        preferences = {id(n) for node in ast.walk(tree) if isinstance(node, ast.IfExp)
                       for n in (node.body, node.orelse)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in preferences and node.elts \
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = {e.value for e in node.elts}  # type: ignore[attr-defined]
                if len(values) >= 2 and (values <= backends | {"auto"} or
                                         (values <= set(RUN_PRECISIONS) and not relative.startswith("export/"))):
                    offenders.append(f"{relative}:{node.lineno} {sorted(values)}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                named = {m.lower().replace(" ", "") for m in _BACKEND_WORDS.findall(node.value)}
                if (len(named) >= 3 and relative.startswith(_HELP_AND_ERRORS)) or \
                        (relative in _ASKS_THE_REGISTRY and node.value in backends):
                    offenders.append(f"{relative}:{node.lineno} {node.value[:60]!r}")
    assert not offenders, offenders


def _texts(tree: ast.AST) -> list[tuple[int, str]]:
    """The string literals of a module outside its docstrings, an f-string as one text (`{}` for each value)."""
    docstrings = _docstring_ids(tree)
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | parts:
            texts.append((node.lineno, node.value))
    return texts


def test_the_library_names_settings_by_parameter_not_by_cli_flag() -> None:
    """Outside the CLI no text spells an option the CLI maps a parameter to (`OPTION_NAMES`): an error or
    hint names the parameter (`{calibration_images}`, `MMGenError.params`) and the CLI prints its flag, so
    a library caller reads its own argument names. A whole command in backticks (`mmgen export RUN
    --components ...`) is a command to run, and may; so may a literal that is one flag alone (an argument of
    a command line being assembled, as `rebuild_command` does)."""
    from mmgen_deploy.cli.common import OPTION_NAMES

    flag = re.compile("(" + "|".join(re.escape(f) for f in sorted(set(OPTION_NAMES.values()), key=len,
                                                                    reverse=True)
                                     if f.startswith("--")) + r")(?![\w-])")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        if relative.startswith("cli/"):
            continue
        for line, text in _texts(ast.parse(path.read_text())):
            if flag.fullmatch(text):
                continue
            prose = re.sub(r"`[^`]*`", "", text)
            offenders += [f"{relative}:{line} {found!r} in {text[:70]!r}" for found in flag.findall(prose)]
    assert not offenders, "\n".join(offenders)
