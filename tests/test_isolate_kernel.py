"""%%isolate through a real kernel: what a front end sees, cell by cell."""

from __future__ import annotations

import textwrap
import threading

import psutil

from .conftest import wait_until


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def test_values_round_trip_and_last_expression_is_out(kernel):
    kernel.run("a = [1, 2, 3]; cfg = {'scale': 2.5, 'name': 'run-7'}")
    res = kernel.run(
        cell(
            """
            %%isolate
            total = sum(a) * cfg['scale']
            label = cfg['name'].upper()
            total + 1
            """
        )
    )
    assert res.result == {"text/plain": "16.0"}
    assert kernel.value("(total, label)") == (15.0, "RUN-7")


def test_every_cell_gets_a_fresh_process_and_nothing_leaks(kernel):
    kernel.run("import os; kernel_pid = os.getpid()")
    first = kernel.run(
        "%%isolate\nimport os, builtins\nbuiltins.leaked = 'yes'\nsecret = 1\npid1 = os.getpid()"
    )
    assert first.ok
    second = kernel.run(
        cell(
            """
            %%isolate --out pid2 seen
            import os, builtins
            pid2 = os.getpid()
            seen = hasattr(builtins, 'leaked')
            """
        )
    )
    assert second.ok
    pid1, pid2, kpid, seen = kernel.value("(pid1, pid2, kernel_pid, seen)")
    assert len({pid1, pid2, kpid}) == 3
    assert seen is False
    # Only the names the cell shipped are visible in the worker.
    kernel.run("unrelated = 123")
    res = kernel.execute("%%isolate\nprint(sorted(n for n in globals() if not n.startswith('__')))")
    assert res.ok and res.stdout.strip() == "[]"


def test_modules_through_aliases_and_inside_objects(kernel):
    """Story 1: a strategy object holding a vendor module as an attribute."""
    kernel.run(
        cell(
            """
            import json as vendor_data, math as m
            class Strategy:
                def __init__(self, data, k):
                    self.data = data
                    self.k = k
                def run(self):
                    return self.data.dumps({'k': self.k})
            strat = Strategy(vendor_data, 3)
            """
        )
    )
    res = kernel.run(
        cell(
            """
            %%isolate
            report = strat.run()
            root = m.sqrt(49)
            same = strat.data is __import__('json')
            """
        )
    )
    assert res.ok
    assert kernel.value("(report, root, same)") == ('{"k": 3}', 7.0, True)


def test_lambda_closure_and_notebook_class_calling_notebook_function(kernel):
    kernel.run(
        cell(
            """
            def score(x):
                return x * 10
            class Model:
                def __init__(self, w):
                    self.w = w
                def predict(self, x):
                    return score(x) + self.w
            def make_adder(n):
                def add(x):
                    return x + n
                return add
            model = Model(1)
            square = lambda v: v * v
            add5 = make_adder(5)
            """
        )
    )
    res = kernel.run(
        cell(
            """
            %%isolate
            out = (model.predict(2), square(4), add5(1), type(model).__name__)
            fresh = Model(7).predict(1)
            """
        )
    )
    assert res.ok
    assert kernel.value("(out, fresh)") == ((21, 16, 6, "Model"), 17)


def test_nested_worker_function_story_3(kernel):
    kernel.run(
        cell(
            """
            def build():
                offset = 100
                def _compute_trace_worker(i):
                    return i + offset
                return _compute_trace_worker
            worker_fn = build()
            """
        )
    )
    res = kernel.run("%%isolate\ntraces = [worker_fn(i) for i in range(3)]")
    assert res.ok
    assert kernel.value("traces") == [100, 101, 102]


def test_sharing_survives_both_ways(kernel):
    kernel.run("shared = [1]; holder = {'x': shared}")
    res = kernel.run(
        cell(
            """
            %%isolate
            inside = holder['x'] is shared
            p = [0]
            q = {'p': p}
            """
        )
    )
    assert res.ok
    assert kernel.value("(inside, q['p'] is p)") == (True, True)


def test_named_inputs_only(kernel):
    kernel.run("n1 = 1; n2 = 2")
    res = kernel.execute("%%isolate n1\nr = n1 + n2")
    assert not res.ok
    assert res.error["ename"] == "NameError"
    assert "n2" in res.error["evalue"]


def test_exception_leaves_namespace_unchanged_and_shows_remote_traceback(kernel):
    kernel.run("untouched = 'before'")
    res = kernel.execute(
        cell(
            """
            %%isolate
            untouched = 'after'
            def inner(v):
                return 1 / v
            inner(0)
            """
        )
    )
    assert not res.ok
    assert res.error["ename"] == "ZeroDivisionError"
    tb = "\n".join(res.error["traceback"])
    assert "line 5" in tb and "inner(0)" in tb  # the cell's own line numbers and source
    assert "line 4" in tb and "return 1 / v" in tb
    assert "nbisolate/runner.py" not in tb
    assert kernel.value("untouched") == "before"


def test_custom_exception_type_is_rebuilt(kernel):
    kernel.run("class Bad(Exception):\n    pass")
    res = kernel.execute("%%isolate\nraise Bad('custom boom')")
    assert res.error["ename"] == "Bad" and res.error["evalue"] == "custom boom"


def test_output_streams_while_the_cell_runs(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import time
            for i in range(4):
                print('step', i, flush=True)
                time.sleep(0.5)
            """
        )
    )
    streams = [t for m, t in zip(res.messages, res.times, strict=True) if m["msg_type"] == "stream"]
    assert res.stdout.split() == ["step", "0", "step", "1", "step", "2", "step", "3"]
    assert streams[0] < res.reply_time - 1.0  # the first line came long before the reply


def test_fd_level_and_subprocess_output_reach_the_cell(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import os, subprocess, sys
            os.write(1, b'from-fd-1\\n')
            subprocess.run(['echo', 'from-child'], check=True)
            subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write("child-err\\\\n")'])
            """
        )
    )
    assert "from-fd-1" in res.stdout and "from-child" in res.stdout
    assert "child-err" in res.stderr


def test_c_library_output_left_in_its_buffer_reaches_the_cell(kernel):
    """printf from C code writes into the C library's buffer, not the pipe: the worker flushes
    it when the cell ends (stdout is a pipe there, so the buffer is not flushed per line)."""
    res = kernel.run(
        "%%isolate\nimport ctypes\nctypes.CDLL(None).printf(b'from C, no newline')\ndone = 1"
    )
    assert "from C, no newline" in res.stdout, res.stdout


def test_timeout_stops_an_endless_loop_and_kernel_keeps_working(kernel):
    kernel.run("guard = 'kept'")
    res = kernel.execute("%%isolate --timeout 1.5\nguard = 'lost'\nwhile True:\n    pass")
    assert res.error["ename"] == "IsolateTimeout"
    assert "--timeout 1.5 s" in res.error["evalue"] and "No notebook variable" in res.error["evalue"]
    assert res.reply_time < 6
    assert kernel.value("guard") == "kept"
    assert kernel.run("%%isolate\nok = 1").ok


def test_timeout_kills_grandchildren(kernel):
    res = kernel.execute(
        cell(
            """
            %%isolate --timeout 2
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)  # nbisolate-test-grandchild'])
            print(child.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    assert res.error["ename"] == "IsolateTimeout"
    pid = int(res.stdout.split()[0])
    assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")


def test_sys_path_and_cwd_follow_into_the_worker(kernel, tmp_path):
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "helper_mod_a.py").write_text("def f():\n    return 'from sys.path'\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "helper_mod_b.py").write_text("def g():\n    return 'from cwd'\n")
    (workdir / "data.txt").write_text("payload")
    kernel.run(
        f"import os, sys\nsys.path.insert(0, {str(libdir)!r})\n_old = os.getcwd()\nos.chdir({str(workdir)!r})"
    )
    try:
        res = kernel.run(
            cell(
                """
                %%isolate
                import helper_mod_a, helper_mod_b
                found = (helper_mod_a.f(), helper_mod_b.g(), open('data.txt').read())
                """
            )
        )
        assert res.ok
        assert kernel.value("found") == ("from sys.path", "from cwd", "payload")
    finally:
        kernel.run("os.chdir(_old); sys.path.remove(sys.path[0])")


def test_unserializable_input_fails_before_any_worker_naming_it(kernel):
    kernel.run("import sqlite3\nclass Store:\n    pass\nstore = Store(); store.db = sqlite3.connect(':memory:')")
    before = {p.pid for p in psutil.Process(kernel.pid).children(recursive=True)}
    res = kernel.execute("%%isolate\nrows = store.db.execute('select 1').fetchall()")
    assert res.error["ename"] == "ShipError"
    assert "'store'" in res.error["evalue"]
    assert "sqlite3.Connection" in res.error["evalue"]
    after = {p.pid for p in psutil.Process(kernel.pid).children(recursive=True)}
    assert after <= before


def test_unreturnable_result_is_skipped_and_named_others_arrive(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import sqlite3
            conn = sqlite3.connect(':memory:')
            answer = conn.execute('select 40 + 2').fetchone()[0]
            """
        )
    )
    assert res.ok
    assert "'conn'" in res.stderr and "sqlite3.Connection" in res.stderr
    assert kernel.value("answer") == 42
    assert kernel.value("'conn' in globals()") is False


def test_out_narrows_results(kernel):
    kernel.run("keep_me = 0; narrow_b = 'old'")
    assert kernel.run("%%isolate --out keep_me\nkeep_me = 1\nnarrow_b = 'new'").ok
    assert kernel.value("(keep_me, narrow_b)") == (1, "old")


def test_unpicklable_last_value_still_displays(kernel):
    res = kernel.run("%%isolate\nimport threading\nthreading.Lock()")
    assert "lock" in res.result["text/plain"]


def test_crashes_are_explained_and_kernel_survives(kernel):
    res = kernel.execute("%%isolate\nimport os\nos._exit(3)")
    assert res.error["ename"] == "WorkerCrashed" and "exit code 3" in res.error["evalue"]
    res = kernel.execute("%%isolate\nimport ctypes\nctypes.string_at(0)")
    assert res.error["ename"] == "WorkerCrashed" and "SIGSEGV" in res.error["evalue"]
    assert kernel.run("%%isolate\n1 + 1").result == {"text/plain": "2"}


def test_usage_errors_are_clear_and_nothing_runs(kernel):
    res = kernel.execute("%%isolate --bogus\nx = 1")
    assert not res.ok and "usage" in res.stderr.lower() and "--bogus" in res.stderr
    res = kernel.execute("%%isolate no_such_var\nx = 1")
    assert not res.ok and "no_such_var" in res.stderr and "nothing ran" in res.stderr
    res = kernel.execute("%%isolate --timeout 0\nx = 1")
    assert not res.ok and "--timeout" in res.stderr
    res = kernel.execute("%%isolate --timeout abc\nx = 1")
    assert not res.ok and "abc" in res.stderr
    res = kernel.execute("%%isolate\nx = 1\ny = (")
    assert not res.ok and res.error["ename"] == "SyntaxError"
    assert "line 3" in "\n".join(res.error["traceback"])  # as the user counts: %%isolate is line 1


def test_interrupt_stops_the_worker_promptly(fresh_kernel):
    k = fresh_kernel
    k.run("import time")
    timer = threading.Timer(1.5, k.interrupt)
    timer.start()
    res = k.execute(
        "%%isolate\nimport os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)", timeout=30
    )
    timer.join()
    assert res.error["ename"] == "KeyboardInterrupt"
    assert res.reply_time < 10
    pid = int(res.stdout.split()[0])
    assert wait_until(lambda: not psutil.pid_exists(pid))
    assert k.run("%%isolate\nafter = 'fine'").ok


def test_python_api_in_the_kernel(kernel):
    res = kernel.run(
        cell(
            """
            import nbisolate
            ns = {'v': 20}
            got = nbisolate.run_isolated('w = v + 1\\nw * 2', ns)
            print(got, ns['w'])
            """
        )
    )
    assert res.stdout.split() == ["42", "21"]


def test_fd_output_written_last_arrives_whole_and_before_the_result(kernel):
    """The worker marks its pipes before the result: nothing is lost, no mark shows."""
    res = kernel.run("%%isolate\nimport os\nos.write(1, b'z' * 300_000 + b'|end\\n')\n'value'")
    assert res.stdout.count("z") == 300_000 and res.stdout.endswith("|end\n")
    assert "nbisolate-sync" not in res.stdout + res.stderr
    kinds = [m["msg_type"] for m in res.messages if m["msg_type"] in ("stream", "execute_result")]
    assert kinds[-1] == "execute_result" and "stream" in kinds
