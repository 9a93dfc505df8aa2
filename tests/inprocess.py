"""fedllm's real ServerApp and ClientApp in this process, without a SuperLink or Ray.

For tests that need many short runs (a run of the tiny model takes ~1.5 s here, against
~15 s or more on Flower's Simulation Engine, `tests/simulate.py`). The grid hands each
message to the real ClientApp, mods included, one site after another, and turns an
exception into an error reply as Flower's simulation does. It has no deadline: a test of
`run.timeout` uses the simulation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients.app import create_app
from fedllm.secure.instruction import config_digest
from server.app import main

__all__ = ["InProcessGrid", "run_in_process", "server_identity"]

RUN_ID = 7
FIRST_NODE = 100


class InProcessGrid(Grid):
    """`sites` nodes (partitions 0 .. sites-1), each a real `client_app` with its own Context."""

    def __init__(self, client_app: Any, sites: int) -> None:
        self.app = client_app
        self._run = Run.create_empty(RUN_ID)
        self.contexts = {
            FIRST_NODE + p: Context(
                run_id=RUN_ID,
                node_id=FIRST_NODE + p,
                node_config={"partition-id": p, "num-partitions": sites},
                state=RecordDict(),
                run_config={},
            )
            for p in range(sites)
        }
        self.queued: dict[str, Message] = {}
        self.pulls = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue the messages; each is answered when a pull asks for it."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's InMemoryGrid
            self.queued[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """One reply per pull (the first queued message asked for), as a site's reply
        arrives on its own: a streaming coordinator folds it before the next is made."""
        wanted = set(message_ids)
        msg_id = next((m for m in self.queued if m in wanted), None)
        if msg_id is None:
            return []
        self.pulls += 1
        return [self._answer(self.queued.pop(msg_id))]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return [self._answer(self.queued.pop(i)) for i in ids]

    def _answer(self, msg: Message) -> Message:
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # reported as Flower's simulation reports it
            ex = ClientAppException(str(e))
            reason = f"{type(ex)}:<'{ex}'>"
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            return Message(error, reply_to=msg)


@contextmanager
def server_identity() -> Iterator[None]:
    """The ServerApp's identity, which Flower's `Message` reads (its simulation sets it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(overrides: dict[str, Any], *, sites: int = 3, client_app: Any = None) -> None:
    """One run with `overrides` laid over the run config (both apps see them), as
    `tests.simulate.simulate` runs it, but in this process; `client_app` replaces the
    ClientApp, as there."""
    with server_identity():
        grid = InProcessGrid(client_app or create_app(overrides), sites)
        main(grid, overrides, config_sha256=config_digest({}))
