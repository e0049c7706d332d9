"""What the kernel and a worker say to each other: the one vocabulary of the channel.

:mod:`nbisolate.wire` moves frames (bytes, buffers, descriptors); this module
says what a frame *means*: the message kinds, who sends each, the shape of
their bodies, and the few constants both sides must agree on.  Both sides
import it, so it imports only the standard library: nothing of IPython, the
widgets, the magics or the runner may reach a worker through here, and nothing
of the worker may reach the kernel.

Messages stay plain ``(kind, body)`` pairs on the wire; the ``TypedDict``
classes below describe the dicts, they are not new types, so any consumer that
reads ``body["names"]`` keeps working.  Every ``error`` body is built by
:func:`error_body`, so the worker's cell errors, its own setup failures and
the supervisor's receive failures all carry the same keys.
"""

from __future__ import annotations

from typing import Any, TypedDict

# -- message kinds --------------------------------------------------------------------
MSG_RUN = "run"
MSG_STREAM = "stream"
MSG_PHASE = "phase"
MSG_DISPLAY = "display"
MSG_COMM = "comm"
MSG_UPDATE_DISPLAY = "update_display"
MSG_CLEAR_OUTPUT = "clear_output"
MSG_ERROR_OUTPUT = "error_output"
MSG_SYSEXIT = "sysexit"
MSG_RESULT = "result"
MSG_ERROR = "error"
MSG_PLACE = "place"
MSG_INPUTS = "inputs"
MSG_VALUES = "values"
MSG_ASK = "ask"

KINDS: dict[str, str] = {
    MSG_RUN: "kernel -> worker, once, first: the job (RunPayload) and the inputs' buffers",
    MSG_STREAM: "worker -> kernel: (name, text), stdout or stderr text as the cell writes it",
    MSG_PHASE: "worker -> kernel: (name, seconds), a phase ended (start, load, run)",
    MSG_DISPLAY: "worker -> kernel: a display_data bundle (data, metadata, transient)",
    MSG_COMM: "worker -> kernel: a widget's comm message (msg_type, comm_id, data, metadata, "
    "target_name) with its buffers; the kernel sends it on from a comm of the same id",
    MSG_UPDATE_DISPLAY: "worker -> kernel: an update of an earlier display by its display id",
    MSG_CLEAR_OUTPUT: "worker -> kernel: {wait}, clear the cell's output",
    MSG_ERROR_OUTPUT: "worker -> kernel: {ename, evalue, traceback}, an exception the cell's code "
    "showed and went on (one raised inside ``with out:``), shown as IPython shows one: an error "
    "output, where the cell's output goes then; not the cell's error",
    MSG_SYSEXIT: "worker -> kernel: SysExitBody, the cell called sys.exit()",
    MSG_RESULT: "worker -> kernel, last: ResultBody with the results' buffers or, when they add "
    "up to 1 MB, pull={spans} instead: the kernel copies them out of the waiting worker "
    "(ship.pull) and answers with one raw byte, ship.PULL_TAKEN, or ship.PULL_RESEND, after "
    "which the worker sends the message again with its buffers",
    MSG_ERROR: "worker (or the supervisor, stage 'receive') -> kernel, last: ErrorBody",
    MSG_PLACE: "worker -> kernel, right after a run with lend={sizes}: {spans}, fresh memory of the "
    "worker's for each lent input buffer; the kernel copies the buffers in (ship.place) and "
    "answers with inputs",
    MSG_INPUTS: "kernel -> worker, the answer to place: {placed: True} when the buffers are in the "
    "worker's memory, else {placed: False} with the buffers themselves",
    MSG_ASK: "worker -> kernel: {prompt, password}, the cell called input() or getpass() (or read "
    "sys.stdin); the kernel asks the front end, as an ordinary cell would, and answers with "
    "ask_reply() on the channel (only a job with waited=True asks: a cell the kernel waits on)",
    MSG_VALUES: "a sweep's leader -> kernel: a batch of its children's messages, a list of "
    "(index, kind, body, number of buffers) with every buffer after it in order; kind is a "
    "worker kind (phases are left out) or started (body: pid), dropped or exit (bodies as the "
    "events'); a child's result/error goes without its pull, and its exit only when no outcome came",
}
"""Every kind a worker's channel carries, with its sender and its body."""

CHANNEL_ONLY = frozenset({MSG_RUN, MSG_PLACE, MSG_INPUTS})
"""Kinds that set a run up between the supervisor and its worker; they never become events."""

TEMPLATE_KINDS: dict[str, str] = {
    "fork": "kernel -> template: {id, env, fresh, cwd, ahead} with fds [channel, stdout, stderr]; "
    "env only when it changed since the last fork; ahead: a sweep's worker; forked directly "
    "(the spare is the kernel's, for the next cell)",
    "spare": "template -> kernel: {pid, env} with fds [the spare's socket]: a worker forked ahead, "
    "which has run nothing; env: the template's environment changed since it started",
    "job": "kernel -> an offered spare: {id: None, fresh: False} with fds [channel, stdout, "
    "stderr]; sent as the offer arrives: the spare then waits on its channel for its cell",
    "taken": "kernel -> template: {pid}: the spare took a cell (told once the cell is over or ran a "
    "moment), or was found gone; fork the next one",
    "forked": "template -> kernel: {id, pid, fresh, threads}: the request's id and the new worker; "
    "also written on the worker's channel, ahead of anything the worker sends there",
    "preload": "kernel -> template: {names, sys_path}, modules to import once for every fork",
    "preloaded": "template -> kernel: {errors: {name: error or None}, threads: package or None}",
    "ping": "kernel -> template: are you there",
    "pong": "template -> kernel: its pid",
    "exit": "template -> kernel: (pid, returncode) of a worker it reaped",
}
"""Every kind of the template's control socket (see :mod:`nbisolate.template`)."""

# -- constants both sides agree on ------------------------------------------------------
RESULT = "\x00result"
"""The reserved shipment name of the value of the cell's last expression."""

STAGES = ("setup", "run", "return", "receive")
"""Where an error that is not the cell's own happened: loading inputs (``setup``),
running the cell (``run``), sending results back (``return``), or the kernel
receiving a message it could not read (``receive``)."""


LET_GO = b"G"
"""The one raw byte the kernel sends a worker whose outcome it took, once the cell is over there.

A worker that asked to linger (``linger`` in its job) waits for it before it
exits.  Exiting is work for the machine (a forked process's memory is torn
down, its parent reaps it and tells the kernel), and done the moment the
outcome is sent it competes with the kernel binding the results, showing the
summary and replying: on two cores a trivial cell's reply came a millisecond
or more later.  Answers of the kernel are single raw bytes, like
``ship.PULL_TAKEN``; several may arrive in one read."""


ASK_REPLY = b"A"
"""Starts the kernel's answer to an ``ask``: then 4 bytes of length (big-endian) and the answer,
``=`` and the text typed, or ``!`` and what the kernel raised (``StdinNotImplementedError:
...`` where the front end takes no input).  Among the single-byte answers on the same channel."""


def ask_reply(ok: bool, text: str) -> bytes:
    """The bytes of the kernel's answer to an ``ask`` (see :data:`ASK_REPLY`)."""
    payload = (b"=" if ok else b"!") + text.encode("utf-8", "surrogatepass")
    return ASK_REPLY + len(payload).to_bytes(4, "big") + payload


def read_answers(data: bytes, put_byte: Any, put_reply: Any) -> bytes:
    """Split what the kernel wrote on the channel into single-byte answers and ask replies.

    ``data`` is what is left from before plus what was just read; each whole
    answer goes to ``put_byte(byte)`` or ``put_reply(ok, text)``; returns the
    tail that is the start of a reply, to be read on with the next bytes.
    """
    i, n = 0, len(data)
    while i < n:
        if data[i : i + 1] != ASK_REPLY:
            put_byte(data[i : i + 1])
            i += 1
            continue
        if n - i < 5:
            break
        size = int.from_bytes(data[i + 1 : i + 5], "big")
        if n - i - 5 < size:
            break
        payload = data[i + 5 : i + 5 + size]
        put_reply(payload[:1] == b"=", payload[1:].decode("utf-8", "surrogatepass"))
        i += 5 + size
    return data[i:]


def sync_mark(token: str) -> bytes:
    """The bytes a worker writes to its stdout and stderr pipes right before its outcome.

    A pipe keeps order, so once the kernel has read the mark on a pipe it has
    read everything the worker wrote there before: it hands the outcome over
    at once instead of waiting a while for stragglers.  ``token`` is the job's
    random ``sync`` value, so no output of the cell can forge it.
    """
    return b"\x1b[nbisolate-sync " + token.encode("ascii") + b"]"


# -- typed bodies ---------------------------------------------------------------------------
class _RunRequired(TypedDict):
    source: str
    filename: str
    inputs: list[str]
    data: bytes
    engine: str
    outputs: list[str]
    has_result: bool
    sys_path: list[str]
    cwd: str


class RunPayload(_RunRequired, total=False):
    """The body of ``run``: one cell and its inputs, built by the kernel.

    ``inputs``/``data``/``engine`` are the shipment (its buffers travel beside
    the body); ``outputs`` are the names to send back; ``display_source`` and
    ``line_offset`` make tracebacks show the lines the user sees; ``mem`` and
    ``max_result`` are limits in bytes (None: none); ``kernel_pid`` is the
    process the worker's watchdog follows; ``sync`` is the token of
    :func:`sync_mark`, added by the supervisor; ``startup`` are modules to
    import before the inputs load; ``spent`` is the part of ``--timeout`` the
    kernel already used (serializing the inputs), which the supervisor's
    deadline counts; ``shared`` (``inputs``, ``data``, ``engine``, ``buffers``:
    how many of the buffers are its own) is a shipment serialized once for
    every run of a sweep, loaded before the run's own; ``watch`` are inputs
    to compare before and after the cell (:mod:`nbisolate.inplace`) and
    ``deletes`` the names the cell may ``del``; ``discover`` asks for the
    names the cell binds at run time too (no ``--out``); ``settings_back`` for
    what the cell changes of the settings, the environment, the working
    directory and ``sys.path`` (:func:`nbisolate.settings.left_by_cell`);
    ``attributes`` the attributes the cell sets (``config.LR``, as chains), to
    send back those it set on modules, classes and functions, and ``patches``
    what cells set on the notebook's modules before, as (module, qualified
    name, attribute, value serialized or None, engine), set on the worker's
    (:mod:`nbisolate.attributes`); ``argv`` the kernel's
    ``sys.argv``; ``rng`` the kernel's global random states
    (:mod:`nbisolate.rng`); ``lend`` (``sizes``) says the
    inputs' large buffers did not come with the message: the worker makes
    room for them and asks the kernel to copy them in (``place``).  ``sweep``
    makes the worker a sweep's leader (:mod:`nbisolate.sweep_leader`):
    ``values`` (one ``(inputs, data, engine, buffers)`` shipment per value, its
    buffers after the shared ones), ``order`` (the values to run),
    ``concurrency``, ``timeout`` and ``max_output`` (per value) and
    ``preload`` (modules to import once).  ``env`` is the kernel's environment,
    for a spare that was handed its channel before the cell, when the spare's
    environment is not the kernel's (set before anything of the cell runs).
    ``linger`` (seconds): once its outcome is sent, the worker waits at most
    this long for :data:`LET_GO` before it exits.  ``cell_label`` names the
    cell in tracebacks (``Cell In[5]``), and ``cell_labels`` the notebook cells
    whose functions and classes came by value, by file name.  ``waited``: the
    kernel waits on this cell (not a background job's, not a sweep's), so
    ``input()`` asks the front end through the kernel (``ask``) and the cell's
    widgets are shown as the kernel's own (``comm``).
    """

    display_source: str
    line_offset: int
    mem: int | None
    max_result: int | None
    kernel_pid: int | None
    sync: str
    startup: list[str]
    spent: float
    shared: dict[str, Any] | None
    watch: list[str]
    deletes: list[str]
    discover: bool
    settings_back: bool
    attributes: list[list[str]]
    patches: list[tuple[str, str, str, bytes | None, str]]
    argv: list[str]
    rng: dict[str, Any] | None
    lend: dict[str, list[int]]
    sweep: dict[str, Any] | None
    env: dict[str, str]
    linger: float
    cell_label: str
    cell_labels: dict[str, str]
    waited: bool


class _ResultRequired(TypedDict):
    marked: dict[str, bool]
    names: list[str]
    data: bytes
    engine: str
    sizes: dict[str, int]
    starts: list[tuple[int, int]]
    skipped: dict[str, str]
    left: dict[str, str]
    mutated: list[str]
    unchanged: list[str]
    deleted: list[str]
    rng: dict[str, Any] | None
    settings: dict[str, Any] | None
    result_bundle: dict[str, Any] | None
    dump_seconds: float


class ResultBody(_ResultRequired, total=False):
    """The body of ``result``: the names the cell bound (and ``RESULT``), serialized.

    ``starts`` where each name's pickle starts (its offset, its first buffer:
    one that cannot be rebuilt does not stop the rest); ``marked`` says on
    which pipes the sync mark went out; ``skipped`` maps a name that could not
    travel to why; ``left`` a name bound to a pool, executor,
    process or thread of the worker (it ended with it) to what it was;
    ``mutated`` the inputs the cell changed in place (see :mod:`nbisolate.inplace`),
    ``unchanged`` those it left as they were (not sent back: the notebook keeps its own);
    ``deleted`` the names the cell deleted (``del tmp``), to delete in the notebook too;
    among ``names``, ``deleted`` and ``mutated``, those that begin with
    :data:`nbisolate.attributes.PREFIX` are attributes the cell set, deleted or
    changed in place on a module, class or function, to set on the notebook's own;
    those that begin with :data:`nbisolate.widgetrelay.HANDLERS` are what the
    cell registered on a widget the kernel shows, to register on the kernel's;
    ``kept`` (a cell the kernel waits on) the inputs the cell left as they were,
    in order, whose objects the results refer to as the notebook's own
    (``shared`` in :func:`nbisolate.ship.loads`: ``y = data`` is ``data``);
    ``rng`` the worker's global random states after the cell; ``settings`` what
    the cell changed of the settings, the environment, the working directory
    and ``sys.path``, when the run asked (``settings_back``);
    ``result_bundle`` is the display bundle of a last value that could not
    travel itself. Only sometimes: ``pull`` (large results: where the buffers
    are in the worker, for :func:`nbisolate.ship.pull`) and ``transfer``
    (added by the kernel: the copy's seconds, faults and bytes).
    """

    pull: dict[str, Any]
    transfer: dict[str, Any]
    kept: list[str]


class _ErrorRequired(TypedDict):
    type: str
    message: str
    traceback: str
    names: list[str]
    data: bytes
    engine: str


class ErrorBody(_ErrorRequired, total=False):
    """The body of ``error``: what was raised, where, and the exception itself if it travels.

    ``type`` is the qualified name of the exception type; ``names``/``data``/
    ``engine`` are a shipment holding it as ``"exc"`` (empty when it cannot be
    sent); ``stage`` is absent for the cell's own exception and one of
    :data:`STAGES` otherwise; ``seconds`` is how long the cell ran and
    ``marked`` as in :class:`ResultBody`.
    """

    stage: str
    seconds: float
    marked: dict[str, bool]


class _SysExitRequired(TypedDict):
    code: str
    status: int


class SysExitBody(_SysExitRequired, total=False):
    """The body of ``sysexit``: the argument of ``sys.exit`` (its repr), the worker's exit
    status and, when there was an argument, ``arg``: itself if None, an int or a str, else
    its repr again."""

    arg: Any


StreamBody = tuple[str, str]
"""The body of ``stream``: ``("stdout" | "stderr", text)`` (a pair, not a dict, on the wire)."""


def qualified_name(cls: type) -> str:
    """``module.QualName`` of an exception type, as ``ErrorBody["type"]`` holds it."""
    return f"{cls.__module__}.{cls.__qualname__}"


CHANNEL_LOST = 75
"""The worker's exit code when its channel broke before it could send its outcome
(the cell closed descriptors it did not open, e.g. ``os.closerange(3, 1024)``)."""


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a description of it when its ``__str__`` itself raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() of the {type(exc).__name__} failed: {type(inner).__name__}: {inner}>"


def error_body(
    exc: BaseException | str,
    message: str | None = None,
    traceback: str = "",
    stage: str | None = None,
    *,
    names: list[str] | None = None,
    data: bytes = b"",
    engine: str = "pickle",
    seconds: float | None = None,
    marked: dict[str, bool] | None = None,
) -> ErrorBody:
    """The one way to build an ``error`` body.

    ``exc`` is the exception (its type and ``str`` fill ``type`` and
    ``message``) or, when there is none at hand, the qualified type name with
    ``message`` given.  ``names``/``data``/``engine`` are the shipment of the
    exception when it was serialized (``ship.dumps({"exc": exc})``), else the
    empty shipment.  Optional keys left as None are left out of the body, so
    a cell's own error has no ``stage``, as consumers expect.
    """
    if isinstance(exc, BaseException):
        type_name = qualified_name(type(exc))
        text = safe_str(exc) if message is None else message
    else:
        type_name = exc
        text = "" if message is None else message
    body: ErrorBody = {
        "type": type_name,
        "message": text,
        "traceback": traceback,
        "names": [] if names is None else names,
        "data": data,
        "engine": engine,
    }
    if stage is not None:
        body["stage"] = stage
    if seconds is not None:
        body["seconds"] = seconds
    if marked is not None:
        body["marked"] = marked
    return body
