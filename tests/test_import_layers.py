"""The package's import layering (DESIGN.md, "Layers of the code"): every module imports only from its own layer or
below, inside functions too, so there are no import cycles and each layer can be read and tested without the ones
above it; and visionmoe.reference, the test oracle, imports without the compiled extension."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGE = "visionmoe"
PACKAGE_DIR = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])

# DESIGN.md's order, bottom to top; each entry names the package's top-level modules and subpackages of one layer.
# The bottom layer also holds the neutral helpers several layers share (constants that ops and reference both
# need, the argument checks that fake kernels and references share, token groups that routers and losses both need,
# memory measurement for tests and benchmarks).
LAYERS = [
    ("registry", "plan", "data", "constants", "checks", "groups", "memory"),
    ("_C", "ops"),
    ("reference",),
    ("losses",),
    ("metrics",),
    ("routers",),
    ("layers",),
    ("models",),
    ("convert",),
    ("distributed",),
    ("train", "evaluate"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# The reference is the oracle the operators are tested against, so it must not reach them (or the extension) even
# though they lie below it.
FORBIDDEN = {"reference": {"_C", "ops"}}


def module_name(path: Path) -> str:
    parts = (PACKAGE,) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_top_level_module(name: str) -> bool:
    paths = (PACKAGE_DIR / name, PACKAGE_DIR / f"{name}.py")
    return any(path.exists() for path in paths) or any(PACKAGE_DIR.glob(f"{name}.*.so"))


def imported_modules(node: ast.AST, module: str, is_package: bool):
    """The visionmoe modules that one import statement of ``module`` names, relative imports resolved.
    ``from visionmoe import x`` names the submodule visionmoe.x when there is one, else the package itself; in
    ``from visionmoe.a import x`` the names lie in a, so a alone decides the layer."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    if base != PACKAGE:
        return [base]
    return [f"{PACKAGE}.{alias.name}" if is_top_level_module(alias.name) else PACKAGE for alias in node.names]


def layer_of(module: str):
    """The top-level part of visionmoe that ``module`` belongs to: a name in LAYERS, the package itself (whose
    __init__ gathers every layer, so nothing inside may import it), or None outside visionmoe."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else PACKAGE


def layering_violations():
    violations, modules = [], []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module, is_package = module_name(path), path.name == "__init__.py"
        modules.append(module)
        own = layer_of(module)
        if own == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_modules(node, module, is_package):
                other = layer_of(target)
                if other is None or other == own:
                    continue
                where = f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}: `{ast.unparse(node)}`"
                if other == PACKAGE:
                    violations.append(f"{where} imports the package root, which imports every layer")
                elif other not in RANK or own not in RANK:
                    violations.append(f"{where}: give {other!r} and {own!r} a layer in LAYERS")
                elif RANK[other] > RANK[own]:
                    violations.append(f"{where} imports {target}: layer {other!r} is above {own!r}")
                elif other in FORBIDDEN.get(own, ()):
                    violations.append(f"{where} imports {target}, which layer {own!r} must not use")
    return violations, modules


def test_every_module_imports_only_from_its_own_layer_or_below():
    violations, _ = layering_violations()
    assert not violations, "imports against DESIGN.md's layer order:\n" + "\n".join(violations)


def test_every_part_of_the_package_has_a_layer():
    _, modules = layering_violations()
    assert "visionmoe.ops.dispatch" in modules and "visionmoe.train.trainer" in modules  # the walk saw the tree
    parts = {layer_of(module) for module in modules} - {PACKAGE}
    assert parts <= set(RANK), f"give these a layer in LAYERS: {sorted(parts - set(RANK))}"


def test_relative_imports_resolve_to_the_modules_they_name():
    function = ast.parse("def f():\n    from ..models.vit import Block\n").body[0]
    assert imported_modules(function.body[0], "visionmoe.layers.moe_mlp", False) == ["visionmoe.models.vit"]
    node = ast.parse("from .. import _C, ops, RoutingPlan\n").body[0]
    assert imported_modules(node, "visionmoe.reference", True) == ["visionmoe._C", "visionmoe.ops", "visionmoe"]


REFERENCE_WITHOUT_EXTENSION = f"""
import importlib.abc, sys, types

class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "visionmoe._C":
            raise ImportError("visionmoe._C is blocked in this test")
        return None

sys.meta_path.insert(0, BlockExtension())
# visionmoe/__init__ loads the extension on purpose (importing visionmoe registers torch.ops.visionmoe), so an empty
# package stands in for it and only the reference and what it imports run.
package = types.ModuleType("visionmoe")
package.__path__ = [{str(PACKAGE_DIR)!r}]
sys.modules["visionmoe"] = package

import torch
import visionmoe.reference

assert "visionmoe._C" not in sys.modules and "visionmoe.ops" not in sys.modules, sorted(sys.modules)
probabilities = visionmoe.reference.sinkhorn(torch.zeros(4, 2)).exp()
assert torch.allclose(probabilities.sum(-1), torch.ones(4))
"""


def test_reference_imports_without_the_compiled_extension():
    result = subprocess.run([sys.executable, "-c", REFERENCE_WITHOUT_EXTENSION], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
