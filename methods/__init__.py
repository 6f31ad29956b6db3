"""The method registry. Importing this package registers every method module in it.

A method is one file in this folder whose class is decorated with ``@register("name")``, plus
its gin file ``configs/methods/<name>.gin``: the harness makes each registered class
gin-configurable under its name (``superclip.cls_weight = 1.0``), includes every method's gin
file and sweeps every registered method by default. Nothing else needs editing to add a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from harness.errors import UnknownMethodError
from harness.specs import MethodSpec
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
        _REGISTRY[name] = cls
        return cls

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


def build_method(spec: MethodSpec | str) -> Method:
    """Instantiate a registered method: by name (its defaults) or from a ``MethodSpec`` (the
    hyperparameters a run's config gives it)."""
    spec = MethodSpec(spec) if isinstance(spec, str) else spec
    return method_class(spec.name)(**spec.kwargs)


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
