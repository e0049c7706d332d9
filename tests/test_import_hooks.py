"""Two ``sys.meta_path`` hooks of the worker that wrap a module's loader (the settings and
random state set after NumPy or pandas is imported, and the display adapters) may watch the
same module: each asks the other finders, so they must compose, not ask each other for ever."""

from __future__ import annotations

import sys

from nbisolate import display_worker, pools


def test_an_import_hook_and_an_adapter_on_one_module_both_run_once(tmp_path, monkeypatch):
    (tmp_path / "nbi_hooked_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[str] = []
    monkeypatch.setitem(display_worker.ADAPTERS, "nbi_hooked_module", lambda module: seen.append("adapted"))
    adapter = display_worker.AdaptOnImport()
    monkeypatch.setattr(sys, "meta_path", [adapter, *sys.meta_path])
    monkeypatch.setattr(pools, "_after_import", None)
    pools._when_imported("nbi_hooked_module", lambda: seen.append("first hook"))
    pools._when_imported("nbi_hooked_module", lambda: seen.append("second hook"))
    try:
        import nbi_hooked_module

        assert nbi_hooked_module.VALUE == 1
        assert sorted(seen) == ["adapted", "first hook", "second hook"]
    finally:
        sys.modules.pop("nbi_hooked_module", None)
        display_worker._adapted.discard("nbi_hooked_module")
