"""What the front end shows says things once, about the user's code, and truly.

%pickle_check never walks into the kernel's own objects; the output of processes an
interrupted cell started is labelled as theirs; a large array says its buffers are
copied directly, as they are.
"""

from __future__ import annotations

import threading
import time

from .conftest import wait_until


def test_pickle_check_stops_at_the_kernels_own_objects(kernel):
    kernel.run("import sys\nclass Holder:\n    pass\nholder = Holder()\nholder.err = sys.stderr")
    res = kernel.run("from nbisolate.diagnose import check_namespace\nprint(check_namespace({'holder': holder}))")
    assert "holder.err" in res.stdout and "part of the Jupyter kernel" in res.stdout
    assert ".session" not in res.stdout and "_hmac" not in res.stdout  # not walked into


def test_output_of_an_interrupted_subprocess_is_labelled_as_its_own(fresh_kernel):
    k = fresh_kernel
    code = (
        "%%isolate\nimport subprocess, sys\n"
        "print('started', flush=True)\n"
        "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    )
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(res=k.execute(code, timeout=60)))
    thread.start()
    time.sleep(2.0)  # the child is running
    k.interrupt()
    thread.join(60)
    res = box["res"]
    assert res.error is not None and res.error["ename"] == "KeyboardInterrupt"
    if "Traceback" in res.stderr:  # the child said something as it was stopped
        assert "comes from processes the cell started" in res.stderr
        assert res.stderr.index("comes from processes") < res.stderr.index("Traceback")
    assert wait_until(lambda: k.value("1") == 1, 10)


def test_a_large_array_says_it_travels_by_direct_copy(kernel):
    kernel.run("import numpy as np\nbig = np.ones(15 * 2**20 // 8)")
    res = kernel.run("%%isolate\ntotal = float(big.sum())")
    html = "".join(
        str(m["content"]["data"].get("text/html", ""))
        for m in res.messages
        if m["msg_type"] in ("display_data", "update_display_data")
    )
    row = html.split("data-name='big'", 1)[1].split("</tr>", 1)[0]
    assert "direct copy" in row, row
