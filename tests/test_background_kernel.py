"""``%%isolate --bg`` through a real kernel: the cell returns a Job at once, other cells run
meanwhile, and the job's later output arrives with its own cell's parent header."""

from __future__ import annotations

import re
import time
from typing import Any

import psutil
import pytest

from .conftest import wait_until
from .kernel import CellResult, Kernel

JOB = "__import__('nbisolate.background').background"



@pytest.fixture(autouse=True)
def _routing_kernel(kernel: Kernel) -> None:
    """--bg needs ipykernel's per-context parent (set_thread_parent); older kernels refuse it."""
    if not kernel.value("callable(getattr(get_ipython(), 'set_thread_parent', None))"):
        res = kernel.execute("%%isolate --bg\nx = 1")
        assert "--bg needs a kernel that can send output" in res.stderr + res.error_text
        pytest.skip("this ipykernel cannot route output to a finished cell: --bg is refused")

def execute(k: Kernel, code: str, others: list[dict[str, Any]], timeout: float = 60.0) -> CellResult:
    """``Kernel.execute``, keeping every IOPub message of *other* requests in ``others``."""
    return k.execute(code, timeout=timeout, others=others)


def drain(k: Kernel, others: list[dict[str, Any]], seconds: float = 0.5) -> None:
    """Read IOPub for ``seconds`` more (output published after the last request went idle)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            others.append(k.kc.get_iopub_msg(timeout=max(0.05, end - time.monotonic())))
        except Exception:
            break


def value(k: Kernel, expr: str, others: list[dict[str, Any]]) -> Any:
    """``Kernel.value`` through :func:`execute`: a job's output arriving meanwhile is kept."""
    import ast

    return ast.literal_eval(execute(k, f"print(repr({expr}))", others).stdout.strip())


def of(msgs: list[dict[str, Any]], parent: str, msg_type: str | None = None) -> list[dict[str, Any]]:
    return [
        m for m in msgs
        if m["parent_header"].get("msg_id") == parent and (msg_type is None or m["msg_type"] == msg_type)
    ]


def text_of(msgs: list[dict[str, Any]]) -> str:
    parts = []
    for m in msgs:
        c = m["content"]
        if m["msg_type"] == "stream":
            parts.append(c["text"])
        elif m["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            parts.append(c["data"].get("text/plain", ""))
        elif m["msg_type"] == "error":
            parts.append(f"{c['ename']}: {c['evalue']}\n" + "\n".join(c["traceback"]))
    return "".join(parts)


def start_bg(k: Kernel, code: str, others: list[dict[str, Any]]) -> str:
    r = execute(k, code, others)
    assert r.ok, r.error_text
    assert re.match(r"Job \d+ (started in the background|queued)", (r.result or {}).get("text/plain", ""))
    return r.reply["parent_header"]["msg_id"]


def test_bg_cell_runs_on_while_other_cells_run_and_binds_at_the_end(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    r = execute(
        kernel,
        "%%isolate --bg\nimport time\nfor i in range(8):\n    print('tick', i, flush=True)\n"
        "    time.sleep(0.5)\nbg_total = 42\n",
        others,
    )
    assert r.ok, r.error_text
    assert r.reply_time < 10
    bg = r.reply["parent_header"]["msg_id"]
    assert "Job" in r.result["text/plain"]
    panels = [d for d in r.displays if "nbisolate" in (d.get("metadata") or {})]
    seen_during: list[str] = []
    for i in range(3):
        time.sleep(0.4)
        o = execute(kernel, f"ordinary_{i} = sum(range(1000)); print('ordinary', {i})", others)
        assert o.ok and o.stdout == f"ordinary {i}\n"
        assert "tick" not in o.stdout + o.stderr  # the job's text never lands in another cell
        seen_during.append(text_of(of(others, bg, "stream")))
    # The live panel shows under the --bg cell (drawn at its first tick, after the cell returned).
    panels += [
        m["content"] for m in of(others, bg, "display_data")
        if "nbisolate" in (m["content"].get("metadata") or {})
    ]
    assert panels, "the live panel shows under the --bg cell"
    # The three cells ended well before the job (4 s): it is still running.
    assert value(kernel, f"{JOB}.jobs()[-1].state", others) == "running"
    assert "bg_total" not in value(kernel, "list(globals())", others)
    # Its output arrived meanwhile, under its own cell.
    assert "tick 0" in seen_during[-1]
    execute(kernel, "%isolate_wait", others, timeout=60)
    drain(kernel, others)
    assert kernel.value("bg_total") == 42
    mine = of(others, bg)
    streamed = text_of([m for m in mine if m["msg_type"] == "stream"])
    assert [f"tick {i}" in streamed for i in range(8)] == [True] * 8
    assert all("tick" not in m["content"].get("text", "") for m in others
               if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") != bg)
    end = text_of([m for m in mine if m["msg_type"] == "display_data"])
    assert "background job" in end and "done at" in end and "bound time, i, bg_total" in end
    if panels:  # the widget panel's final summary replaces it through its display id
        display_id = panels[0]["metadata"]["nbisolate"]["display_id"]
        updates = [m for m in mine if m["msg_type"] == "update_display_data"
                   and m["content"].get("transient", {}).get("display_id") == display_id]
        assert updates, "the panel's summary was not sent with the job's parent"
        assert "ended at" in updates[-1]["content"]["data"]["text/plain"]


def test_failing_job_binds_nothing_and_shows_its_traceback_under_its_cell(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    bg = start_bg(kernel, "%%isolate --bg\nfail_partial = 1\nraise ValueError('boom in the job')\n",
                  others)
    execute(kernel, "%isolate_wait", others)
    drain(kernel, others)
    assert "fail_partial" not in kernel.value("list(globals())")
    errors = of(others, bg, "error")
    assert errors and errors[0]["content"]["ename"] == "ValueError"
    assert "boom in the job" in text_of(errors)
    assert "failed at" in text_of(of(others, bg, "display_data"))
    assert kernel.value(f"{JOB}.jobs()[-1].state") == "failed"
    r = kernel.execute(f"{JOB}.jobs()[-1].result()")
    assert r.error and r.error["ename"] == "ValueError"


def test_the_notebooks_newer_value_is_kept_and_named(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    kernel.run("clash = 'before'")
    bg = start_bg(kernel, "%%isolate --bg\nimport time\ntime.sleep(1.5)\nclash = 'job'\nquiet = 'job'\n",
                  others)
    execute(kernel, "clash = 'mine'", others)
    execute(kernel, "job = _", others)
    execute(kernel, "%isolate_wait", others)
    drain(kernel, others)
    assert kernel.value("clash") == "mine"
    assert kernel.value("quiet") == "job"
    assert kernel.value("job.kept") == ["clash"]
    assert "quiet" in kernel.value("job.bound") and "clash" not in kernel.value("job.bound")
    assert kernel.value("job.result()['clash']") == "job"
    end = text_of(of(others, bg, "display_data"))
    assert "kept the notebook's newer clash" in end


def test_a_name_the_job_deletes_is_deleted_unless_the_notebook_assigned_it(kernel: Kernel) -> None:
    """``del`` in a --bg cell means what it means in a foreground one, under the same rule
    as its results: a name the notebook assigned while the job ran keeps the newer value."""
    others: list[dict[str, Any]] = []
    kernel.run("scratch = [1]\nreassigned = 'old'\nuntouched = 3")
    bg = start_bg(
        kernel,
        "%%isolate --bg\nimport time\ntotal = len(scratch) + untouched\ntime.sleep(1.5)\n"
        "del scratch, reassigned\n",
        others,
    )
    execute(kernel, "reassigned = 'new'", others)
    execute(kernel, "job = _", others)
    execute(kernel, "%isolate_wait", others)
    drain(kernel, others)
    assert kernel.value("'scratch' in dir()") is False
    assert kernel.value("(reassigned, untouched, total)") == ("new", 3, 4)
    assert kernel.value("(job.deleted, job.kept_deleted)") == (["scratch"], ["reassigned"])
    end = text_of(of(others, bg, "display_data"))
    assert "deleted scratch" in end and "did not delete reassigned" in end


def test_handle_await_wait_and_result(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    start_bg(kernel, "%%isolate --bg\nimport time\ntime.sleep(1.5)\nawaited = [1, 2]\n", others)
    kernel.run("j = _")
    assert kernel.value("j.done()") is False
    r = kernel.execute("j.result()")
    assert r.error and "still running" in r.error["evalue"] and "%isolate_wait" in r.error["evalue"]
    assert kernel.value("j.wait(0.1)") is False
    assert kernel.value("(await j)['awaited']") == [1, 2]
    assert kernel.value("j.wait(5)") is True
    assert kernel.value("awaited") == [1, 2]


def test_stop_kills_the_worker_and_binds_nothing(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    bg = start_bg(kernel, "%%isolate --bg\nimport os, time\nstopped_x = 1\nprint(os.getpid(), flush=True)\n"
                  "time.sleep(60)\n", others)
    kernel.run("sj = _")
    assert wait_until(lambda: kernel.value("sj.where()[1]") != "", 20)
    pid = int(kernel.value("sj.where()[1]"))
    table = kernel.run("%isolate_jobs").result["text/plain"]
    assert str(pid) in table and "running" in table
    execute(kernel, "%isolate_stop " + kernel.value("str(sj.id)"), others)
    assert "True" in execute(kernel, "print(sj.wait(20))", others).stdout
    assert kernel.value("sj.state") == "stopped"
    assert "stopped_x" not in kernel.value("list(globals())")
    assert wait_until(lambda: not psutil.pid_exists(pid), 10)
    drain(kernel, others)
    assert "stopped at" in text_of(of(others, bg, "display_data"))
    r = kernel.execute("%isolate_stop 999")
    assert "no background job '999'" in r.stderr and "%isolate_stop ID|all" in r.stderr


def test_limit_queues_jobs_beyond_it(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    kernel.run("%isolate_config bg_limit=1")
    try:
        start_bg(kernel, "%%isolate --bg\nimport time\ntime.sleep(1.5)\nfirst_q = 1\n", others)
        kernel.run("q1 = _")
        start_bg(kernel, "%%isolate --bg\nsecond_q = 2\n", others)
        kernel.run("q2 = _")
        assert kernel.value("q2.state") == "queued"
        table = kernel.run("%isolate_jobs").result["text/plain"]
        assert "queued" in table and "running" in table
        execute(kernel, "%isolate_wait", others)
        assert kernel.value("(first_q, second_q)") == (1, 2)
        assert kernel.value("q2.started >= q1.ended") is True
        assert "bg_limit=1" in kernel.run("%isolate_config").stdout
        r = kernel.execute("%isolate_config bg_limit=0")
        assert "UsageError" in r.stderr and "bg_limit='0'" in r.stderr
    finally:
        kernel.run("%isolate_config bg_limit=4")


def test_background_sweep(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    start_bg(kernel, "%%isolate --bg --over v=[1, 2, 3]\nsq = v * v\n", others)
    execute(kernel, "%isolate_wait", others)
    assert kernel.value("sq") == [1, 4, 9]


def test_wait_is_interruptible_and_the_job_runs_on(fresh_kernel: Kernel) -> None:
    k = fresh_kernel
    others: list[dict[str, Any]] = []
    start_bg(k, "%%isolate --bg\nimport time\ntime.sleep(60)\n", others)
    k.run("lj = _")
    msg_id = k.kc.execute("%isolate_wait")
    time.sleep(1.5)
    k.interrupt()
    reply = k.kc.get_shell_msg(timeout=20)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = k.kc.get_shell_msg(timeout=20)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert "keep running" in reply["content"]["evalue"]
    assert k.value("lj.state") == "running"
    k.run("%isolate_stop all")
    assert k.value("lj.wait(20)") is True


@pytest.mark.parametrize("how", ["restart", "shutdown"])
def test_restart_or_shutdown_leaves_no_worker(how: str) -> None:
    k = Kernel()
    pid = None
    try:
        k.run("%load_ext nbisolate")
        others: list[dict[str, Any]] = []
        start_bg(k, "%%isolate --bg\nimport time\ntime.sleep(120)\n", others)
        k.run("rj = _")
        assert wait_until(lambda: k.value("rj.where()[1]") != "", 20)
        pid = int(k.value("rj.where()[1]"))
        if how == "restart":
            k.km.restart_kernel(now=False)
            k.kc.wait_for_ready(timeout=60)
    finally:
        k.shutdown()
    assert pid is not None
    assert wait_until(lambda: not psutil.pid_exists(pid), 15), f"worker {pid} outlived the kernel"


def test_status_comm_lists_jobs_apart_and_stops_one(kernel: Kernel) -> None:
    from .test_labcomm_kernel import StatusClient

    client = StatusClient(kernel)
    client.open()
    msg_id = kernel.kc.execute("%%isolate --bg\nimport time\ntime.sleep(60)\nlab_never = 1\n")
    seen = client.wait(lambda d: any(j["cell"]["msg_id"] == msg_id and j["state"] == "running"
                                     for j in d.get("jobs", []))
                       and any(w.get("job") is not None and w["cell"]["msg_id"] == msg_id
                               for w in d["workers"]), 30)
    job = next(j for j in seen["jobs"] if j["cell"]["msg_id"] == msg_id)
    worker = next(w for w in seen["workers"] if w.get("job") == job["id"])
    assert worker["pid"] and job["label"] == "import time"
    client.send({"action": "stop_job", "job": job["id"]})
    ended = client.wait(lambda d: any(j["id"] == job["id"] and j["state"] == "stopped"
                                      for j in d.get("jobs", [])), 30)
    assert not any(w.get("job") == job["id"] for w in ended["workers"]) or client.wait(
        lambda d: not any(w.get("job") == job["id"] for w in d["workers"]), 15)
    assert "lab_never" not in kernel.value("list(globals())")
    client.close()


def test_a_new_view_gets_the_jobs_output_so_far(kernel: Kernel) -> None:
    """A page that reloads while a job runs asks for its output (nbisolate.labcomm)."""
    from .test_labcomm_kernel import StatusClient

    others: list[dict[str, Any]] = []
    start_bg(kernel, "%%isolate --bg\nimport time\nfrom IPython.display import display, HTML\n"
             "print('kept 1', flush=True)\ndisplay(HTML('<b>shown</b>'))\n"
             "print('kept 2', flush=True)\ntime.sleep(60)\n", others)
    kernel.run("rp = _")
    assert wait_until(lambda: "kept 2" in kernel.value("repr(rp.outputs)"), 30)
    client = StatusClient(kernel)
    client.open()
    job_id = kernel.value("rp.id")
    client.send({"action": "replay_job", "job": job_id})
    replay = client.wait(lambda d: "replay" in d)["replay"]
    outputs = [item["output"] for item in replay["outputs"]]
    assert replay["job"] == job_id
    assert outputs[0]["output_type"] == "execute_result" and "started" in outputs[0]["data"]["text/plain"]
    streamed = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "kept 1" in streamed and "kept 2" in streamed
    assert any("<b>shown</b>" in o.get("data", {}).get("text/html", "") for o in outputs)
    kernel.run("rp.stop()")
    assert kernel.value("rp.wait(20)") is True
    client.close()


def test_isolated_cell_runs_beside_a_job_each_output_in_its_own_cell(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    bg = start_bg(kernel, "%%isolate --bg\nimport time\nfor i in range(6):\n"
                  "    print('job line', i, flush=True)\n    time.sleep(0.4)\nside = 'job'\n", others)
    fg = execute(kernel, "%%isolate\nimport time\nfor i in range(5):\n"
                 "    print('cell line', i, flush=True)\n    time.sleep(0.4)\nfront = 'cell'\n", others)
    assert fg.ok, fg.error_text
    assert "job line" not in fg.stdout and fg.stdout.count("cell line") == 5
    # While the isolated cell awaited its worker, the job's output went to the job's cell.
    during = text_of(of(others, bg, "stream"))
    assert "job line 1" in during
    execute(kernel, "%isolate_wait", others)
    assert kernel.value("(side, front)") == ("job", "cell")
    # A function made by a background sweep lives in the notebook's globals, as any other.
    start_bg(kernel, "%%isolate --bg --over k=[2, 3]\ndef scale(x):\n    return x * k * factor\n",
             others)
    execute(kernel, "%isolate_wait", others)
    assert kernel.value("all(f.__globals__ is globals() for f in scale)") is True
    kernel.run("factor = 10")
    assert kernel.value("scale[0](1)") == 10 * kernel.value("k")


def test_background_sweep_with_a_failing_value_binds_what_arrived(kernel: Kernel) -> None:
    others: list[dict[str, Any]] = []
    bg = start_bg(kernel, "%%isolate --bg --over d=[1, 0, 2]\ninv = 1 / d\n", others)
    execute(kernel, "%isolate_wait", others)
    drain(kernel, others)
    assert kernel.value("inv") == [1.0, None, 0.5]  # as a foreground sweep binds it
    assert kernel.value(f"{JOB}.jobs()[-1].state") == "failed"
    shown = text_of(of(others, bg))
    assert "SweepError" in shown and "d=0" in shown and "bound what arrived: inv" in shown


NO_KERNEL = r"""
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "nbisolate")
shell.run_cell_magic("isolate", "--bg", "never = 1")
"""


def test_bg_without_a_kernel_is_refused_before_anything_runs(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-c", NO_KERNEL], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, check=False,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin",
             "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "UsageError" in proc.stderr and "--bg runs the cell in the background" in proc.stderr
    assert "Run the cell without --bg" in proc.stderr
    assert "isolated cell starting" not in proc.stderr  # no panel, nothing planned


def test_a_jobs_worker_that_outlives_its_result_is_still_named_the_jobs(fresh_kernel: Kernel) -> None:
    """A worker exits once the kernel lets it go, after its result; a job's worker, still
    listed then, lost its job (the job had let its run go) and was sent as a foreground
    cell's: a page that reloaded meanwhile marked the job's cell running ([*]), for good."""
    from .test_labcomm_kernel import StatusClient

    k = fresh_kernel
    # Workers wait for the kernel's word as long as a cell runs (and at most 30 s).
    k.run("import nbisolate.supervisor as _sup\n_sup.LINGER_SECONDS = 30.0")
    client = StatusClient(k)
    client.open()
    bg = k.kc.execute("%%isolate --bg\nimport time\ntime.sleep(0.5)\nbg_done = 1")
    others: list[dict[str, Any]] = []
    res = execute(k, "%%isolate --quiet\nimport time\ntime.sleep(4)", others)  # the job ends meanwhile
    client.drain(0.5)
    seen = [m["content"]["data"] for m in [*res.messages, *others]
            if m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == client.comm_id] + client.seen
    ended = [d for d in seen if any(j["cell"]["msg_id"] == bg and j["state"] == "done" for j in d.get("jobs", []))]
    # The job is over while its worker, waiting for the kernel's word, is still listed.
    assert any(w["pid"] for d in ended for w in d["workers"]), seen
    for data in seen:
        for worker in data["workers"]:
            if (worker.get("cell") or {}).get("msg_id") == bg:
                assert worker.get("job") is not None, data
    assert k.value("bg_done") == 1
    client.close()


def test_a_worker_that_outlives_its_cell_no_longer_names_the_cell(fresh_kernel: Kernel) -> None:
    """The same for a cell in the foreground: once the cell is over, a worker still listed
    (waiting for the kernel's word while a job runs) no longer names it, so another view of
    the notebook does not take it for a cell still running."""
    from .test_labcomm_kernel import StatusClient

    k = fresh_kernel
    k.run("import nbisolate.supervisor as _sup\n_sup.LINGER_SECONDS = 30.0")
    client = StatusClient(k)
    client.open()
    others: list[dict[str, Any]] = []
    execute(k, "%%isolate --bg\nimport time\ntime.sleep(5)", others)  # a cell running: no worker goes
    res = execute(k, "%%isolate --quiet\nimport os\nfg_pid = os.getpid()", others)
    fg = res.reply["parent_header"]["msg_id"]
    pid = k.value("fg_pid")
    client.send({"action": "refresh"})
    listed = client.wait(lambda d: any(w["pid"] == pid for w in d["workers"]), 10)
    row = next(w for w in listed["workers"] if w["pid"] == pid)
    assert (row.get("cell") or {}).get("msg_id") != fg, listed
    client.close()


def test_input_in_a_background_cell_says_nothing_waits_to_answer(kernel):
    """A foreground cell's input() asks the front end; a background cell's has no one to ask."""
    kernel.run("%%isolate --bg\nimport getpass\ntry:\n    input('x? ')\nexcept EOFError as e:\n    why = str(e)")
    assert wait_until(lambda: kernel.value("'why' in dir()"), 20)
    assert "input() has no one to ask in a background cell" in kernel.value("why")
    assert "normal cell" in kernel.value("why")
