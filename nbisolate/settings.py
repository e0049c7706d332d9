"""The notebook's interpreter settings travel with the cell: what its code obeys without naming it.

A notebook sets some things once, near its top, and every later cell obeys
them: ``warnings.filterwarnings("ignore")`` silences warnings,
``sys.setrecursionlimit(10_000)`` lets a deep recursion finish,
``decimal.getcontext().prec = 6`` rounds every ``Decimal`` to six digits,
``sys.set_int_max_str_digits(0)`` prints integers of any length,
``np.seterr(all="raise")`` turns a division by zero into an error,
``np.set_printoptions(precision=3)`` prints arrays shorter and
``pd.set_option("display.max_columns", None)`` shows every column of a frame,
and ``plt.style.use("ggplot")`` or ``plt.rcParams["figure.figsize"] = (8, 3)``
(or a library's theme, as seaborn's ``set_theme``) makes every later plot look
alike, as ``%config InlineBackend.figure_formats = ["retina"]`` makes them
sharp; after ``logging.basicConfig(level=logging.INFO)`` every cell's log
records show. A worker is a fresh
process with the defaults, so the same cell, isolated, would warn, fail or
print otherwise. The kernel sends these settings with each cell
(:func:`capture`); the worker takes them before its inputs load (a deep input
needs the recursion limit to be rebuilt, :func:`restore`), and the warning
filters around the cell's own code only (:func:`cell_filters`).

What a cell changes comes back, as it would stay after an ordinary cell
(:func:`left_by_cell` in the worker, :func:`apply` in the kernel): the same
settings, and the process's environment variables, working directory and
``sys.path`` (``os.environ["X"] = "1"``, ``%cd data``, ``sys.path.append``).
Not from a failed cell, which changes nothing, nor from the values of a sweep
(which value's would win?), a background job (the notebook went on) or another
machine (its directories are not the kernel's). The random state comes back
by :mod:`nbisolate.rng`.

The standard library and nbisolate's worker modules only: a worker imports
this module. NumPy's and pandas'
settings are read only when the notebook has imported them, and set in the
worker only once the package is imported there (preloaded by the template, or
by the cell), so a cell that never uses them never pays for importing them.
Of pandas' options and matplotlib's ``rcParams`` only those the notebook
changed travel (against pandas' defaults, and against what matplotlib read
from its ``matplotlibrc``), and of pandas' only plain values (a
``display.float_format`` function stays the worker's default); the plotting
backend stays the worker's own (it draws without a kernel). Of logging, the
levels set and each logger's handlers that write to the cell's output
(``StreamHandler`` on ``sys.stdout`` or ``sys.stderr``) or to a file
(``FileHandler``, appended to in the worker), with their level and format,
travel, both ways; a handler of another kind (a service, a queue) stays the
kernel's.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

Settings = dict[str, Any]

_PLAIN = (bool, int, float, str, type(None))
"""The values of NumPy's print options and pandas' options that travel: a function (NumPy's
``formatter``, pandas' ``float_format``) does not, and stays the worker's default."""


_latest: Settings | None = None
"""The settings of the last run made in this process (the kernel): a spare takes them while it
waits, so that its cell finds them in place (:func:`latest`)."""


def latest() -> Settings | None:
    return _latest


def capture() -> Settings:
    """This process's settings, as plain values any pickler takes (a few microseconds)."""
    global _latest
    out: Settings = {"recursion": sys.getrecursionlimit(), "warnings": _pack_filters()}
    logs = _pack_logging()
    if logs:
        out["logging"] = logs
    digits = _int_digits()
    if digits is not None:
        out["digits"] = digits
    numpy = _numpy_settings()
    if numpy is not None:
        out["numpy"] = numpy
    decimal = _decimal_settings()
    if decimal is not None:
        out["decimal"] = decimal
    for package, changes in (("pandas", _pandas_changed), ("matplotlib", _matplotlib_changed)):
        module = sys.modules.get(package)
        if module is not None:
            changed = changes(module)
            if changed:
                out[package] = changed
    inline = sys.modules.get("matplotlib_inline.config")
    if inline is not None:
        figures = _inline_figures(inline)
        if figures:
            out["figures"] = figures
    _latest = out
    return out


def _numpy_settings() -> Settings | None:
    """NumPy's error handling and plain print options, when it is imported (else None)."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    try:
        printing = {k: v for k, v in numpy.get_printoptions().items() if isinstance(v, _PLAIN)}
        return {"err": dict(numpy.geterr()), "print": printing}
    except Exception:  # a NumPy being imported, or an unusual one: the worker keeps its own
        return None


def _int_digits() -> int | None:
    """How many digits ``int`` and ``str`` convert between (Python 3.11 on; ``sys.set_int_max_str_digits``)."""
    get = getattr(sys, "get_int_max_str_digits", None)
    return None if get is None else get()


_DECIMAL_FIELDS = ("prec", "rounding", "Emin", "Emax", "capitals", "clamp")


def _decimal_settings(default: bool = False) -> Settings | None:
    """The current ``decimal`` context's settings (precision, rounding, traps...), when the
    notebook imported ``decimal`` and changed them from a new context's (else None; with
    ``default``, a new context's then).  The flags it raised are not settings: they stay."""
    decimal = sys.modules.get("decimal")
    if decimal is None:
        return None
    try:
        current, fresh = decimal.getcontext(), decimal.Context()
        packed = _pack_decimal(current)
        if packed == _pack_decimal(fresh):
            return packed if default else None
        return packed
    except Exception:
        return None


def _pack_decimal(context: Any) -> Settings:
    out: Settings = {name: getattr(context, name) for name in _DECIMAL_FIELDS}
    out["traps"] = sorted(signal.__name__ for signal, on in context.traps.items() if on)
    return out


def _set_decimal(packed: Settings) -> None:
    try:
        import decimal

        context = decimal.getcontext()
        if _pack_decimal(context) == packed:
            return
        for name in _DECIMAL_FIELDS:
            setattr(context, name, packed[name])
        context.traps = {signal: signal.__name__ in packed["traps"] for signal in context.traps}
    except Exception:  # a setting this Python refuses: its own stays
        pass


def restore(settings: Settings | None) -> None:
    """Take the settings :func:`capture` read in the kernel; what cannot be set stays as it is.

    Each part is compared before it is set: in a freshly forked worker, setting
    them costs a millisecond of first-time work and page faults (compiling the
    filters' patterns, NumPy's print options), comparing a fraction of that. A
    spare takes the kernel's latest settings while it waits for its cell
    (:mod:`nbisolate.template`), so its cell usually finds them in place.

    The warning filters are not taken here but around the cell's own code
    (:func:`cell_filters`): a notebook's ``simplefilter("error")`` is for its
    cells, and must not turn a warning of the worker's own steps (loading the
    inputs, sending the results) into a failure. Here they are only taken once
    and given back, so that taking them around the cell costs next to nothing.
    """
    if not settings:
        return
    limit = settings.get("recursion")
    if limit and limit != sys.getrecursionlimit():
        try:
            sys.setrecursionlimit(limit)
        except (RecursionError, ValueError):  # the worker's stack is deeper than the limit: keep its own
            pass
    digits = settings.get("digits")
    if digits is not None and digits != _int_digits():
        try:
            sys.set_int_max_str_digits(digits)
        except (AttributeError, ValueError):  # an older Python here
            pass
    if "warnings" in settings:
        with cell_filters(settings):  # taken once and given back: the cell's own take is then warm
            pass
    if "logging" in settings:
        _unpack_logging(settings["logging"])
    if "figures" in settings:
        from . import display_worker

        display_worker.figure_formats(settings["figures"]["formats"], settings["figures"]["kwargs"])
    for package, setter in _SETTERS:
        if package not in settings:
            continue
        if package in sys.modules:
            setter(settings[package])
        else:  # importing NumPy costs ~50 ms, pandas more: only if the cell does, and then at once
            from .pools import _when_imported

            _when_imported(package, lambda setter=setter, packed=settings[package]: setter(packed))


def _pack_filters() -> list[tuple[Any, ...]]:
    """``warnings.filters``, with each pattern as its text and flags and each category by its name."""
    packed = []
    for action, message, category, module, lineno in warnings.filters:
        name = (getattr(category, "__module__", None), getattr(category, "__qualname__", None))
        packed.append((action, _pack_pattern(message), *name, _pack_pattern(module), lineno))
    return packed


def _pack_pattern(pattern: Any) -> Any:
    """A filter's message or module: None, a plain string (the interpreter's own filters) or a regex."""
    if pattern is None or isinstance(pattern, str):
        return pattern
    return (pattern.pattern, pattern.flags)


def _unpack_pattern(packed: Any) -> Any:
    return re.compile(*packed) if isinstance(packed, tuple) else packed


class CellFilters:
    """What :func:`cell_filters` yields: ``left`` is, once the block is over, the filters as the
    cell's code left them (packed, as :func:`capture` packs them) if it changed them, else None."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left: list[tuple[Any, ...]] | None = None


@contextlib.contextmanager
def cell_filters(settings: Settings | None) -> Iterator[CellFilters]:
    """The kernel's warning filters while the cell's code runs; this process's own again after."""
    packed = (settings or {}).get("warnings")
    taken = CellFilters()
    if packed is None:
        yield taken
        return
    own = warnings.filters[:]
    try:
        _unpack_filters(packed)
    except Exception:  # filters this process cannot take: the cell runs under its own
        pass
    start = warnings.filters[:]
    try:
        yield taken
    finally:
        if warnings.filters != start:  # the cell's own filterwarnings(): they go back with it
            taken.left = _pack_filters()
        if warnings.filters != own:
            warnings.filters[:] = own
            _filters_changed()


def _filters_changed() -> None:
    mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings() calls
    if mutated is not None:
        mutated()


_filters_taken: Any = None
"""The kernel's filters this process took last: its own differ where a category could not be
named here, so comparing them with the kernel's would never find them equal."""
_filters_made: list[Any] = []
"""What they became here, taken again as they are (see :func:`cell_filters`)."""


def _unpack_filters(packed: list[tuple[Any, ...]]) -> None:
    """Make ``warnings.filters`` the kernel's: a filter whose category this process cannot
    name without importing anything (a class defined in the notebook, a package not imported
    here) is left out."""
    global _filters_taken, _filters_made
    if packed == _filters_taken:  # taken before (by the spare, ahead): made already
        filters = _filters_made
    else:
        filters = _make_filters(packed)
        _filters_taken, _filters_made = packed, filters
    if filters != warnings.filters:
        warnings.filters[:] = filters
        _filters_changed()


def _make_filters(packed: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    filters = []
    for action, message, module_name, qualname, module, lineno in packed:
        category: Any = sys.modules.get(module_name or "")
        for part in (qualname or "").split("."):
            category = getattr(category, part, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            continue
        try:
            filters.append(
                (action, _unpack_pattern(message), category, _unpack_pattern(module), lineno)
            )
        except re.error:
            continue
    return filters


def _set_numpy(packed: Settings) -> None:
    try:
        import numpy as np

        if np.geterr() != packed["err"]:
            np.seterr(**packed["err"])
        now = np.get_printoptions()
        changed = {key: value for key, value in packed["print"].items() if now.get(key) != value}
        if changed:
            np.set_printoptions(**changed)
    except Exception:  # another NumPy version here: its own settings
        pass


def _pandas_changed(pandas: Any) -> dict[str, Any]:
    """pandas' options whose values are not their defaults (plain values only), read from its
    option table (about 20 us): ``get_option`` on each would take milliseconds, and warn
    about the deprecated ones."""
    try:
        config = pandas._config.config
        registered, current = config._registered_options, config._global_config
    except AttributeError:  # another pandas: its options stay the worker's
        return {}
    changed: dict[str, Any] = {}
    todo: list[tuple[str, Any]] = [("", current)]
    while todo:
        prefix, table = todo.pop()
        for key, value in table.items():
            if isinstance(value, dict):
                todo.append((prefix + key + ".", value))
                continue
            option = registered.get(prefix + key)
            if option is None or value is option.defval or not isinstance(value, _PLAIN):
                continue
            try:
                if value != option.defval:
                    changed[prefix + key] = value
            except Exception:  # a default that cannot be compared: leave it
                continue
    return changed


def _set_pandas(changed: dict[str, Any]) -> None:
    try:
        import pandas
    except Exception:
        return
    for key, value in changed.items():
        try:
            pandas.set_option(key, value)
        except Exception:  # an option this pandas lacks or refuses: its own value
            continue


_OWN_RC = frozenset({"backend", "backend_fallback", "interactive"})
"""matplotlib settings that stay the worker's: it draws with Agg, without a kernel or a window."""


def _matplotlib_changed(matplotlib: Any) -> dict[str, Any]:
    """``rcParams`` the notebook changed since matplotlib read its ``matplotlibrc`` (a style, a
    theme, a figure size), about 20 us; read as stored, so no deprecation warning fires."""
    try:
        current, original = matplotlib.rcParams, matplotlib.rcParamsOrig
        changed: dict[str, Any] = {}
        for key, value in dict.items(current):
            before = dict.get(original, key)
            if value is before or key in _OWN_RC:
                continue
            try:
                if value == before:
                    continue
            except Exception:  # values that cannot be compared (arrays): sent, to be safe
                pass
            changed[key] = value
    except Exception:  # a matplotlib being imported, or an unusual one: the worker keeps its own
        return {}
    try:  # the run message is pickled whole: one value that cannot be must not stop the cell
        pickle.dumps(changed)
    except Exception:
        changed = {key: value for key, value in changed.items() if _picklable(value)}
    return changed


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _set_matplotlib(changed: dict[str, Any]) -> None:
    try:
        import matplotlib
    except Exception:
        return
    current = matplotlib.rcParams
    for key, value in changed.items():
        try:
            if dict.get(current, key) != value:
                current[key] = value
        except Exception:  # a key this matplotlib lacks, or a value it refuses: its own
            continue


_SETTERS = (
    ("numpy", _set_numpy), ("decimal", _set_decimal), ("pandas", _set_pandas), ("matplotlib", _set_matplotlib),
)
"""Each package whose settings travel, and what takes them."""


def _inline_figures(config: Any) -> dict[str, Any] | None:
    """The kernel's inline figure formats and ``print_figure`` options, when the notebook changed
    them from the inline backend's defaults (``png``, ``bbox_inches="tight"``)."""
    backend = getattr(config, "InlineBackend", None)
    try:
        if backend is None or not backend.initialized():
            return None
        inline = backend.instance()
        formats, kwargs = sorted(inline.figure_formats), dict(inline.print_figure_kwargs)
    except Exception:
        return None
    if formats == ["png"] and kwargs == {"bbox_inches": "tight"}:
        return None
    if not _picklable(kwargs):
        kwargs = {"bbox_inches": "tight"}
    return {"formats": formats, "kwargs": kwargs}


_STYLES = {logging.PercentStyle: "%", logging.StrFormatStyle: "{", logging.StringTemplateStyle: "$"}


def _pack_logging() -> Settings | None:
    """The levels set and the log handlers that travel; None while logging is as it starts."""
    root = logging.getLogger()
    levels: dict[str, int] = {}
    alone: list[str] = []
    handlers: list[tuple[Any, ...]] = []
    for name, logger in _loggers():  # one pass: a kernel has a hundred loggers or more
        if logger.level and name:
            levels[name] = logger.level
        if not logger.propagate:
            alone.append(name)
        if logger.handlers:
            handlers += _pack_handlers(name, logger)
    if root.level == logging.WARNING and not levels and not handlers and not alone:
        return None
    handlers.sort(key=lambda packed: packed[0])  # the same order in any process (a stable sort)
    packed: Settings = {"root": root.level, "levels": levels, "handlers": handlers}
    if alone:
        alone.sort()  # logger.propagate = False: its records stop at its own handlers
        packed["alone"] = alone
    return packed


def _loggers() -> list[tuple[str, logging.Logger]]:
    """The root logger (named ``""`` here) and every logger made so far."""
    return [("", logging.getLogger())] + [
        (name, logger)
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger)
    ]


def _spec(handler: logging.Handler) -> tuple[str, Any] | None:
    """What a handler writes to, if it travels: ``("stdout", None)`` or ``("stderr", None)`` for a
    ``StreamHandler`` on this process's output (the cell's output in a worker), ``("file",
    (path, encoding))`` for a ``FileHandler``; None for any other (a service, the terminal the
    kernel was started from), which stays where it is."""
    kind = type(handler)
    if kind is logging.StreamHandler:
        stream = getattr(handler, "stream", None)
        where = "stdout" if stream is sys.stdout else "stderr" if stream is sys.stderr else None
        return None if where is None else (where, None)
    if kind is logging.FileHandler:
        return ("file", (handler.baseFilename, handler.encoding))
    return None


def _pack_handlers(name: str, logger: logging.Logger) -> list[tuple[Any, ...]]:
    """A logger's handlers that travel (:func:`_spec`), with their level and format."""
    handlers = []
    for handler in logger.handlers:
        spec = _spec(handler)
        if spec is not None:
            handlers.append((name, *spec, *_look(handler)))
    return handlers


def _look(handler: logging.Handler) -> tuple[Any, ...]:
    """A handler's level and format, as packed."""
    form = handler.formatter
    style = _STYLES.get(type(getattr(form, "_style", None)), "%")
    return handler.level, getattr(form, "_fmt", None), getattr(form, "datefmt", None), style


def _make_handler(where: str, target: Any) -> logging.Handler:
    if where == "file":
        path, encoding = target
        # Appending, never "w": the file is the notebook's log, whatever mode it was opened in.
        return logging.FileHandler(path, mode="a", encoding=encoding, delay=True)
    return logging.StreamHandler(sys.stdout if where == "stdout" else sys.stderr)


def _unpack_logging(packed: Settings, keep_others: bool = False) -> None:
    """Set the levels, and give each logger the handlers that travel as packed: one already
    there that writes to the same place with the same level and format is kept, the others
    made (or, gone from the pack, closed and taken off). Handlers that do not travel (a
    service, a queue) stay as they are.  ``keep_others``: in the kernel, taking what a cell
    changed, where a file handler taken off is closed."""
    root = logging.getLogger()
    changed = False
    for logger, level in ((root, packed["root"]), *((logging.getLogger(n), lv) for n, lv in packed["levels"].items())):
        if logger.level != level:
            logger.level = level  # not setLevel: that clears every logger's cache, once per call
            changed = True
    if changed:
        logging.Logger.manager._clear_cache()  # once, as setLevel would
    alone = set(packed.get("alone", ()))
    for name, logger in _loggers():
        if logger.propagate == (name in alone):
            logger.propagate = name not in alone
    for name in alone:
        logging.getLogger(name).propagate = False
    wanted: dict[str, list[tuple[Any, ...]]] = {}
    for name, *spec in packed["handlers"]:
        wanted.setdefault(name, []).append(tuple(spec))
    for name, logger in _loggers():
        specs = wanted.pop(name, [])
        if specs or any(type(h) in _OURS for h in logger.handlers):
            _reconcile(logger, specs, kernel=keep_others)
    for name, specs in wanted.items():  # a logger the cell made
        _reconcile(logging.getLogger(name) if name else root, specs, kernel=keep_others)


_OURS = (logging.StreamHandler, logging.FileHandler)


def _reconcile(logger: logging.Logger, specs: list[tuple[Any, ...]], kernel: bool) -> None:
    """``logger``'s handlers as ``specs`` say. In a worker every plain stream or file handler is
    the pack's to make (one a spare made before the fork writes to an output the worker no
    longer has); in the kernel one that does not travel (the terminal's) stays, and one the cell
    took off is closed."""
    have: list[tuple[tuple[Any, ...], logging.Handler]] = []
    kept: list[logging.Handler] = []
    for handler in logger.handlers:
        spec = _spec(handler)
        if spec is None:
            if kernel or type(handler) not in _OURS:
                kept.append(handler)
            continue
        have.append(((*spec, *_look(handler)), handler))
    if [spec for spec, _ in have] == specs and len(kept) + len(have) == len(logger.handlers):
        return
    made: list[logging.Handler] = []
    for spec in specs:
        found = next((h for s, h in have if s == spec), None)
        if found is not None:
            have = [(s, h) for s, h in have if h is not found]
            made.append(found)
            continue
        where, target, level, fmt, datefmt, style = spec
        handler = _make_handler(where, target)
        handler.setLevel(level)
        try:
            handler.setFormatter(logging.Formatter(fmt, datefmt, style))
        except (ValueError, TypeError):
            pass
        made.append(handler)
    if kernel:
        for _, handler in have:
            if isinstance(handler, logging.FileHandler):
                handler.close()
    logger.handlers[:] = kept + made


def catch_up_logs() -> None:
    """In the kernel after an isolated cell: a log file the notebook opened for writing (not
    appending) moves to its end, past what the worker appended, so the notebook's next line
    follows the cell's instead of writing over them."""
    for _, logger in _loggers():
        for handler in logger.handlers:
            if type(handler) is logging.FileHandler and handler.stream is not None and "a" not in handler.mode:
                try:
                    handler.flush()
                    handler.stream.seek(0, os.SEEK_END)
                except (OSError, ValueError):
                    pass


# -- what a cell changed, back to the kernel -----------------------------------------------------


def environment() -> dict[Any, Any]:
    """The environment as a cell starts, for :func:`left_by_cell`: the raw table behind
    ``os.environ`` where there is one (copying and comparing it costs a fresh worker a
    fraction of what decoding every variable would)."""
    raw = getattr(os.environ, "_data", None)
    return dict(raw) if isinstance(raw, dict) else dict(os.environ)


def left_by_cell(job: dict[str, Any], environ: dict[Any, Any], filters: list[tuple[Any, ...]] | None) -> Settings:
    """In the worker, as a cell ends well: what its code changed of the settings the kernel sent
    (``job["settings"]``), of its environment (``environ``, from :func:`environment` as the
    cell started), working directory and ``sys.path``, for :func:`apply`; ``filters`` are the
    warning filters the cell left, if it changed them (:class:`CellFilters`).  About 0.1 ms
    in a worker that rehearsed it (:func:`nbisolate.worker.rehearse`)."""
    sent = job.get("settings") or {}
    out: Settings = {}
    limit = sys.getrecursionlimit()
    if limit != sent.get("recursion", limit):
        out["recursion"] = limit
    if filters is not None:
        out["warnings"] = filters
    logs = _pack_logging()
    if logs is not None and logs != sent.get("logging"):
        out["logging"] = logs
    if "digits" in sent and _int_digits() != sent["digits"]:
        out["digits"] = _int_digits()
    if "numpy" in sent:
        numpy = _numpy_settings()
        if numpy is not None and numpy != sent["numpy"]:
            out["numpy"] = numpy
    if "decimal" in sys.modules:
        decimal = _decimal_settings()
        if decimal != sent.get("decimal"):  # None: back to a new context's, which then go back
            out["decimal"] = decimal if decimal is not None else _decimal_settings(default=True)
    for package, changes, defaults in (
        ("pandas", _pandas_changed, _pandas_defaults),
        ("matplotlib", _matplotlib_changed, _matplotlib_defaults),
    ):
        module = sys.modules.get(package)
        if module is None:
            continue
        before, now = sent.get(package) or {}, changes(module)
        if now != before:  # what went back to its default goes back there in the kernel too
            out[package] = {**defaults(module, [k for k in before if k not in now]), **now}
    if environment() != environ:
        from .pools import ENV_REPORT  # where the cell's own pools report to: this worker's alone

        def text(value: Any) -> str:
            return os.fsdecode(value) if isinstance(value, bytes) else value

        before = {text(k): text(v) for k, v in environ.items()}
        current = {k: v for k, v in os.environ.items() if k != ENV_REPORT}
        env = {
            "set": {k: v for k, v in current.items() if before.get(k) != v},
            "unset": [k for k in before if k not in current and k != ENV_REPORT],
        }
        if env["set"] or env["unset"]:
            out["env"] = env
    try:
        where = os.getcwd()
    except OSError:  # the cell removed its own directory: nothing to follow
        where = job["cwd"]
    if where != job["cwd"]:
        out["cwd"] = where
    if sys.path != job["sys_path"]:
        out["sys_path"] = list(sys.path)
    return out


def _pandas_defaults(pandas: Any, keys: list[str]) -> dict[str, Any]:
    try:
        registered = pandas._config.config._registered_options
        return {key: registered[key].defval for key in keys if key in registered}
    except Exception:
        return {}


def _matplotlib_defaults(matplotlib: Any, keys: list[str]) -> dict[str, Any]:
    try:
        original = matplotlib.rcParamsOrig
        return {key: dict.__getitem__(original, key) for key in keys if key in original}
    except Exception:
        return {}


def apply(changed: Settings) -> list[str]:
    """In the kernel: take what an isolated cell changed (:func:`left_by_cell`), as if it had run
    here.  A part this process cannot take stays as it is; returns the parts that could not be
    taken, to be named to the user.  A package's settings are taken only where the notebook
    has imported it (an ordinary cell would have, but importing it here now would cost the
    kernel seconds for settings no cell of its own uses yet)."""
    failed: list[str] = []

    def attempt(part: str, step: Any) -> None:
        try:
            step()
        except Exception as exc:
            failed.append(f"{part} ({type(exc).__name__}: {exc})")

    if "recursion" in changed:
        attempt("the recursion limit", lambda: sys.setrecursionlimit(changed["recursion"]))
    if "digits" in changed:
        attempt("the int digits limit", lambda: sys.set_int_max_str_digits(changed["digits"]))
    if "warnings" in changed:
        attempt("the warning filters", lambda: _unpack_filters(changed["warnings"]))
    if "logging" in changed:
        attempt("logging", lambda: _unpack_logging(changed["logging"], keep_others=True))
    for package, setter in _SETTERS:
        if package in changed and package in sys.modules:
            attempt(f"{package}'s settings", lambda setter=setter, package=package: setter(changed[package]))
    per_context = {part: changed[part] for part in _PER_CONTEXT if part in changed and part in sys.modules}
    if per_context:  # see before_cell
        global _pending, _pending_id
        _pending, _pending_id = {**(_pending or {}), **per_context}, _pending_id + 1
    if "env" in changed:

        def take_env() -> None:
            os.environ.update(changed["env"]["set"])
            for key in changed["env"]["unset"]:
                os.environ.pop(key, None)

        attempt("the environment", take_env)
    if "cwd" in changed:
        attempt("the working directory", lambda: os.chdir(changed["cwd"]))
    if "sys_path" in changed:
        sys.path[:] = changed["sys_path"]
    return failed


# NumPy 2 keeps its print options and error handling per context (contextvars), as decimal
# keeps its context, and a kernel runs a cell that awaits (as an isolated cell does) in a copy
# of its context, which ends with the cell: what ``apply`` set there would be lost for the
# cells after it.  So are the notebook's own context variables an isolated cell set
# (``request_id.set(7)``, see :func:`hold_in_context`).  They are set again as each cell
# starts (:func:`before_cell`, an IPython ``pre_run_cell`` hook), until one start finds them
# still set from the one before: then they live in the notebook's own context.
_PER_CONTEXT = ("numpy", "decimal")
_pending: Settings | None = None
_pending_vars: dict[contextvars.ContextVar[Any], Any] = {}
_pending_id = 0
_taken: contextvars.ContextVar[int] = contextvars.ContextVar("nbisolate_context_settings", default=0)


def hold_in_context(var: contextvars.ContextVar[Any], value: Any) -> None:
    """In the kernel: set the notebook's ``var`` to the value an isolated cell set, so that it holds
    for the cells after it (set now, and again as cells start until it holds: see above)."""
    global _pending_id
    var.set(value)
    _pending_vars[var] = value
    _pending_id += 1


def before_cell(*_: Any) -> None:
    """As a cell starts: the settings and context variables an isolated cell changed, set again until they hold."""
    global _pending
    if _pending is None and not _pending_vars:
        return
    if _taken.get() == _pending_id:  # set at the start of a cell before, and still: they hold
        _pending = None
        _pending_vars.clear()
        return
    for part, setter in _SETTERS:
        if _pending and part in _pending and part in sys.modules:
            setter(_pending[part])
    for var, value in _pending_vars.items():
        var.set(value)
    _taken.set(_pending_id)
