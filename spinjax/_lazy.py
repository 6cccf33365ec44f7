"""Package namespaces that load their modules on first attribute access (PEP 562).

A package's ``__init__`` declares its public API as {module: names}; nothing is imported until a
name is used, so importing a light module of a package never drags in its heavy siblings (JAX,
flax, huggingface_hub) and an ``import`` changes nothing in the process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any


def lazy_api(package: str, api: Mapping[str, Sequence[str]]) -> tuple[Callable, Callable, list[str]]:
    """(``__getattr__``, ``__dir__``, ``__all__``) for ``package`` exporting ``api``'s names,
    each from its module (relative to the package)."""
    module_of = {name: module for module, names in api.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in module_of:
            return getattr(import_module(f"{package}.{module_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(module_of)

    return __getattr__, __dir__, sorted(module_of)
