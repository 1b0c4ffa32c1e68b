"""Checks of a training config made before anything is built: numbers that are NaN or infinite, and a
section whose `target` requires parameters that its `params` leave out."""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserInputError
from ldm.util import get_obj_from_str

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def refuse_non_finite_overrides(overrides: Sequence[str]) -> None:
    """Refuse a `key=value` override whose value reads as NaN or an infinity (`nan`, `inf`, `1e999`)."""
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise UserInputError(f"{key}={value}: NaN and infinity are not accepted; give a finite number")


def _nodes(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of `node` and of everything inside it."""
    yield where, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        yield from _nodes(value, f"{where}.{key}" if where else str(key))


def _plain(config: Any) -> Any:
    return OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config


def refuse_non_finite_values(config: Any, where: str = "") -> None:
    """Refuse a float in `config` that is NaN or infinite (`.nan`, `.inf` in YAML), naming its key."""
    for path, value in _nodes(_plain(config), where):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{path} is {value}: NaN and infinity are not accepted; give a finite number")


def _keywords_passed_to_super(init: Any) -> set[str] | None:
    """Keyword names that `init` passes explicitly to a base class's `__init__`; None when its source cannot
    be read or it passes positional arguments (then which base parameters it fills is unknown)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__":
            if any(not isinstance(arg, ast.Starred) for arg in node.args):
                return None
            names |= {keyword.arg for keyword in node.keywords if keyword.arg}
    return names


def required_params(target: Any) -> list[str]:
    """Parameters `target(**params)` cannot do without: those of its `__init__` without a default and, while an
    `__init__` passes `**kwargs` on to its base class, the base class's ones it does not fill itself."""
    if not inspect.isclass(target):
        try:
            parameters = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return []
        return [p.name for p in parameters if p.kind in _NAMED and p.default is p.empty]
    required: list[str] = []
    supplied: set[str] = set()
    for cls in target.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        required += [p.name for p in parameters
                     if p.kind in _NAMED and p.default is p.empty and p.name not in supplied | set(required)]
        supplied |= {p.name for p in parameters}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
        passed = _keywords_passed_to_super(init)
        if passed is None:
            break
        supplied |= passed
    return required


def refuse_missing_params(section: Any, where: str) -> None:
    """Refuse a `target`/`params` section whose `params` lack a parameter its target requires, or leave a
    required `*_config` section empty, naming the section and the class that needs it. Only the section's own
    target is checked: a model passes some arguments of its nested sections' targets itself."""
    section = _plain(section)
    if not isinstance(section, dict) or not isinstance(section.get("target"), str):
        return
    target, params = section["target"], section.get("params") or {}
    if not isinstance(params, dict):
        return
    for name in required_params(get_obj_from_str(target)):
        if name not in params:
            raise UserInputError(f"{where}.params.{name} is missing: {target} needs it; add it to the config")
        if name.endswith("_config") and params[name] is None:
            raise UserInputError(f"{where}.params.{name} is empty: {target} needs a section there "
                                 "(with target: and params:)")
