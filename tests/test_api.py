"""The public API: one hop from ``vijax``, documented, owned by one module."""

import inspect

import pytest

import vijax
import vijax.models


def _public(module):
    return [(module.__name__, name, getattr(module, name)) for name in module.__all__]


PUBLIC = _public(vijax) + _public(vijax.models)


def test_all_is_sorted_and_importable():
    for module in (vijax, vijax.models):
        names = [n for n in module.__all__]
        assert names == sorted(names), f"{module.__name__}.__all__ is not sorted"
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"


@pytest.mark.parametrize("module,name,obj", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_every_public_name_has_a_docstring(module, name, obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) > 20, f"{module}.{name} needs a docstring"


def test_public_functions_live_in_private_modules_listed_in_the_package_docstring():
    for name in vijax.__all__:
        obj = getattr(vijax, name)
        owner = getattr(obj, "__module__", None)
        if owner is None or inspect.ismodule(obj):
            continue
        assert owner.startswith("vijax."), (name, owner)
        if owner.startswith("vijax._"):
            assert f"``{owner}``" in vijax.__doc__, f"{owner} (owner of {name}) is not in the module table"
