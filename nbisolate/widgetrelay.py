"""Widgets an isolated cell makes, shown and kept by the kernel as its own.

A widget is a model in the front end and an object in the kernel, tied by a comm of
the same id. The worker has no comms of its own: in a cell the kernel waits on,
:mod:`nbisolate.display_worker` sends each widget's comm messages over the channel,
and the kernel sends them on from a comm it opens with the same id (:func:`relay`).
The front end thus sees exactly what an ordinary cell's widget sends: its ``comm_open``
with the state, the display that names its model, each update while the cell runs.

The kernel keeps a widget of its own for each model it relays (:data:`TWINS`), made as
ipywidgets makes one the page opens and kept up to date. When the cell binds a widget
(``bar = IntProgress()``), the worker's object cannot come back as it is, as no object
bound to a comm can; it comes back as the kernel's widget for that model (:func:`rebuild`),
so the notebook goes on with the widget it sees (``bar.value = 10`` moves the bar shown
above, the page's reload finds it among the kernel's widgets). A widget whose model the
kernel never opened (a ``--bg`` cell's, a sweep's) comes back as a new widget with the
same state.

The other way, a widget the notebook made goes to the worker as a widget of its class on
a comm of the same id (:func:`reduction`, :func:`in_worker`): what the cell sets on it
(``bar.value = epoch`` in a training loop) reaches the kernel's widget and the page as the
cell runs, and ``bar`` is the notebook's own object again after it.

What the cell registers to run on its widgets (``button.on_click(go)``, ``slider.observe(show,
"value")``, a ``link`` between two) comes back with its results (:func:`handlers_of` in the worker,
:func:`take_handlers` in the kernel) and is registered on the kernel's widget for each model: the
page's click or drag runs it in the kernel, as it runs an ordinary cell's, with the notebook's
names. Another widget's method among them (``interact``'s update, on its sliders) comes back as that
widget's, which :func:`rebuild` makes of the worker's class, with its attributes beside its traits
(:func:`own_attributes`), so that dragging the slider runs the function again.

Standard library only at import: both sides import it (the worker to name :func:`rebuild`,
the kernel's pickler to ask :func:`widget_class`).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "HANDLERS", "RELAYED", "TWINS", "describe", "handlers_of", "in_worker", "own_attributes", "rebuild", "reduction",
    "relay", "take_handlers", "widget_class", "widget_on",
]

_SKIP = ("_model_", "_view_")  # the model's and view's names: the class has them

THIS_CELL = "nbisolate:this-cell"
"""What an ``Output`` widget's ``msg_id`` is set to in the worker by ``with out:``: the kernel puts
the id of the cell's request in its place (the worker never sees it), as ipywidgets does in an
ordinary cell, and the page shows the cell's output from then on in the widget."""


def synced_traits(widget: Any) -> dict[str, Any]:
    """What a widget is, for another process: its synced traits but its class's own names."""
    return {name: getattr(widget, name) for name in widget.keys if name == "_view_count" or not name.startswith(_SKIP)}


def widget_class() -> type | None:
    """ipywidgets' ``Widget``, or None where it was never imported (no notebook that has not
    imported it holds a widget). A pickler asks once, then ``issubclass(type(obj), it)`` of each
    object: a proxy's ``__class__`` (``isinstance``) may block."""
    widget = getattr(sys.modules.get("ipywidgets.widgets.widget"), "Widget", None)
    return widget if isinstance(widget, type) else None


def reduction(widget: Any) -> tuple[Any, ...]:
    """In the kernel: how the notebook's ``widget`` travels to a worker (:func:`in_worker`)."""
    comm = getattr(widget, "comm", None)
    own = own_attributes(widget) or None
    return in_worker, (type(widget), getattr(comm, "comm_id", None), synced_traits(widget), own)


def in_worker(cls: type, comm_id: str | None, traits: dict[str, Any], own: dict[str, Any] | None = None) -> Any:
    """In the worker: the notebook's widget ``comm_id`` (display_worker.widget_from_kernel), with
    its attributes beside its traits as the notebook has them."""
    from .display_worker import widget_from_kernel

    return _set_own(widget_from_kernel(cls, comm_id, traits), own)


def _set_own(widget: Any, own: dict[str, Any] | None) -> Any:
    for name, value in (own or {}).items():
        try:
            setattr(widget, name, value)
        except Exception:
            pass  # (a read-only property of its class: this side's stands)
    return widget


RELAYED: dict[str, Any] = {}
"""The kernel's comms for the widgets isolated cells made, by id; like a kernel's own widgets'
they stay open (the front end keeps their views) until the worker closes them."""

TWINS: dict[str, Any] = {}
"""The kernel's widget for each relayed model whose class the kernel knows, by id: made from the
state the model opened with and kept up to date with its updates, as ipywidgets makes a widget
the front end opens (``Widget.handle_comm_opened``). It answers the page (a reload asks the
kernel's widgets for their state, a drag updates it) and is what a cell that binds the widget
gets back."""


def relay(body: dict[str, Any], buffers: list[Any]) -> None:
    """In the kernel: one comm message of a worker's widget, sent on from the comm of its id."""
    import comm

    kind, comm_id = body.get("msg_type"), body.get("comm_id")
    data, metadata = body.get("data") or {}, body.get("metadata") or {}
    if kind == "comm_open" and isinstance(comm_id, str):
        RELAYED[comm_id] = comm.create_comm(
            target_name=body.get("target_name") or "comm", target_module=body.get("target_module"),
            data=data, metadata=metadata, buffers=buffers, comm_id=comm_id,
        )
        if body.get("target_name") == "jupyter.widget":
            _make_twin(comm_id, data, buffers)
    elif kind == "comm_msg":
        state = data.get("state")
        if isinstance(state, dict) and "msg_id" in state:  # an Output widget starts or stops taking
            sys.stdout.flush()  # the cell's output: what it printed before goes where it was printed
            sys.stderr.flush()
            if state["msg_id"] == THIS_CELL:
                data = dict(data, state=dict(state, msg_id=_request_id()))
        twin = TWINS.get(comm_id) or _kernel_widget(comm_id)
        if twin is not None and data.get("method") == "update":
            _take(twin, data, buffers)
        kernel_comm = RELAYED.get(comm_id) or getattr(twin, "comm", None)
        if kernel_comm is not None:
            kernel_comm.send(data=data, metadata=metadata, buffers=buffers)
    elif kind == "comm_close":
        TWINS.pop(comm_id, None)
        if comm_id in RELAYED:
            RELAYED.pop(comm_id).close(data=data, metadata=metadata, buffers=buffers)
        elif _kernel_widget(comm_id) is not None:  # the cell closed the notebook's widget
            _kernel_widget(comm_id).close()


def _request_id() -> str:
    """The id of the request the kernel is running (the isolated cell's)."""
    from IPython import get_ipython

    shell = get_ipython()
    for get in (getattr(shell, "get_parent", None), getattr(getattr(shell, "kernel", None), "get_parent", None)):
        try:
            msg_id = (get() or {}).get("header", {}).get("msg_id") if callable(get) else None
        except Exception:
            continue
        if msg_id:
            return str(msg_id)
    return ""


def _kernel_widget(comm_id: Any) -> Any:
    """The kernel's own widget of this id (one the notebook made and sent to the worker)."""
    module = sys.modules.get("ipywidgets.widgets.widget")
    instances = getattr(module, "_instances", None)
    return instances.get(comm_id) if isinstance(instances, dict) and isinstance(comm_id, str) else None


def _make_twin(comm_id: str, data: dict[str, Any], buffers: list[Any]) -> None:
    """The kernel's widget on the relayed comm, if the kernel knows the model's class (a package
    it has not imported, a class only the worker defined: none, the comm is relayed alone)."""
    try:
        from ipywidgets.widgets.widget import _instances, _registry

        state = data["state"]
        cls = _registry.get(
            state["_model_module"], state["_model_module_version"], state["_model_name"],
            state["_view_module"], state["_view_module_version"], state["_view_name"],
        )
    except Exception:
        return
    kernel_comm = RELAYED[comm_id]
    try:
        twin = widget_on(kernel_comm, cls, {})  # (its state follows, as ipywidgets sets it)
    except Exception:  # a class that cannot be made so: the comm is relayed alone
        _instances.pop(comm_id, None)
        kernel_comm.on_msg(None)
        return
    try:
        _take(twin, data, buffers)
    except Exception:  # a state this class cannot take
        _instances.pop(comm_id, None)
        kernel_comm.on_msg(None)
        return
    TWINS[comm_id] = twin


def _take(twin: Any, data: dict[str, Any], buffers: list[Any]) -> None:
    """Set ``twin``'s state from an ``open`` or ``update`` the page gets as it is: nothing goes
    back (ipywidgets 8 would echo what it is told, for a page that told it)."""
    from ipywidgets.widgets.widget import _put_buffers

    state = dict(data.get("state") or {})
    if data.get("buffer_paths"):
        _put_buffers(state, data["buffer_paths"], buffers)
    with _silenced(twin.comm):
        twin.set_state(state)


def rebuild(cls: type, comm_id: str | None, traits: dict[str, Any], own: dict[str, Any] | None = None) -> Any:
    """In the kernel: the widget a cell bound. Its twin (:data:`TWINS`) when the kernel made one,
    else a widget of its class on the kernel's comm for its model, else (the kernel never opened
    it) a new widget. ``traits`` are its synced traits, widgets among them already rebuilt (they
    travel the same way), so a slider comes back with its own layout and style; ``own`` its other
    attributes (:func:`own_attributes`), set on it as the cell left them."""
    return _set_own(_rebuilt(cls, comm_id, traits), own)


def _rebuilt(cls: type, comm_id: str | None, traits: dict[str, Any]) -> Any:
    twin = (TWINS.get(comm_id) or _kernel_widget(comm_id)) if comm_id is not None else None
    if twin is not None and type(twin) is cls:
        return twin  # (the notebook's own object, for one it sent: as after an ordinary cell)
    kernel_comm = RELAYED.get(comm_id) if comm_id is not None else None
    if kernel_comm is None:
        return cls(**traits)
    try:
        return widget_on(kernel_comm, cls, traits)
    except Exception:
        if twin is None:
            raise
        # A class not made from its traits alone (ipywidgets' interactive takes its function):
        # the kernel's widget for the model the page shows becomes one of that class (a subclass
        # of its model's registered class), its attributes set by rebuild, so that its methods
        # work in the kernel (interactive's update runs the function when the page drags).
        _kernel_widget_registered(twin)
        if issubclass(cls, type(twin)):
            try:
                twin.__class__ = cls
            except TypeError:
                pass
        return twin


_INTERNAL = ("_trait_", "_cross_validation_lock", "_model_id", "_property_lock", "_holding_sync",
             "_states_to_send", "_nbisolate")


def own_attributes(widget: Any) -> dict[str, Any]:
    """A widget's attributes beside its traits (``interactive``'s function, a slider's ``_kwarg``,
    a subclass's counter): not traitlets' and ipywidgets' bookkeeping, nor its callbacks
    (:func:`handlers_of`)."""
    from ipywidgets.widgets.widget import CallbackDispatcher

    return {
        name: value
        for name, value in vars(widget).items()
        if not name.startswith(_INTERNAL) and not isinstance(value, CallbackDispatcher)
    }


def _kernel_widget_registered(twin: Any) -> None:
    """Make ``twin`` the kernel's widget for its model again (a failed rebuild may have replaced it)."""
    module = sys.modules.get("ipywidgets.widgets.widget")
    instances = getattr(module, "_instances", None)
    if isinstance(instances, dict):
        instances[twin.model_id] = twin
    twin.comm.on_msg(twin._handle_msg)


def widget_on(comm: Any, cls: type, traits: dict[str, Any]) -> Any:
    """A widget of ``cls`` on ``comm`` with ``traits``, for a model the page has with them all
    already: setting them sends nothing (it would send each one back)."""
    with _silenced(comm):
        return cls(comm=comm, **traits)


@contextlib.contextmanager
def _silenced(comm: Any) -> Iterator[None]:
    comm.publish_msg = _silent  # on the instance, over its class's method, for a moment
    try:
        yield
    finally:
        del comm.publish_msg


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


HANDLERS = "\x00handlers "
"""Starts the name of a result that holds the callbacks the cell registered on a widget, then its
model's id (no variable is named so)."""


def handlers_of(widget: Any) -> dict[str, Any] | None:
    """In the worker: what the cell registered to run on ``widget`` (None: nothing): the functions
    each of its ``CallbackDispatcher`` calls (``on_click``, ``on_msg``...), by attribute, and under
    ``observe`` each trait observer as ``(name, type, handler)``. Not the handlers its class
    declares (``@observe``: the kernel's widget has its own), nor ipywidgets' wiring of the widget
    to itself. Another widget's method (``interact``'s ``update`` on its sliders) travels as that
    widget's, which :func:`rebuild` makes in the kernel."""
    from ipywidgets.widgets.widget import CallbackDispatcher
    from traitlets import EventHandler

    found: dict[str, Any] = {}

    def travels(handler: Any) -> bool:
        if isinstance(handler, EventHandler):
            return False
        if getattr(handler, "__self__", None) is widget:  # ipywidgets' own wiring of it stays
            return not str(getattr(handler, "__module__", "")).startswith("ipywidgets")
        return True

    for where in (vars(widget), getattr(widget, "_trait_values", {})):
        for attr, value in where.items():
            if isinstance(value, CallbackDispatcher):
                mine = [callback for callback in value.callbacks if travels(callback)]
                if mine:
                    found[attr] = mine
    observers = [
        (name, kind, handler)
        for name, kinds in getattr(widget, "_trait_notifiers", {}).items()
        for kind, handlers in kinds.items()
        for handler in handlers
        if travels(handler)
    ]
    if observers:
        found[_OBSERVE] = observers
    return found or None


_OBSERVE = "observe"  # (no CallbackDispatcher is named so: it is a method of every widget)


def take_handlers(name: str, found: dict[str, Any]) -> str | None:
    """In the kernel: register what a cell registered on a widget (``name``: :data:`HANDLERS` and
    its model's id) on the kernel's widget for that model. What could not be taken, else None."""
    model_id = name[len(HANDLERS):]
    widget = TWINS.get(model_id) or _kernel_widget(model_id)
    if widget is None:
        return f"the kernel has no widget for its model {model_id}"
    missing = []
    for attr, callbacks in found.items():
        if attr == _OBSERVE:
            for trait, kind, handler in callbacks:
                if handler not in widget._trait_notifiers.get(trait, {}).get(kind, ()):
                    widget.observe(handler, names=trait, type=kind)
            continue
        dispatcher = getattr(widget, attr, None)
        if not hasattr(dispatcher, "register_callback"):
            missing.append(attr)
            continue
        for callback in callbacks:
            if callback not in dispatcher.callbacks:  # (its class's __init__ ran again here)
                dispatcher.register_callback(callback)
    if missing:
        return f"the kernel's {type(widget).__name__} has no {', '.join(missing)}"
    return None


def describe(name: str, namespace: Mapping[str, Any], why: str) -> tuple[str, str]:
    """What a :data:`HANDLERS` result is, and ``why`` it did not come back, in a person's words:
    the widget by the variable that holds it, where one does (``press._click_handlers[0]``)."""
    model_id = name[len(HANDLERS):]
    widget = TWINS.get(model_id) or _kernel_widget(model_id)
    held = [key for key, value in namespace.items() if widget is not None and value is widget and key[:1] != "_"]
    label = held[0] if held else f"its widget {model_id}"
    kind = f" ({type(widget).__name__})" if widget is not None else ""
    where = held[0] if held else "handlers"
    why = re.sub(r"\['(\w+)'\]", r".\1", why.removeprefix("builtins.dict: ").replace(name, where))
    why = why.split(" Fix: ")[0]  # (the fix for an input: a callback is made again in a normal cell)
    return f"what the cell registered to run on {label}{kind}", why
