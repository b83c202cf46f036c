"""What a recipe, a command-line override or a checkpoint's hyper-parameters may make the CLI import.

Recipes are code: jsonargparse imports every ``class_path`` and every dotted path given to a
``Callable`` or ``type`` argument (``on_fit_start: some_module.hook``), and Lightning merges a
``--ckpt_path`` file's ``hyper_parameters._class_path`` into the configuration. Two guards stand
before any import:

- :func:`check_imports` reads recipe files, the command line and a checkpoint's hyper-parameters as
  plain data and refuses every ``class_path``, and every other value that is the dotted path of an
  importable module, outside :data:`ALLOWED_NAMESPACES` (less :data:`DENIED_WITHIN`), in one line
  naming the value, its key and where it came from;
- :func:`import_policy` sets jsonargparse's own import-path policy for the run (deny everything but
  the allowed namespaces), so that a value the first guard cannot see as a path is refused at the
  one place where jsonargparse imports values.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import yaml
from jsonargparse import Namespace, set_parsing_settings
from jsonargparse import _common as jsonargparse_settings

__all__ = [
    "ALLOWED_NAMESPACES",
    "ALLOW_ANY_FLAG",
    "DENIED_WITHIN",
    "UnsafeRecipeError",
    "check_command_line",
    "check_imports",
    "import_policy",
]

ALLOWED_NAMESPACES = ("torch", "torchvision", "torchmetrics", "timm", "albumentations", "lightning",
                      "pytorch_lightning", "visionzoo")  # fmt: skip
# modules of the allowed namespaces that load or compile code
DENIED_WITHIN = ("torch.hub", "torch.package", "torch.utils.cpp_extension", "timm.models.hub")
ALLOW_ANY_FLAG = "--allow_any_class_path"
_CLASS_KEYS = ("class_path", "_class_path")


class UnsafeRecipeError(ValueError):
    """A recipe, an override or a checkpoint names an import outside :data:`ALLOWED_NAMESPACES`."""


def is_allowed(path: str) -> bool:
    """Whether ``path`` lies in an allowed namespace and not in a denied module within one."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in DENIED_WITHIN:
            return False
        if prefix in ALLOWED_NAMESPACES:
            return True
    return False


def _is_dotted_path(value: str) -> bool:
    return "." in value and all(part.isidentifier() for part in value.split("."))


def _names_a_module(value: str) -> bool:
    """A dotted path whose top-level name is an importable module (found, not imported): what jsonargparse
    would import for a ``Callable`` or ``type`` argument. ``train.csv`` is not one."""
    try:
        return importlib.util.find_spec(value.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def _values(node, key: str) -> Iterator[tuple[str, str, bool]]:
    """``(key, value, is_class_path)`` for every string in a nested configuration."""
    if isinstance(node, Namespace):
        node = node.as_dict()
    if isinstance(node, dict):
        for name, value in node.items():
            child = f"{key}.{name}" if key else str(name)
            if name in _CLASS_KEYS and isinstance(value, str):
                yield child, value, True
            else:
                yield from _values(value, child)
    elif isinstance(node, list | tuple):
        for index, item in enumerate(node):
            yield from _values(item, f"{key}[{index}]")
    elif isinstance(node, str):
        yield key, node, False


def check_imports(config, source: str, key: str = "") -> None:
    """Raise :class:`UnsafeRecipeError` for the first value of ``config`` that would import code outside the
    allowed namespaces: a dotted ``class_path`` (a short class name is resolved among classes already
    imported), or any other string that is the dotted path of an importable module."""
    for where, value, is_class_path in _values(config, key):
        if not _is_dotted_path(value) or is_allowed(value):
            continue
        if is_class_path or _names_a_module(value):
            raise UnsafeRecipeError(
                f"{source}: {where or 'value'}: {value!r} is outside the namespaces a recipe may import "
                f"({', '.join(ALLOWED_NAMESPACES)}); recipes are code: pass {ALLOW_ANY_FLAG} to run it anyway"
            )


def _parsed(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_command_line(args: list[str]) -> None:
    """:func:`check_imports` over each config file (``--config PATH``, or inline YAML) and each override
    (``--key=value``, ``--key value``, ``--key+=value``), read as YAML the way jsonargparse reads them."""
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-"):
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        if not has_value:
            if index >= len(args) or args[index].startswith("--"):
                continue
            value, index = args[index], index + 1
        is_config = key in ("config", "c")
        if is_config and Path(value).is_file():
            check_imports(yaml.safe_load(Path(value).read_text()), value)
        else:
            check_imports(_parsed(value), f"the command line (--{key})", "" if is_config else key.removesuffix("+"))


@contextlib.contextmanager
def import_policy(enforced: bool = True) -> Iterator[None]:
    """jsonargparse's import-path policy for a run: deny everything outside :data:`ALLOWED_NAMESPACES` (and
    :data:`DENIED_WITHIN`); the settings before are restored after, since jsonargparse's are global."""
    settings = jsonargparse_settings.parsing_settings
    saved = {name: settings[name] for name in ("import_path_verdicts", "import_paths_enforced")}
    if enforced:
        set_parsing_settings(import_path_denylist=["*", *DENIED_WITHIN], import_path_allowlist=list(ALLOWED_NAMESPACES))
    try:
        yield
    finally:
        settings.update(saved)
