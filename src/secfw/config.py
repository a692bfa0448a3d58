"""Agent and compiler configuration, read from a nova.conf-style INI file.

``[DEFAULT] allow_same_net_traffic`` (default ``true``, as in nova-network),
``metadata_listen = ADDR:PORT`` (the local metadata server; default none) and
``flowtable = off|auto|on`` (the nftables fast path for established flows,
``backends/nftables/flowtable.py``; default ``off``) are read.
The file is ``--config FILE`` or ``$SECFW_CONFIG``; with neither,
the defaults apply. An explicitly named file that is missing or malformed is an
error: silently falling back to defaults could open traffic an operator closed.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass

from secfw.compiler.metadata import parse_listen
from secfw.errors import ConfigError

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


@dataclass(frozen=True)
class Config:
    """``metadata_listen``: the local metadata server ``(address, port)`` the
    agent redirects instances' ``169.254.169.254:80`` to (None: no redirect).
    ``flowtable``: :data:`FLOWTABLE_MODES` (nftables backend only)."""

    allow_same_net_traffic: bool = True
    metadata_listen: tuple[str, int] | None = None
    flowtable: str = "off"


#: The flowtable settings (``secfw.backends.nftables.flowtable.MODES``).
FLOWTABLE_MODES = ("off", "auto", "on")


def read_ini(path: str) -> configparser.ConfigParser:
    """The INI file at ``path`` parsed (no interpolation); ConfigError, one line,
    when it cannot be read or is not INI."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"config {path} is not a valid INI file: {_first_line(exc)}") from exc
    return parser


def load_config(path: str | None = None) -> Config:
    """The configuration from ``path`` (or ``$SECFW_CONFIG``), else the defaults."""
    path = path or os.environ.get("SECFW_CONFIG")
    if not path:
        return Config()
    parser = read_ini(path)
    raw = parser.defaults().get("allow_same_net_traffic")
    listen = parser.defaults().get("metadata_listen")
    return Config(allow_same_net_traffic=_parse_bool(raw, path) if raw is not None else True,
                  metadata_listen=None if not listen else _parse_listen(listen, path),
                  flowtable=_parse_flowtable(parser.defaults().get("flowtable", "off"), path))


def _parse_flowtable(raw: str, path: str) -> str:
    value = raw.strip().lower()
    if value not in FLOWTABLE_MODES:
        raise ConfigError(f"config {path}: flowtable must be one of "
                          f"{', '.join(FLOWTABLE_MODES)}, not {raw!r}")
    return value


def _parse_listen(raw: str, path: str) -> tuple[str, int]:
    try:
        return parse_listen(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"config {path}: metadata_listen: {exc}") from exc


def _parse_bool(raw: str, path: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"config {path}: allow_same_net_traffic must be true or false, not {raw!r}")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0]
