"""The one gin parse site.

Every configurable module is imported before parsing (gin locks the config after), every file
is syntax-checked first so that an error names its file and line, and all the small frozen
config dataclasses are instantiated here, once, into a ``RunSpec``. Inner code receives explicit
values, never gin.

Macros every config understands (``configs/base.gin`` defines their defaults)::

    METHOD  BATCH_SIZE  SEED  TRAIN_SAMPLES  MODEL  DATA
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util  # gin 0.5.0 needs importlib.util loaded to report a missing file
import json
import re
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gin
from gin import config_parser

from harness.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
MACROS = ("METHOD", "BATCH_SIZE", "SEED", "TRAIN_SAMPLES", "MODEL", "DATA")
_SEARCH_PATHS: set[Path] = set()
# modules whose import registers gin configurables (methods registers every method)
CONFIGURABLE_MODULES = (
    "harness.data",
    "harness.faults",
    "harness.grid",
    "harness.trainer",
    "methods",
)


@gin.configurable
@dataclass(frozen=True)
class RunConfig:
    """Which method and which model; ``device`` is auto, cpu or cuda."""

    method: str = "clip"
    model: str = "tiny-vit"
    device: str = "auto"


@gin.configurable
@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 250
    chunk_size: int = 1024  # queries scored at once; bounds memory at O(N * chunk)
    split: str = "test"
    probe_split: str = "train"
    probe_train_samples: int = 2000  # labelled train images used to fit the probe
    probe_C: float = 1.0  # inverse L2 strength of the logistic regression
    probe_max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.probe_split == self.split:
            raise ValueError(
                f"EvalConfig.probe_split={self.probe_split!r} is the evaluation split: the "
                f"probe would be fitted on the images it is scored on"
            )


def import_configurables() -> None:
    """Import every module that declares configurables, so gin knows them before parsing."""
    for name in CONFIGURABLE_MODULES:
        importlib.import_module(name)


@dataclass(frozen=True)
class RunSpec:
    run: RunConfig
    train: Any  # harness.trainer.TrainConfig
    data: Any  # harness.data.DataConfig
    eval: EvalConfig

    def to_json(self) -> dict[str, Any]:
        return {k: asdict(v) for k, v in self.__dict__.items()}


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
    import_configurables()
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
    """Instantiate the config dataclasses from the parsed gin config."""
    from harness.data import DataConfig
    from harness.trainer import TrainConfig

    try:
        return RunSpec(run=RunConfig(), train=TrainConfig(), data=DataConfig(), eval=EvalConfig())
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).split("\n  In call to configurable")[0]) from None


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


# How a sweep is laid out and launched (its axes, launcher, report): no single run's result
# depends on it, so adding a seed or a batch size to a grid keeps the cells already run. World
# size, the one launch choice that can change a result, is hashed by the callers.
SWEEP_LAYOUT = frozenset({"Grid"})


def config_hash(*extra: Any, ignore: frozenset[str] = frozenset()) -> str:
    """Hash of the complete parsed config plus anything else that changes the result.

    ``ignore`` names configurables whose bindings are left out (e.g. the hyperparameters of
    methods other than the one a run trains, which cannot change its result); the sweep layout
    is always left out.
    """
    lines = _bindings(full_config(), ignore=ignore)
    payload = "\n".join(lines) + "".join(json.dumps(x, sort_keys=True, default=str) for x in extra)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def differing_bindings(
    saved: str, *, ignore: frozenset[str] = frozenset(), ignore_params: frozenset[str] = frozenset()
) -> list[str]:
    """The bindings where the parsed config and ``saved`` (an earlier ``full_config()``) differ,
    as '- old' and '+ new'. Left out: the bindings of the ``ignore`` configurables and the sweep
    layout (as in ``config_hash``) and of ``ignore_params`` such as 'superclass.init_from', which
    hold the directories of earlier stages (their own configs are checked where they run, and a
    sweep may have moved since)."""

    def kept(text: str) -> list[str]:
        return [
            binding
            for binding in _bindings(text, ignore=ignore)
            if not any(binding.split("=", 1)[0].strip().endswith(p) for p in ignore_params)
        ]

    old, new = kept(saved), kept(full_config())
    old_set, new_set = set(old), set(new)
    return [f"- {x}" for x in old if x not in new_set] + [f"+ {x}" for x in new if x not in old_set]


def _bindings(text: str, *, ignore: frozenset[str]) -> list[str]:
    """gin's config text as one string per binding (a long value goes on over indented lines),
    without comments, blank lines, the sweep layout and the ``ignore`` configurables."""
    bindings: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and bindings:
            bindings[-1] += "\n" + line
        else:
            bindings.append(line)
    left_out = ignore | SWEEP_LAYOUT
    return [b for b in bindings if _configurable_of(b) not in left_out]


def _configurable_of(line: str) -> str | None:
    """'scope/module.name.param = value' -> 'name'; None for macros, comments and blank lines."""
    selector = line.split("=", 1)[0].strip()
    if "=" not in line or line.startswith("#") or "." not in selector:
        return None
    return selector.rsplit("/", 1)[-1].rsplit(".", 2)[-2]
