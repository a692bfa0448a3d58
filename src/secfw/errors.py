"""Every error secfw raises on purpose.

Hierarchy::

    SecfwError                  base; ``str(err)`` is the one line the CLI prints
    ├── ValidationError         bad input: a field, a CIDR, a port range, a name
    ├── NotFoundError           unknown group, instance, network, flavor, image, port
    ├── ConflictError           duplicate rule/name, overlapping network, address exhausted
    ├── QuotaError              over a project quota (names the quota)
    ├── InUseError              deleting something still referenced
    ├── ForbiddenError          an admin-only operation from another project
    ├── StoreError              the store cannot be opened, read or written
    │   ├── WriteConflictError  another writer committed since this transaction read
    │   ├── HistoryCompactedError  the change history asked for is gone: reload whole
    │   ├── StoreUnreachableError  a store server did not answer, or cannot serve now
    │   └── StoreRefusedError   a store server answered the request with an error
    ├── ConfigError             bad configuration file or value
    ├── BackendError            the kernel refused a transaction, a tool failed
    │   ├── UnsupportedError    a backend cannot express part of the IR faithfully
    │   └── TopologyError       the host's taps are not laid out as the agent was told
    ├── LabError                the network-namespace lab could not be built
    └── NeutronApiError         an error of the Neutron API, with its HTTP status and type

Lower-level exceptions (sqlite3, OSError, netlink) are translated at the edge with
``raise ... from exc`` so callers only ever catch :class:`SecfwError`.
"""

from __future__ import annotations


class SecfwError(Exception):
    """Base of all secfw errors. The message is a single human-readable line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()) if "\n" in message else message)


class ValidationError(SecfwError):
    """Input that can never be valid (bad field value, malformed CIDR, ...)."""

    exit_code = 2


class NotFoundError(SecfwError):
    """A referenced object does not exist (in the caller's project)."""

    exit_code = 3


class ConflictError(SecfwError):
    """The request clashes with existing state (duplicate, overlap, exhaustion)."""

    exit_code = 4


class QuotaError(SecfwError):
    """The request would exceed a project quota."""

    exit_code = 5


class InUseError(SecfwError):
    """The object is still referenced and cannot be deleted."""

    exit_code = 6


class ForbiddenError(SecfwError):
    """The operation is reserved to the admin project (nova's policy: flavor
    management), or to the owner of the object (changing another project's image)."""

    exit_code = 11


class StoreError(SecfwError):
    """The store could not be opened, read or written."""

    exit_code = 7


class WriteConflictError(StoreError):
    """A write transaction lost an optimistic-concurrency race: another writer
    committed after it read, so it committed nothing. Re-running the whole
    transaction on fresh state is safe (see :func:`secfw.store.base.retry_conflicts`)."""


class HistoryCompactedError(StoreError):
    """:meth:`~secfw.store.base.Store.changes_since` cannot answer: the store has
    discarded (compacted) the history after the revision asked for. The reader
    must load everything again; carrying on would silently miss changes."""


class StoreUnreachableError(StoreError):
    """One server of the store (an etcd member) could not be reached, or
    answered that it cannot serve now (HTTP 503, 408, 504): another member of
    the cluster may answer (:mod:`secfw.store.etcdhttp`)."""


class StoreRefusedError(StoreError):
    """A server of the store answered a request with an error of its own (the
    message is the server's): asking another member would not help."""


class ConfigError(SecfwError):
    """A configuration file or value is invalid."""

    exit_code = 8


class BackendError(SecfwError):
    """A packet-filter backend failed to apply or read back a ruleset."""

    exit_code = 9


class UnsupportedError(BackendError):
    """A backend cannot express part of the IR as well as the IR asks."""


class TopologyError(BackendError):
    """The taps of the host are not laid out as the configured topology says
    (bridge ports on a ``routed`` host, or the other way round).

    ``actual`` is the topology the taps show (None when they show none, or both):
    the one whose closed filter really closes them.
    """

    def __init__(self, message: str, actual: str | None = None) -> None:
        super().__init__(message)
        self.actual = actual


class LabError(SecfwError):
    """The network-namespace lab could not be created or removed."""

    exit_code = 10


class NeutronApiError(SecfwError):
    """An error the Neutron-compatible API reports exactly as Neutron does.

    ``status`` is the HTTP status (400, 404, 409, ...), ``kind`` the name
    Neutron gives the error in ``{"NeutronError": {"type": ...}}`` (its
    exception class, e.g. ``SecurityGroupNotFound`` or ``HTTPBadRequest``), and
    the message is Neutron's text, which clients and tempest compare.
    """

    exit_code = 2

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
