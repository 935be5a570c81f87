"""Every job is decided on one path: controller/admission.py is the only caller of the store's job
decisions (``submit``, ``submit_many``, ``reject_entry``); the REST API, the stream intake and the
turn clock call the admission. Checked on the syntax tree of every module under controller/, so a
new caller anywhere, or a call through another name than the admission, fails here.

Not every write of desired state is a job: ``PUT /schedule`` sets a game's turn interval with
``store.set_schedule``, the reconciler writes a failed start's or a rollback's desired state
(``fail_generation``) and a cleanup's end, ``rtmanager adopt`` inserts a record. Those are
named store methods of their own, not job decisions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DECISIONS = frozenset({"submit", "submit_many", "reject_entry"})
ADMISSION = ROOT / "controller" / "admission.py"


def receiver(node: ast.expr) -> str:
    """The last name of a call's receiver: ``self.c.admission`` -> ``admission``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def decision_calls(path: Path) -> list[tuple[int, str]]:
    """(line, "receiver.method") of each call of a job decision in the module at ``path``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in DECISIONS):
            calls.append((node.lineno, f"{receiver(node.func.value)}.{node.func.attr}"))
    return calls


def test_only_the_admission_asks_the_store_for_a_job_decision():
    modules = sorted((ROOT / "controller").rglob("*.py"))
    assert ADMISSION in modules
    outside = {}
    for path in modules:
        if path == ADMISSION:
            continue
        wrong = [(line, call) for line, call in decision_calls(path) if not call.startswith("admission.")]
        if wrong:
            outside[str(path.relative_to(ROOT))] = wrong
    assert outside == {}, f"job decisions that bypass controller/admission.py: {outside}"


def test_the_admission_is_what_the_entry_points_call():
    """The check above looks at real calls: the REST API and the stream intake make them."""
    callers = {str(p.relative_to(ROOT)) for p in (ROOT / "controller").rglob("*.py")
               if any(call.startswith("admission.") for _, call in decision_calls(p))}
    assert {"controller/http.py", "controller/intake.py"} <= callers, callers
    assert {call for _, call in decision_calls(ADMISSION)} >= {"store.submit", "store.submit_many"}
