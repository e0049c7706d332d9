"""``pickle_check``: the check of one object, from fast verdict to located culprits.

Each serializer first dumps the object at C speed into a counting sink (large
buffers out of band, so sizing a 1 GB array copies nothing) and loads it back;
only a failure, or a hint of a reference a spawned child can't resolve, pays
for the tracing walk. The findings of all walks are merged into one
:class:`~.report.Problem` per culprit.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..travel import Route, route
from .categories import (
    _CATEGORIES,
    _SOFT_CATEGORIES,
    _classify,
    _describe,
    _exc_text,
    _is,
    _type_name,
)
from .render import _fmt_size
from .report import Problem, Report, SerializerResult
from .serializers import _SERIALIZERS, PROTOCOL, _OutOfTime, _Serializer, available_serializers
from .spawn import _Context, _VerifySpawn
from .tracing import _TRACERS, _Finding

DEFAULT_MAX_SECONDS = 5.0
DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_PROBLEMS = 50
LARGE_BYTES = 100_000_000
"""Objects whose pickle is at least this big get a "large object" warning."""

_KEEP_LIMIT = 64 * 2**20
"""In-band bytes kept for the in-process load check; beyond this we only count."""




class _Sink:
    """A write-only file that counts bytes, keeps them while small, and greps them.

    The grep looks for module names that make a by-reference pickle fail in a
    spawned child (``__main__``, modules a fresh interpreter can't import).
    Pickles store such names as plain strings, so a byte search tells us
    cheaply whether the slow walk is needed at all. False hits only cost time.
    """

    __slots__ = ("size", "chunks", "kept", "pattern", "hit", "_tail")

    def __init__(self, pattern: re.Pattern[bytes] | None) -> None:
        self.size = 0
        self.chunks: list[bytes] = []
        self.kept = True
        self.pattern = pattern
        self.hit = False
        self._tail = b""

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        self.size += n
        if self.kept:
            if self.size <= _KEEP_LIMIT:
                self.chunks.append(bytes(view))
            else:
                self.kept = False
                self.chunks = []
        if self.pattern is not None and not self.hit and n <= 4 * 2**20:
            chunk = bytes(view) if not isinstance(data, bytes) else data
            if self.pattern.search(self._tail + chunk[:256]) or self.pattern.search(chunk):
                self.hit = True
            self._tail = chunk[-256:]
        return n

    def value(self) -> bytes | None:
        return b"".join(self.chunks) if self.kept else None

    def reset(self) -> None:
        """Forget everything written: a serializer is starting over (``%%isolate``'s dill retry)."""
        self.size = 0
        self.chunks = []
        self.kept = True
        self.hit = False
        self._tail = b""


class _Kept:
    """The ``buffer_callback`` of a check: keeps out-of-band buffers for the load, counts them."""

    __slots__ = ("buffers", "oob")

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.oob = 0

    def __call__(self, buf: Any) -> None:
        self.oob += memoryview(buf).nbytes
        self.buffers.append(buf)

    def reset(self) -> None:
        self.release()
        self.buffers = []
        self.oob = 0

    def release(self) -> None:
        for buf in self.buffers:
            with contextlib.suppress(Exception):
                buf.release()


class _NullSink:
    def write(self, data: Any) -> int:
        return memoryview(data).nbytes




@dataclass
class _Outcome:
    result: SerializerResult
    needs_trace: bool
    needs_refs: bool
    load_error: str | None = None
    only_builtins: bool = False  # the stream holds plain builtins alone (serializers._BuiltinsWatch)


_LOAD_HERE_BYTES = 4096
"""Streams up to this size are scanned for opcodes that run code (see :func:`_runs_no_code`)."""

_CODE_OPS = frozenset({
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD",
    "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
})
"""The opcodes by which loading a pickle looks up a name or calls something; without them a
stream can only build strings, numbers, bytes and the builtin containers."""


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


def _runs_no_code(data: bytes, buffers: Sequence[Any], ctx: _Context | None = None) -> bool:
    """True for a small stream, without out-of-band buffers, that calls nothing: loading it runs
    no code of any object, so it may be loaded in this process.

    A notebook's many small lists, dicts and strings are checked this way; sending each of
    them to the loader process (three times: once per serializer) cost ten times the check.
    With ``ctx``, a stream may also look names up (``from sklearn.ensemble import
    RandomForestClassifier``, pickled by reference) in modules a fresh interpreter imports
    from the same file (:meth:`_Context.module_status` ``ok``, not one of the working
    directory's): loading that here is ``getattr`` on a module this process imported, and in
    the loader process it would cost importing the package again, a second for some.
    """
    if buffers or len(data) > _LOAD_HERE_BYTES:
        return False
    import pickletools

    strings: list[str] = []  # the strings pushed, newest last, and those memoized
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                strings.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else ""
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else ""
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(int(arg), ""))
            elif name == "STACK_GLOBAL":
                if ctx is None or len(strings) < 2 or not _found_fresh(strings[-2], ctx):
                    return False
            elif name == "GLOBAL":
                if ctx is None or not _found_fresh(str(arg).partition(" ")[0], ctx):
                    return False
            elif name in _CODE_OPS:
                return False
            elif name not in ("PROTO", "FRAME", "STOP"):
                strings.append("")  # anything else pushed: a STACK_GLOBAL must not pair across it
    except Exception:  # not a stream pickletools can read: the loader process decides
        return False
    return True


def _found_fresh(module: str, ctx: _Context) -> bool:
    """A module a fresh interpreter imports from the same file as this process did."""
    return (
        module.partition(".")[0] not in ctx.suspicious
        and module not in ctx.suspicious
        and ctx.module_status(module) == "ok"
    )


def _fast(
    ser: _Serializer, obj: Any, ctx: _Context, deadline: float, load_seconds: float = DEFAULT_MAX_SECONDS,
) -> _Outcome:
    """Dump with the real (fast) serializer, counting bytes; load back if small enough.

    The load runs in the check's loader process when it has one (loading runs
    the object's own code: never in the kernel), for at most ``load_seconds``
    and not past ``deadline``; a stream that can run no code
    (:func:`_runs_no_code`) is loaded here.
    """
    # Serializers that send __main__ by value only need the module-name scan.
    sink = _Sink(ctx.pattern_refs if ser.by_value_main else ctx.pattern_all)
    keep = _Kept()
    res = SerializerResult(ser.name, ser.label, ser.used_by, ok=None, dumps_ok=None)
    t0 = time.perf_counter()
    try:
        try:
            dumped = ser.dump(obj, sink, keep, deadline)
        except _OutOfTime:
            res.seconds = time.perf_counter() - t0
            res.note = "stopped: out of time before the pickle was complete"
            return _Outcome(res, needs_trace=False, needs_refs=False)
        except Exception as exc:
            res.seconds = time.perf_counter() - t0
            res.dumps_ok = False
            res.ok = False
            res.error = _exc_text(exc)
            return _Outcome(res, needs_trace=True, needs_refs=False)
        res.dumps_ok = True
        res.size = sink.size + keep.oob
        res.oob_bytes = keep.oob
        data = sink.value()
        load_error = None
        unknown = False  # not loaded back, and what loading would do is not known
        if dumped.only_builtins:
            res.loads_ok = True  # strings, numbers and builtin containers: nothing that can fail
        elif data is None:
            res.note = "not loaded back here: pickle too large to keep for the check"
        elif ctx.loads_elsewhere and not _runs_no_code(data, keep.buffers, ctx):
            load_error, unknown = _load_elsewhere(
                ser, data, keep, dumped.engine, ctx, res, deadline, load_seconds
            )
        else:
            try:
                ser.loads(data, keep.buffers, dumped.engine)
                res.loads_ok = True
            except Exception as exc:
                res.loads_ok = False
                load_error = res.error = _exc_text(exc)
        res.seconds = time.perf_counter() - t0
        res.ok = None if unknown else res.loads_ok is not False
        return _Outcome(
            res, needs_trace=False, needs_refs=sink.hit or dumped.main_refs, load_error=load_error,
            only_builtins=dumped.only_builtins,
        )
    finally:
        keep.release()


_SAME_FOR_PLAIN_DATA = frozenset({"dill", "cloudpickle"})
"""Serializers that write plain data exactly as pickle does (``%%isolate``'s fast path and
cloudpickle are the C pickler; they differ only for what pickle finds by name in
``__main__`` or cannot write at all)."""

_PLAIN_SHORTCUT_BYTES = 1 << 20
"""From this size on, plain data is serialized once, not once per serializer (and at any size
when it holds builtins alone)."""


def _is_plain_data(outcome: _Outcome) -> bool:
    """pickle wrote and loaded it, naming nothing of ``__main__`` or of a module a fresh
    interpreter cannot import: every C-pickler serializer writes the same stream."""
    res = outcome.result
    return (
        res.ok is True and res.loads_ok is True and not outcome.needs_trace
        and not outcome.needs_refs
        and (outcome.only_builtins or (res.size or 0) >= _PLAIN_SHORTCUT_BYTES)
    )


def _as_plain(ser: _Serializer, plain: SerializerResult) -> SerializerResult:
    """The result of ``ser`` for plain data, from pickle's: why a 1M-row frame is not
    serialized three times over (``%pickle_check`` on a whole notebook stays within seconds)."""
    return SerializerResult(
        ser.name, ser.label, ser.used_by, ok=True, dumps_ok=True, loads_ok=True,
        spawn_ok=plain.spawn_ok, size=plain.size, oob_bytes=plain.oob_bytes,
        seconds=plain.seconds,
        note="plain data: pickle's stream, not serialized again",
    )


_MIN_LOAD_SECONDS = 0.25
"""Below this much time left, a load is not started: it would be reported as too slow."""


def _load_elsewhere(
    ser: _Serializer, data: bytes, keep: _Kept, engine: str, ctx: _Context,
    res: SerializerResult, deadline: float, load_seconds: float,
) -> tuple[str | None, bool]:
    """Load back in the loader process and fill ``res``: (the load error, not known)."""
    timeout = min(load_seconds, deadline - time.perf_counter())
    if timeout < _MIN_LOAD_SECONDS:
        res.note = (
            f"not loaded back: out of time (max_seconds={load_seconds:g}) before the load began"
        )
        return None, True
    status, text = ctx.load(ser.name, data, keep.buffers, engine, timeout)
    if status == "ok":
        res.loads_ok = True
        return None, False
    if status == "error":
        res.loads_ok = False
        res.error = text
        return text, False
    if status == "timeout":
        res.note = (
            f"not loaded back: {text}; loading runs the object's own code (a constructor "
            "its __reduce__ names, a __setstate__), and a worker loading it would wait as "
            "long: look at what that code waits for"
        )
    else:
        res.note = f"not loaded back: {text}"
    return None, True


@dataclass
class _TraceResult:
    findings: list[_Finding]
    out_of_time: bool = False
    depth_paths: list[str] = field(default_factory=list)
    unavailable: bool = False


def _trace(
    ser: _Serializer, obj: Any, name: str, ctx: _Context, deadline: float, max_depth: int,
    check_refs: bool,
) -> _TraceResult:
    cls = _TRACERS.get(ser.name)
    if cls is None:
        return _TraceResult([], unavailable=True)
    tracer = cls(_NullSink(), PROTOCOL, buffer_callback=lambda buf: None)
    tracer._nb_setup(name, ser.name, ctx, deadline, max_depth, check_refs)
    out = _TraceResult([])
    old_limit = sys.getrecursionlimit()
    # Each level of the pure-Python pickler costs a handful of Python frames;
    # make room for max_depth levels, and put the limit back afterwards.
    needed = len(_frames_in_use()) + 12 * max_depth + 200
    if needed > old_limit:
        sys.setrecursionlimit(needed)
    try:
        tracer.dump(obj)
    except _OutOfTime:
        out.out_of_time = True
    except RecursionError:
        out.depth_paths.append(f"{name} (Python's recursion limit)")
    except Exception as exc:  # a failure outside any save(): blame the root
        tracer._nb_stack[:] = [obj]
        tracer._nb_record(obj, "fail", _exc_text(exc))
    finally:
        if needed > old_limit:
            sys.setrecursionlimit(old_limit)
    out.findings = list(tracer._nb_found.values())
    out.depth_paths.extend(tracer._nb_depth_paths)
    return out


def _abbreviate(path: str, limit: int = 120) -> str:
    if len(path) <= limit:
        return path
    keep = limit // 2 - 2
    return f"{path[:keep]} ... {path[-keep:]}"


def _frames_in_use() -> list[Any]:
    frames = []
    frame = sys._getframe()
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def pickle_check(
    obj: Any,
    name: str = "obj",
    *,
    serializers: Sequence[str] | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_depth: int = DEFAULT_MAX_DEPTH,
    verify_spawn: _VerifySpawn | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    large_bytes: int = LARGE_BYTES,
    _ctx: _Context | None = None,
    _search_seconds: float | None = None,
) -> Report:
    """Check whether ``obj`` can be sent to another process, and name every culprit.

    ``name`` is how the object is called in paths (``name.attr[0]``).
    ``serializers`` picks from :func:`available_serializers` (default: all of
    them: ``pickle``, ``dill`` as ``%%isolate`` uses it, ``cloudpickle``).
    ``max_seconds`` bounds the search for culprits. The first dump of each
    serializer gives the verdict and the size: with the C picklers it runs to
    the end, dill's (pure Python) gets at most another ``max_seconds`` and is
    reported as unknown past that. ``max_depth`` bounds how deep the search
    descends (each attribute, item or reduce step is a level).
    ``max_problems`` caps the listing (the rest is counted in ``omitted``);
    objects pickling to ``large_bytes`` or more get a cost warning.
    ``verify_spawn``, e.g.
    :func:`nbisolate.probe.spawn_loads`, is called with a small pickle when
    the static check can't tell whether a spawned child could load a
    reference; it returns None or the child's error text.

    The verdict per serializer comes from really dumping and loading (no
    guessing), the culprits from a walk that follows exactly what pickling
    follows; see the module docstring for the details.
    """
    started = time.perf_counter()
    deadline = started + max_seconds
    names = list(serializers) if serializers is not None else available_serializers()
    unknown = [n for n in names if n not in _SERIALIZERS]
    if unknown:
        raise ValueError(
            f"unknown serializer(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(available_serializers())}"
        )
    ctx = _ctx if _ctx is not None else _Context(verify_spawn)
    if verify_spawn is not None and ctx.verify_spawn is None:
        ctx.verify_spawn = verify_spawn
    report = Report(name=name, type_name=_type_name(type(obj)), results={}, problems=[])
    collected: list[tuple[_Finding, str]] = []  # (finding, serializer)
    load_failures: dict[str, str] = {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = {}
        plain: SerializerResult | None = None  # pickle's result, when the object is plain data
        try:
            for sname in names:
                ser = _SERIALIZERS[sname]
                if plain is not None and sname in _SAME_FOR_PLAIN_DATA:
                    outcome = _Outcome(_as_plain(ser, plain), needs_trace=False, needs_refs=False)
                else:
                    outcome = _fast(ser, obj, ctx, deadline + max_seconds, max_seconds)
                if sname == "pickle" and _is_plain_data(outcome):
                    plain = outcome.result
                outcomes[sname] = outcome
                report.results[sname] = outcome.result
                if outcome.result.ok is None:
                    report.truncated = True
                    report.notes.append(f"{sname}: {outcome.result.note}")
                if outcome.load_error:
                    load_failures[sname] = outcome.load_error
        finally:
            if _ctx is None:  # a context of our own: its loader process ends with the loads
                ctx.close()

        to_trace = [s for s in names if outcomes[s].needs_trace or outcomes[s].needs_refs]
        depth_hits: list[tuple[str, str]] = []
        searched = max_seconds
        if _search_seconds is not None:  # (check_namespace's shorter search, after the loads)
            searched = _search_seconds
            deadline = min(deadline, time.perf_counter() + _search_seconds)
        for i, sname in enumerate(to_trace):
            ser = _SERIALIZERS[sname]
            now = time.perf_counter()
            share = max(deadline - now, 0.0) / (len(to_trace) - i)
            tr = _trace(ser, obj, name, ctx, now + max(share, 0.05), max_depth, check_refs=True)
            if tr.unavailable:
                report.notes.append(f"{sname}: no tracing pickler available; culprits not located")
            if tr.out_of_time:
                report.truncated = True
                report.notes.append(
                    f"{sname}: stopped looking for culprits after the time limit "
                    f"(max_seconds={searched:g}); the problems listed are real, more may exist"
                )
            if tr.depth_paths:
                report.truncated = True
                depth_hits.append((sname, tr.depth_paths[0]))
            for finding in tr.findings:
                collected.append((finding, sname))
        if depth_hits:
            report.notes.append(
                f"{', '.join(s for s, _ in depth_hits)}: did not descend deeper than "
                f"{max_depth} levels (max_depth), e.g. at {_abbreviate(depth_hits[0][1])}"
            )

    _apply_findings(report, obj, collected, load_failures, ctx, max_problems)
    _add_large(report, large_bytes)
    report.seconds = time.perf_counter() - started
    return report


def _apply_findings(
    report: Report, root: Any, collected: list[tuple[_Finding, str]],
    load_failures: dict[str, str], ctx: _Context, max_problems: int,
) -> None:
    """Merge the walks' findings into one problem per culprit; settle spawn verdicts."""
    merged: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []

    def entry(key: Any, finding: _Finding, category: str, obj: Any, path: str) -> dict[str, Any]:
        if key not in merged:
            merged[key] = {
                "obj": obj, "path": path, "category": category, "errors": {},
                "also": [], "fails": [], "finding": finding,
            }
            order.append(key)
        return merged[key]

    for finding, sname in collected:
        obj = finding.obj
        path = finding.path
        if finding.kind == "fail":
            category = _classify(obj, finding.error)
            e = entry(("obj", id(obj)), finding, category, obj, path)
            e["errors"].setdefault(sname, finding.error)
            if sname not in e["fails"]:
                e["fails"].append(sname)
            for p in finding.also:
                if p != e["path"] and p not in e["also"]:
                    e["also"].append(p)
            continue
        # a by-reference spawn problem: report it at the instance when the
        # reference is the class of an instance
        instance_path = path[: -len(".__class__")] if path.endswith(".__class__") else None
        if finding.kind == "main":
            verdict: str | None = (
                f"AttributeError: Can't get attribute {getattr(obj, '__qualname__', '?')!r} "
                "on <module '__main__'>"
            )
            by_name = route(obj) is Route.REFERENCE  # an Enum or TypeVar: by name even for %%isolate
            category = "notebook-by-reference" if by_name else "notebook-defined"
        else:
            qual = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
            probe = ctx.verify(obj, finding.module, qual)
            if probe is None:
                continue  # a fresh interpreter loads it: no problem after all
            if probe is False:
                if finding.error == "missing":
                    verdict = f"a fresh interpreter can't find module {finding.module!r}"
                    category = "unimportable-module"
                else:
                    verdict = None
                    category = "unverified-reference"
            else:
                verdict = str(probe)
                category = "unimportable-module"
        e = entry(("ref", id(obj)), finding, category, obj, instance_path or path)
        if instance_path is not None:
            e["instance_of"] = True
        e["errors"].setdefault(sname, verdict or "not verified")
        if verdict is not None and sname not in e["fails"]:
            e["fails"].append(sname)
            res = report.results.get(sname)
            if res is not None:
                res.spawn_ok = False
                res.ok = False
                if res.error is None:
                    res.error = f"fails in a spawned child: {verdict}"
        for p in finding.also:
            if p.endswith(".__class__"):
                p = p[: -len(".__class__")]
            if p != e["path"] and p not in e["also"]:
                e["also"].append(p)

    for sname, res in report.results.items():
        if res.dumps_ok and res.loads_ok and res.spawn_ok is None:
            res.spawn_ok = True if sname not in _spawn_unverified(merged) else None

    # failures the walk could not pin on a member: blame the root, honestly
    for sname, res in report.results.items():
        if res.ok is not False:
            continue
        located = any(sname in e["fails"] for e in merged.values())
        if located:
            continue
        if sname in load_failures:
            category = "load-fails"
        else:
            category = _classify(root, res.error or "")
        e = entry(("root", category), None, category, root, report.name)  # type: ignore[arg-type]
        e["errors"].setdefault(sname, res.error or "failed")
        e["fails"].append(sname)

    problems = _sort_problems([_make_problem(merged[k], report) for k in order])
    if len(problems) > max_problems:
        report.omitted = len(problems) - max_problems
        problems = problems[:max_problems]
        report.notes.append(
            f"listed the first {max_problems} problems; {report.omitted} more not shown "
            "(max_problems)"
        )
    report.problems = problems



def _sort_problems(problems: list[Problem]) -> list[Problem]:
    """Errors for %%isolate first, then hard failures, then spawn-only; kinds kept together."""
    first: dict[str, int] = {}
    for i, p in enumerate(problems):
        first.setdefault(p.category, i)
    ranked = sorted(
        enumerate(problems),
        key=lambda ip: (
            ip[1].severity != "error", ip[1].category in _SOFT_CATEGORIES,
            first[ip[1].category], ip[0],
        ),
    )
    return [p for _, p in ranked]


def _spawn_unverified(merged: dict[Any, dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for e in merged.values():
        if e["category"] == "unverified-reference":
            out.update(e["errors"])
    return out


def _make_problem(e: dict[str, Any], report: Report) -> Problem:
    obj = e["obj"]
    category = e["category"]
    cat = _CATEGORIES[category]
    fails = tuple(s for s in report.results if s in e["fails"])
    if e.get("instance_of"):
        type_name = _type_name(obj) if _is(obj, type) else _type_name(type(obj))
        what = f"instance of class {type_name}"
    else:
        type_name = _type_name(type(obj))
        what = _describe(obj)
    # An error breaks %%isolate only if the dill column fails; with no dill
    # column we can't say it doesn't.
    breaks_isolate = "dill" in fails or ("dill" not in report.results and bool(fails))
    severity = "error" if breaks_isolate else "warning"
    errors = dict(e["errors"])
    distinct: dict[str, list[str]] = {}
    for sname, text in errors.items():
        distinct.setdefault(text, []).append(sname)
    said = "; ".join(f"{'/'.join(ss)}: {text}" for text, ss in distinct.items())
    reason = f"{cat.why} ({said})" if cat.why else said
    if e.get("instance_of"):
        reason = f"its class {type_name}: {reason}"
    fix = cat.fix
    if category in _POOL_BY_VALUE and _multiprocessing_by_value():
        fix += (
            " (`%isolate_config mp=on` is in effect in this kernel: its own multiprocessing and "
            "concurrent.futures pools already send this by value.)"
        )
    return Problem(
        path=e["path"], type_name=type_name, category=category, title=cat.title,
        reason=reason, fix=fix, fails_with=fails, severity=severity, what=what,
        also_at=tuple(e["also"][:5]), errors=errors,
    )


_POOL_BY_VALUE = frozenset({"notebook-defined", "lambda", "local-function", "local-class"})
"""What ``%isolate_config mp=on`` (nbisolate.pools) sends by value to the notebook's own pools."""


def _multiprocessing_by_value() -> bool:
    """True while mp=on is in effect (never imports nbisolate.pools: it imports multiprocessing)."""
    pools = sys.modules.get("nbisolate.pools")
    return bool(pools is not None and pools.enabled())


def _add_large(report: Report, large_bytes: int) -> None:
    size = report.size
    if size is None or size < large_bytes:
        return
    res = report.results.get("dill") or next(iter(report.results.values()))
    est = res.seconds + size / 1e9
    oob = res.oob_bytes
    how = (
        f"{_fmt_size(oob)} of it as raw buffers (arrays), which pickle without copying here "
        "but are still copied to the worker"
        if oob
        else "all of it pickled byte by byte"
    )
    reason = (
        f"{_fmt_size(size)} would be copied into the worker on every run ({how}); expect "
        f"roughly {est:.1f} s per run to pickle, send and load it, and as much memory again "
        "in the worker while it runs."
    )
    cat = _CATEGORIES["large"]
    report.problems.append(
        Problem(
            path=report.name, type_name=report.type_name, category="large", title=cat.title,
            reason=reason, fix=cat.fix, fails_with=(), severity="warning",
            what=f"{_fmt_size(size)} pickled",
        )
    )
