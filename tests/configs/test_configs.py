"""Every file under configs/ loads, and every ``type`` in it resolves in some registry."""

from pathlib import Path

import mmengine.registry as mm_registry
import mmengine.runner  # noqa: F401  (registers mmengine's hooks, loops, ... as a Runner does)
import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope, Registry

import groma_px.registry as gp_registry
import region_proposer.registry as rp_registry

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.py"))


def _registries() -> list[Registry]:
    found = []
    for module in (gp_registry, rp_registry, mm_registry):
        found += [v for v in vars(module).values() if isinstance(v, Registry)]
    # Import each registry's own modules, as a build does (parent lookups skip them).
    for registry in found:
        registry.import_from_location()
    return found


def _types(node, path="cfg"):
    """Yields (path, type name) for every dict with a string ``type`` in a config tree."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield path, node["type"]
        for key, value in node.items():
            yield from _types(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _types(value, f"{path}[{i}]")


def test_config_files_exist():
    assert CONFIG_FILES, "no config files found"
    assert (CONFIG_DIR / "_base_" / "default_runtime.py") in CONFIG_FILES


@pytest.mark.parametrize(
    "path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES]
)
def test_config_loads_and_types_resolve(path):
    cfg = Config.fromfile(str(path))
    scope = cfg.get("default_scope", "groma_px")
    registries = _registries()
    unresolved = []
    with DefaultScope.overwrite_default_scope(scope):
        for where, name in _types(cfg.to_dict()):
            if not any(reg.get(name) is not None for reg in registries):
                unresolved.append(f"{where}: {name}")
    assert not unresolved, f"{path}: unresolved types {unresolved}"


def test_resolver_reports_unknown_type():
    # The check above must be able to fail: an unknown name resolves nowhere.
    with DefaultScope.overwrite_default_scope("groma_px"):
        assert all(reg.get("NoSuchComponentXYZ") is None for reg in _registries())
