"""states/ is the functional core: it must not import anything that touches the world."""

import ast
from pathlib import Path

import states

FORBIDDEN = {"ray", "subprocess", "aiohttp", "http", "urllib", "requests", "httpx", "socket",
             "asyncio.subprocess", "controller", "os", "time", "signal", "multiprocessing"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def test_states_imports_no_effects():
    root = Path(states.__file__).parent
    files = sorted(root.glob("*.py"))
    assert files, "states/ has no modules"
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert name not in FORBIDDEN and top not in FORBIDDEN, f"{path.name} imports {name}"


def test_layering_check_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import subprocess\nfrom ray.util import x\n")
    assert {"subprocess", "ray.util"} <= imported_modules(bad)


def test_the_product_never_imports_the_test_kit():
    root = Path(states.__file__).parent.parent / "controller"
    for path in sorted(root.rglob("*.py")):
        if path.name == "testing.py":
            continue
        assert "controller.testing" not in imported_modules(path), f"{path} imports the test kit"


def test_only_the_ray_adapter_imports_ray():
    """Every Ray call goes through controller/cluster/ray_adapter.py, which the node,
    the coordinator client, the replica set and the monitors are handed (the actor
    classes Ray imports on its nodes call no Ray themselves)."""
    root = Path(states.__file__).parent.parent / "controller"
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() == "cluster/ray_adapter.py":
            continue
        ray_imports = {n for n in imported_modules(path) if n.split(".")[0] == "ray"}
        assert not ray_imports, f"{path.relative_to(root)} imports {sorted(ray_imports)}"
