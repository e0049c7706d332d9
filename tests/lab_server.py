"""A real ``jupyter lab`` server for browser tests, on a free loopback port.

Everything the server writes (settings, workspaces, runtime files, IPython
profile) goes to a temporary directory, and nothing reaches the network: no
news feed, no update check.  :meth:`LabServer.stop` shuts the server down
through its API (which stops its kernels, and so their isolated workers) and then
kills its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(cells: list[str], path: Path) -> Path:
    """Write a Python 3 notebook with these code cells."""
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell-{i}",
                "metadata": {},
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
                "name": "python3",
            },
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))
    return path


def jupyter_command(*args: str) -> list[str]:
    """Run a jupyter subcommand from this Python's environment."""
    return [sys.executable, "-m", "jupyter", *args]


def labextension_list() -> str:
    """`jupyter labextension list` output (it prints to stderr), without colours."""
    proc = subprocess.run(
        jupyter_command("labextension", "list"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return ANSI.sub("", proc.stdout + proc.stderr)


def labextension_build() -> Path | None:
    """The JupyterLab extension built next to the ``nbisolate`` package the tests import."""
    import nbisolate

    build = Path(nbisolate.__file__).resolve().parent / "labextension"
    return build if (build / "package.json").is_file() else None


def link_labextension(data_dir: Path) -> None:
    """Serve the extension built from this source tree, not a copy installed earlier.

    An install copies the build into ``share/jupyter/labextensions``; a source
    tree whose TypeScript changed since would be tested against that old copy.
    JupyterLab takes the first ``nbisolate`` it finds on its data path, and
    ``JUPYTER_PATH`` comes first, so a link in a directory given there wins.
    Without a build in the tree the installed extension is used.
    """
    build = labextension_build()
    if build is None:
        return
    target = data_dir / "labextensions" / "nbisolate"
    target.mkdir(parents=True, exist_ok=True)
    for entry in build.iterdir():
        link = target / entry.name
        if not link.exists():
            link.symlink_to(entry)
    install = build.parent.parent / "labextension" / "install.json"
    if install.is_file() and not (target / "install.json").exists():
        shutil.copy(install, target / "install.json")


class LabServer:
    def __init__(self, root_dir: Path, state_dir: Path) -> None:
        self.root_dir = root_dir
        self.state_dir = state_dir
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / "jupyter-lab.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}/{path.lstrip('/')}{sep}token={self.token}"

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ)
        for name, sub in [
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
            ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
            ("IPYTHONDIR", "ipython"),
        ]:
            path = self.state_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            env[name] = str(path)
        env.pop("JUPYTER_TOKEN", None)
        # JUPYTER_PATH comes first on Jupyter's data path, before the environment's own
        # share/jupyter (which a virtualenv puts before the user's data directory).
        source_path = self.state_dir / "jupyter-path"
        link_labextension(source_path)
        env["JUPYTER_PATH"] = os.pathsep.join(
            p for p in (str(source_path), env.get("JUPYTER_PATH", "")) if p
        )
        cmd = jupyter_command(
            "lab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.open_browser=False",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.expose_app_in_browser=True",
            # The same for Notebook 7's pages (/tree, /notebooks/...), when it is installed.
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--LabApp.extension_manager=readonly",
        )
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer within {timeout} s:\n{self.log()}")

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self) -> None:
        import psutil

        proc = self.proc
        if proc is None:
            return
        self.proc = None
        try:
            # Kernels (and the workers they started) run in sessions of their own.
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if proc.poll() is None:
            try:
                # Stops the kernels properly, so they stop their workers.
                self.api("api/shutdown", method="POST")
            except (urllib.error.URLError, OSError):
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        proc.wait(timeout=5)
        # Anything the server started and that is still there after a grace period.
        _, alive = psutil.wait_procs(descendants, timeout=5)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def find_chromium() -> str | None:
    """The system Chromium (Debian's ``chromium`` package); NBISOLATE_CHROMIUM overrides."""
    candidates = [os.environ.get("NBISOLATE_CHROMIUM", "")] + [
        shutil.which(name) or "" for name in ("chromium", "chromium-browser", "google-chrome")
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_env(home: Path) -> dict[str, str]:
    """Environment for Chromium that keeps its config and crash reports in ``home``."""
    env = dict(os.environ)
    for name, sub in [("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")]:
        path = home / sub
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    return env


# -- what every browser test module shares ------------------------------------------------
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"

# JupyterLab settings for the test server: no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# JavaScript, run in the page (the server exposes window.jupyterapp): the kernel's status.
KERNEL_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null;
}"""


def require_chromium() -> str:
    """Chromium's path, or skip the calling tests saying what is missing (never a silent pass)."""
    import pytest

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"browser tests need the playwright package: {exc}")
    path = find_chromium()
    if path is None:
        pytest.skip(
            "browser tests need Chromium: `apt-get install -y chromium`"
            " (or set NBISOLATE_CHROMIUM to a Chromium binary)"
        )
    pytest.importorskip("jupyterlab", reason="browser tests need jupyterlab")
    return path


@contextlib.contextmanager
def running_lab(root: Path, state: Path, cells: list[str], name: str) -> Iterator[LabServer]:
    """A lab server on ``root`` with one notebook of ``cells``, stopped (with its kernels) after."""
    notebook(cells, root / name)
    for setting, values in LAB_SETTINGS.items():
        path = state / "lab-settings" / setting
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    server = LabServer(root, state)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def lab_page(
    lab: LabServer, chromium: str, name: str, home: Path, width: int = 1400, height: int = 900
) -> Iterator[Any]:
    """Headless Chromium with the notebook ``name`` open and its kernel idle."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True, env=browser_env(home)
        )
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.console_messages_seen = []
            page.on("console", lambda msg: page.console_messages_seen.append(msg.text))
            page.goto(lab.url(f"lab/tree/{name}") + "&reset")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            wait_kernel_idle(page, timeout=60_000)
            yield page
        finally:
            browser.close()


def lab_fixtures(name: str, cells: list[str], width: int = 1400) -> tuple[Any, Any, Any]:
    """The three module-scoped fixtures of a browser test module: ``chromium`` (or a skip
    saying what is missing), ``lab`` (a server with notebook ``name`` of ``cells``) and
    ``page`` (that notebook open, its kernel idle). Bind them in the module:
    ``chromium, lab, page = lab_fixtures(NOTEBOOK, CELLS)``."""
    import pytest

    @pytest.fixture(scope="module")
    def chromium() -> str:
        return require_chromium()

    @pytest.fixture(scope="module")
    def lab(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LabServer]:
        root, state = tmp_path_factory.mktemp("lab-root"), tmp_path_factory.mktemp("lab-state")
        with running_lab(root, state, cells, name) as server:
            yield server

    @pytest.fixture(scope="module")
    def page(lab: LabServer, chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        home = tmp_path_factory.mktemp("browser-home")
        with lab_page(lab, chromium, name, home, width=width) as opened:
            yield opened

    return chromium, lab, page


# JavaScript: is the kernel idle, and has its status not changed for ``quiet`` ms?  The page's
# session reports every change (a probe or a comm opening flips it busy for a moment).
SETTLED_JS = """(quiet) => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const ctx = w && w.sessionContext;
  if (!ctx) return false;
  if (window.__nbisolateWatched !== ctx) {
    window.__nbisolateWatched = ctx;
    window.__nbisolateChanged = Date.now();
    ctx.statusChanged.connect(() => { window.__nbisolateChanged = Date.now(); });
  }
  const k = ctx.session && ctx.session.kernel;
  return !!k && k.status === 'idle' && Date.now() - window.__nbisolateChanged >= quiet;
}"""


def wait_kernel_idle(page: Any, timeout: float = 30_000) -> None:
    page.wait_for_function(f"() => ({KERNEL_JS})() === 'idle'", timeout=timeout)


def wait_kernel_settled(page: Any, quiet: float = 1_500, timeout: float = 30_000) -> None:
    """Wait until the kernel is idle and has stayed so for ``quiet`` ms: a kernel that went
    back to busy (or never came back) fails here, saying so, rather than by a lucky sample."""
    page.wait_for_function(SETTLED_JS, arg=quiet, timeout=timeout, polling=100)


def cell(page: Any, index: int) -> Any:
    """The ``index``-th cell of the notebook in view."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)


def select_cell(page: Any, index: int) -> None:
    """Make the cell active, in command mode."""
    page.evaluate(
        """(index) => {
             const nb = window.jupyterapp.shell.currentWidget.content;
             nb.activeCellIndex = index;
             nb.deselectAll();
             nb.mode = 'command';
             nb.node.focus();
           }""",
        index,
    )
