"""docs/architecture.md matches the tree: every folder and top-level module of the package,
and every module of the inspector, has its place in the page."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe_devkit"
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def test_every_folder_of_the_package_is_described() -> None:
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders, "no subpackage found"
    missing = [name for name in folders if f"**`{name}/`**" not in PAGE]
    assert not missing, f"docs/architecture.md has no paragraph for {missing}"


def test_every_top_level_module_has_its_layer() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    layers = PAGE.split("```")[1]  # the layer diagram
    missing = [name for name in modules if name not in layers]
    assert not missing, f"the layer diagram of docs/architecture.md lacks {missing}"


def test_every_inspector_module_is_named() -> None:
    modules = sorted(p.name for p in (PACKAGE / "inspect").glob("*.py") if p.stem != "__init__")
    missing = [name for name in modules if f"`{name}`" not in PAGE]
    assert not missing, f"docs/architecture.md does not name inspect/{missing}"
