"""Replies as a site sends them, without a SuperLink (Flower's `create_mock_reply` habit)."""

from __future__ import annotations

from flwr.app import Message, Metadata, RecordDict
from flwr.common import MessageType


def mock_reply(
    content: RecordDict, *, node_id: int, run_id: int = 1, phase: str = MessageType.TRAIN
) -> Message:
    """A reply from `node_id` carrying `content` (Flower's Message needs a run context to be
    built the ordinary way; a reply from its metadata does not)."""
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=phase,
    )
    return Message(content=content, metadata=metadata)
