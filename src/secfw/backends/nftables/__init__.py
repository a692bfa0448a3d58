"""The nftables backend: one private table ``inet secfw`` (see docs/nftables.md).

* :func:`render` — HostFilter IR → :class:`Ruleset` (pure);
  :func:`to_nft_text` / :func:`to_nft_json` print it for ``nft -f`` / libnftables.
* :class:`KernelState` — normalised snapshot, from a Ruleset or a JSON read-back.
* :func:`plan` — the minimal atomic :class:`Transaction` from one state to another.
* :class:`NftablesExecutor` — libnftables: read back, apply, delete the table.
* :class:`NftablesBackend` — the three above, as the agent drives a backend.
"""

from secfw.backends.nftables.backend import NftablesBackend
from secfw.backends.nftables.executor import NftablesExecutor
from secfw.backends.nftables.plan import Transaction, full_transaction, plan
from secfw.backends.nftables.render import render
from secfw.backends.nftables.state import KernelState
from secfw.backends.nftables.syntax import Ruleset, to_nft_json, to_nft_text

__all__ = [
    "KernelState",
    "NftablesBackend",
    "NftablesExecutor",
    "Ruleset",
    "Transaction",
    "full_transaction",
    "plan",
    "render",
    "to_nft_json",
    "to_nft_text",
]
