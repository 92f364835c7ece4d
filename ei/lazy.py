"""Package namespaces whose names are imported from their submodules on first use.

Reading a config must not wait for torch and timm (seconds): `ei.data`, `ei.model` and
`ei.train` list their public names here and import a submodule only when one of its names is
asked for, so `from ei.data import get_preset` loads presets.py alone.
"""

from __future__ import annotations

import importlib
import sys


def lazy_namespace(package: str, exports: dict[str, tuple[str, ...]]):
    """(__getattr__, __dir__, __all__) for `package`: exports maps submodule -> its names."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return __getattr__, __dir__, sorted(where)
