"""
The material a configuration names, loaded: key and trust stores into the
TLS holders, the htpasswd file into L{Htpasswd}.

Owns: turning L{Settings} (plain data) into what start-up needs, and failing
with a located L{ConfigError} (file, the key the user wrote, its line) when
something cannot be loaded.  One code path for start-up (the twistd plugin),
C{check-config} and, later, SIGHUP.  May import L{mydataproxy.config},
L{mydataproxy.egress} and L{mydataproxy.tls}; the listeners and the service
import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from mydataproxy.config import ConfigError, Settings, StoreRef
from mydataproxy.egress.auth import Htpasswd, HtpasswdError
from mydataproxy.tls.contexts import OriginTLS, ServerTLS, TLSConfigError, loadIdentity, loadTrust

_T = TypeVar("_T")


@dataclass(frozen=True)
class Material:
    """
    What start-up needs beyond the settings, loaded.

    @ivar serverTLS: The forward listener's TLS holder, or L{None} for a
        plain-text listener.
    @ivar reverseTLS: The reverse listener's, likewise.
    @ivar originTLS: How to speak TLS to origins (always built: the default
        profile verifies against the system trust store).
    @ivar htpasswd: The users of C{forward.auth_file}, or L{None} without
        proxy authentication.
    """

    serverTLS: ServerTLS | None
    originTLS: OriginTLS
    htpasswd: Htpasswd | None
    reverseTLS: ServerTLS | None = None


def _located(
    settings: Settings, setting: str, build: Callable[[], _T], errors: tuple[type[Exception], ...] = (TLSConfigError,)
) -> _T:
    """C{build()}, with a failure raised as a L{ConfigError} at C{setting}'s key and line."""
    try:
        return build()
    except errors as e:
        key, line = settings.locate(setting)
        raise ConfigError(settings.source, key, str(e), line) from None


def _stores(settings: Settings) -> list[tuple[str, StoreRef | None, Callable[[StoreRef], object]]]:
    """Every store the settings name, with its setting and how it is read."""
    upstream = settings.upstream.tls
    stores: list[tuple[str, StoreRef | None, Callable[[StoreRef], object]]] = [
        ("upstream.tls.key_store", upstream.key_store, loadIdentity),
        ("upstream.tls.trust_store", upstream.trust_store, loadTrust),
    ]
    reverse = settings.reverse.tls if settings.reverse is not None else None
    for section, listener in (("forward", settings.forward.tls), ("reverse", reverse)):
        stores += [(f"{section}.tls.key_store", listener.key_store if listener else None, loadIdentity),
                   (f"{section}.tls.trust_store", listener.trust_store if listener else None, loadTrust)]
    for index, profile in enumerate(settings.upstream.tls_profiles):
        prefix = f"upstream.tls.profiles[{index}]"
        stores += [(f"{prefix}.key_store", profile.key_store, loadIdentity),
                   (f"{prefix}.trust_store", profile.trust_store, loadTrust)]
    return stores


def loadMaterial(settings: Settings) -> Material:
    """
    Load everything C{settings} names: the htpasswd file, then the stores,
    then the TLS holders built from them.

    A store the source names with a key of its own (in
    L{Settings.locations}: the legacy file's C{server.ssl.trust-store}) is
    read on its own first, so that its failure names that key; a store
    inside a section (TOML's C{[forward.tls]}) fails as its section does.

    @raise ConfigError: Naming the file, the key the user wrote and its
        line, on the first thing that cannot be loaded.
    """
    forward, upstream = settings.forward, settings.upstream
    htpasswd = None
    if forward.auth_file:
        htpasswd = _located(
            settings, "forward.auth_file", lambda: Htpasswd.load(forward.auth_file), (HtpasswdError, OSError)
        )
    own = {setting for setting, _, _ in settings.locations}
    for setting, ref, load in _stores(settings):
        if ref is not None and setting in own:
            _located(settings, setting, lambda ref=ref, load=load: load(ref))
    serverTLS = None
    if forward.tls is not None:
        serverTLS = _located(settings, "forward.tls", lambda: ServerTLS(forward.tls))
    reverseTLS = None
    if settings.reverse is not None and settings.reverse.tls is not None:
        tls = settings.reverse.tls
        reverseTLS = _located(settings, "reverse.tls", lambda: ServerTLS(tls, "reverse.tls"))
    originTLS = _located(settings, "upstream.tls", lambda: OriginTLS(upstream.tls, upstream.tls_profiles))
    return Material(serverTLS, originTLS, htpasswd, reverseTLS)
