"""The package's layering, read from its import statements: data flows one way, and each decision has one home."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "commer"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS = [
    ["commer.version", "commer.errors", "commer.fetch"],
    ["commer.config", "commer.merge", "commer.backbone", "commer.batch"],
    ["commer.text", "commer.model"],
    ["commer.data"],
    ["commer.checkpoint"],
    ["commer.serving", "commer.train", "commer.evaluate", "commer.summary"],
    ["commer.store"],
    ["commer.service", "commer.scale", "commer.experiments", "commer.quickstart"],
    # the command lines and the package's public API sit on top of everything
    ["commer.cli", "commer.data.cli", "commer.service.cli", "commer.__main__", "commer.service.__main__", "commer"],
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of a module: that of the longest listed name it is or sits under."""
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``commer`` import that runs (not those only for type checkers)."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "commer")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "commer":
            found.append((node.lineno, node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


EDGES = [
    (_module_name(path), line, target)
    for path in sorted(PACKAGE.rglob("*.py"))
    for line, target in _imports(ast.parse(path.read_text(), str(path)))
]


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{source}:{line} imports {target} (layer {_layer(target)} > {_layer(source)})"
        for source, line, target in EDGES
        if _layer(target) > _layer(source)
    ]
    assert not upward, "\n".join(upward)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_packages_of_one_layer_do_not_import_each_other():
    edges = {(_package(s), _package(t)) for s, _, t in EDGES if _package(s) != _package(t)}
    cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, cycles


def test_the_layer_test_sees_imports_inside_functions_and_skips_type_checking():
    tree = ast.parse("if TYPE_CHECKING:\n    import commer.store\ndef f():\n    from commer.cli import app\n")
    assert _imports(tree) == [(4, "commer.cli")]
    assert _layer("commer.data.tasks") == 3 and _layer("commer.data.cli") == len(LAYERS) - 1


# -- one home per default ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        # K: a literal default for num_embeddings, k or --k (the one home is DEFAULT_K)
        (
            r"(num_embeddings|\bk)\s*(:\s*int)?\s*=\s*(typer\.Option\()?[0-9]+|Option\([0-9]+,\s*\"--k\"",
            r"^DEFAULT_K = 16\b",
        ),
        # the embedded backbone's name as a default (the one home is DEFAULT_BACKBONE)
        (r"=\s*(typer\.Option\()?\"smollm2-135m\"", r'^DEFAULT_BACKBONE = "smollm2-135m"'),
    ],
)
def test_a_default_is_defined_once(pattern, home):
    found = subprocess.run(
        ["grep", "-rnE", pattern, "commer", "--include=*.py"], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()
    elsewhere = [x for x in found if not (x.startswith("commer/config.py:") and re.search(home, x.split(":", 2)[2]))]
    assert not elsewhere, elsewhere
    assert re.search(home, (PACKAGE / "config.py").read_text(), re.M), f"config.py lost {home}"
