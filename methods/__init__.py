"""The method registry. Importing this package registers every method module in it.

A method is one file in this folder whose class is decorated with ``@register("name")``; the
decorator also makes the class gin-configurable under that name, so ``superclip.cls_weight = 1.0``
in a gin file sets that method's hyperparameter. Nothing else needs editing to add a method.
"""

from __future__ import annotations

import importlib
import pkgutil

import gin

from harness.errors import UnknownMethodError
from methods.base import Method, RunInfo, Stage

_REGISTRY: dict[str, type[Method]] = {}
_NOT_METHODS = {"base", "common"}


def register(name: str):
    """Class decorator: add a Method subclass to the registry under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        if not issubclass(cls, Method):
            raise TypeError(f"{cls} must subclass methods.base.Method")
        cls.name = name
        configurable = gin.configurable(name, module="methods")(cls)
        _REGISTRY[name] = configurable
        return configurable

    return decorate


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(registered_names())}"
        )
    return _REGISTRY[name]


def other_methods(name: str) -> frozenset[str]:
    """Every registered method but ``name``: their gin bindings cannot change a ``name`` run."""
    return frozenset(registered_names()) - {name}


def build_method(name: str) -> Method:
    """Instantiate a registered method with its gin-bound hyperparameters."""
    return method_class(name)()


def _import_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = [
    "Method",
    "RunInfo",
    "Stage",
    "UnknownMethodError",
    "build_method",
    "method_class",
    "other_methods",
    "register",
    "registered_names",
]
