"""The Argo CD health checks in docs/operator.md, run as Lua 5.1 (Argo CD's gopher-lua dialect)
through lupa, on MqttBroker and ApplicationClient objects shaped as the operator writes them.

Run: python3 -m pytest -q charts/   (.ci/run's `chart` phase does; needs `pip install lupa`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

lupa = pytest.importorskip("lupa", reason="pip install lupa")
from lupa import lua51  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "operator.md"


def checks() -> dict[str, str]:
    """kind -> Lua source, from the argocd-cm snippet in docs/operator.md."""
    text = DOC.read_text()
    found = {}
    for m in re.finditer(
        r"resource\.customizations\.health\.ferrymq\.io_(\w+): \|\n((?:    .*\n|\n)+?)(?=  \S|```)", text
    ):
        found[m.group(1)] = "\n".join(line[4:] for line in m.group(2).splitlines())
    return found


def health(kind: str, obj: dict) -> dict:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(v):
        if isinstance(v, dict):
            return lua.table_from({k: to_lua(x) for k, x in v.items()})
        if isinstance(v, list):
            return lua.table_from([to_lua(x) for x in v])
        return v

    fn = lua.eval("function(obj) " + checks()[kind] + " end")
    out = fn(to_lua(obj))
    return {"status": out["status"], "message": out["message"]}


def obj(generation: int, observed: int | None, conditions: list[dict]) -> dict:
    o = {"metadata": {"name": "x", "generation": generation}}
    if observed is not None:
        o["status"] = {"observedGeneration": observed, "conditions": conditions}
    return o


def cond(type_: str, status: str, reason: str, message: str = "m") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_both_kinds_have_a_check():
    assert set(checks()) == {"MqttBroker", "ApplicationClient"}


@pytest.mark.parametrize("kind", ["MqttBroker", "ApplicationClient"])
def test_health_follows_the_kstatus_conditions(kind):
    assert health(kind, obj(1, None, []))["status"] == "Progressing"
    ready = cond("Ready", "True", "Reconciled", "1 of 1 pods ready")
    # Ready for an older generation is not healthy yet.
    assert health(kind, obj(2, 1, [ready]))["status"] == "Progressing"
    assert health(kind, obj(2, 2, [ready])) == {"status": "Healthy", "message": "1 of 1 pods ready"}
    stalled = [cond("Ready", "False", "ApiRejected"), cond("Stalled", "True", "ApiRejected", "refused")]
    assert health(kind, obj(3, 3, stalled)) == {"status": "Degraded", "message": "ApiRejected: refused"}
    waiting = [cond("Ready", "False", "PodsNotReady", "0 of 1"), cond("Reconciling", "True", "PodsNotReady")]
    assert health(kind, obj(3, 3, waiting)) == {"status": "Progressing", "message": "PodsNotReady: 0 of 1"}


def test_a_suspended_application_client_is_suspended():
    s = [cond("Ready", "False", "Suspended", "spec.suspend is true")]
    assert health("ApplicationClient", obj(1, 1, s))["status"] == "Suspended"
