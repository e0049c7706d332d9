"""A real IPython kernel for tests, and what a front end would see of a cell.

Tests talk to the kernel over ZMQ exactly as JupyterLab does: an
``execute_request`` on the shell channel, then every IOPub message until the
kernel goes idle.  Nothing of nbisolate is imported in the test process to
produce these results.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class CellResult:
    """Everything IOPub said about one execution, in arrival order, with arrival times."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    reply_time: float = 0.0
    asked: list[dict[str, Any]] = field(default_factory=list)  # the input requests' contents

    def of(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] == msg_type]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stderr")

    @property
    def ok(self) -> bool:
        return self.reply["content"]["status"] == "ok"

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of("error")
        return errors[0]["content"] if errors else None

    @property
    def error_text(self) -> str:
        err = self.error
        if err is None:
            return ""
        return f"{err['ename']}: {err['evalue']}\n" + "\n".join(err["traceback"])

    @property
    def result(self) -> dict[str, Any] | None:
        res = self.of("execute_result")
        return res[0]["content"]["data"] if res else None

    @property
    def displays(self) -> list[dict[str, Any]]:
        return [m["content"] for m in self.of("display_data")]


class Kernel:
    """One running kernel and a blocking client for it."""

    def __init__(self, cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        kenv = dict(os.environ)
        kenv.update(env or {})
        for attempt in range(3):
            self.km = KernelManager(kernel_name="python3")
            # The kernel must run from the project's environment, whatever kernelspec is installed.
            self.km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            self.km.start_kernel(cwd=cwd, env=kenv)
            self.kc = self.km.client()
            self.kc.start_channels()
            try:
                self.kc.wait_for_ready(timeout=60)
                break
            except RuntimeError:
                # jupyter_client picks free TCP ports, then the kernel binds them: a kernel of
                # another test session side by side can take one in between, and this one dies
                # ("Address already in use"). It goes with its connection file and its manager
                # (whose ZMQ context the cleanup closes: a manager cannot start a kernel again),
                # and a new manager starts one on new ports.
                self.kc.stop_channels()
                self.km.shutdown_kernel(now=True)
                self.km.cleanup_resources()
                if attempt == 2:
                    raise

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def execute(
        self,
        code: str,
        timeout: float = 60.0,
        allow_error: bool = True,
        others: list[dict[str, Any]] | None = None,
        watch: Callable[[CellResult], None] | None = None,
        answers: list[str] | None = None,
    ) -> CellResult:
        """Run ``code`` and collect its IOPub messages until idle. With ``answers`` the request
        allows stdin, as a notebook front end does, and each input request is answered with
        the next of them (its content goes to ``asked``); without, it does not, as nbclient
        does not (``input()`` raises in the kernel). With ``others``, IOPub
        messages of *other* requests go there instead of being dropped (a background job's
        output carries the parent header of the cell that started it). ``watch`` is called
        with the result so far after each message of this request (to act while it runs).

        ipykernel 6 aborts execute requests for a moment after a cell that raised (its
        "stop on error" window ends with a callback queued behind the reply): a request sent
        right after such a reply may come back ``aborted`` without running. The tests send
        one request at a time, so that is never the answer meant: it is sent again."""
        for _ in range(20):
            result = self._execute_once(code, timeout, others, watch, answers)
            if result.reply["content"].get("status") != "aborted" or result.messages:
                break
            time.sleep(0.1)
        if not allow_error and not result.ok:
            raise AssertionError(f"cell failed:\n{code}\n---\n{result.error_text}")
        return result

    def _execute_once(
        self,
        code: str,
        timeout: float,
        others: list[dict[str, Any]] | None,
        watch: Callable[[CellResult], None] | None,
        answers: list[str] | None = None,
    ) -> CellResult:
        start = time.perf_counter()
        msg_id = self.kc.execute(code, allow_stdin=answers is not None)
        result = CellResult(reply={})
        deadline = time.monotonic() + timeout
        idle = False
        left = list(answers or ())
        while not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no idle status within {timeout} s for: {code[:80]!r}")
            if answers is not None:
                while self.kc.stdin_channel.msg_ready():
                    request = self.kc.get_stdin_msg(timeout=1)
                    result.asked.append(request["content"])
                    self.kc.input(left.pop(0) if left else "")
                try:
                    msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.02))
                except queue.Empty:
                    continue
            else:
                msg = self.kc.get_iopub_msg(timeout=remaining)
            if msg["parent_header"].get("msg_id") != msg_id:
                if others is not None:
                    others.append(msg)
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
                continue
            result.messages.append(msg)
            result.times.append(time.perf_counter() - start)
            if watch is not None:
                watch(result)
        reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        result.reply = reply
        result.reply_time = time.perf_counter() - start
        return result

    def run(self, code: str, timeout: float = 60.0) -> CellResult:
        """Execute and insist on success."""
        return self.execute(code, timeout=timeout, allow_error=False)

    def value(self, expr: str) -> Any:
        """Evaluate ``expr`` in the kernel (not isolated) and return its repr parsed back."""
        import ast

        res = self.run(f"print(repr({expr}))")
        return ast.literal_eval(res.stdout.strip())

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=False)
