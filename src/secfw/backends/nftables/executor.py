"""The one place secfw talks to the kernel's nftables: libnftables through the
``nftables`` Python module (PyPI ``pip-nftables``, upstream's ``py/`` binding).

:class:`NftablesExecutor` wraps ONE ``nftables.Nftables()`` context. It only ever
lists, changes or deletes table ``inet secfw`` (design rule 1: never list or touch
anyone else's tables). Every batch is atomic (nft(8): the kernel commits a batch
whole or not at all), so when :meth:`apply` raises, nothing was applied.

The context filters the network namespace it was created in: libnftables binds
its netlink socket when the context is created (measured: a context created
before ``setns`` keeps talking to the old namespace). With ``netns=NAME`` the
context is created inside that namespace (``setns``) and every call also runs
inside it, in case libnftables reopens its socket. ``setns`` changes the calling
thread only: use an executor from one thread at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import nftables
from pyroute2 import netns as pyroute2_netns

from secfw.backends.nftables.plan import Transaction
from secfw.backends.nftables.render import FAMILY, TABLE
from secfw.backends.nftables.state import KernelState
from secfw.errors import BackendError

_T = f"{FAMILY} {TABLE}"
_R = TypeVar("_R")
#: Where ``ip netns add`` keeps named namespaces (ip-netns(8)).
NETNS_DIR = "/run/netns"
_NETNS = re.compile(r"[A-Za-z0-9_.-]+")


class NftablesExecutor:
    """Applies transactions to, and reads back, table ``inet secfw``."""

    def __init__(self, netns: str | None = None) -> None:
        """Open a libnftables context in the current namespace, or in ``netns``.

        Raises BackendError when libnftables or the namespace cannot be opened.
        """
        if netns is not None and (netns in (".", "..") or not _NETNS.fullmatch(netns)):
            raise BackendError(f"nftables: {netns!r} is not a network namespace name")
        self.netns = netns
        self._nft = self._call(self._open)

    @staticmethod
    def _open() -> nftables.Nftables:
        nft = nftables.Nftables()
        # JSON output for read-back: structured, unlike the native listing.
        nft.set_json_output(True)
        return nft

    def read_json(self) -> dict[str, Any] | None:
        """libnftables' JSON listing of ``list table inet secfw``; None if it is absent."""
        rc, out, err = self._call(lambda: self._nft.cmd(f"list table {_T}"))
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise BackendError(f"nft list table {_T}: {_first_line(err)}")
        try:
            listing = json.loads(out)
        except ValueError as exc:
            raise BackendError(f"nft list table {_T}: output is not JSON: {exc}") from exc
        if not isinstance(listing, dict):
            raise BackendError(f"nft list table {_T}: unexpected output")
        return listing

    def read_state(self) -> KernelState | None:
        """The table as the kernel holds it, in normal form; None if it is absent."""
        listing = self.read_json()
        return None if listing is None else KernelState.from_nft_json(listing)

    def apply(self, tx: Transaction) -> None:
        """Commit ``tx`` atomically. An empty transaction is not sent at all.

        Raises BackendError with nft's first error line; the kernel is unchanged.
        """
        if not tx.empty:
            self.apply_text(tx.text)

    def apply_text(self, text: str) -> None:
        """Commit a native-syntax batch (as ``nft -f``) atomically."""
        rc, _out, err = self._call(lambda: self._nft.cmd(text))
        if rc != 0:
            raise BackendError(f"nft: {_first_line(err)}")

    def apply_json(self, document: dict[str, Any]) -> None:
        """Commit a libnftables JSON batch (``{"nftables": [...]}``) atomically."""
        rc, _out, err = self._call(lambda: self._nft.json_cmd(document))
        if rc != 0:
            raise BackendError(f"nft (json): {_first_line(err)}")

    def delete_table(self) -> None:
        """Remove table ``inet secfw`` and everything in it; absent is not an error.

        ``add`` first makes the ``delete`` valid either way (nft 1.0.6 has no
        ``destroy``), in one atomic batch.
        """
        self.apply_text(f"add table {_T}\ndelete table {_T}\n")

    def _call(self, fn: Callable[[], _R]) -> _R:
        try:
            with self._namespace():
                return fn()
        except OSError as exc:
            raise BackendError(f"nftables: {exc}") from exc

    @contextmanager
    def _namespace(self) -> Iterator[None]:
        """Run the body in ``self.netns`` (this thread only), then come back.

        Not ``pyroute2.netns.pushns``: it creates a namespace that does not exist
        (``setns`` defaults to ``O_CREAT``), where a missing one must be an error.
        """
        if self.netns is None:
            yield
            return
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(os.path.join(NETNS_DIR, self.netns), os.O_RDONLY)
            try:
                pyroute2_netns.setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                pyroute2_netns.setns(home)
        finally:
            os.close(home)


def _first_line(err: str) -> str:
    """nft's first error line (the following lines repeat the command and point at it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[0] if lines else "failed without a message"
