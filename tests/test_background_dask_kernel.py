"""``%%isolate --bg --backend dask``: a long remote job while the notebook keeps working."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import wait_until
from .kernel import Kernel
from .test_background_kernel import _routing_kernel, drain, execute, of, text_of  # noqa: F401 (fixture)

pytest.importorskip("distributed")

from .test_dask_kernel import Cluster, cluster  # noqa: F401 (fixture)


def test_background_job_on_a_dask_worker(kernel: Kernel, cluster: Cluster) -> None:  # noqa: F811 (the imported fixture)
    others: list[dict[str, Any]] = []
    kernel.run(f"%isolate_config scheduler={cluster.address}")
    r = execute(
        kernel,
        "%%isolate --bg --backend dask\nimport os, time\nfor i in range(4):\n"
        "    print('remote', i, flush=True)\n    time.sleep(0.5)\nremote_pid = os.getpid()\n",
        others,
    )
    assert r.ok, r.error_text
    bg = r.reply["parent_header"]["msg_id"]
    # Every request goes through execute(): the job's output arriving meanwhile is kept.
    execute(kernel, "dj = _", others)
    assert execute(kernel, "local = 1 + 1\nprint(local)", others).stdout == "2\n"
    assert wait_until(
        lambda: "tcp://" in execute(kernel, "%isolate_jobs", others).result["text/plain"], 30
    )
    execute(kernel, "%isolate_wait", others, timeout=90)
    drain(kernel, others)
    assert kernel.value("dj.state") == "done"
    remote_pid = kernel.value("remote_pid")
    assert remote_pid != kernel.pid
    streamed = text_of(of(others, bg, "stream"))
    assert all(f"remote {i}" in streamed for i in range(4))
