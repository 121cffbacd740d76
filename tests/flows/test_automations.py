from __future__ import annotations

from uuid import uuid4

from prefect.events.schemas.automations import AutomationCore

from flows.automations import failure_notice


def test_failure_notice_fires_on_failed_or_crashed_fedscan_runs_only():
    block = uuid4()
    notice = failure_notice(block)
    again = AutomationCore.model_validate(notice.model_dump(mode="json"))  # what the server receives parses back
    assert again.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert again.trigger.match_related.root == {"prefect.resource.id": "prefect.tag.fedscan"}
    assert again.trigger.posture == "Reactive"
    (action,) = again.actions
    assert action.type == "send-notification" and action.block_document_id == block
