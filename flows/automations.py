"""Prefect automations of a fedscan server beyond infra/automations.yaml: a notice for every failed or crashed run.

A notification needs a block on the server (its id goes into the automation), so this one is made by code:
``fedscan notify-failures URL`` saves a webhook block and (re)creates the automation that posts to it whenever a
flow run of a fedscan deployment (tag ``fedscan``) ends Failed or Crashed — Crashed includes the runs that
infra/automations.yaml's heartbeat automation marks.
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

__all__ = ["BLOCK_NAME", "NOTICE_NAME", "failure_notice", "install_failure_notice"]

NOTICE_NAME = "fedscan run failed or crashed"
BLOCK_NAME = "fedscan-failures"
#: what a notice says: names, states and links only (a state message may list scan ids; the UI shows it)
SUBJECT = "fedscan: {{ flow_run.name }} ended {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }} "
    "at {{ flow_run.state.timestamp }}. {{ flow_run|ui_url }}"
)


def failure_notice(block_document_id: UUID) -> AutomationCore:
    """The automation: any fedscan-tagged flow run entering Failed or Crashed sends one notification."""
    return AutomationCore(
        name=NOTICE_NAME,
        description="Notifies the operator when a fedscan flow run fails or crashes.",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.id": "prefect.tag.fedscan"}),
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def install_failure_notice(webhook_url: str) -> UUID:
    """Save the webhook block and (re)create the automation on the configured Prefect server; the automation id."""
    block = CustomWebhookNotificationBlock(
        name="fedscan", url=webhook_url, json_data={"subject": "{{subject}}", "text": "{{body}}"}
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    assert isinstance(block_id, UUID)  # the synchronous call returns the id
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name=NOTICE_NAME):  # rerunning the command replaces it
            client.delete_automation(old.id)
        return client.create_automation(failure_notice(block_id))
