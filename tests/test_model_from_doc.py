"""Record.from_doc builds records without the dataclass ``__init__`` (model.py):
it must give exactly what ``cls(**fields)`` gives — same fields, defaults filled,
fresh default_factory objects — and a document missing a required field must
still fail in ``__init__``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from secfw.api import Api
from secfw.demo import add_floating_ips, build_guide_cloud
from secfw.model import RECORD_TYPES, Flavor, Record


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
