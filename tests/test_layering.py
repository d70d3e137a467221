"""The code base's shape: imports go one way down, no module reaches into another's private names,
no two modules share a name, and no setting's default is written twice."""

from __future__ import annotations

import ast
import collections
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("meteora_jax", "pallas_kernels")


def _project_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _private_imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[str]:
    """`from project.module import _name`, and `alias._name` where alias is a project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                elif f"{node.module}.{alias.name}" in modules:
                    module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
        ):
            found.append(f"{path.name}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    modules = _project_modules()
    found = [hit for path in modules.values() for hit in _private_imports(path, modules)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checker_sees_a_private_import(tmp_path):
    """The check above can fail: it flags both forms on a sample file."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from meteora_jax.generation import _step\nfrom meteora_jax import generation as gen\ngen._plan\n"
    )
    hits = _private_imports(sample, {"meteora_jax.generation": sample})
    assert len(hits) == 2, hits


def test_pallas_kernels_import_nothing_of_the_library():
    """`pallas_kernels` sits below `meteora_jax`: importing it loads neither the library nor Orbax."""
    code = (
        "import sys, pallas_kernels; "
        "print([m for m in sys.modules if m.startswith(('meteora_jax', 'orbax'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# The README's architecture table, top to bottom: a module imports only from its own layer or above.
LAYERS = (
    ("pallas_kernels",),
    ("meteora_jax.errors", "meteora_jax.settings", "meteora_jax.sharding", "meteora_jax.chips"),
    ("meteora_jax.ops",),
    ("meteora_jax.inputs", "meteora_jax.config"),
    ("meteora_jax.modeling",),
    ("meteora_jax.io",),
    ("meteora_jax.data",),
    ("meteora_jax.api", "meteora_jax.generation", "meteora_jax.text", "meteora_jax.viz"),
    ("meteora_jax.training",),
    ("meteora_jax.evaluation",),
    ("meteora_jax.serving",),
    ("meteora_jax.bench",),
    ("meteora_jax.aot",),
    ("meteora_jax.demo",),
    ("meteora_jax.commands", "meteora_jax.cli"),
)


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package's own `__init__`


def _upward_imports(path: pathlib.Path, module: str) -> list[str]:
    """Imports of `module` (at `path`) from a layer below its own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:  # `from meteora_jax import io`: meteora_jax.io
            top = node.module in PACKAGES
            names += [f"{node.module}.{a.name}" for a in node.names] if top else [node.module]
        for name in names:
            theirs = _layer(name)
            if theirs is not None and theirs > _layer(module):
                found.append(f"{module} (layer {_layer(module)}) imports {name} (layer {theirs})")
    return found


def test_imports_go_one_way_up_the_readme_table():
    modules = _project_modules()
    assert all(_layer(m) is not None for m in modules if m not in PACKAGES), "a module in no layer"
    found = [
        hit for name, path in modules.items() if name not in PACKAGES for hit in _upward_imports(path, name)
    ]
    assert not found, "imports from a lower layer:\n" + "\n".join(found)


def test_the_layer_checker_sees_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import meteora_jax.commands\nfrom meteora_jax import demo\n"
        "from meteora_jax.errors import ConfigError\n"
    )
    assert len(_upward_imports(sample, "meteora_jax.ops.routing")) == 2


def test_no_two_modules_share_a_name():
    names = collections.Counter(p.name for p in _project_modules().values() if p.name != "__init__.py")
    assert not [n for n, count in names.items() if count > 1]


# Parameters that share a name and a default but are different settings: (name, repr(value)).
COINCIDENT_DEFAULTS = {
    ("batch_size", "8"),  # training rows (DataConfig, the demo), prompts per batch (eval, generate)
    ("max_positions", "256"),  # the tests' tiny model and the demo's base, sized apart
}
TRIVIAL_DEFAULTS = (None, True, False, 0, 1, "", 0.0, 1.0)


def _literal_defaults(paths) -> dict[tuple[str, str], list[str]]:
    """(parameter name, repr(default)) -> where it is written, over the literal defaults of
    function parameters, annotated class fields (a `setting(default, ...)` counts as its default)
    and argparse `--flag` defaults; small values that say "off" or "none" are not counted."""
    found = collections.defaultdict(list)
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args
                with_default = args[len(args) - len(node.args.defaults) :]
                pairs += zip([a.arg for a in with_default], node.args.defaults, strict=True)
                pairs += [
                    (a.arg, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True) if d
                ]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                pairs.append((node.target.id, node.value))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags = [
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                ]
                pairs += [
                    (flags[0][2:].replace("-", "_"), k.value)
                    for k in node.keywords
                    if flags and k.arg == "default"
                ]
            for name, value in pairs:
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "setting" and value.args:
                    value = value.args[0]
                try:
                    literal = ast.literal_eval(value)
                except ValueError:
                    continue
                if literal in TRIVIAL_DEFAULTS and not isinstance(literal, tuple | dict):
                    continue
                if isinstance(literal, int | float | str) or (isinstance(literal, tuple | dict) and literal):
                    found[(name, repr(literal))].append(f"{path.relative_to(path.parents[1])}:{node.lineno}")
    return found


def test_no_default_is_written_twice():
    """A setting's default lives in one declaration; the others name it (`TrainConfig.save_every`,
    `DEFAULT_LAYOUT`), so changing it cannot leave a stale copy behind."""
    found = _literal_defaults(_project_modules().values())
    twice = {k: v for k, v in found.items() if len(v) > 1 and k not in COINCIDENT_DEFAULTS}
    assert not twice, "defaults written more than once:\n" + "\n".join(f"{k}: {v}" for k, v in twice.items())


def test_the_default_checker_sees_a_repeated_default(tmp_path):
    """The check above can fail: a function default, a field and a flag repeating one value."""
    sample = tmp_path / "pkg" / "sample.py"
    sample.parent.mkdir()
    sample.write_text(
        "def f(*, top_k=2, off=0): ...\n"
        "class C:\n    top_k: int = setting(2, 'k')\n"
        "parser.add_argument('--top-k', default=2)\n"
    )
    assert _literal_defaults([sample]) == {
        ("top_k", "2"): ["pkg/sample.py:1", "pkg/sample.py:3", "pkg/sample.py:4"]
    }
