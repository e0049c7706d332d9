"""Can a freshly started interpreter resolve a reference this pickle makes?

Pickles store classes and functions by module and name. That loads in the
kernel and can fail in a spawned child: ``__main__`` there is not the
notebook, and a module loaded from an odd place may not be importable. This
module decides, per referenced module, whether a fresh interpreter finds it,
and caches the answers of an injected ``verify_spawn`` so each reference is
probed in a real child at most once (this package itself never starts one).
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .categories import _is
from .serializers import PROTOCOL

_VerifySpawn = Callable[[bytes], "str | None"]
"""Asks a fresh interpreter to load a small pickle: None when it can, else its error text."""


class _Loader(Protocol):
    """Loads pickles in another process, so that checking never runs their code here.

    :class:`nbisolate.probe.Loader` is the one in use; a verifier handed in as
    ``verify_spawn`` offers it as ``verify_spawn.start_loader()``.
    """

    def loads(
        self, serializer: str, data: bytes, buffers: Sequence[Any], engine: str, timeout: float
    ) -> tuple[str, str | None]: ...

    def close(self) -> None: ...


def _main_module_has_file() -> str | None:
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    return f if isinstance(f, str) else None


class _Context:
    """State shared by all checks of one call (one variable or a namespace).

    Knows which loaded modules look suspicious (no spec, loaded under another
    name, or from a directory not on ``sys.path``), decides per referenced
    module whether a fresh interpreter can import it, and caches the answers
    of ``verify_spawn`` so each reference is probed once.

    When ``verify_spawn`` can also start a loader process (``start_loader``,
    as :func:`nbisolate.probe.spawn_loads` can), every load-back check of the
    call runs there (:meth:`load`), started on first use and ended by
    :meth:`close`: loading runs the object's own reconstruction code, which
    must never run in the kernel. Without one, loads run in this process
    (a script calling :func:`~nbisolate.diagnose.pickle_check` directly).
    """

    def __init__(self, verify_spawn: _VerifySpawn | None) -> None:
        self.verify_spawn = verify_spawn
        self._start_loader: Callable[[], _Loader] | None = getattr(
            verify_spawn, "start_loader", None
        )
        self._loader: _Loader | None = None
        self._closed = False
        self._lock = threading.Lock()  # a given-up check's thread may still load
        self._status: dict[str, str] = {}
        self._verified: dict[tuple[str, str], str | None] = {}
        self.suspicious = self._find_suspicious()
        names = sorted(self.suspicious, key=len, reverse=True)
        self.pattern_all = _needle_pattern(["__main__", *names])
        self.pattern_refs = _needle_pattern(names, [_MAIN_BY_NAME])

    @property
    def loads_elsewhere(self) -> bool:
        """True when load-back checks run in a loader process, not here."""
        return self._start_loader is not None

    def load(
        self, serializer: str, data: bytes, buffers: Sequence[Any], engine: str, timeout: float
    ) -> tuple[str, str | None]:
        """Load in the loader process: ``("ok", None)``, ``("error", text)``, ``("timeout", text)``,
        ``("unavailable", text)`` or ``("closed", text)``; see :class:`nbisolate.probe.Loader`."""
        assert self._start_loader is not None
        with self._lock:
            loader = self._loader
            if loader is None:
                if self._closed:
                    return "closed", "the check had ended"
                loader = self._loader = self._start_loader()
        return loader.loads(serializer, data, buffers, engine, timeout)

    def prepare(self, values: Iterable[Any]) -> None:
        """Start the loader process ahead of the first load, when some of ``values`` will be
        loaded there: instances of a package's types (their streams call its code, or carry
        buffers). It imports those packages meanwhile, in parallel with the checks before it."""
        if self._start_loader is None:
            return
        packages = []
        for value in values:
            kind = type(value)  # never the value's own attributes: a proxy's may block for good
            module = getattr(kind, "__module__", None)
            if not isinstance(module, str) or issubclass(kind, type):
                continue  # a class travels by name: looked up here (_runs_no_code)
            top = module.partition(".")[0]
            if top in ("builtins", "__main__", "__mp_main__") or top in self.suspicious:
                continue
            if top not in packages and self.module_status(top) == "ok":
                packages.append(top)
        if not packages:
            return
        with self._lock:
            if self._closed:
                return
            if self._loader is None:
                self._loader = self._start_loader()
            loader = self._loader
        begin = getattr(loader, "begin", None)
        if begin is not None:
            begin(packages)

    def close(self) -> None:
        """End the loader process (and all it started), if one was started; idempotent."""
        with self._lock:
            self._closed = True
            loader, self._loader = self._loader, None
        if loader is not None:
            loader.close()

    @staticmethod
    def _find_suspicious() -> set[str]:
        on_path = set()
        cwd = os.getcwd()
        for entry in sys.path:
            if isinstance(entry, str):
                on_path.add(os.path.abspath(entry or cwd))
        found = set()
        for name, mod in list(sys.modules.items()):
            if mod is None or name == "__main__":
                continue
            spec = getattr(mod, "__spec__", None)
            if spec is None:
                found.add(name)
                continue
            if spec.name != name:
                found.add(name)
                continue
            if "." in name:
                continue
            origin = getattr(spec, "origin", None)
            if not origin or origin in ("built-in", "frozen") or not os.path.isabs(origin):
                continue
            where = os.path.dirname(origin)
            if spec.submodule_search_locations:
                where = os.path.dirname(where)
            if where not in on_path:
                found.add(name)
        return found

    def module_status(self, modname: str) -> str:
        """``ok``, ``main``, ``missing`` (a fresh interpreter won't find it) or ``unknown``."""
        cached = self._status.get(modname)
        if cached is None:
            cached = self._status[modname] = _module_status(modname)
        return cached

    def verify(self, obj: Any, modname: str, qualname: str) -> str | None | bool:
        """Ask ``verify_spawn`` whether a fresh interpreter can load ``obj`` by reference.

        Returns None when it can, the error text when it can't, and False when
        no verifier was given or ``obj`` itself can't be pickled for the probe.
        """
        if self.verify_spawn is None:
            return False
        key = (modname, qualname)
        if key not in self._verified:
            try:
                data = pickle.dumps(obj, protocol=PROTOCOL)
            except Exception:
                return False
            self._verified[key] = self.verify_spawn(data)
        return self._verified[key]


_MAIN_BY_NAME = rb"\x8c\x08__main__\x94\x8c.[\w.]+\x94\x93"
"""A global looked up by name in ``__main__`` (protocol 4 and 5: two short strings, then
``STACK_GLOBAL``), as even a serializer that copies the notebook's functions writes one it
does not copy (an ``lru_cache``'d function); not the ``'__module__': '__main__'`` of a copy."""


def _needle_pattern(names: Iterable[str], raw: Iterable[bytes] = ()) -> re.Pattern[bytes] | None:
    needles = [re.escape(n.encode()) for n in names if n] + list(raw)
    if not needles:
        return None
    return re.compile(b"|".join(needles), re.DOTALL)


def _module_status(modname: str) -> str:
    if modname in ("__main__", "__mp_main__"):
        return "main"
    mod = sys.modules.get(modname)
    if mod is None:
        return "unknown"
    spec = getattr(mod, "__spec__", None)
    if spec is None or spec.name != modname:
        return "unknown"
    if spec.origin in ("built-in", "frozen"):
        return "ok"
    top = modname.partition(".")[0]
    top_mod = sys.modules.get(top)
    top_spec = getattr(top_mod, "__spec__", None)
    if top_spec is None:
        return "unknown"
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec2 = find_spec(top, None)
        except Exception:
            continue
        if spec2 is None:
            continue
        same_origin = spec2.origin == top_spec.origin or (
            spec2.submodule_search_locations
            and top_spec.submodule_search_locations
            and list(spec2.submodule_search_locations)
            == list(top_spec.submodule_search_locations)
        )
        return "ok" if same_origin else "unknown"
    return "missing"


def _main_ref_loads_in_child(obj: Any) -> bool:
    """True when a spawned child would find ``__main__.<obj>`` after all.

    multiprocessing's spawn re-runs a *script's* main module in the child, so
    a function defined in that file is found there. A notebook's ``__main__``
    has no file, and nothing defined in it survives.
    """
    main_file = _main_module_has_file()
    if main_file is None:
        return False
    if _is(obj, type):
        # a class is from the script if its methods are
        codes = [
            v.__code__ for v in vars(obj).values() if isinstance(v, types.FunctionType)
        ]
    else:
        codes = [getattr(obj, "__code__", None)]
    for code in codes:
        if code is None:
            return False
        try:
            if not os.path.samefile(code.co_filename, main_file):
                return False
        except OSError:
            return False
    return True
