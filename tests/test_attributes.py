"""What cells set on modules, classes and functions: the pieces of :mod:`nbisolate.attributes`.

The kernel tests (``test_meaning_kernel``) run them through a real kernel and worker; these
check each step on its own, in this process.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from nbisolate import attributes
from nbisolate.plan import attribute_uses, parse_cell


def test_the_plan_finds_every_attribute_the_text_sets_deletes_or_may_change_in_place():
    tree = parse_cell(
        "cfg.LR = 0.1\nK.n += 1\ndel cfg.OLD\nsetattr(cfg, 'NEW', 1)\ndelattr(K, 'gone')\n"
        "torch.backends.cudnn.benchmark = True\nx = cfg.READ\nitems[0].name = 'not a chain'\n"
        "def f(self):\n    self.seen = 1\nsetattr(cfg, name, 2)\n"
        "cfg.LAYERS.append(3)\ncfg.OPTS['a'] = 1\ndel cfg.CACHE[0]\nfit(cfg.data)\nframe.plot()\n"
    )
    stored, touched = attribute_uses(tree)
    assert len(stored) == len(set(stored))
    assert set(stored) == {
        ("cfg", "LR"), ("K", "n"), ("cfg", "OLD"), ("torch", "backends", "cudnn", "benchmark"),
        ("self", "seen"), ("cfg", "NEW"), ("K", "gone"),
    }
    # frame.plot() calls a method of a variable (inplace.py watches variables); fit(cfg.data) only reads
    assert set(touched) == {("torch", "backends", "cudnn"), ("cfg", "LAYERS"), ("cfg", "OPTS"), ("cfg", "CACHE")}


def test_only_modules_classes_and_functions_are_followed():
    instance = types.SimpleNamespace(inner=types.SimpleNamespace(x=1))
    ns = {"mod": importlib, "inst": instance, "K": type("K", (), {}), "sys": sys}
    assert attributes.owner(ns, ("mod", "x")) is importlib
    assert attributes.owner(ns, ("K", "x")) is ns["K"]
    assert attributes.is_missing(attributes.owner(ns, ("inst", "x")))  # travels as a copy: inplace's
    assert attributes.is_missing(attributes.owner(ns, ("inst", "inner", "x")))  # never looked into
    assert attributes.is_missing(attributes.owner(ns, ("sys", "argv")))  # the process's: settings'
    assert attributes.is_missing(attributes.owner(ns, ("absent", "x")))


def test_changes_found_after_the_cell_and_applied_on_the_other_sides_objects():
    class Before:
        kept, changed, removed = 1, 2, 3

    Before.items, Before.same = [1], [2]
    ns = {"K": Before}
    chains = [("K", "kept"), ("K", "changed"), ("K", "removed"), ("K", "added"), ("K", "items"), ("K", "same")]
    seen = attributes.watch(ns, chains)
    Before.changed = 20
    del Before.removed
    Before.added = [4]
    Before.items.append(5)
    values, deleted, in_place = attributes.changed(ns, seen)
    name = attributes.name_of
    assert values == {name(("K", "changed")): 20, name(("K", "added")): [4], name(("K", "items")): [1, 5]}
    assert deleted == [name(("K", "removed"))]
    assert in_place == [name(("K", "items"))]

    class There:
        kept, changed, removed = 1, 2, 3

    held = There.items = [1]  # another reference to the same list sees the change
    registry = attributes.Registry()
    problems = attributes.apply({"K": There}, values, deleted, registry, in_place)
    assert problems == []
    assert (There.changed, There.added, hasattr(There, "removed"), There.items, held is There.items) == (
        20, [4], False, [1, 5], True
    )
    assert len(registry) == 0  # a class of no module's (defined here, in a function): it travels by value


def test_what_cannot_be_set_is_said():
    ns = {"n": 1, "int": int}
    problems = attributes.apply(ns, {attributes.name_of(("int", "x")): 1, attributes.name_of(("n", "x")): 1}, [])
    assert len(problems) == 2
    assert "int.x, which the kernel could not take (TypeError" in problems[0]
    assert "n is no module, class or function here" in problems[1]


@pytest.fixture
def fresh_module(tmp_path, monkeypatch):
    (tmp_path / "nbi_patched_mod.py").write_text("LR = 1.0\nclass Knob:\n    n = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "nbi_patched_mod"
    sys.modules.pop("nbi_patched_mod", None)


def test_the_registry_reads_values_as_they_are_now(fresh_module):
    module = importlib.import_module(fresh_module)
    registry = attributes.Registry()
    module.LAYERS = []
    registry.note({"m": module}, [("m", "LR"), ("m", "Knob", "n"), ("m", "nothing", "x")], [("m", "LAYERS"), ("m", "Knob")])
    module.LR, module.Knob.n = 0.5, 7
    assert registry.current() == [  # m.Knob is a class: what changes on it is set, not changed in place
        ((fresh_module, "", "LR"), 0.5), ((fresh_module, "Knob", "n"), 7), ((fresh_module, "", "LAYERS"), []),
    ]
    del module.LR
    assert attributes.is_missing(dict(registry.current())[(fresh_module, "", "LR")])


def test_patches_wait_for_their_module_to_be_imported(fresh_module):
    assert fresh_module not in sys.modules
    finders = list(sys.meta_path)
    attributes.patch([((fresh_module, "", "LR"), lambda: 0.5), ((fresh_module, "Knob", "n"), lambda: 7)])
    module = importlib.import_module(fresh_module)
    assert (module.LR, module.Knob.n) == (0.5, 7)
    assert sys.meta_path == finders  # the finder stepped aside once its module was patched
    assert type(module.__loader__).__name__ == "SourceFileLoader"  # its own loader again
    attributes.patch([((fresh_module, "", "LR"), None)])  # imported already: at once
    assert not hasattr(module, "LR")
