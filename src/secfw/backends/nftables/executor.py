"""The one place secfw talks to the kernel's nftables: libnftables through the
``nftables`` Python module (PyPI ``pip-nftables``, upstream's ``py/`` binding).

:class:`NftablesExecutor` wraps ONE ``nftables.Nftables()`` context. It only ever
lists, changes or deletes secfw's own tables, ``inet secfw`` and ``arp secfw``
(design rule 1: never list or touch anyone else's tables). Every batch is atomic
(nft(8): the kernel commits a batch whole or not at all), so when :meth:`apply`
raises, nothing was applied.

The context filters the network namespace it was created in: libnftables binds
its netlink socket when the context is created (measured: a context created
before ``setns`` keeps talking to the old namespace). With ``netns=NAME`` the
context is created inside that namespace (``setns``) and every call also runs
inside it, in case libnftables reopens its socket. ``setns`` changes the calling
thread only: use an executor from one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import nftables

from secfw.backends.nftables.generation import GenerationReader, next_generation
from secfw.backends.nftables.plan import Transaction
from secfw.backends.nftables.stages import BUDGET, batches
from secfw.backends.nftables.state import KernelState
from secfw.backends.nftables.syntax import FAMILIES, TABLE, table_header
from secfw.errors import BackendError
from secfw.gcpause import collector_paused, release_free_memory
from secfw.netns import inside_netns

log = logging.getLogger(__name__)
_R = TypeVar("_R")
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
        #: Characters of object-creating commands above which a plan is sent
        #: in several batches (:mod:`.stages`).
        self.batch_budget = BUDGET
        self._nft = self._call(self._open)
        self._generations: GenerationReader | None = None
        self._generation_failed = False
        #: ``(before, after)``: the namespace's nftables generation read just
        #: before and just after the last successful :meth:`apply_text`, when
        #: ``after`` is the generation right after ``before`` — exactly one
        #: commit, ours, in between, so ``after`` is the generation our commit
        #: produced (generation module); for a plan sent in several batches
        #: (:meth:`apply_texts`), one commit per batch, chained. None otherwise
        #: (someone else's commit among them; unreadable; before any apply).
        self.last_commit: tuple[int, int] | None = None

    def generation(self) -> int | None:
        """The namespace's nftables generation now (generation module), or None
        when it cannot be read (the caller then reads the tables back)."""
        try:
            if self._generations is None:
                self._generations = GenerationReader(self.netns)
            return self._generations.read()
        except BackendError as exc:
            if not self._generation_failed:  # once: every later check reads back too
                self._generation_failed = True
                log.warning("nftables generation unreadable (%s): the agent reads its "
                            "tables back instead of trusting the generation", exc)
            return None

    def generation_reader(self) -> GenerationReader | None:
        """The reader :meth:`generation` uses (thread-safe), or None."""
        return self._generations if self.generation() is not None else None

    @staticmethod
    def _open() -> nftables.Nftables:
        nft = nftables.Nftables()
        # JSON output for read-back: structured, unlike the native listing.
        nft.set_json_output(True)
        return nft

    def read_json(self) -> dict[str, Any] | None:
        """libnftables' JSON listing of secfw's tables (``list table`` of each, the
        objects concatenated); None when the main table ``inet secfw`` is absent —
        whatever else is left then, the next transaction replaces all of it.
        Python's cyclic collector is paused while the listing is decoded (~10^6
        acyclic objects at 10k ports; :mod:`secfw.gcpause`): in a process that
        holds a cloud's model — ``secfw audit verify`` — its collections took
        ~1.5 s of a 10k-port read."""
        objects: list[Any] = []
        with collector_paused():
            for family in FAMILIES:
                listing = self._list_table(family)
                if listing is None and family == FAMILIES[0]:
                    return None
                objects += [] if listing is None else listing.get("nftables", [])
        return {"nftables": objects}

    def _list_table(self, family: str) -> dict[str, Any] | None:
        command = f"list table {family} {TABLE}"
        rc, out, err = self._call(lambda: self._nft.cmd(command))
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise BackendError(f"nft {command}: {_first_line(err)}")
        try:
            listing = loads_in_pieces(out)
        except ValueError as exc:
            raise BackendError(f"nft {command}: output is not JSON: {exc}") from exc
        if not isinstance(listing, dict):
            raise BackendError(f"nft {command}: unexpected output")
        return listing

    def read_state(self) -> KernelState | None:
        """The tables as the kernel holds them, in normal form; None when the main
        table is absent."""
        with collector_paused():
            listing = self.read_json()
            state = None if listing is None else KernelState.from_nft_json(listing)
        del listing
        release_free_memory()
        return state

    def apply(self, tx: Transaction) -> None:
        """Commit ``tx`` atomically. An empty transaction is not sent at all.

        Raises BackendError with nft's first error line; the kernel is unchanged.
        """
        if not tx.empty:
            self.apply_texts(batches(tx, self.batch_budget))
        if tx.full:  # libnftables parsed the whole table: hundreds of MB at 10k ports
            release_free_memory()

    def apply_text(self, text: str) -> None:
        """Commit a native-syntax batch (as ``nft -f``) atomically; the
        generation is read around it (:attr:`last_commit`)."""
        self.apply_texts([text])

    def apply_texts(self, texts: Iterable[str]) -> None:
        """Commit each batch of ``texts`` atomically, in order (:mod:`.stages`:
        all but the last only create unreachable objects); raises at the first
        one refused, the later ones unsent. :attr:`last_commit` is set only when
        every batch was exactly one commit and each began at the generation the
        previous one ended at: then nobody else committed in between, and the
        kernel's state at the end is ours alone."""
        self.last_commit = None
        first = before = self.generation()
        chained = before is not None
        for text in texts:
            rc, _out, err = self._call(partial(self._nft.cmd, text))
            if rc != 0:
                raise BackendError(f"nft: {_first_line(err)}")
            after = self.generation()
            chained = (chained and before is not None and after is not None
                       and after == next_generation(before))
            before = after
        if chained and first is not None and before is not None:
            self.last_commit = (first, before)

    def apply_json(self, document: dict[str, Any]) -> None:
        """Commit a libnftables JSON batch (``{"nftables": [...]}``) atomically;
        unbracketed, so :attr:`last_commit` becomes None (a commit of ours that
        is not accounted for: no generation may be vouched for after it)."""
        self.last_commit = None
        rc, _out, err = self._call(lambda: self._nft.json_cmd(document))
        if rc != 0:
            raise BackendError(f"nft (json): {_first_line(err)}")

    def delete_table(self) -> None:
        """Remove secfw's tables and everything in them; absent is not an error.

        ``add`` first makes each ``delete`` valid either way (nft 1.0.6 has no
        ``destroy``), all in one atomic batch.
        """
        self.apply_text("".join(table_header(f) + "\n" for f in FAMILIES))

    def _call(self, fn: Callable[[], _R]) -> _R:
        try:
            with self._namespace():
                return fn()
        except OSError as exc:
            raise BackendError(f"nftables: {exc}") from exc

    def _namespace(self) -> contextlib.AbstractContextManager[None]:
        return inside_netns(self.netns)


_LIST_HEAD = re.compile(r'\s*\{\s*"nftables"\s*:\s*\[')
_DECODER = json.JSONDecoder()


def loads_in_pieces(text: str) -> Any:
    """``json.loads(text)`` for libnftables' listing ``{"nftables": [obj, …]}``,
    decoded one object at a time (anything else: in one call).

    json.loads holds the GIL for the whole document — about a second for a
    10,000-port table — and the agent reads the table back on a thread beside
    the loop that applies changes (secfw.agent.resync): a change would wait for
    it. Decoding object by object lets the interpreter switch threads between
    objects (sys.getswitchinterval, 5 ms), so a pass waits for one object at most.
    """
    head = _LIST_HEAD.match(text)
    if head is None:
        return json.loads(text)
    objects: list[Any] = []
    index = _skip_space(text, head.end())
    while not text.startswith("]", index):
        if objects:  # a comma between objects, and only there
            if not text.startswith(",", index):
                raise ValueError(f"expected ',' or ']' at {index}")
            index = _skip_space(text, index + 1)
        item, index = _DECODER.raw_decode(text, index)
        objects.append(item)
        index = _skip_space(text, index)
    if text[index + 1:].strip() != "}":
        raise ValueError(f"unexpected text after the list at {index + 1}")
    return {"nftables": objects}


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    if index >= len(text):
        raise ValueError("the listing ends early")
    return index


def _first_line(err: str) -> str:
    """nft's first error line (the following lines repeat the command and point at it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[0] if lines else "failed without a message"
