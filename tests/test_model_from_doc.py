"""Record.from_doc builds records without the dataclass ``__init__`` (model.py):
it must give exactly what ``cls(**fields)`` gives — same fields, defaults filled,
fresh default_factory objects — and a document missing a required field must
still fail in ``__init__``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from secfw.api import Api
from secfw.lab.demo import add_floating_ips, build_guide_cloud
from secfw.model import RECORD_TYPES, Flavor, Instance, Port, Record, Rule


def reference(cls: type[Record], doc: dict[str, Any]) -> Any:
    """from_doc as it was: the generated __init__."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in doc.items() if k in names})


def _required(cls: type[Record]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def test_every_record_of_the_guide_cloud_equals_the_reference(api: Api) -> None:
    build_guide_cloud(api)
    add_floating_ips(api)
    api.keypair_add("admin", "k1")
    seen = set()
    for kind, docs in api.store.load().all_docs().items():
        cls = RECORD_TYPES.get(kind)
        if cls is None:
            continue
        for doc in docs.values():
            seen.add(kind)
            built, expected = cls.from_doc(doc), reference(cls, doc)
            assert built == expected and repr(built) == repr(expected)
            partial = {k: v for k, v in doc.items() if k in _required(cls)}
            assert cls.from_doc(partial | {"unknown-key": 1}) == reference(cls, partial)
    assert len(seen) >= 6, seen


def test_a_missing_required_field_fails_as_before() -> None:
    with pytest.raises(TypeError):
        Flavor.from_doc({"id": "f1", "name": "tiny"})


def test_default_factories_give_fresh_objects() -> None:
    doc = {"id": "f1", "name": "tiny", "ram_mb": 1, "disk_gb": 1, "ephemeral_gb": 0, "vcpus": 1}
    one, two = Flavor.from_doc(doc), Flavor.from_doc(doc)
    assert one.extra_specs == {} and one.extra_specs is not two.extra_specs
    assert one == Flavor(**doc)


def test_records_share_their_attribute_names_and_recurring_values() -> None:
    """Two records read from two documents (JSON decodes every key and value
    afresh) hold one copy of each attribute name and of each SHARED_FIELDS
    value — and are still equal to what ``__init__`` builds."""
    text = ('{"id": "p-%d", "instance_id": "i-1", "network_id": "n-1", '
            '"mac": "fa:16:3e:00:00:0%d", "ip": "10.0.0.%d"}')
    docs = [json.loads(text % (i, i, i)) for i in (1, 2)]
    assert docs[0]["network_id"] is not docs[1]["network_id"]  # what JSON gives
    one, two = (Port.from_doc(doc) for doc in docs)
    assert [one, two] == [reference(Port, doc) for doc in docs]
    assert one.network_id is two.network_id and one.instance_id is two.instance_id
    assert one.mac is not two.mac  # unique values are left alone
    text = '{"id": "r-%d", "group_id": "g-1", "protocol": "tcp", "remote_cidr": "0.0.0.0/0"}'
    rules = [Rule.from_doc(json.loads(text % i)) for i in (1, 2)]  # a record with a __dict__
    assert rules == [reference(Rule, json.loads(text % i)) for i in (1, 2)]
    names = [list(vars(rule)) for rule in rules]
    assert all(a is b for a, b in zip(*names, strict=True))
    assert rules[0].group_id is rules[1].group_id


@pytest.mark.parametrize("cls", [Instance, Port])
def test_the_kinds_held_by_the_ten_thousand_have_no_per_record_dict(cls: type[Record]) -> None:
    """Instance and Port are slotted (model.Record): no ``__dict__`` per record,
    built by from_doc with every field (defaults and fresh factories included)."""
    doc = {f.name: f"v-{f.name}" for f in dataclasses.fields(cls)  # type: ignore[arg-type]
           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    built = cls.from_doc(doc)
    assert not hasattr(built, "__dict__")
    assert built == reference(cls, doc) and repr(built) == repr(reference(cls, doc))
    if cls is Instance:
        assert built.metadata == {} and built.metadata is not cls.from_doc(doc).metadata


@pytest.mark.parametrize("cls", sorted(set(RECORD_TYPES.values()), key=lambda c: c.KIND))
def test_shared_fields_name_fields(cls: type[Record]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    assert cls.SHARED_FIELDS.issubset(fields)
