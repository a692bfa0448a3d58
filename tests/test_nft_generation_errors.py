"""backends.nftables.generation: a reader that cannot get a well-formed answer
raises BackendError — never another exception, never a wait without end —
so its callers fall back to reading the tables back."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from secfw.backends.nftables import generation
from secfw.backends.nftables.generation import GenerationReader
from secfw.errors import BackendError

NEWGEN = generation.NFNL_SUBSYS_NFTABLES << 8 | generation.NFT_MSG_NEWGEN


class FakeSocket:
    """Answers every request with ``answers`` (then times out, as a silent kernel)."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers

    def send(self, data: bytes) -> int:
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.answers:
            raise TimeoutError("timed out")
        return self.answers.pop(0)


def reader_with(answers: list[bytes]) -> GenerationReader:
    reader = GenerationReader.__new__(GenerationReader)
    reader._sock = FakeSocket(answers)  # type: ignore[assignment]
    reader._lock = threading.Lock()
    reader._seq = 0
    return reader


def answer(seq: int, body: bytes = b"", kind: int = NEWGEN) -> bytes:
    header = struct.pack("=LHHLL", 16 + 4 + len(body), kind, 0, seq, 0)
    return header + struct.pack("=BBH", 0, 0, 0) + body


def gen_attr(value: int) -> bytes:
    return struct.pack("=HH", 8, generation.NFTA_GEN_ID) + struct.pack(">L", value)


def test_a_well_formed_answer_is_read() -> None:
    assert reader_with([answer(1, gen_attr(42))]).read() == 42


@pytest.mark.parametrize("answers", [
    [],                                   # no answer: the timeout
    [b"\x01\x00"],                        # cut short before the header's end
    [answer(1)[:18]],                     # cut short in nfgenmsg: no attribute
    [answer(1, kind=0x0a10)],             # another message type
    [answer(1, struct.pack("=HH", 8, 9) + b"\0" * 4)],  # no NFTA_GEN_ID
    [answer(7, gen_attr(1))] * 20,        # only answers to other requests
], ids=["silent", "short", "no-attribute", "other-type", "other-attribute", "stale"])
def test_a_bad_or_missing_answer_is_a_backend_error(answers: list[bytes]) -> None:
    with pytest.raises(BackendError):
        reader_with(list(answers)).read()


def test_the_real_socket_has_a_timeout() -> None:
    reader = GenerationReader()
    try:
        assert reader._sock.gettimeout() == generation.TIMEOUT_S
        assert isinstance(reader._sock, socket.socket)
    finally:
        reader.close()


def test_an_executor_that_cannot_read_the_generation_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No generation: None (the caller reads back), one warning however often asked."""
    from secfw.backends.nftables.executor import NftablesExecutor

    def refuse(_netns: str | None = None) -> GenerationReader:
        raise BackendError("nftables generation: refused")

    monkeypatch.setattr("secfw.backends.nftables.executor.GenerationReader", refuse)
    executor = NftablesExecutor()
    with caplog.at_level("WARNING"):
        assert [executor.generation() for _ in range(3)] == [None] * 3
        assert executor.generation_reader() is None
    assert len([r for r in caplog.records if "generation unreadable" in r.getMessage()]) == 1
