"""%pickle_check never runs an object's reconstruction code in the kernel, through a real kernel.

Loading a pickle back runs the object's own code: a ``__reduce__`` that re-runs
a constructor, a ``__setstate__``. A diagnosis must not have the effects of
that code on the notebook: a constructor that opens the user's file for
writing must not truncate it, one that blocks must not hang the kernel past
the check's budget, and the process that did the loading must be gone when
the check answers.
"""

from __future__ import annotations

import time

import psutil

from .conftest import wait_until
from .test_pickle_check_kernel import cell, shown

LOADER_MARK = "_loader_main"


def loaders_of(kernel) -> list[psutil.Process]:
    """The kernel's loader processes, and anything still running that one started."""
    found = []
    for proc in psutil.Process(kernel.pid).children(recursive=True):
        try:
            if LOADER_MARK in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_constructor_that_opens_a_file_for_writing_never_runs_in_the_kernel(kernel, tmp_path):
    data = tmp_path / "results.csv"
    data.write_text("a,b\n1,2\n")
    marker = tmp_path / "constructed.txt"
    kernel.run(
        cell(
            f"""
            CONSTRUCTED = []

            class Writer:
                def __init__(self, path):
                    CONSTRUCTED.append(path)
                    self.fh = open(path, "w")
                    self.fh.write("overwritten")
                    self.fh.flush()
                    with open({str(marker)!r}, "w") as m:
                        m.write("the constructor ran here")

            class Report:
                def __init__(self, path):
                    self.path = path

                def __reduce__(self):
                    return (Writer, (self.path,))

            class Strict:
                def __init__(self, path):
                    open(path, "a").close()
                    raise ValueError("Strict refuses to be rebuilt")

            class Fragile:
                def __reduce__(self):
                    return (Strict, ({str(data)!r},))

            w = Report({str(data)!r})
            f = Fragile()
            """
        )
    )
    kernel.run("checked = %pickle_check w f")
    text = shown(kernel.run("checked"))["text/plain"]
    assert data.read_text() == "a,b\n1,2\n", "the check truncated the user's file"
    assert not marker.exists(), "the constructor wrote a file"
    assert kernel.value("CONSTRUCTED") == [], "the constructor ran in the kernel"
    # the loads really happened elsewhere: %%isolate sends Writer by value, and it rebuilds ...
    verdicts = kernel.value("{k: r.verdict for k, r in checked.reports['w'].results.items()}")
    assert verdicts == {"pickle": "spawn", "dill": "ok", "cloudpickle": "ok"}
    # ... while Strict's constructor raised there, and says so
    assert "Strict refuses to be rebuilt" in text
    assert data.read_text() == "a,b\n1,2\n"
    assert kernel.value("CONSTRUCTED") == []
    assert wait_until(lambda: not loaders_of(kernel), 5), loaders_of(kernel)


def test_a_setstate_that_blocks_keeps_the_budget_and_leaves_no_process(kernel, tmp_path):
    mark = f"nbisolate-loader-test-{time.monotonic_ns()}"
    kernel.run(
        cell(
            f"""
            import subprocess, time

            class Stuck:
                def __init__(self):
                    self.state = 1

                def __setstate__(self, state):
                    subprocess.Popen(["sh", "-c", "sleep 300; echo {mark}"])
                    time.sleep(10**6)

            stuck = Stuck()
            after = [1, 2, 3]
            """
        )
    )
    started = time.monotonic()
    kernel.run("checked = %pickle_check stuck after", timeout=60)
    elapsed = time.monotonic() - started
    text = shown(kernel.run("checked"))["text/plain"]
    # the budget of one variable: 2 x 5 s for the dumps and loads, plus 1 s (namespace.py)
    assert elapsed < 11 + 3, f"%pickle_check took {elapsed:.1f} s"
    assert "did not finish within" in text
    assert "stopped: serializing" not in text  # the loads were bounded, not the whole check
    assert kernel.value("1 + 1") == 2  # the kernel answers
    # the loader was replaced after the kill: the next variable got its verdicts
    after = kernel.value("{k: r.verdict for k, r in checked.reports['after'].results.items()}")
    assert after == {"pickle": "ok", "dill": "ok", "cloudpickle": "ok"}

    def leftovers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if mark in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        return found

    assert wait_until(lambda: not leftovers() and not loaders_of(kernel), 5), (
        leftovers(),
        loaders_of(kernel),
    )
