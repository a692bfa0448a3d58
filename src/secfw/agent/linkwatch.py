"""Follow the tap interfaces of the agent's network namespace (rtnetlink link events).

:class:`LinkWatcher` keeps the set of interfaces whose name starts with ``tap``
in the namespace of the thread that starts it (the agent runs in the host's
namespace, so that is the host's taps) and calls ``on_change(name, present)``
whenever one appears or disappears, from its own thread.

How: a raw ``NETLINK_ROUTE`` socket subscribed to ``RTNLGRP_LINK`` (the
``RTMGRP_LINK`` bit, rtnetlink(7)) is opened *before* the initial dump of the
links, so no event between the two is lost; events queued during the dump are
replayed after it and converge (a link's latest event wins). Messages are
decoded by pyroute2's rtnetlink marshal. pyroute2's own ``IPRoute.get()`` is not
used for the stream: since 0.9 it buffers messages inside an asyncio loop, so a
``select`` on its descriptor can miss queued events (measured). When the socket
overflows (``ENOBUFS``: events were dropped) the links are dumped again.

The agent does not need the taps to build rules — the ruleset matches
interfaces by name, so a tap that appears is filtered by rules that already name
it, and one no port claims is dropped by the fail-closed rule. Link events make
the agent run a pass at once and report which taps are unknown (dropped) or
missing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from secfw.agent.daemon import log_event

log = logging.getLogger("secfw.agent.linkwatch")

TAP_PREFIX = "tap"
_RCVBUF = 4 << 20  # room for the burst of events of many taps created at once
_RECV = 1 << 16

OnChange = Callable[[str, bool], None]
#: Called with a tap's name when it joins or leaves a bridge (its IFLA_MASTER changed).
OnMove = Callable[[str], None]


class LinkWatcher:
    """The taps of this namespace, kept current by a background thread (module doc).

    Contract: :meth:`start` raises OSError when netlink cannot be opened;
    afterwards :meth:`taps` is always the latest known set, ``on_change`` is
    called once per tap appearing (True) or disappearing (False), from the
    watcher's thread; :meth:`stop` ends the thread and closes the socket.
    """

    def __init__(self, on_change: OnChange, prefix: str = TAP_PREFIX,
                 on_move: OnMove | None = None) -> None:
        self._on_change = on_change
        self._on_move = on_move
        self._prefix = prefix
        self._names: dict[int, str] = {}  # ifindex -> name, every link
        self._masters: dict[int, int] = {}  # ifindex -> IFLA_MASTER (0: none), every link
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._marshal = MarshalRtnl()

    def start(self) -> None:
        """Subscribe, dump the current links, then follow events in a thread."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, RTMGRP_LINK))
            self._sock = sock
            self._resync(notify=False)
        except BaseException:
            sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="secfw-linkwatch", daemon=True)
        self._thread.start()

    def taps(self) -> frozenset[str]:
        """The taps present now (as far as events have been read)."""
        with self._lock:
            return frozenset(n for n in self._names.values() if n.startswith(self._prefix))

    def stop(self) -> None:
        """End the thread and close the socket (idempotent)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- the thread

    def _run(self) -> None:
        """Read events until stopped; a failure is logged and the thread retries."""
        assert self._sock is not None
        sock_fd = self._sock.fileno()
        while True:
            ready = select.select([sock_fd, self._stop_r], [], [])[0]
            if self._stop_r in ready:
                return
            try:
                self._read()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log_event(log, logging.ERROR, "linkwatch_failed", error=str(exc))
                    return
                log_event(log, logging.WARNING, "linkwatch_overflow", action="dumping links")
                self._resync(notify=True)

    def _read(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(_RECV)
        for message in self._marshal.parse(data):
            if message.get("family") == socket.AF_BRIDGE:
                # The bridge's own view of a port (rtnetlink(7) with PF_BRIDGE): an
                # RTM_DELLINK here means "left the bridge", not "the link is gone".
                continue
            event = message.get("event")
            index = int(message["index"])
            if event == "RTM_NEWLINK":
                name = str(message.get_attr("IFLA_IFNAME"))
                self._moved(index, name, int(message.get_attr("IFLA_MASTER") or 0))
                self._update({index: name}, {index})
            elif event == "RTM_DELLINK":
                self._masters.pop(index, None)
                self._update({}, {index})

    def _resync(self, notify: bool) -> None:
        """Replace the link table by a fresh dump (at start and after an overflow)."""
        with IPRoute() as ipr:
            dump = list(ipr.get_links())
        links = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in dump}
        for message in dump:
            index = int(message["index"])
            self._moved(index, links[index], int(message.get_attr("IFLA_MASTER") or 0),
                        notify=notify)
        if not notify:
            with self._lock:
                self._names = links
            return
        with self._lock:
            stale = set(self._names) - set(links)
        self._update(links, stale)

    def _update(self, names: dict[int, str], touched: Iterable[int]) -> None:
        """Set ``names`` (index -> name), forget other ``touched`` indexes, and
        report the taps that appeared or disappeared."""
        with self._lock:
            before = self._tap_set()
            for index in touched:
                self._names.pop(index, None)
            self._names.update(names)
            after = self._tap_set()
        for name in sorted(after - before):
            self._notify(name, True)
        for name in sorted(before - after):
            self._notify(name, False)

    def _moved(self, index: int, name: str, master: int, notify: bool = True) -> None:
        """Record a link's master; report a known tap that joined or left a bridge
        (the agent then checks its topology: libvirt plugs a tap after creating it)."""
        before = self._masters.get(index)
        self._masters[index] = master
        known = before is not None
        if notify and known and before != master and name.startswith(self._prefix) \
                and self._on_move is not None:
            try:
                self._on_move(name)
            except Exception:  # a callback bug must not end the watcher
                log.exception("link_callback_failed")

    def _tap_set(self) -> set[str]:
        return {n for n in self._names.values() if n.startswith(self._prefix)}

    def _notify(self, name: str, present: bool) -> None:
        try:
            self._on_change(name, present)
        except Exception:  # a callback bug must not end the watcher
            log.exception("link_callback_failed")
