"""Access paths: turning the pickler's stack of objects into ``model.loader._fh``.

A culprit is only useful if the user can find it. The pickler's stack holds
the objects it went through, including artefacts of reduction (argument
tuples, copied globals); this module labels each step with how a user would
spell it (attribute, key, index, closure cell, global) and skips artefacts.
Only used after a failure, so it may be slow.
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections.abc import Callable, Sequence
from typing import Any

from ..units import short_repr
from .categories import _is, _module_of, _type_name


def _key_repr(key: Any) -> str:
    return short_repr(key, 60, f"<{_type_name(type(key))}>")


def _attr_label(name: Any) -> str:
    if isinstance(name, str) and name.isidentifier():
        return "." + name
    return f".__dict__[{_key_repr(name)}]"


def _code_names(code: types.CodeType, out: set[str]) -> set[str]:
    out.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, out)
    return out


# Containers that serializers copy or rebuild rather than keep: labelling
# them would make paths like ``f.__globals__['x']`` instead of ``f.<global x>``.
_HIDDEN_DESCRIPTORS = frozenset(
    {"__dict__", "__weakref__", "__closure__", "__globals__", "__builtins__"}
)


def _child_labels(anchor: Any) -> dict[int, str]:
    """Map ``id(child) -> label`` for the members of ``anchor`` a user can name.

    Used only after a failure, to turn the pickler's stack into a path like
    ``model.loader.dataset._fh``. The first label for a child wins, so the
    most natural spelling is added first.
    """
    labels: dict[int, str] = {}

    def add(child: Any, label: str) -> None:
        labels.setdefault(id(child), label)

    if _is(anchor, enum.Enum):
        # a member reduces to (its class, (value,)); it also holds the class as
        # __objclass__, but the class is what a user recognises
        add(type(anchor), ".__class__")
    with contextlib.suppress(Exception):
        if _is(anchor, types.FunctionType):
            code = anchor.__code__
            for var, cell in zip(code.co_freevars, anchor.__closure__ or (), strict=False):
                add(cell, f".<closure {var}>")
                with contextlib.suppress(ValueError):
                    add(cell.cell_contents, f".<closure {var}>")
            globs = anchor.__globals__
            for gname in sorted(_code_names(code, set())):
                if gname in globs:
                    add(globs[gname], f".<global {gname}>")
            for i, value in enumerate(anchor.__defaults__ or ()):
                add(value, f".__defaults__[{i}]")
            for k, value in (anchor.__kwdefaults__ or {}).items():
                add(value, f".__kwdefaults__[{k!r}]")
            add(code, ".__code__")
        elif _is(anchor, types.MethodType):
            add(anchor.__self__, ".__self__")
            add(anchor.__func__, ".__func__")
        elif _is(anchor, types.CellType):
            with contextlib.suppress(ValueError):
                add(anchor.cell_contents, "")
        if _is(anchor, dict):
            for k, v in anchor.items():
                add(v, f"[{_key_repr(k)}]")
            for k in anchor:
                add(k, f"<key {_key_repr(k)}>")
        elif _is(anchor, (list, tuple)):
            fields = getattr(type(anchor), "_fields", None) if _is(anchor, tuple) else None
            for i, v in enumerate(anchor):
                if fields and i < len(fields) and isinstance(fields[i], str):
                    add(v, "." + fields[i])
                else:
                    add(v, f"[{i}]")
        elif _is(anchor, (set, frozenset)):
            for v in anchor:
                add(v, "<set item>")
        elif _is(anchor, type):
            for k, v in vars(anchor).items():
                add(v, _attr_label(k))
            for i, base in enumerate(anchor.__bases__):
                add(base, f".__bases__[{i}]")
        else:
            _library_labels(anchor, add)
    with contextlib.suppress(Exception):
        if not _is(anchor, type):
            attrs = getattr(anchor, "__dict__", None)
            if isinstance(attrs, dict):
                for k, v in attrs.items():
                    add(v, _attr_label(k))
    with contextlib.suppress(Exception):
        # __slots__ and C-level attributes (functools.partial.func, ...):
        # data descriptors defined on the type. Reading them is side-effect
        # free, unlike properties, which we never call.
        cls = type(anchor)
        for klass in cls.__mro__:
            for dname, desc in vars(klass).items():
                if dname in _HIDDEN_DESCRIPTORS or not isinstance(
                    desc, (types.MemberDescriptorType, types.GetSetDescriptorType)
                ):
                    continue
                try:
                    value = desc.__get__(anchor, cls)
                except Exception:
                    continue
                add(value, "." + dname)
        add(cls, ".__class__")
    return labels


_ELEMENT_LIMIT = 1_000_000


def _library_labels(anchor: Any, add: Callable[[Any, str], None]) -> None:
    """Elements of object-dtype numpy arrays and pandas objects, by index.

    Both pickle their Python objects inside what ``__reduce__`` returns (a
    block manager, a flat list in the state), so without this the path to a
    lock in a DataFrame cell would read ``df._mgr.blocks[1].values<reduce>[4][0]``
    instead of ``df['col'].iloc[0]``.
    """
    t = type(anchor)
    module = _module_of(t)
    if module.startswith("numpy") and t.__name__ == "ndarray":
        if anchor.dtype.hasobject and anchor.size <= _ELEMENT_LIMIT:
            import numpy

            for index in numpy.ndindex(anchor.shape):
                label = ", ".join(map(str, index))
                add(anchor[index], f"[{label}]")
    elif module.startswith("pandas") and t.__name__ == "DataFrame":
        if anchor.size <= _ELEMENT_LIMIT:
            for col in anchor.columns:
                column = anchor[col]
                if getattr(getattr(column, "dtype", None), "kind", "") == "O":
                    for i, v in enumerate(column.to_numpy()):
                        add(v, f"[{_key_repr(col)}].iloc[{i}]")
    elif module.startswith("pandas") and t.__name__ == "Series":
        if anchor.dtype.kind == "O" and anchor.size <= _ELEMENT_LIMIT:
            for i, v in enumerate(anchor.to_numpy()):
                add(v, f".iloc[{i}]")


def _public_shortcut(anchor: Any) -> bool:
    """Anchors whose pickled internals are private: name culprits from the outside."""
    t = type(anchor)
    return _module_of(t).startswith("pandas") and t.__name__ in ("DataFrame", "Series")


class _LabelCache:
    """Label maps per anchor, built once: keeps path rendering linear in total."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[Any, dict[int, str]]] = {}

    def find(self, anchor: Any, child: Any) -> str | None:
        entry = self._maps.get(id(anchor))
        if entry is None or entry[0] is not anchor:
            entry = (anchor, _child_labels(anchor))
            self._maps[id(anchor)] = entry
        return entry[1].get(id(child))


def _render_path(root_name: str, stack: Sequence[Any], labels: _LabelCache) -> str:
    """Turn the pickler's stack of objects into ``root.attr['key'][3]``.

    The stack also holds objects the pickler made on the way (the argument
    tuple and state returned by ``__reduce_ex__``, dill's and cloudpickle's
    copies of a function's globals). Such artefacts are not reachable from
    the last user-visible object, so they are skipped: the next object is
    looked up from the last object that *was* reachable. A tail that can't be
    linked at all is shown after a ``<reduce>`` marker, with indexes inside
    what ``__reduce__`` returned where possible (``it<reduce>[0][12][1]``).
    """
    parts = [root_name]
    if not stack:
        return root_name
    anchor = prev = stack[0]
    culprit = stack[-1]
    tail: list[str] = []  # labels inside what the anchor's __reduce__ made
    for obj in stack[1:]:
        if _public_shortcut(anchor) and obj is not culprit:
            direct = labels.find(anchor, culprit)
            if direct is not None:
                parts.append(direct)
                return "".join(parts)
        label = labels.find(anchor, obj)
        if label is not None:
            parts.append(label)
            anchor = obj
            tail = []
        elif prev is anchor:
            tail = ["<reduce>"]
        else:
            tail.append(labels.find(prev, obj) or "")
        prev = obj
    if tail:
        parts.extend(tail)
        if not tail[-1] or tail[-1] == "<reduce>":
            parts.append(f"<{_type_name(type(stack[-1]))}>")
    return "".join(parts)
