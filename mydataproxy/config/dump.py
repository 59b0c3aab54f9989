"""
Settings as native TOML text: what C{mydataproxy migrate} writes for an
C{application.properties} user.

Only the settings that differ from what the TOML loader would take anyway
are written, so the file says what this deployment changed; loaded again
(L{mydataproxy.config.load}) it gives the same L{Settings}, apart from
C{source}, C{notices} and C{locations}, which describe a file, not a setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import MISSING, replace
from typing import Any, Iterator

from mydataproxy.config.model import (
    OriginTLSProfile,
    RouteBackend,
    RouteSettings,
    Settings,
    StoreRef,
)

#: Fields of L{Settings} that describe the source file, not a setting.
_ABOUT_THE_FILE = frozenset({"source", "notices", "locations"})

#: Sections written even with nothing but defaults in them: their presence
#: is the setting (C{[admin]} runs the admin listener).
_PRESENCE_SECTIONS = frozenset({"admin", "reverse"})

#: Store references and the keys their parts are written under.
_STORE_KEYS = {
    "key_store": ("key_store", "key_store_password", "key_password", "key_alias"),
    "trust_store": ("trust_store", "trust_store_password", None, None),
}


def settingsToToml(settings: Settings) -> str:
    """
    The native TOML for C{settings}: a header comment (the source, and its
    notices as comments), then every setting that differs from its default.

    @raise TypeError: If a setting has a type this writer does not know
        (a new field in the model that needs a rule here).
    """
    lines = [
        "# MyData Proxy configuration (TOML), written by `mydataproxy migrate`",
        f"# from {_comment(settings.source)}.",
        "# Only settings that differ from the embedded defaults are written;",
        "# etc/mydataproxy.toml shows every key with its default.",
    ]
    if settings.notices:
        lines.append("#")
        lines.append("# What loading the source reported:")
        lines.extend(f"#   {_comment(notice)}" for notice in settings.notices)
    for field in dataclasses.fields(Settings):
        if field.name in _ABOUT_THE_FILE:
            continue
        value = getattr(settings, field.name)
        if value is None:
            continue
        lines.extend(_section(field.name, value, settings))
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    """C{text} on one comment line."""
    return " ".join(text.splitlines())


def _section(name: str, value: Any, settings: Settings) -> Iterator[str]:
    """The table C{[name]} for one section of the settings, with its sub-tables."""
    tables: list[tuple[str, Any, dict[str, Any]]] = []
    arrays: list[tuple[str, tuple[Any, ...], Settings]] = []
    scalars = []
    for key, item, default in _differing(value, _defaults(value)):
        if dataclasses.is_dataclass(item):
            tables.append((f"{name}.{key}", item, _defaults(item)))
        elif key == "tls_profiles":
            arrays.append((f"{name}.tls.profiles", item, settings))
        elif isinstance(item, tuple) and item and dataclasses.is_dataclass(item[0]):
            arrays.append((f"{name}.{key}", item, settings))
        else:
            scalars.extend(_entry(key, item))
    if scalars or (not tables and not arrays and name in _PRESENCE_SECTIONS):
        yield ""
        yield f"[{name}]"
        yield from scalars
    for table, item, defaults in tables:
        entries = [line for key, part, _ in _differing(item, defaults) for line in _entry(key, part)]
        if entries:
            yield ""
            yield f"[{table}]"
            yield from entries
    for array, items, settings_ in arrays:
        for index, item in enumerate(items):
            yield ""
            yield f"[[{array}]]"
            defaults = _elementDefaults(array, index, item, settings_)
            yield from (line for key, part, _ in _differing(item, defaults) for line in _entry(key, part))


def _defaults(value: Any) -> dict[str, Any]:
    """The value each field of a settings dataclass takes when not written."""
    defaults = {}
    for field in dataclasses.fields(value):
        if field.default is not MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def _elementDefaults(array: str, index: int, item: Any, settings: Settings) -> dict[str, Any]:
    """
    What the loader gives the fields of C{array}'s entry C{index} when they
    are not written: routes take timeouts and the body limit from
    C{[upstream]} and C{[limits]}, TLS profiles start from C{[upstream.tls]},
    names are the entry's place (and, for routes, its hosts and prefix).
    """
    place = f"{array}[{index}]"
    if isinstance(item, RouteSettings):
        defaults = _defaults(item)
        defaults.update(
            connect_timeout=settings.upstream.connect_timeout,
            read_timeout=settings.upstream.read_timeout,
            max_body_bytes=settings.limits.max_body_bytes,
            name=(item.hosts[0] + item.prefix.decode("ascii")) if item.hosts else item.prefix.decode("ascii"),
        )
        return defaults
    if isinstance(item, OriginTLSProfile):
        start = replace(settings.upstream.tls, name=place, hosts=(), pins=(), serial_number="")
        return {field.name: getattr(start, field.name) for field in dataclasses.fields(start)}
    defaults = _defaults(item)
    defaults["name"] = place
    return defaults


def _differing(value: Any, defaults: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """C{(field, value, default)} for the fields of C{value} that differ from C{defaults}."""
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        default = defaults.get(field.name, MISSING)
        if item != default:
            if field.name == "name" and isinstance(default, str) and item.startswith(default + " "):
                # Loaded names carry their place: "egress.rules[0] office".
                item = item[len(default) + 1 :]
            yield field.name, item, default


def _entry(key: str, value: Any) -> Iterator[str]:
    """The C{key = value} line(s) for one field."""
    if isinstance(value, StoreRef) or (value is None and key in _STORE_KEYS):
        yield from _store(key, value)
    elif key == "http_ports":
        yield f"{key} = {_array([low if low == high else f'{low}-{high}' for low, high in value])}"
    elif key == "servers":
        yield f"{key} = {_array([f'[{h}]:{p}' if ':' in h else f'{h}:{p}' for h, p in value])}"
    else:
        yield f"{key} = {_value(value)}"


def _store(key: str, ref: StoreRef | None) -> Iterator[str]:
    """A store reference as the keys the loader reads it from."""
    if ref is None:
        raise TypeError(f"{key}: an inherited store cannot be removed in TOML")
    path, password, keyPassword, alias = _STORE_KEYS[key]
    yield f"{path} = {_value(ref.path)}"
    for name, part in ((password, ref.password), (keyPassword, ref.key_password), (alias, ref.alias)):
        if name is not None and part:
            yield f"{name} = {_value(part)}"


def _array(items: list[Any]) -> str:
    return "[" + ", ".join(_value(item) for item in items) + "]"


def _value(value: Any) -> str:
    """A TOML value for one setting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, bytes):
        return _string(value.decode("ascii"))
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return _string(str(value))
    if isinstance(value, RouteBackend):
        return _string(value.url)
    if isinstance(value, frozenset):
        return _array(sorted(value))
    if isinstance(value, tuple) and not any(isinstance(item, tuple) for item in value):
        return _array(list(value))
    raise TypeError(f"no TOML form for {value!r}")


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\t" or (char >= " " and char != "\x7f"):
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}")
    return '"' + "".join(out) + '"'
