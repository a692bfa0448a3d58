"""``syntax.elements_text`` (the fast printer of a set's elements, per key type)
prints exactly what ``syntax.element_text`` prints element by element, for every
kind of key the renderer uses: a full transaction's text is mostly its output."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from secfw.backends.nftables.syntax import (
    Datum,
    Element,
    Verdict,
    element_text,
    elements_text,
)

SEP = ",\n\t\t\t"
TAPS = st.text("abcdef0123456789-", min_size=1, max_size=12).map(lambda s: "tap" + s)
VERDICTS = st.one_of(
    st.none(),
    st.sampled_from([Verdict("accept"), Verdict("drop"), Verdict("goto", "ingress-filter")]),
    st.integers(0, 499).map(lambda i: Verdict("jump", f"sg-{i:04d}-in")),
)


def _expected(key_type: tuple[str, ...], elements: list[Element], interval: bool) -> str:
    return SEP.join(element_text(key_type, e, interval) for e in elements)


@given(st.lists(st.tuples(TAPS, VERDICTS), max_size=30))
def test_ifname_sets_and_maps_print_as_element_by_element(pairs: list[tuple[str, Verdict | None]]
                                                          ) -> None:
    elements = [Element((tap,), verdict) for tap, verdict in pairs]
    got = elements_text((("ifname",), ()), elements, SEP)
    assert got == _expected(("ifname",), elements, False)


def test_other_key_types_print_as_element_by_element() -> None:
    cases: list[tuple[tuple[str, ...], tuple[str, ...], list[Element]]] = [
        (("ipv4_addr",), (), [Element(("10.0.0.1/32",)), Element(("10.0.0.2/32",))]),
        (("ipv4_addr",), ("interval",), [Element(("10.0.0.0/24",)), Element(("10.1.0.1/32",))]),
        (("ipv6_addr",), (), [Element(("2001:db8::1/128",))]),
        (("ifname", "ether_addr", "ipv4_addr"), (),
         [Element(("tap1", "fa:16:3e:00:00:01", "10.0.0.5/32"))]),
        (("ifname", "ether_addr", "ipv4_addr"), ("interval",),
         [Element(("tap1", "fa:16:3e:00:00:01", "10.0.0.0/28"))]),
        (("mark",), (), [Element(("17",), Verdict("goto", "ingress-filter")),
                         Element(("18",), Datum("2147483665"))]),
        (("ifname",), (), [Element(("tap2",), Datum("17"))]),
        (("ifname",), (), []),
    ]
    for key_type, flags, elements in cases:
        got = elements_text((key_type, flags), elements, SEP)
        assert got == _expected(key_type, elements, "interval" in flags), (key_type, flags)
