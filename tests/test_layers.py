"""The layering of docs/ARCHITECTURE.md, read from the import statements (no import runs):
the kernels sit at the ground floor, the tuner above them, the op above both."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it is installed as
PACKAGES = {"sasa_triton": "sasa_triton", "kernels": "sasa_triton.kernels",
            "autotune": "sasa_triton.autotune"}


def package_imports(path: Path, source: str = None) -> set[str]:
    """The sasa_triton modules a file imports (relative imports resolved), anywhere in it
    (`source` stands in for the file's text)."""
    folder = path.parent.relative_to(ROOT).parts
    package = PACKAGES[folder[0]].split(".") + list(folder[1:])
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` / `from pkg import x` may name submodules: keep both forms
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "sasa_triton")
    return found


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


def _is_submodule_of(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


GROUND = ("sasa_triton.types", "sasa_triton.window")


def kernel_violations(names: set[str]) -> set[str]:
    return {n for n in names if n not in ("sasa_triton", "sasa_triton.kernels")
            and not _is_submodule_of(n, ("sasa_triton.kernels", *GROUND))}


@pytest.mark.parametrize("path", _files("kernels"), ids=lambda p: p.name)
def test_kernels_import_only_the_ground_floor(path):
    assert not kernel_violations(package_imports(path)), path.name


@pytest.mark.parametrize("path", _files("autotune"), ids=lambda p: p.name)
def test_the_tuner_stays_below_the_op(path):
    above = ("sasa_triton.reference", "sasa_triton.reference_bwd", "sasa_triton.dispatch",
             "sasa_triton.ops", "sasa_triton.api", "sasa_triton.nn", "sasa_triton.report")
    for name in package_imports(path):
        assert not _is_submodule_of(name, above), f"autotune/{path.name} imports {name}"


@pytest.mark.parametrize("module", ["types", "window", "perf_suite", "variants"])
def test_the_shared_modules_import_only_the_vocabulary(module):
    names = package_imports(ROOT / "sasa_triton" / f"{module}.py")
    assert names <= {"sasa_triton", "sasa_triton.types", "sasa_triton.types.AttendArgs",
                     "sasa_triton.types.DIRECTIONS"}, names


def test_the_check_sees_a_violation():
    path = ROOT / "kernels" / "common.py"
    source = path.read_text() + "\nfrom sasa_triton.args import check_attend_args\n" \
        "from ..dispatch import choose\n"
    assert kernel_violations(package_imports(path, source)) >= {
        "sasa_triton.args", "sasa_triton.dispatch"}
