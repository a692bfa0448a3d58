"""Stores: where the cloud model lives. ``open_store(url)`` picks the implementation."""

from secfw.store.base import Change, Snapshot, Store, WriteTxn, open_store

__all__ = ["Change", "Snapshot", "Store", "WriteTxn", "open_store"]
