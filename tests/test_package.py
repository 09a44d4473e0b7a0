"""The package root and how its modules import each other: one name for one thing, imports that go down."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import lfm2edge


def _child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_convert_is_the_subpackage_before_and_after_its_modules_are_imported():
    # In a fresh process: before any lfm2edge.convert.* import, then after one.
    out = _child(
        "import lfm2edge, types\n"
        "first = lfm2edge.convert\n"
        "import lfm2edge.convert.pipeline\n"
        "print(isinstance(first, types.ModuleType), lfm2edge.convert is first, first.__name__)"
    )
    assert out == "True True lfm2edge.convert"


def test_convert_checkpoint_is_the_converter():
    from lfm2edge.convert.pipeline import convert

    assert lfm2edge.convert_checkpoint is convert
    assert "convert_checkpoint" in lfm2edge.__all__ and "convert" not in lfm2edge.__all__
    assert isinstance(lfm2edge.runtime, types.ModuleType) and isinstance(lfm2edge.bench, types.ModuleType)


@pytest.mark.parametrize("name", sorted(lfm2edge.__all__))
def test_every_exported_name_resolves(name):
    assert getattr(lfm2edge, name) is not None


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lfm2edge.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("lfm2edge", ("torch", "typer", "lfm2edge.runtime.core.encoders", "lfm2edge.convert")),
        ("lfm2edge.runtime.frontends.search_cli", ("lfm2edge.cli",)),  # the root app imports the search commands
        ("lfm2edge.runtime.storage.index", ("lfm2edge.runtime.core.encoders", "lfm2edge.runtime.core.llama")),
        ("lfm2edge.convert.quantize", ("lfm2edge.runtime.core.llama",)),  # the backend is initialised when used
        ("lfm2edge.runtime.core.encoders", ("lfm2edge.runtime.storage.index", "lfm2edge.runtime.storage.vector_codecs", "torch")),
    ],
)
def test_imports_only_go_down(module, must_not_load):
    loaded = _child(f"import sys, {module}; print([m for m in {must_not_load!r} if m in sys.modules])")
    assert loaded == "[]"


LAYERS = {
    "core": ("storage", "distributed", "frontends"),
    "storage": ("distributed", "frontends"),
    "distributed": ("frontends",),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_runtime_layer_imports_only_the_layers_below(layer):
    """core imports nothing above it; storage neither the distributed pipeline nor front-ends; the
    distributed pipeline no front-end."""
    import pkgutil

    package = __import__(f"lfm2edge.runtime.{layer}", fromlist=["_"])
    modules = [f"lfm2edge.runtime.{layer}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
               if not m.name.startswith("_")]
    assert modules, layer
    above = tuple(f"lfm2edge.runtime.{u}" for u in LAYERS[layer])
    loaded = _child(
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({above!r})))"
    )
    assert loaded == "[]", loaded

