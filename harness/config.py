"""The one gin parse site.

gin names the config dataclasses of ``harness.specs``, the sweep's ``Grid`` and every registered
method (``superclip.cls_weight = ...``); they are registered here, so no module below the entry
point depends on gin. Every file is syntax-checked first so that an error names its file and
line, and ``resolve`` turns the parsed config into a ``RunSpec``: plain values that the plan
carries to every process. Nothing else reads gin.

Macros every config understands (``configs/base.gin`` defines their defaults)::

    METHOD  BATCH_SIZE  SEED  TRAIN_SAMPLES  MODEL  DATA
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tokenize
from pathlib import Path
from typing import Any

import gin
from gin import config_parser

import methods
from harness.errors import ConfigError, UserError
from harness.grid import Grid
from harness.plan import bindings_of
from harness.specs import DataConfig, EvalConfig, MethodSpec, RunConfig, RunSpec, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
MACROS = ("METHOD", "BATCH_SIZE", "SEED", "TRAIN_SAMPLES", "MODEL", "DATA")
_SEARCH_PATHS: set[Path] = set()


def _faults(spec: str = "") -> str:
    """``Faults.spec``: a deliberate fault for the reliability tests (harness.faults)."""
    return spec


# gin's wrappers of the plain classes, by the names config files use
_CONFIGURABLE = {
    cls: gin.external_configurable(cls, cls.__name__, module="harness")
    for cls in (RunConfig, TrainConfig, DataConfig, EvalConfig, Grid)
}
_FAULTS = gin.external_configurable(_faults, "Faults", module="harness")
_METHODS = {
    name: gin.external_configurable(methods.method_class(name), name, module="methods")
    for name in methods.registered_names()
}


def _resolved(cls: type) -> Any:
    """An instance of ``cls`` (not gin's subclass of it) with the values the config binds."""
    made = _CONFIGURABLE[cls]()
    return cls(**{f.name: getattr(made, f.name) for f in dataclasses.fields(cls)})


def configured_method(name: str) -> methods.Method:
    """The method ``name`` built with its bound hyperparameters (so they count as operative)."""
    methods.method_class(name)  # an unknown name: the error lists the registered ones
    try:
        return _METHODS[name]()
    except (ValueError, TypeError) as e:
        raise ConfigError(_without_gin_suffix(e)) from None


def _without_gin_suffix(error: Exception) -> str:
    # gin appends "In call to configurable ..." to errors raised inside a configurable
    return str(error).split("\n  In call to configurable")[0]


def _includes(path: Path) -> list[Path]:
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("include "):
            found.append(_resolve(line.split(None, 1)[1].strip().strip("'\""), path.parent, path))
    return found


def _resolve(name: str, here: Path, including: Path | None) -> Path:
    for base in (Path.cwd(), here, REPO_ROOT):
        candidate = (base / name).resolve()
        if candidate.exists():
            return candidate
    where = f" (included from {including})" if including else ""
    raise ConfigError(f"config file not found: {name}{where}")


def check_syntax(path: Path, seen: set[Path] | None = None) -> None:
    """Parse ``path`` and its includes without binding anything; errors name file and line."""
    seen = set() if seen is None else seen
    if path in seen:
        return
    seen.add(path)
    try:
        with open(path) as f:
            for _ in config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True)):
                pass
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: malformed gin ({e.msg})") from None
    except tokenize.TokenError as e:
        line = e.args[1][0] if len(e.args) > 1 else "?"
        raise ConfigError(
            f"{path}, line {line}: malformed gin (unclosed bracket or quote)"
        ) from None
    for child in _includes(path):
        check_syntax(child, seen)


def refuse_imports(path: Path) -> None:
    """gin's ``import`` statements import (run) Python modules: never from an untrusted file."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"\s*(import|from)\s", line):
            raise ConfigError(
                f"{path}, line {number}: refusing a gin import statement in a run directory"
            )


def parse(
    config_files: list[str | Path], bindings: list[str] = (), *, trusted: bool = True
) -> list[Path]:
    """Clear gin, then parse files and bindings; returns the resolved file paths.

    ``trusted=False`` (configs read back from run directories) refuses gin import statements.
    """
    paths = [_resolve(str(f), Path.cwd(), None) for f in config_files]
    for path in paths:
        check_syntax(path)
        if not trusted:
            refuse_imports(path)
    gin.clear_config()
    for folder in (REPO_ROOT, *(p.parent for p in paths)):
        if folder not in _SEARCH_PATHS:  # gin keeps search paths for the whole process
            _SEARCH_PATHS.add(folder)
            gin.add_config_file_search_path(str(folder))
    try:
        gin.parse_config_files_and_bindings([str(p) for p in paths], list(bindings))
    except (ValueError, KeyError, OSError, SyntaxError, tokenize.TokenError) as e:
        raise ConfigError(_clean(e, bindings)) from None
    check_macros_used(list(bindings))
    return paths


def check_macros_used(bindings: list[str]) -> None:
    """gin takes any ``NAME = value`` as a macro: a misspelt one (``--gin_param "SEEDS=1"``, a
    grid axis ``'SEEDS'``) would be stored, hashed into the config and never read. A macro
    bound by ``bindings`` that nothing references is refused, unless it is one of the harness's
    own (a stage may bind what its macro would set); files may keep macros a binding overrides."""
    text = full_config()
    defined = set(re.findall(r"^([A-Za-z_]\w*) = ", text, flags=re.MULTILINE))
    used = set(re.findall(r"%([A-Za-z_]\w*)", text))
    named = {binding.partition("=")[0].strip() for binding in bindings}
    unused = sorted((defined - used - set(MACROS)) & named)
    if unused:
        raise ConfigError(
            f"macro {', '.join(unused)} is bound but nothing uses it (misspelt?); "
            f"the harness's macros are {', '.join(MACROS)}"
        )


# NAME=word with the word unquoted: what a shell leaves of --gin_param METHOD='clip'.
BARE_WORD_BINDING = re.compile(r"^\s*([\w./]+)\s*=\s*([A-Za-z_][\w-]*)\s*$")
# Python's literal parser names an object by its address: noise in a message for users.
AST_NODE = re.compile(r"malformed node or string on line \d+: <ast\.\w+ object at 0x[0-9a-f]+>\s*")


def _clean(error: Exception, bindings: list[str]) -> str:
    text = AST_NODE.sub("", str(error).strip()) or repr(error)
    required = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", text)
    if required:
        name = required.group(1)
        return f"this config requires {name}: pass --gin_param \"{name}=...\" (e.g. {name}='path')"
    if isinstance(error, SyntaxError | tokenize.TokenError) and bindings:
        for binding in bindings:
            bare = BARE_WORD_BINDING.match(binding)
            if bare and bare.group(2) not in ("True", "False", "None"):
                name, word = bare.groups()
                return (
                    f"--gin_param {binding!r}: {word} is not a value gin can read; a string "
                    f"needs quotes: {name}='{word}' (in a shell: --gin_param \"{name}='{word}'\")"
                )
        return f"malformed --gin_param binding among {list(bindings)}: {text}"
    return text


def resolve() -> RunSpec:
    """The parsed config's run: its config dataclasses and its method's hyperparameters."""
    try:
        run = _resolved(RunConfig)
        method = MethodSpec(
            run.method, gin.get_bindings(run.method) if run.method in _METHODS else {}
        )
        return RunSpec(
            run=run, train=_resolved(TrainConfig), data=_resolved(DataConfig),
            eval=_resolved(EvalConfig), method=method, faults=_FAULTS(),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(_without_gin_suffix(e)) from None


def configured_grid() -> Grid | None:
    """The parsed config's grid, or None when the config is a single run."""
    try:
        axes = gin.query_parameter("Grid.axes")
    except ValueError:
        return None
    if not axes:
        return None
    try:
        return _resolved(Grid)
    except ValueError as e:
        raise ConfigError(_without_gin_suffix(e)) from None


def macro(name: str) -> Any:
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None


def full_config() -> str:
    """Every binding and macro in force (not only the ones used so far)."""
    return gin.config_str()


def operative_config() -> str:
    return gin.operative_config_str()


def config_hash(*extra: Any, ignore: frozenset[str] = frozenset()) -> str:
    """Hash of the complete parsed config plus anything else that changes the result.

    ``ignore`` names configurables whose bindings are left out (e.g. the hyperparameters of
    methods other than the one a run trains, which cannot change its result); the sweep layout
    is always left out (``plan.bindings_of``).
    """
    lines = bindings_of(full_config(), ignore=ignore)
    payload = "\n".join(lines) + "".join(json.dumps(x, sort_keys=True, default=str) for x in extra)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]
