"""The code base's shape: imports go one way down, and no module reaches into another's private names."""

from __future__ import annotations

import ast
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
