"""Shipping values between the kernel and a worker.

Why not plain ``pickle``: a spawned interpreter has no notebook ``__main__``,
so functions and classes defined in cells, lambdas and closures must travel
*by value*, and module objects must never be pickled at all but re-imported by
name. Why not plain ``dill``: it is built on the pure-Python pickler and is an
order of magnitude slower on ordinary data (100k small dicts: ~50 ms with the
C pickler, ~1.9 s with dill).

So the fast path is the C ``pickle.Pickler`` with a ``reducer_override`` that
makes a per-object choice (the idea of choosing the serializer per object, as
some experiment recorders do per class):

* a module becomes ``importlib.import_module(name)`` in the worker;
* a function or class the worker could not import by name (defined in the
  notebook, a lambda, a nested function) is handed to ``dill`` with
  ``recurse=True``, so the globals it uses travel with it (dill's default
  would silently drop them and the worker would hit ``NameError``);
* everything else takes the C pickler's own path, including protocol-5
  out-of-band buffers, so arrays are never copied into the stream.

If the fast path cannot serialize something (an open file, say, which dill
can re-open by name), the whole shipment is redone with ``dill`` alone. All
variables go through *one* pickler with one memo, so objects shared between
variables stay shared on the other side (``b['x'] is a`` still holds).
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ShipError

PROTOCOL = 5


def _import_module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def _load_dill(data: bytes) -> Any:
    import dill

    return dill.loads(data)


def needs_value(obj: Any) -> bool:
    """True when a function or class cannot be found by name in a fresh interpreter."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or module.startswith("__"):
        return True
    if "<lambda>" in qualname or "<locals>" in qualname:
        return True
    found: Any = sys.modules.get(module)
    if found is None:
        return True
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return True
    return found is not obj


def module_is_importable(module: types.ModuleType) -> bool:
    """A module a worker can import again by its name."""
    name = getattr(module, "__name__", None)
    return bool(name) and name != "__main__" and sys.modules.get(name) is module


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "SHORT_BINSTRING", "BINSTRING"})
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
_IMPORTERS = frozenset({("nbisolate.ship", "_import_module"), ("dill._dill", "_import_module")})


def modules_in_pickle(data: bytes | memoryview) -> set[str]:
    """Module names a pickle stream imports when loaded (globals, re-imported modules).

    Looks inside embedded pickles too (the dill blobs of by-value functions).
    Used where the loading side is another machine, to check before sending
    that it can import them. A stream it cannot read gives what was found so far.
    """
    return _scan_pickle(data, strict=False) or set()


def _scan_pickle(data: bytes | memoryview, strict: bool) -> set[str] | None:
    """The modules of a stream of pickles; with ``strict``, None unless it is valid throughout."""
    import io
    import pickletools

    found: set[str] = set()
    memo: dict[int, Any] = {}  # one memo for the whole stream, as ship.loads reads it
    file = io.BytesIO(data)
    size = len(file.getbuffer())
    try:
        while file.tell() < size:
            recent: list[Any] = [None, None]  # what the last two pushing opcodes pushed
            want_module = False
            for op, arg, _ in pickletools.genops(file):
                name = op.name
                if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1]
                    continue
                if name in ("FRAME", "PROTO"):
                    continue
                pushed: Any = None
                if name in _STRING_OPS:
                    pushed = arg
                elif name in _BYTES_OPS and isinstance(arg, bytes) and arg[:1] == b"\x80":
                    # a dill blob inside; code objects' line tables can start with 0x80 too
                    found |= _scan_pickle(arg, strict=True) or set()
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed = memo.get(int(arg))
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    pushed = ("global", module, attr)
                elif name == "STACK_GLOBAL" and isinstance(recent[-2], str):
                    pushed = ("global", recent[-2], recent[-1])
                if want_module and isinstance(pushed, str):
                    found.add(pushed)  # the argument of _import_module(name)
                    want_module = False
                if isinstance(pushed, tuple):
                    found.add(pushed[1])
                    want_module = pushed[1:] in _IMPORTERS
                recent = [recent[-1], pushed]
    except Exception:
        return None if strict else found
    return found


class _FastPickler(pickle.Pickler):
    """The C pickler, with dill only for what the C pickler would get wrong.

    It also notes the modules the stream will import on the other side
    (``modules``, plus whatever the ``dill_blobs`` import): a remote worker
    must be able to import every one of them.  The blobs are kept, not
    scanned: only the Dask backend asks, so the per-cell path does not pay.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modules: set[str] = set()
        self.dill_blobs: list[bytes] = []

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.ModuleType:
            if not module_is_importable(obj):
                raise pickle.PicklingError(
                    f"module {getattr(obj, '__name__', obj)!r} cannot be re-imported by name"
                )
            self.modules.add(obj.__name__)
            return _import_module, (obj.__name__,)
        if kind is types.FunctionType or kind is types.BuiltinFunctionType or isinstance(obj, type):
            if kind is not types.BuiltinFunctionType and needs_value(obj):
                import dill

                blob = dill.dumps(obj, recurse=True)
                self.dill_blobs.append(blob)
                return _load_dill, (blob,)
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        return NotImplemented


@dataclass
class Shipment:
    """Serialized variables: one pickle stream plus its out-of-band buffers.

    ``sizes`` (bytes, stream share plus buffers), ``seconds`` and ``how`` are
    per variable, for the live panel; ``skipped`` names what could not be
    serialized (only when skipping was asked for) and why. :attr:`modules`
    are the modules loading the shipment imports, for checking a remote worker.
    """

    names: list[str]
    data: bytes
    buffers: list[memoryview] = field(default_factory=list)
    engine: str = "pickle"
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    module_refs: set[str] | None = None  # noted while pickling; None: scan the stream
    dill_blobs: list[bytes] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.nbytes for b in self.buffers)

    @property
    def modules(self) -> set[str]:
        """Modules loading this shipment imports: re-imported modules, and those of classes
        and functions sent by reference, also inside by-value ones. Computed on first use."""
        found = getattr(self, "_modules", None)
        if found is None:
            if self.module_refs is None:
                found = modules_in_pickle(self.data)
            else:
                found = set(self.module_refs)
                for blob in self.dill_blobs:
                    found |= modules_in_pickle(blob)
            self._modules = found
        return found


def _how(value: Any, engine: str) -> str:
    if isinstance(value, types.ModuleType):
        return "module (re-imported)"
    if (isinstance(value, types.FunctionType) or isinstance(value, type)) and needs_value(value):
        return "dill (by value)"
    return engine


def _describe_failure(name: str, value: Any, exc: BaseException) -> tuple[str, str | None, Any]:
    """A one-paragraph reason naming the member path, and the diagnosis report behind it."""
    path = None
    report = None
    detail = f"{type(exc).__name__}: {exc}"
    try:
        from .diagnose import pickle_check

        report = pickle_check(value, name=name, serializers=["dill"])
        found = getattr(report, "errors", None) or getattr(report, "problems", [])
        problems = [p for p in found if getattr(p, "path", None)]
        if problems:
            first = problems[0]
            path = first.path
            detail = f"{first.path}: {first.type_name} ({first.reason}). Fix: {first.fix}"
            if len(problems) > 1:
                detail += f" (+{len(problems) - 1} more; run %pickle_check {name})"
    except Exception:  # diagnosis is a help, never a second failure
        pass
    return detail, path, report


def _attempt(
    pickler_factory: Any, values: Mapping[str, Any], names: Sequence[str]
) -> tuple[Shipment | None, str | None, BaseException | None]:
    file = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = pickler_factory(file, buffer_callback=buffers.append)
    sizes: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start_pos, start_buf, t0 = file.tell(), len(buffers), time.perf_counter()
        try:
            pickler.dump(values[name])
        except Exception as exc:
            return None, name, exc
        seconds[name] = time.perf_counter() - t0
        sizes[name] = (file.tell() - start_pos) + sum(
            b.raw().nbytes for b in buffers[start_buf:]
        )
    shipment = Shipment(
        names=list(names),
        data=file.getvalue(),
        buffers=[b.raw() for b in buffers],
        sizes=sizes,
        seconds=seconds,
    )
    shipment.module_refs = getattr(pickler, "modules", None)
    shipment.dill_blobs = getattr(pickler, "dill_blobs", [])
    return shipment, None, None


def _fast(file: io.BytesIO, buffer_callback: Any = None) -> pickle.Pickler:
    return _FastPickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback)


_dill_pickler_class: Any = None


def _is_exact_ndarray(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"


def _dill(file: io.BytesIO, buffer_callback: Any = None) -> pickle.Pickler:
    """dill for the whole shipment, keeping the two promises the fast path makes.

    Plain dill pickles a module that is not installed (a ``.py`` next to the
    notebook) by value, namespace and all, and copies numpy arrays in-band
    (it reduces them without protocol 5).  Modules are re-imported by name and
    exact arrays keep their out-of-band buffers here too.
    """
    global _dill_pickler_class
    if _dill_pickler_class is None:
        import dill

        class _DillPickler(dill.Pickler):  # type: ignore[misc]
            def reducer_override(self, obj: Any) -> Any:
                if type(obj) is types.ModuleType and module_is_importable(obj):
                    return _import_module, (obj.__name__,)
                if _is_exact_ndarray(obj):
                    return obj.__reduce_ex__(PROTOCOL)
                return NotImplemented

        _dill_pickler_class = _DillPickler
    return _dill_pickler_class(file, protocol=PROTOCOL, recurse=True, buffer_callback=buffer_callback)


def dumps(values: Mapping[str, Any], *, skip_failures: bool = False) -> Shipment:
    """Serialize named values in one pass, preserving sharing between them.

    With ``skip_failures`` (used for results coming back) a variable that
    cannot be serialized is left out and named in ``skipped``; otherwise the
    first such variable raises :class:`ShipError` naming it and, when the
    diagnosis engine finds it, the member path and the fix.
    """
    names = list(values)
    skipped: dict[str, str] = {}
    for engine, factory in (("pickle", _fast), ("dill", _dill)):
        todo = [n for n in names if n not in skipped]
        while True:
            shipment, failed, exc = _attempt(factory, values, todo)
            if shipment is not None:
                shipment.engine = engine
                shipment.skipped = skipped
                shipment.how = {n: _how(values[n], engine) for n in shipment.names}
                return shipment
            assert failed is not None and exc is not None
            if engine == "pickle":
                break  # redo everything with dill, which handles more kinds
            detail, path, report = _describe_failure(failed, values[failed], exc)
            if not skip_failures:
                value = values[failed]
                error = ShipError(
                    f"cannot send variable {failed!r} ({type(value).__module__}."
                    f"{type(value).__qualname__}) to the worker: {detail.rstrip('.')}. Nothing ran. "
                    f"Create it inside the isolated cell instead, or leave it out of the "
                    f"inputs; `%pickle_check {failed}` shows every problem in it.",
                    name=failed,
                    path=path,
                )
                error.report = report  # the panel lists every problem without diagnosing again
                raise error from exc
            skipped[failed] = f"{type(values[failed]).__module__}.{type(values[failed]).__qualname__}: {detail}"
            todo = [n for n in todo if n != failed]
    raise AssertionError("unreachable")  # pragma: no cover


def loads(
    names: Iterable[str], data: bytes | memoryview, buffers: Sequence[Any], engine: str = "pickle"
) -> dict[str, Any]:
    """Rebuild the values written by :func:`dumps`, in order and with one memo."""
    file = io.BytesIO(data)
    if engine == "dill":
        import dill

        unpickler: Any = dill.Unpickler(file, buffers=buffers, ignore=True)
    else:
        unpickler = pickle.Unpickler(file, buffers=buffers)
    return {name: unpickler.load() for name in names}
