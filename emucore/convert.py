"""Turn plain data (JSON, TOML) into emu's models, or one error naming every bad field.

One private converter, built by :func:`make_converter`, never cattrs' global one. It is strict:
unknown keys are refused, an integer field does not take ``"12"`` or ``12.5``, a boolean does
not take ``"false"``. Every failure becomes a :class:`~emucore.errors.ConfigError` whose
message lists each bad field as ``$.path: reason``.
"""

from __future__ import annotations

import difflib
import functools
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from emucore.errors import ConfigError
from emucore.models import Nio, TapNio, UdpNio

T = TypeVar("T")

# GNS3 spells NIOs {"type": "nio_udp", "lport", "rhost", "rport"}; emu spells them
# {"type": "udp", "local_port", "remote_host", "remote_port"}. Both are accepted.
_NIO_FORMS: dict[str, tuple[type[UdpNio] | type[TapNio], dict[str, str]]] = {
    "udp": (UdpNio, {}),
    "nio_udp": (UdpNio, {"lport": "local_port", "rhost": "remote_host", "rport": "remote_port"}),
    "tap": (TapNio, {}),
    "nio_tap": (TapNio, {"tap_device": "device"}),
}


class _TypeMismatch(TypeError):
    """A value of the wrong JSON type; the message is ready for a user."""


def _expect(kind: str, value: Any) -> _TypeMismatch:
    return _TypeMismatch(f"must be {kind}, got {type(value).__name__} {value!r}")


def _structure_int(value: Any, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expect("an integer", value)
    return value


def _structure_float(value: Any, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expect("a number", value)
    return float(value)


def _structure_bool(value: Any, _type: type) -> bool:
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def _structure_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise _expect("a string", value)
    return value


def _structure_path(value: Any, _type: type) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise _expect("a non-empty path string", value)
    if "\x00" in str(value):
        raise ValueError("must not contain a NUL character")
    return Path(value)


def _structure_uuid(value: Any, _type: type) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise _expect("a UUID string", value)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError(f"must be a UUID, got {value!r}") from None


def _structure_adapter_number(value: Any) -> int:
    # JSON and TOML object keys are strings: accept "3" as adapter 3.
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"adapter numbers must be non-negative integers, got {value!r}")


def make_converter() -> cattrs.Converter:
    """Build emu's strict converter.

    Plugins may register hooks for their own types on the converter a host passes them,
    but the converter is never global: each call returns a new one.
    """
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(Path, _structure_path)
    converter.register_structure_hook(uuid.UUID, _structure_uuid)

    def structure_nio(value: Any, _type: Any) -> Nio:
        if not isinstance(value, Mapping):
            raise _expect("a table with a 'type' key", value)
        data = dict(value)
        kind = data.pop("type", None)
        if kind not in _NIO_FORMS:
            choices = ", ".join(sorted(_NIO_FORMS))
            raise ValueError(f"NIO 'type' must be one of {choices}; got {kind!r}")
        cls, renames = _NIO_FORMS[kind]
        data = {renames.get(key, key): item for key, item in data.items()}
        nio: Nio = converter.structure(data, cls)
        return nio

    converter.register_structure_hook(Nio, structure_nio)

    def structure_nios(value: Any, _type: Any) -> dict[int, Nio]:
        if not isinstance(value, Mapping):
            raise _expect("a table keyed by adapter number", value)
        result: dict[int, Nio] = {}
        errors: list[Exception] = []
        for key, item in value.items():
            try:
                result[_structure_adapter_number(key)] = structure_nio(item, Nio)
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []), _key_note(key)]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring NIOs", errors, dict)
        return result

    converter.register_structure_hook_func(lambda t: t == Mapping[int, Nio], structure_nios)
    converter.register_structure_hook_factory(attrs.has, lambda cl: _validated(cl, converter))
    return converter


def _validated(cls: type[Any], converter: cattrs.Converter) -> Any:
    """A structure hook for an attrs class that reports every bad field at once.

    cattrs stops at type errors before attrs runs any validator, and attrs stops at the first
    failing validator, which cattrs then reports without a field name. Here each field is
    structured on its own, the instance is built with validators off (fields that failed keep
    their defaults), and every validator of a field that did not fail runs; all problems are
    reported, each under its field's name, unknown keys included.
    """
    fields = attrs.fields(attrs.resolve_types(cls))
    known = {field.name for field in fields}

    def structure_checked(data: Any, _type: Any) -> Any:
        if not isinstance(data, Mapping):
            raise _expect("a table", data)
        unknown: list[Exception] = []
        if not known.issuperset(data):
            unknown.append(ForbiddenExtraKeysError("", cls, set(data) - known))
        values: dict[str, Any] = {}
        errors: list[Exception] = []
        for field in fields:
            if field.name in data:
                try:
                    values[field.alias] = converter.structure(data[field.name], field.type)
                except Exception as exc:
                    errors.append(_noted(exc, field))
            elif field.default is attrs.NOTHING:
                errors.append(_noted(KeyError(field.name), field))
        failed = {note.name for exc in errors for note in getattr(exc, "__notes__", [])}
        if any(f.default is attrs.NOTHING and f.name in failed for f in fields):
            raise ClassValidationError(f"While structuring {cls.__name__}", errors + unknown, cls)
        with _validators_disabled():
            instance = cls(**values)
        for field in fields:
            if field.validator is None or field.name in failed:
                continue
            try:
                field.validator(instance, field, getattr(instance, field.name))
            except (ValueError, TypeError) as exc:
                errors.append(_noted(exc, field))
        if errors or unknown:
            raise ClassValidationError(f"While validating {cls.__name__}", errors + unknown, cls)
        return instance

    return structure_checked


def _noted(exc: Exception, field: attrs.Attribute[Any]) -> Exception:
    note = AttributeValidationNote(f"Structuring {field.name}", field.name, field.type)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def _key_note(key: Any) -> IterableValidationNote:
    return IterableValidationNote(f"Structuring mapping value @ key {key!r}", key, object)


@functools.cache
def default_converter() -> cattrs.Converter:
    """The converter emu uses when a host does not pass its own (built once, then shared)."""
    return make_converter()


def structure(
    data: Any, cls: type[T], where: str = "", converter: cattrs.Converter | None = None
) -> T:
    """Build ``cls`` from ``data`` or raise one :class:`ConfigError` listing every problem.

    :param data: plain data, e.g. from ``json.load`` or ``tomllib.load``.
    :param cls: the attrs class (or type) to build.
    :param where: what the data is, for the message: a file name, ``node 'R1'``...
    :param converter: defaults to :func:`default_converter`.
    """
    converter = converter or default_converter()
    try:
        result: T = converter.structure(data, cls)
        return result
    except Exception as exc:
        raise ConfigError(where, describe(exc, "$")) from None


def describe(exc: BaseException, path: str) -> list[str]:
    """Flatten a (cattrs) exception tree into ``"$.path: reason"`` lines."""
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        lines = [
            line
            for sub, note in with_notes
            for line in describe(sub, f"{path}.{_attribute_name(note)}")
        ]
        return lines + [line for sub in others for line in describe(sub, path)]
    if isinstance(exc, IterableValidationError):
        with_index, others_ = exc.group_exceptions()
        lines = [line for sub, note in with_index for line in describe(sub, _index(path, note))]
        return lines + [line for sub in others_ for line in describe(sub, path)]
    if isinstance(exc, BaseValidationError):
        return [line for sub in exc.exceptions for line in describe(sub, path)]
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        return [
            f"{path}.{key}: unknown key{_suggest(key, known)}" for key in sorted(exc.extra_fields)
        ]
    if isinstance(exc, KeyError):
        return [f"{path}: required"]
    if isinstance(exc, ValueError | TypeError):
        return [f"{path}: {exc}"]
    return [f"{path}: {type(exc).__name__}: {exc}"]


def _attribute_name(note: AttributeValidationNote) -> str:
    return note.name


def _index(path: str, note: IterableValidationNote) -> str:
    index = note.index
    if isinstance(index, str) and index.isidentifier():
        return f"{path}.{index}"
    return f"{path}[{index!r}]"


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _validators_disabled:
    """Turn attrs validators off while an instance is built (process-wide, but only for the
    duration of one structure call on the event loop's thread)."""

    def __enter__(self) -> None:
        self._was = attrs.validators.get_disabled()
        attrs.validators.set_disabled(True)

    def __exit__(self, *exc: object) -> None:
        attrs.validators.set_disabled(self._was)
