"""``%pickle_check``: can this object cross a process boundary, and if not, which member can't?

A pickling error names a type and never a place: ``TypeError: cannot pickle
'_io.BufferedReader' object`` says nothing about which of a thousand
attributes holds the file. Worse, some objects pickle fine in the kernel and
only fail in the child: functions and classes defined in the notebook are
stored as a reference to ``__main__``, which a freshly spawned interpreter
does not have. This package answers three questions, side by side for the
serializers a notebook user actually meets:

* does it work? (``pickle``: multiprocessing, concurrent.futures, PyTorch
  DataLoader workers; ``dill``: ``%%isolate`` itself, with
  :mod:`nbisolate.ship`'s own picklers -- C pickler, dill for what must go by
  value, dill for everything when that fails; ``cloudpickle``: loky, joblib,
  Dask, Ray) -- judged by really dumping *and* loading, so there are no false
  verdicts;
* where is every culprit? -- the access path from the root
  (``model.loader.dataset._fh``), the culprit's type, a category;
* what to do about it? -- a fix worded for someone in the middle of a
  notebook.

How it works, and why this way:

1. **Fast path.** Each serializer dumps the object once with protocol 5 into
   a sink that only counts bytes, with a ``buffer_callback`` that keeps large
   buffers (numpy arrays, pandas blocks) out of band. Sizing a 1 GB array
   therefore copies nothing. The result is loaded back in-process (with the
   out-of-band buffers, again without copying) because some objects pickle
   fine and fail to load. Most objects are done here, at C speed.
2. **Slow path, only on failure.** A tracing subclass of the serializer's
   pure-Python pickler re-runs the same reduction that failed, keeps the stack
   of objects being saved, and when a ``save`` raises it records the deepest
   failing object, writes a placeholder and carries on with the siblings. So
   every distinct culprit is found in one walk, exactly along the graph that
   pickling follows (``__reduce_ex__``/``__getstate__`` results, ``__dict__``
   and ``__slots__``, dict keys and values, sequence items, function globals
   and closures) -- not along ``dir()``, which reports members pickling never
   touches. Cycles and shared objects are handled by the pickler's own memo
   plus a table of already failed objects; time and depth are bounded and the
   report says when it stopped early.
3. **The spawn trap.** A stdlib pickle that refers to ``__main__`` (or to a
   module a fresh interpreter can't import) loads in the kernel and fails in
   a spawned child. A cheap scan of the pickled bytes tells when to look; the
   tracer then finds which member is stored that way. ``%%isolate`` sends
   notebook functions and classes by value, but a notebook Enum or TypeVar
   still goes by name (:func:`nbisolate.travel.route` says which): the
   ``%%isolate`` column flags those too. When static reasoning
   is not conclusive, ``verify_spawn`` (see :func:`nbisolate.probe.spawn_loads`)
   asks a fresh interpreter -- injected, so this module never starts a process.

Everything here is plain functions and data: no processes, no IPython.

The package, by seam: :mod:`.report` (result types), :mod:`.serializers`
(the serializers judged, ``%%isolate``'s taken from :mod:`nbisolate.ship`),
:mod:`.check` (fast path and merging, :func:`pickle_check`),
:mod:`.tracing` (the culprit-finding picklers), :mod:`.paths` (access paths),
:mod:`.spawn` (what a fresh interpreter can import), :mod:`.categories`
(what a failure is and its fix), :mod:`.render` (text and HTML) and
:mod:`.namespace` (:func:`check_namespace`). Only the names below are public.
"""

from __future__ import annotations

from .check import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_PROBLEMS,
    DEFAULT_MAX_SECONDS,
    LARGE_BYTES,
    pickle_check,
)
from .namespace import check_namespace
from .report import NamespaceReport, Problem, Report, SerializerResult, UnknownNameError
from .serializers import PROTOCOL, available_serializers

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_PROBLEMS",
    "DEFAULT_MAX_SECONDS",
    "LARGE_BYTES",
    "PROTOCOL",
    "NamespaceReport",
    "Problem",
    "Report",
    "SerializerResult",
    "UnknownNameError",
    "available_serializers",
    "check_namespace",
    "pickle_check",
]
