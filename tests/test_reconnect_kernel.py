"""A front end that lost sight of a running isolated cell (a page reload, a notebook closed
and reopened) asks the status comm what became of its panels, through a real kernel."""

from __future__ import annotations

from typing import Any

from .kernel import Kernel
from .test_labcomm_kernel import StatusClient, idle, running

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def of_request(client: StatusClient, msg_id: str, msg_type: str) -> list[dict[str, Any]]:
    return [
        m["content"]
        for m in client.other
        if m["msg_type"] == msg_type and m["parent_header"].get("msg_id") == msg_id
    ]


def test_a_reloaded_page_gets_a_live_copy_of_the_panel_and_its_ending(kernel: Kernel) -> None:
    client = StatusClient(kernel)
    client.open()
    msg_id = client.kc.execute("%%isolate\nimport time\ntime.sleep(3)\nx = 1")
    (worker,) = client.wait(running)["workers"]
    assert worker["cell"]["msg_id"] == msg_id
    # The live widgets are drawn once the cell has run for a tick: read what came meanwhile.
    client.drain(0.5)
    # The panel shows with its display id in the metadata, which a saved notebook keeps.
    panel = [d for d in of_request(client, msg_id, "display_data") if WIDGET_VIEW in d["data"]]
    assert len(panel) == 1, client.other
    display_id = panel[0]["metadata"]["nbisolate"]["display_id"]
    assert display_id == panel[0]["transient"]["display_id"]

    client.send({"action": "lookup", "display_ids": [display_id, "unknown"]})
    found = client.wait(lambda data: "lookup" in data)["lookup"]
    assert found == {"live": [display_id], "outcomes": {}}

    # A reloaded page asks for the panel again, by the cell's request id: it comes as
    # HTML (the widgets cannot be rebuilt while the cell runs), as output of that cell.
    client.send({"action": "mirror", "msg_id": msg_id})
    assert client.wait(lambda data: "mirror" in data)["mirror"] == {"msg_id": msg_id, "shown": True}
    client.wait(idle, timeout=20)
    client.drain(1.0)
    mirrors = [
        d for d in of_request(client, msg_id, "display_data")
        if d["metadata"].get("nbisolate", {}).get("mirror")
    ]
    assert len(mirrors) == 1, client.other
    mirror_id = mirrors[0]["transient"]["display_id"]
    assert "running in pid" in mirrors[0]["data"]["text/html"]
    updates = [
        u for u in of_request(client, msg_id, "update_display_data")
        if u["transient"]["display_id"] == mirror_id
    ]
    assert updates and "ran " in updates[-1]["data"]["text/plain"], updates

    # Once it ended, a notebook reopened on this kernel learns how.
    client.send({"action": "lookup", "display_ids": [display_id]})
    found = client.wait(lambda data: "lookup" in data)["lookup"]
    assert found["live"] == []
    assert found["outcomes"][display_id]["text/plain"].startswith("nbisolate: ran ")
    client.close()


def test_mirror_of_a_request_without_a_panel_says_so(kernel: Kernel) -> None:
    client = StatusClient(kernel)
    client.open()
    client.send({"action": "mirror", "msg_id": "no-such-request"})
    assert client.wait(lambda data: "mirror" in data)["mirror"]["shown"] is False
    client.close()
