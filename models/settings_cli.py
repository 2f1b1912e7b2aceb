"""Command-line flags generated from settings models, so no setting is ever typed twice.

`with_settings(command)` replaces each parameter of `command` annotated with a pydantic
settings model by one typer option per field of that model, nested sections included:
`--<field>` for a top-level field, `--<section>-<field>` in a section, and `--<section>` for a
section's `enabled` switch; booleans get a `--no-` form. Help text, default and environment
variable name come from the model. A collection (a dict, a set...) is one string option that
the model's own validators parse, as they parse its environment variable. Flags left out fall
through to the environment, then to the defaults; the command receives the built model.

Both programs use it: `halflabel-train` (trainer.cli) and `halflabel-serve` (service.cli).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Optional, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

FieldPath = tuple[str, ...]  # a field's place in the model: ("spreading", "alpha")
Result = TypeVar("Result")
Settings = TypeVar("Settings", bound=BaseSettings)


def with_settings(command: Callable[..., Result]) -> Callable[..., Result]:
    """`command` with its settings-model parameters turned into generated flags."""
    hints = typing.get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    models = {name: hints[name] for name in signature.parameters if _is_settings(hints[name])}
    flags: dict[str, tuple[str, FieldPath, type[BaseSettings]]] = {}
    generated = []
    for parameter, model in models.items():
        for path, field in settings_fields(model):
            identifier = "__".join((parameter, *path))
            flags[identifier] = (parameter, path, model)
            generated.append(inspect.Parameter(
                identifier, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=_option(model, path, field)))

    @functools.wraps(command)
    def wrapper(**values: Any) -> Result:
        given: dict[str, dict[str, Any]] = {name: {} for name in models}
        for identifier, (parameter, path, _) in flags.items():
            if (value := values.pop(identifier)) is not None:
                _set(given[parameter], path, value)
        built = {name: _build(model, given[name]) for name, model in models.items()}
        return command(**values, **built)

    own = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()
           if p.name not in models]
    parameters = own + generated
    # typer reads both: the signature, and the annotations (resolved here, in the command's
    # module, since functools.wraps copied them as strings).
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def settings_fields(model: type[BaseModel],
                    prefix: FieldPath = ()) -> Iterator[tuple[FieldPath, FieldInfo]]:
    """Every field of `model` that takes a value, nested sections' included, with its path."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from settings_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), field


def flag_name(path: FieldPath) -> str:
    """`--spreading-alpha` for ("spreading", "alpha"); `--spreading` for its `enabled`."""
    words = path[:-1] if len(path) > 1 and path[-1] == "enabled" else path
    return "--" + "-".join(words).replace("_", "-")


def env_name(model: type[BaseSettings], path: FieldPath) -> str:
    """The environment variable pydantic-settings reads for the field at `path`: its alias
    where it has one, else the model's prefix and the path (nested with `_`)."""
    alias = model.model_fields[path[0]].validation_alias
    if isinstance(alias, str):
        return alias.upper()
    return (str(model.model_config.get("env_prefix", "")) + "_".join(path)).upper()


def _is_settings(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseSettings)


def _build(model: type[Settings], values: dict[str, Any]) -> Settings:
    """`model` from `values` (nested dicts) over its environment; a usage error naming the flag
    and the variable when a value is not valid."""
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = tuple(str(part) for part in error["loc"])
        by_alias = {str(f.validation_alias): name for name, f in model.model_fields.items()}
        path = (by_alias.get(path[0], path[0]), *path[1:])
        why = error["msg"].removeprefix("Value error, ")
        raise typer.BadParameter(f"{why} (from the flag or {env_name(model, path)})",
                                 param_hint=[flag_name(path)]) from None


def _option(model: type[BaseSettings], path: FieldPath, field: FieldInfo) -> object:
    flag = flag_name(path)
    names = [f"{flag}/--no-{flag[2:]}"] if field.annotation is bool else [flag]
    default = field.get_default(call_default_factory=True)
    shown = default.value if hasattr(default, "value") else default
    # Parentheses, not brackets: rich would read "[default: ...]" as markup and drop it.
    help_text = f"{field.description or ''} (default: {shown}; env {env_name(model, path)})"
    option = typer.Option(*names, help=help_text.strip(), show_default=False,
                          rich_help_panel=path[0] if len(path) > 1 else None)
    value_type = str if _is_collection(field.annotation) else field.annotation
    return Annotated[Optional[value_type], option]  # noqa: UP045


def _is_collection(annotation: object) -> bool:
    """Whether `annotation` holds a dict, list, set or tuple (`int | None` does not)."""
    return (typing.get_origin(annotation) in (dict, list, set, frozenset, tuple)
            or any(_is_collection(argument) for argument in typing.get_args(annotation)))


def _set(tree: dict[str, Any], path: FieldPath, value: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
