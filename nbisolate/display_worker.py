"""Rich output in the worker: an isolated cell looks the same as an ordinary one.

In a kernel, ``display()``, ``IPython.display`` objects, ``_repr_*_``
methods, matplotlib's inline backend, warnings and logging all end up as
IOPub messages.  The worker has no kernel and no ``InteractiveShell``, so
left alone ``IPython.display.display`` would merely ``print`` and a plot would
try to open a window.  This module (installed by :func:`nbisolate.worker.main`
before any input is loaded) makes the worker behave like the kernel:

* ``display`` is a builtin, as IPython makes it in a kernel; it formats
  objects and sends ``("display", {"data", "metadata", "transient"})`` over
  the worker's channel, after flushing ``sys.stdout``/``sys.stderr`` so text
  and displays arrive in the order the cell produced them.  The kernel side
  (:class:`nbisolate.sink.StdSink`) publishes them as ``display_data``,
  ``update_display_data`` and ``clear_output`` messages.
* Objects are formatted with IPython's own ``DisplayFormatter`` when IPython
  is importable, so ``_repr_html_``/``_repr_png_``/``_repr_mimebundle_`` and
  IPython's display types give the bundles the kernel would give; matplotlib
  figures get the inline backend's PNG printer (``bbox_inches='tight'``).
* The worker stays light: nothing here imports IPython, matplotlib, pandas or
  ipywidgets.  A ``sys.meta_path`` hook adapts those modules right after the
  cell (or an input being unpickled) imports them: IPython's ``display``,
  ``update_display``, ``clear_output`` and ``publish_display_data`` are routed
  to the channel; matplotlib gets the Agg backend (no window ever opens) and
  ``plt.show()`` displays figures as the inline backend does; figures still
  open when the cell ends are shown by :func:`end_of_cell`; pandas gets the
  column limit it has in a notebook; ``getpass`` explains that there is no
  one to ask (a cell the kernel waits on replaces it again, to ask the kernel:
  :func:`nbisolate.worker._let_ask`).
* Widgets (ipywidgets 8.1 on) made in a cell the kernel waits on are shown and
  updated as the kernel's own: their comm messages go over the channel
  (``("comm", {...})`` with the widget's buffers) and the kernel opens, updates and
  closes a comm of the same id, keeping a widget of its own for each model
  (:mod:`nbisolate.widgetrelay`), so a progress bar (``tqdm.notebook`` too) moves as
  the cell runs and a widget the cell binds comes back as the kernel's.  A notebook
  widget arrives as one on a relayed comm of its id (:func:`widget_from_kernel`);
  ``with out:`` sends the cell's output into an ``Output`` widget.  Elsewhere
  (``--bg``, ``--over``, Dask, ipywidgets 8.0) a widget says it cannot be shown, and
  ``tqdm.notebook`` draws tqdm's text bar.

The worker runs exactly one cell and exits, so patching these modules in
place changes nothing outside that one cell.
"""

from __future__ import annotations

import builtins
import os
import sys
import threading
from binascii import b2a_hex
from collections.abc import Callable, Iterable
from typing import Any

from .protocol import MSG_COMM, MSG_ERROR_OUTPUT

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_ADVICE = (
    "widgets need the kernel's comm channel, and this cell runs in a separate worker "
    "process. Create widgets in a normal cell; compute values in the isolated one."
)
# The inline backend's defaults (matplotlib_inline.config.InlineBackend):
# figure_formats={"png"}, print_figure_kwargs={"bbox_inches": "tight"},
# close_figures=True, and no rc overrides; the kernel's own, when the notebook
# changed them (%config InlineBackend.figure_formats), see figure_formats().
FIGURE_FORMATS: tuple[str, ...] = ("png",)
PRINT_FIGURE_KWARGS: dict[str, Any] = {"bbox_inches": "tight"}
# pandas' display.max_columns when it runs in a notebook kernel; see _adapt_pandas.
NOTEBOOK_MAX_COLUMNS = 20

_chan: Any = None
_streams: list[Any] = []
_formatter: Any = None  # IPython's DisplayFormatter; False when IPython cannot be imported
_warned_widgets: set[str] = set()
_local = threading.local()
_relaying = False  # widgets' comms go to the kernel (relay_widgets)
_relayed: set[str] = set()  # the comm ids (a widget's model id) the kernel has opened
_tqdm_widget_bar: dict[str, Any] = {}  # tqdm.notebook's own names, while its text bar stands in


# -- sending ------------------------------------------------------------------
def _flush_streams() -> None:
    """Send pending text first, so a display never overtakes what was printed before it."""
    seen: list[Any] = []
    for stream in (*_streams, sys.stdout, sys.stderr):
        if stream is None or any(stream is s for s in seen):
            continue
        seen.append(stream)
        try:
            stream.flush()
        except Exception:
            pass


def _note(text: str) -> None:
    """A one-line explanation on the cell's stderr, as the runner writes its own notes."""
    _flush_streams()
    sys.stderr.write(f"nbisolate: {text}\n")
    sys.stderr.flush()


def _send(kind: str, body: dict[str, Any]) -> None:
    _flush_streams()
    if _chan is None:  # not in a worker (used by hand): show the text form, as IPython would
        if kind != "clear_output":
            print(body.get("data", {}).get("text/plain", ""))
        return
    try:
        _chan.send(kind, body)
    except OSError:
        pass  # the kernel went away; the worker's watchdog ends the process
    except Exception as exc:  # only the pickling of the message can fail before sending
        mimes = ", ".join(sorted(body.get("data") or {})) or "no data"
        raise TypeError(
            f"{kind}(): the display data ({mimes}) cannot be sent from the isolated cell to "
            f"the notebook: {type(exc).__name__}: {exc}. Display data must be JSON-like "
            "(str, bytes, numbers, lists, dicts); convert the value before displaying it."
        ) from None


def _drop_widget_view(data: dict[str, Any], obj: Any = None) -> dict[str, Any]:
    """Remove a widget view (it would point at a model the kernel never had) and say why."""
    if WIDGET_MIME not in data:
        return data
    view = data[WIDGET_MIME]
    if isinstance(view, dict) and view.get("model_id") in _relayed:
        return data  # the kernel opened its model (relay_widgets)
    data = {k: v for k, v in data.items() if k != WIDGET_MIME}
    name = type(obj).__name__ if obj is not None and not isinstance(obj, dict) else "a widget"
    if name in _warned_widgets:
        return data  # said once already, when it was created or first displayed
    _warned_widgets.add(name)
    shown = "only its text form is shown" if data else "nothing is shown"
    _note(f"cannot display {name} from an isolated cell ({shown}): {WIDGET_ADVICE}")
    return data


# -- formatting -----------------------------------------------------------------
def _ipython_formatter() -> Any:
    """IPython's DisplayFormatter, set up as the inline backend sets the kernel's; None without IPython."""
    global _formatter
    if _formatter is None:
        try:
            from IPython.core import pylabtools  # noqa: F401  (figures are drawn through it)
            from IPython.core.formatters import DisplayFormatter
        except Exception:
            _formatter = False
            return None
        formatter = DisplayFormatter()
        _register_figures(formatter)
        _formatter = formatter
    return _formatter or None


def _register_figures(formatter: Any) -> None:
    """What IPython's ``select_figure_formats`` registers in the kernel for the inline backend,
    by name, so that matplotlib is not imported until a figure exists."""
    from functools import partial

    from IPython.core.pylabtools import print_figure, retina_figure

    for one in formatter.formatters.values():
        one.pop("matplotlib.figure.Figure", None)
    kwargs = PRINT_FIGURE_KWARGS
    for fmt in FIGURE_FORMATS:
        if fmt == "png":
            mime, draw = "image/png", partial(print_figure, fmt="png", base64=True, **kwargs)
        elif fmt in ("retina", "png2x"):
            mime, draw = "image/png", partial(retina_figure, base64=True, **kwargs)
        elif fmt in ("jpg", "jpeg"):
            mime, draw = "image/jpeg", partial(print_figure, fmt="jpg", base64=True, **kwargs)
        elif fmt == "svg":
            mime, draw = "image/svg+xml", partial(print_figure, fmt="svg", **kwargs)
        elif fmt == "pdf":
            mime, draw = "application/pdf", partial(print_figure, fmt="pdf", base64=True, **kwargs)
        else:  # a format this IPython does not know: the kernel refused it too
            continue
        formatter.formatters[mime].for_type_by_name("matplotlib.figure", "Figure", draw)


def figure_formats(formats: Iterable[str], kwargs: dict[str, Any]) -> None:
    """Draw figures as the kernel's inline backend does when the notebook chose other formats
    (``%config InlineBackend.figure_formats = ["retina"]``, ``["svg"]``) or ``print_figure`` options."""
    global FIGURE_FORMATS
    if tuple(formats) == FIGURE_FORMATS and kwargs == PRINT_FIGURE_KWARGS:
        return
    FIGURE_FORMATS = tuple(formats)
    PRINT_FIGURE_KWARGS.clear()
    PRINT_FIGURE_KWARGS.update(kwargs)
    if _formatter:  # built already (a spare builds it while it waits): drawn the new way from now on
        try:
            _register_figures(_formatter)
        except Exception:
            pass


def _figure_png(fig: Any) -> str | None:
    """The inline backend's PNG of a figure, without IPython (base64 text; None when empty)."""
    import base64
    import io

    if not fig.axes and not fig.lines:
        return None
    buf = io.BytesIO()
    fig.canvas.print_figure(
        buf,
        format="png",
        facecolor=fig.get_facecolor(),
        edgecolor=fig.get_edgecolor(),
        dpi=fig.dpi,
        **PRINT_FIGURE_KWARGS,
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fallback_bundle(value: Any) -> dict[str, Any]:
    """A display bundle for a value that cannot travel back: its ``_repr_*_`` methods and repr."""
    bundle: dict[str, Any] = {}
    mimebundle = getattr(value, "_repr_mimebundle_", None)
    if callable(mimebundle):
        try:
            got = mimebundle()
            if isinstance(got, tuple):
                got = got[0]
            bundle.update(got or {})
        except Exception:
            pass
    for mime, attr in (
        ("text/html", "_repr_html_"),
        ("text/markdown", "_repr_markdown_"),
        ("image/png", "_repr_png_"),
        ("image/svg+xml", "_repr_svg_"),
        ("text/latex", "_repr_latex_"),
        ("application/json", "_repr_json_"),
    ):
        method = getattr(value, attr, None)
        if mime not in bundle and callable(method):
            try:
                got = method()
            except Exception:
                continue
            if got is not None:
                if mime == "image/png" and isinstance(got, bytes):
                    import base64

                    got = base64.b64encode(got).decode("ascii")
                bundle[mime] = got
    try:
        bundle["text/plain"] = repr(value)
    except Exception as exc:
        bundle["text/plain"] = f"<{type(value).__qualname__} object; repr failed: {exc!r}>"
    return bundle


def _plain_format(obj: Any) -> dict[str, Any]:
    """Without IPython: the ``_repr_*_`` methods and repr, plus figures as PNG."""
    data = _fallback_bundle(obj)
    figure_module = sys.modules.get("matplotlib.figure")
    if (
        figure_module is not None
        and isinstance(obj, figure_module.Figure)
        and "image/png" not in data
    ):
        png = _figure_png(obj)
        if png is not None:
            data["image/png"] = png
    return data


def format_object(
    obj: Any, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(data, metadata)`` display bundle of ``obj``, as the kernel would compute it.

    Empty data means the object displayed itself (``_ipython_display_``).
    """
    formatter = _ipython_formatter()
    if formatter is not None:
        data, metadata = formatter.format(obj, include=include, exclude=exclude)
    else:
        data, metadata = _plain_format(obj), {}
        if include:
            data = {k: v for k, v in data.items() if k in include}
        if exclude:
            data = {k: v for k, v in data.items() if k not in exclude}
    return _drop_widget_view(data, obj), metadata


def result_bundle(value: Any) -> dict[str, Any]:
    """The display of a last-expression value that cannot travel back to the kernel."""
    try:
        data, _ = format_object(value)
    except Exception as exc:
        data = {"text/plain": f"<{type(value).__qualname__} object; formatting failed: {exc!r}>"}
    return data or {"text/plain": ""}


# -- the display API (IPython's signatures and semantics) ----------------------
def _new_id() -> str:
    return b2a_hex(os.urandom(16)).decode("ascii")


def _merge(d1: Any, d2: Any) -> Any:
    """Like IPython's: update ``d1`` in place, merging sub-dicts instead of replacing them."""
    if not isinstance(d2, dict) or not isinstance(d1, dict):
        return d2
    for key, value in d2.items():
        d1[key] = _merge(d1.get(key), value)
    return d1


class DisplayHandle:
    """A handle on an updatable display, used until the cell imports IPython's own."""

    def __init__(self, display_id: str | None = None) -> None:
        self.display_id = display_id if display_id is not None else _new_id()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} display_id={self.display_id}>"

    def display(self, obj: Any, **kwargs: Any) -> None:
        """Make a new display with this id, updating existing instances."""
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj: Any, **kwargs: Any) -> None:
        """Update the existing displays with this id."""
        update_display(obj, display_id=self.display_id, **kwargs)


def _handle(display_id: str) -> Any:
    functions = sys.modules.get("IPython.core.display_functions")
    cls = getattr(functions, "DisplayHandle", None) or DisplayHandle
    return cls(display_id)


def publish_display_data(
    data: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    *,
    transient: dict[str, Any] | None = None,
    update: bool = False,
    source: Any = None,
) -> None:
    """Send display data to the cell's output in the notebook (``update`` replaces by id)."""
    if not isinstance(data, dict):
        raise TypeError(
            f"publish_display_data(): data must be a dict of mime type -> data, not "
            f"{type(data).__name__}, in the isolated cell"
        )
    data = _drop_widget_view(data)
    if not data and not (transient or {}).get("display_id"):
        return
    _send(
        "update_display" if update else "display",
        {"data": data, "metadata": metadata or {}, "transient": transient or {}},
    )


def display(
    *objs: Any,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    metadata: dict[str, Any] | None = None,
    transient: dict[str, Any] | None = None,
    display_id: str | bool | None = None,
    raw: bool = False,
    clear: bool = False,
    **kwargs: Any,
) -> Any:
    """Display objects in the isolated cell's output, as IPython's ``display`` does in a kernel.

    Returns a display handle when ``display_id`` is given (``True`` makes a new id).
    """
    unknown = set(kwargs) - {"update"}
    if unknown:
        raise TypeError(f"display() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    transient = {} if transient is None else dict(transient)
    metadata = {} if metadata is None else metadata
    if display_id:
        if display_id is True:
            display_id = _new_id()
        transient["display_id"] = display_id
    update = bool(kwargs.get("update"))
    if update and "display_id" not in transient:
        raise TypeError("display_id required for update_display")
    if not objs and display_id:
        # No object but an id: an empty output that can be updated later.
        objs = ({},)
        raw = True
    if clear:
        clear_output(wait=True)
    for obj in objs:
        if raw:
            publish_display_data(obj, metadata, transient=transient, update=update)
            continue
        data, md = format_object(obj, include=include, exclude=exclude)
        if not data:
            continue  # nothing to show (the object displayed itself)
        if metadata:
            _merge(md, metadata)
        publish_display_data(data, md, transient=transient, update=update)
    if display_id:
        return _handle(str(display_id))
    return None


def update_display(obj: Any, *, display_id: str, **kwargs: Any) -> None:
    """Replace the display with ``display_id`` by ``obj``."""
    kwargs["update"] = True
    display(obj, display_id=display_id, **kwargs)


def clear_output(wait: bool = False) -> None:
    """Clear the cell's output (with ``wait``, when the next output arrives)."""
    _send("clear_output", {"wait": bool(wait)})


# -- matplotlib ---------------------------------------------------------------------
def _figure_metadata(fig: Any) -> dict[str, Any] | None:
    """The inline backend's metadata: which background a transparent figure needs."""
    from matplotlib import colors

    if colors.to_rgba(fig.get_facecolor())[3] < 0.5:
        labels = [
            label.get_color()
            for axes in fig.axes
            for axis in (axes.xaxis, axes.yaxis)
            for label in axis.get_ticklabels()
        ]
        light = colors.to_rgba_array(labels)[:, :3].dot((0.299, 0.587, 0.114)) > 0.5
        if light.size and (light == light[0]).all():
            return {"needs_background": "dark" if light[0] else "light"}
    return None


def show(close: bool | None = None, block: bool | None = None) -> None:
    """``plt.show()`` in the worker: display every open figure, then close them (inline backend)."""
    from matplotlib import pyplot
    from matplotlib._pylab_helpers import Gcf

    close = True if close is None else close
    try:
        for manager in Gcf.get_all_fig_managers():
            figure = manager.canvas.figure
            display(figure, metadata=_figure_metadata(figure))
    finally:
        if close and Gcf.get_all_fig_managers():
            pyplot.close("all")


def end_of_cell() -> None:
    """Show the figures the cell left open, as the inline backend does after every cell."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    try:
        from matplotlib._pylab_helpers import Gcf

        if Gcf.get_all_fig_managers():
            show(close=True)
    except Exception as exc:
        import traceback

        _flush_streams()
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        _note(f"the figures this cell left open could not be drawn ({type(exc).__name__}: {exc}).")


def _adapt_matplotlib(matplotlib: Any) -> None:
    # The kernel hands its MPLBACKEND (the inline backend) to the worker; Agg draws
    # the same pixels without a kernel and never opens a window.  A backend the cell
    # chooses itself (matplotlib.use) still wins, as it comes later.
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].switch_backend("agg")
    else:
        matplotlib.rcParams["backend"] = "agg"


def _adapt_pyplot(pyplot: Any) -> None:
    pyplot.show = show
    from matplotlib.figure import Figure

    if getattr(Figure.show, "_nbisolate", False):
        return
    original = Figure.show

    def figure_show(self: Any, warn: bool = True) -> None:
        # As the inline backend: fig.show() displays a pyplot figure (and leaves it open).
        if getattr(self.canvas, "manager", None) is None:
            return original(self, warn)
        display(self, metadata=_figure_metadata(self))
        return None

    figure_show._nbisolate = True  # type: ignore[attr-defined]
    figure_show.__doc__ = original.__doc__
    Figure.show = figure_show


# -- other libraries ------------------------------------------------------------------
def _adapt_ipython_display(module: Any) -> None:
    for name, func in (
        ("display", display),
        ("update_display", update_display),
        ("clear_output", clear_output),
        ("publish_display_data", publish_display_data),
    ):
        if hasattr(module, name):
            setattr(module, name, func)


def _adapt_pandas(pandas: Any) -> None:
    # pandas picks display.max_columns at import: 20 in a notebook kernel (it finds
    # get_ipython() there), 0 = "fit the terminal" elsewhere, which would make a
    # wide frame render differently in an isolated cell than in a normal one.
    try:
        if pandas.get_option("display.max_columns") == 0:
            pandas.set_option("display.max_columns", NOTEBOOK_MAX_COLUMNS)
    except Exception:
        pass


def nobody_to_ask(what: str) -> EOFError:
    """The error of ``input()``, ``getpass()`` or ``sys.stdin`` in a worker whose kernel does not
    wait to answer (a cell the kernel waits on asks it instead: :func:`nbisolate.worker._let_ask`)."""
    return EOFError(
        f"{what} has no one to ask in a background cell (--bg), a sweep's value (--over) or a cell "
        "run on Dask: nothing waits there to answer. Read the value in a normal cell, or from an "
        "environment variable, and use it here (it arrives as an input)."
    )


def _getpass(prompt: str = "Password: ", stream: Any = None) -> str:
    raise nobody_to_ask("getpass()")


def _adapt_getpass(module: Any) -> None:
    module.getpass = _getpass


def relay_widgets() -> None:
    """The kernel waits on this cell and shows its widgets: relay their comms from now on, and
    give ``tqdm.notebook`` its widget bar back."""
    global _relaying
    _relaying = True
    module = sys.modules.get("tqdm.notebook")
    if module is not None and _widgets_relayed():  # (ipywidgets 8.0's stay in the worker)
        for name, value in _tqdm_widget_bar.items():
            setattr(module, name, value)


def widget_handlers() -> dict[str, Any]:
    """What the cell registered to run on the widgets the kernel shows (``on_click``, ``observe``),
    one result a widget (``widgetrelay.HANDLERS`` and its model's id): they come back with the
    cell's results and run in the kernel when the page clicks or drags, as an ordinary cell's."""
    module = sys.modules.get("ipywidgets.widgets.widget")
    instances = getattr(module, "_instances", None)
    if not _relayed or not isinstance(instances, dict):
        return {}
    from .widgetrelay import HANDLERS, handlers_of

    found = {}
    for model_id, widget in list(instances.items()):
        if model_id in _relayed:
            try:
                handlers = handlers_of(widget)
            except Exception:  # an ipywidgets or traitlets unlike the ones known: they stay here
                continue
            if handlers:
                found[HANDLERS + model_id] = handlers
    return found


def _widgets_relayed() -> bool:
    """Widgets made now are shown in the notebook: relayed, and made by ``comm.create_comm``."""
    create = getattr(sys.modules.get("comm"), "create_comm", None)
    return _relaying and getattr(create, "_nbisolate", False)


_RELAYED_COMM: list[Any] = []


def _relayed_comm_class() -> Any:
    """A comm whose messages go to the kernel, which sends them on from a comm of the same id."""
    if _RELAYED_COMM:
        return _RELAYED_COMM[0]
    from comm.base_comm import BaseComm

    class RelayedComm(BaseComm):
        def publish_msg(
            self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None, **keys: Any
        ) -> None:
            if msg_type == "comm_open":
                _relayed.add(self.comm_id)
            body = {"msg_type": msg_type, "comm_id": self.comm_id, "data": data or {}, "metadata": metadata or {}}
            body.update((k, v) for k, v in keys.items() if k in ("target_name", "target_module"))
            _flush_streams()  # in the order the cell made them, with its text and displays
            if _chan is not None:
                try:
                    _chan.send(MSG_COMM, body, [memoryview(b).cast("B") for b in buffers or ()])
                except OSError:
                    pass  # the kernel went away; the worker's watchdog ends the process

    _RELAYED_COMM.append(RelayedComm)
    return RelayedComm


def widget_from_kernel(cls: type, comm_id: str | None, traits: dict[str, Any]) -> Any:
    """The notebook's widget ``comm_id``, in the worker: one of its class on a comm of that id, so
    that what the cell sets on it goes to the kernel's widget (and the page) as it runs, and its
    views may be displayed here. Where comms cannot be relayed (ipywidgets 8.0), a widget alone."""
    module = sys.modules.get("ipywidgets.widgets.widget")
    if comm_id is None or module is None or not hasattr(module, "comm") or "comm" not in sys.modules:
        return cls(**traits)
    from .widgetrelay import widget_on

    comm = _relayed_comm_class()(comm_id=comm_id, primary=False, target_name="jupyter.widget")
    _relayed.add(comm_id)
    return widget_on(comm, cls, traits)  # (its traits are the kernel's widget's: nothing to send)


def _relay_comms(module: Any) -> None:
    """ipywidgets 8.1 on makes each widget's comm with ``comm.create_comm``: make it a relayed one
    in a cell whose kernel shows them (decided when the widget is made, not at import: a spare
    imports ipywidgets before it knows its cell)."""
    comm = sys.modules.get("comm")
    if comm is None or not hasattr(module, "comm"):  # the package, or ipywidgets.comm on top of it
        return  # ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker
    if getattr(comm.create_comm, "_nbisolate", False):
        return
    original = comm.create_comm

    def create_comm(*args: Any, **kwargs: Any) -> Any:
        if not _relaying:
            return original(*args, **kwargs)
        return _relayed_comm_class()(*args, **kwargs)

    create_comm._nbisolate = True  # type: ignore[attr-defined]
    comm.create_comm = create_comm


def _adapt_widget_output(module: Any) -> None:
    """``with out:`` on a relayed ``Output`` widget: the cell's output goes into it, as in an
    ordinary cell. ipywidgets sets its ``msg_id`` to the request the kernel runs, which the
    worker does not know: it sets a mark the kernel replaces (``widgetrelay.THIS_CELL``). An
    exception inside is shown in the widget and goes no further, as IPython has it."""
    output = getattr(module, "Output", None)
    if output is None or getattr(output.__enter__, "_nbisolate", False):
        return
    from .widgetrelay import THIS_CELL

    original_enter, original_exit = output.__enter__, output.__exit__

    def relayed(widget: Any) -> bool:
        return getattr(widget.comm, "comm_id", None) in _relayed

    def __enter__(self: Any) -> Any:
        if not relayed(self):
            return original_enter(self)
        _flush_streams()
        depth = self.__dict__.get("_nbisolate_depth", 0)
        self.__dict__["_nbisolate_depth"] = depth + 1
        if depth == 0:
            self.msg_id = THIS_CELL
        return None

    def __exit__(self: Any, etype: Any, evalue: Any, tb: Any) -> Any:
        if not relayed(self):
            return original_exit(self, etype, evalue, tb)
        if etype is not None:
            _show_exception(evalue if evalue is not None else etype(), tb)
        _flush_streams()
        depth = self.__dict__.get("_nbisolate_depth", 1) - 1
        self.__dict__["_nbisolate_depth"] = depth
        if depth == 0:
            self.msg_id = ""
        return True if etype is not None else None

    __enter__._nbisolate = True  # type: ignore[attr-defined]
    output.__enter__, output.__exit__ = __enter__, __exit__


def _show_exception(exc: BaseException, tb: Any) -> None:
    """Show ``exc`` as IPython shows one in an ordinary cell (an error output where the cell's
    output goes now), and go on."""
    from . import worker

    exc.__traceback__ = tb
    _flush_streams()
    text = worker.shown_traceback(exc)
    _send(MSG_ERROR_OUTPUT, {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text.splitlines()})


def _adapt_widgets(module: Any) -> None:
    widget_cls = getattr(module, "Widget", None)
    if widget_cls is None or getattr(widget_cls.__init__, "_nbisolate", False):
        return
    _relay_comms(module)
    original_init = widget_cls.__init__

    def __init__(self: Any, **kwargs: Any) -> None:
        depth = getattr(_local, "widget_depth", 0)
        name = type(self).__name__
        relayed = _widgets_relayed() or bool(_RELAYED_COMM and isinstance(kwargs.get("comm"), _RELAYED_COMM[0]))
        if depth == 0 and name not in _warned_widgets and not relayed:  # not a slider's Layout
            _warned_widgets.add(name)
            _note(
                f"{name} widget created in an isolated cell: it cannot be shown or used "
                f"here, because {WIDGET_ADVICE}"
            )
        _local.widget_depth = depth + 1
        try:
            original_init(self, **kwargs)
        finally:
            _local.widget_depth = depth

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        # Back in the kernel, a widget of its class on the kernel's comm for its model (a new
        # one if the kernel never opened it), with its synced traits: nbisolate.widgetrelay.
        from .widgetrelay import own_attributes, rebuild, synced_traits

        comm_id = getattr(self.comm, "comm_id", None)
        own = own_attributes(self) or None
        return rebuild, (type(self), comm_id if comm_id in _relayed else None, synced_traits(self), own)

    __init__._nbisolate = True  # type: ignore[attr-defined]
    __init__.__doc__ = original_init.__doc__
    widget_cls.__init__ = __init__
    widget_cls.__reduce_ex__ = __reduce_ex__


def _adapt_tqdm_notebook(module: Any) -> None:
    """``tqdm.notebook``'s bar is a widget, which a worker whose widgets are not relayed cannot
    show: each bar drew a frozen ``0%`` and a warning per widget.  There its names give tqdm's
    text bar instead, the one ``tqdm.auto`` picks here, live on the cell's stderr (Jupyter
    redraws a line on ``\\r``); :func:`relay_widgets` puts the widget bar back."""
    if _widgets_relayed():  # (it imported ipywidgets first)
        return
    from tqdm import std

    _tqdm_widget_bar.update(
        (name, getattr(module, name)) for name in ("tqdm_notebook", "tqdm", "tnrange", "trange") if hasattr(module, name)
    )

    class tqdm_notebook(std.tqdm):
        """tqdm's text bar, taking the notebook bar's own keyword (``display``) too."""

        def __init__(self, *args: Any, display: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    def tnrange(*args: Any, **kwargs: Any) -> Any:
        return tqdm_notebook(range(*args), **kwargs)

    # Found by name, so the class goes back to the kernel as the notebook's own bar.
    tqdm_notebook.__module__, tqdm_notebook.__qualname__ = module.__name__, "tqdm_notebook"
    module.tqdm_notebook = module.tqdm = tqdm_notebook
    module.tnrange = module.trange = tnrange


# -- the import hook -------------------------------------------------------------------
ADAPTERS: dict[str, Callable[[Any], None]] = {
    "IPython.core.display_functions": _adapt_ipython_display,
    "IPython.core.display": _adapt_ipython_display,
    "IPython.display": _adapt_ipython_display,
    "matplotlib": _adapt_matplotlib,
    "matplotlib.pyplot": _adapt_pyplot,
    "pandas": _adapt_pandas,
    "getpass": _adapt_getpass,
    "ipywidgets.widgets.widget": _adapt_widgets,
    "ipywidgets.widgets.widget_output": _adapt_widget_output,
    "tqdm.notebook": _adapt_tqdm_notebook,
}


_adapted: set[str] = set()
"""The modules of :data:`ADAPTERS` already adapted in this process."""
_untold: list[str] = []
"""What could not be adapted before a cell had streams to say it on (see :func:`prepare`)."""


def _adapt(name: str, module: Any) -> None:
    _adapted.add(name)
    try:
        ADAPTERS[name](module)
    except Exception as exc:  # never break the cell's import over a nicety
        text = f"could not adapt {name} to the isolated cell ({type(exc).__name__}: {exc})."
        if _chan is None:
            _untold.append(text)
        else:
            _note(text)


class _AdaptingLoader:
    """Wraps a module's real loader; runs its adapter right after the module has executed."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module sees its own loader, not this wrapper (importlib.resources, inspect...).
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        _adapt(self._name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class AdaptOnImport:
    """A ``sys.meta_path`` finder that adapts a few modules as soon as they are imported.

    It finds nothing itself: for the watched names it asks the other finders
    and wraps the loader they return; every other import is untouched.  A
    finder that wraps loaders too (``pools``' import hooks) may ask this one
    in turn for the same name: it gets None, so the two wrap one loader.
    """

    def __init__(self) -> None:
        self.resolving: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in ADAPTERS or fullname in self.resolving:
            return None
        self.resolving.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or isinstance(finder, AdaptOnImport):
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self.resolving.discard(fullname)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AdaptingLoader(spec.loader, fullname)
        return spec


def prepare() -> None:
    """What :func:`install` does that needs no channel: ``display`` as a builtin, the modules
    already imported adapted, the others as they are imported.  A spare worker does it while
    it waits for its cell (off the cell's path); :func:`install` does what is left."""
    builtins.display = display  # type: ignore[attr-defined]
    if not any(isinstance(finder, AdaptOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, AdaptOnImport())
    for name in ADAPTERS:
        module = sys.modules.get(name)
        if module is not None and name not in _adapted:
            _adapt(name, module)
    if "IPython.core.pylabtools" in sys.modules:  # preloaded: set up what displaying will use
        _ipython_formatter()


def install(chan: Any) -> None:
    """Make the worker's output behave like the kernel's; call before the job's inputs load.

    ``chan`` is the worker's :class:`nbisolate.wire.Channel`; displays go
    through it, interleaved in order with the ``stream`` messages of the
    current ``sys.stdout``/``sys.stderr``.
    """
    global _chan
    _chan = chan
    _streams[:] = [sys.stdout, sys.stderr]
    prepare()
    while _untold:
        _note(_untold.pop(0))
