"""The slow path: walk an object exactly as pickling does and name every culprit.

Only run after a fast dump failed or hinted at a spawn problem. A tracing
subclass of each serializer's pure-Python pickler keeps the stack of objects
being saved; when a ``save`` raises it records the deepest failing object with
its access path, writes a placeholder and carries on with the siblings, so one
walk finds every distinct culprit along the graph pickling really follows.
"""

from __future__ import annotations

import pickle
import time
import types
from dataclasses import dataclass, field
from typing import Any

from ..travel import CACHED_FUNCTION, NAMED_INSTANCE_TYPES, refers_to_main
from .categories import _exc_text, _is, _resource_category, _type_name
from .paths import _LabelCache, _render_path
from .serializers import PROTOCOL, _cloudpickle, _IsolateDillPickler, _OutOfTime
from .spawn import _Context, _main_ref_loads_in_child


@dataclass
class _Finding:
    obj: Any
    path: str
    kind: str  # "fail", "main" (spawn trap), "ref" (unimportable module), "depth"
    error: str
    serializer: str
    also: list[str] = field(default_factory=list)
    module: str = ""


class _Abandon(BaseException):
    """Unwinds the walk to a resource that holds a failing member.

    A lock inside a ``threading.Thread``, a buffer inside a ``GzipFile``, a
    pool inside a database engine: the useful answer is the thread, the
    file, the engine (one problem, one fix), not their private parts -- and
    walking on through their internals (a thread's ``_stderr`` leads into the
    whole kernel) only produces noise. A BaseException, so that reducers'
    ``except Exception`` don't stop it on the way.
    """

    def __init__(self, holder: Any, error: str) -> None:
        super().__init__()
        self.holder = holder
        self.error = error


_RESOURCE_BY_TYPE: dict[type, str | None] = {}


def _resource_of(obj: Any) -> str | None:
    t = type(obj)
    try:
        return _RESOURCE_BY_TYPE[t]
    except KeyError:
        found = _RESOURCE_BY_TYPE[t] = _resource_category(obj)
        return found
    except TypeError:  # unhashable metatype
        return _resource_category(obj)


# What pickle writes as a module-and-name reference: classes, functions and
# modules, and the instances whose __reduce__ returns a bare name (TypeVars, the
# wrapper of an lru_cache'd function).
_BY_NAME: tuple[type, ...] = (
    type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, CACHED_FUNCTION,
    *NAMED_INSTANCE_TYPES,
)


class _TraceMixin:
    """Turns a pure-Python pickler into a culprit finder.

    ``save`` keeps the stack of objects being pickled. An exception that
    escapes ``save(obj)`` without having been handled by a deeper ``save``
    means ``obj`` itself can't be reduced: it is the deepest failing object,
    so we record it with its path, write a placeholder (``None``) and return
    normally, letting the parent carry on with its other members. The stream
    we produce is never loaded, so a placeholder is harmless.

    When the failing object sits inside a resource (see :class:`_Abandon`),
    the walk instead unwinds to the outermost such resource, forgets what it
    found inside it, and reports the resource, naming the failing member in
    the error text.
    """

    _nb_by_value_main = False
    _nb_routes = False  # %%isolate: travel.route says what still goes by name

    def _nb_setup(
        self, name: str, serializer: str, ctx: _Context, deadline: float,
        max_depth: int, check_refs: bool,
    ) -> None:
        self._nb_name = name
        self._nb_serializer = serializer
        self._nb_ctx = ctx
        self._nb_deadline = deadline
        self._nb_max_depth = max_depth
        self._nb_check_refs = check_refs
        self._nb_stack: list[Any] = []
        self._nb_found: dict[int, _Finding] = {}
        self._nb_undo: list[tuple[Any, ...]] = []
        self._nb_calls = 0
        self._nb_depth_paths: list[str] = []
        self._nb_labels = _LabelCache()

    # The core of it ------------------------------------------------------

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        self._nb_calls += 1
        if not self._nb_calls & 63 and time.perf_counter() > self._nb_deadline:
            raise _OutOfTime
        stack = self._nb_stack
        seen = self._nb_found.get(id(obj))
        if seen is not None and seen.kind == "fail":
            stack.append(obj)
            try:
                self._nb_also(seen)
            finally:
                stack.pop()
            self.write(pickle.NONE)
            return
        if len(stack) >= self._nb_max_depth:
            if len(self._nb_depth_paths) < 3:
                stack.append(obj)
                try:
                    self._nb_depth_paths.append(self._nb_path())
                    self._nb_undo.append(("depth",))
                finally:
                    stack.pop()
            self.write(pickle.NONE)
            return
        resource = _resource_of(obj)
        if resource == "kernel":  # the kernel's own objects are a leaf: never walk into them
            stack.append(obj)
            try:
                self._nb_record(obj, "fail", "it belongs to the running Jupyter kernel")
            finally:
                stack.pop()
            self.write(pickle.NONE)
            return
        mark = (len(self._nb_undo), len(self.memo)) if resource else None
        stack.append(obj)
        try:
            super().save(obj, save_persistent_id)  # type: ignore[misc]
        except (_OutOfTime, RecursionError):
            raise
        except _Abandon as abandon:
            if abandon.holder is not obj or mark is None:
                raise
            self._nb_rollback(*mark)
            self._nb_record(obj, "fail", abandon.error)
            self.write(pickle.NONE)
        except Exception as exc:
            error = _exc_text(exc)
            holder = next((o for o in stack[:-1] if _resource_of(o)), None)
            if holder is not None:
                where = f" (at {self._nb_path()}, a {_type_name(type(obj))})"
                raise _Abandon(holder, error + where) from None
            self._nb_record(obj, "fail", error)
            self.write(pickle.NONE)
        else:
            if self._nb_check_refs and _is(obj, _BY_NAME):
                self._nb_check_ref(obj)
        finally:
            stack.pop()

    def _nb_check_ref(self, obj: Any) -> None:
        """Record ``obj`` if it was stored by a reference a spawned child can't resolve."""
        if _is(obj, types.ModuleType):
            modname = obj.__name__
            if modname in ("__main__", "builtins"):
                return
        else:
            modname = getattr(obj, "__module__", None)
            if not isinstance(modname, str):
                return
        if modname == "__main__":
            if _is(obj, types.ModuleType):
                return
            if self._nb_routes:
                # a worker's __main__ is never the notebook (nor a script)
                if refers_to_main(obj):
                    self._nb_record(obj, "main", "")
                return
            # cloudpickle copies the notebook's functions, but names an lru_cache'd one
            by_value = self._nb_by_value_main and not _is(obj, CACHED_FUNCTION)
            if by_value or _main_ref_loads_in_child(obj):
                return
            self._nb_record(obj, "main", "")
            return
        if modname not in self._nb_ctx.suspicious:
            return
        status = self._nb_ctx.module_status(modname)
        if status == "ok":
            return
        self._nb_record(obj, "ref", status, module=modname)

    def _nb_record(self, obj: Any, kind: str, error: str, module: str = "") -> None:
        key = id(obj)
        seen = self._nb_found.get(key)
        if seen is not None:
            self._nb_also(seen)
            return
        self._nb_found[key] = _Finding(
            obj=obj, path=self._nb_path(), kind=kind, error=error,
            serializer=self._nb_serializer, module=module,
        )
        self._nb_undo.append(("found", key))

    def _nb_also(self, seen: _Finding) -> None:
        """Note another path to an object already reported (shared objects, once)."""
        if len(seen.also) >= 5:
            return
        path = self._nb_path()
        if path != seen.path and path not in seen.also:
            seen.also.append(path)
            self._nb_undo.append(("also", seen))

    def _nb_rollback(self, undo_len: int, memo_len: int) -> None:
        """Forget what was found, and memoized, since a resource's walk began.

        Memo entries go too: an object first met inside the abandoned
        resource and met again outside it must be walked again there, or a
        problem only reachable that way would be lost.
        """
        while len(self._nb_undo) > undo_len:
            entry = self._nb_undo.pop()
            if entry[0] == "found":
                self._nb_found.pop(entry[1], None)
            elif entry[0] == "also":
                entry[1].also.pop()
            else:
                self._nb_depth_paths.pop()
        memo = self.memo
        if len(memo) > memo_len:
            for key in list(memo)[memo_len:]:
                del memo[key]

    def _nb_path(self) -> str:
        return _render_path(self._nb_name, self._nb_stack, self._nb_labels)


def _stdlib_dispatch() -> dict[type, Any]:
    """The pure-Python pickler's own dispatch table, without what dill added.

    Importing dill extends ``pickle._Pickler.dispatch`` in place with its
    savers (functions, files, locks...), which would make a "stdlib pickle"
    walk behave like dill. The C pickler is untouched, so the tracer must be
    too: keep only the entries defined by the ``pickle`` module itself.
    """
    table = {
        t: f
        for t, f in pickle._Pickler.dispatch.items()
        if getattr(f, "__module__", None) == "pickle"
    }
    # the entries dill replaced (functions, classes) go back to pickle's own
    standard = {
        type(None): "save_none", bool: "save_bool", int: "save_long", float: "save_float",
        bytes: "save_bytes", bytearray: "save_bytearray", str: "save_str",
        tuple: "save_tuple", list: "save_list", dict: "save_dict", set: "save_set",
        frozenset: "save_frozenset", types.FunctionType: "save_global", type: "save_type",
        pickle.PickleBuffer: "save_picklebuffer",
    }
    for t, method in standard.items():
        if t not in table and hasattr(pickle._Pickler, method):
            table[t] = getattr(pickle._Pickler, method)
    return table


class _PickleTracer(_TraceMixin, pickle._Pickler):  # type: ignore[misc]
    _nb_by_value_main = False
    dispatch = _stdlib_dispatch()


class _DillTracer(_TraceMixin, _IsolateDillPickler):
    _nb_by_value_main = True
    _nb_routes = True


_CloudTracer: type | None = None
if _cloudpickle is not None:
    # cloudpickle subclasses the C pickler, whose ``save`` can't be hooked.
    # Its behaviour lives in ``reducer_override`` and ``dispatch_table``,
    # which the pure-Python pickler honours too, so we lend them to it.
    _borrowed: dict[str, Any] = {}
    for _attr, _value in vars(_cloudpickle.Pickler).items():
        if _attr in ("reducer_override", "dispatch_table") or (
            _attr.startswith("_") and not _attr.startswith("__") and callable(_value)
        ):
            _borrowed[_attr] = _value

    if "reducer_override" in _borrowed:

        class _PureCloudPickler(pickle._Pickler):  # type: ignore[misc]
            dispatch = _stdlib_dispatch()

            def __init__(self, file: Any, protocol: int = PROTOCOL, **kwds: Any) -> None:
                super().__init__(file, protocol, **kwds)
                self.globals_ref: dict[int, Any] = {}
                self.proto = int(protocol)

        for _attr, _value in _borrowed.items():
            setattr(_PureCloudPickler, _attr, _value)

        class _CloudTracerCls(_TraceMixin, _PureCloudPickler):
            _nb_by_value_main = True

        _CloudTracer = _CloudTracerCls

_TRACERS: dict[str, type | None] = {
    "pickle": _PickleTracer,
    "dill": _DillTracer,
    "cloudpickle": _CloudTracer,
}
