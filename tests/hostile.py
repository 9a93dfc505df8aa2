"""A hostile coordinator for the deployment tests: fedllm's real ServerApp with one more
stage, which sends one node (`TARGET_NODE`) a run name that is a path, `../escape`.

It signs that message like any other (the Signatures stage is outside it): a coordinator's
signature proves who sent an instruction, not that it is safe. The site must refuse the
name itself. `tests/deployment.py` `hostile_app` writes the target's node id into
`TARGET_NODE` before the FAB is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedllm.strategy.base import Stage
from fedllm.strategy.pipeline import register_stage
from fedllm.wire import CONFIG, RUN_NAME
from server.app import app

__all__ = ["ESCAPE", "TARGET_NODE", "app"]

TARGET_NODE = 0
ESCAPE = "../escape"


class PathRunName(Stage):
    """Innermost stage: rewrites the run name in the target node's messages."""

    name = "path-run-name"

    def _rewrite(self, messages: Iterable[Message]) -> Iterator[Message]:
        for msg in messages:
            if msg.metadata.dst_node_id == TARGET_NODE:
                content = RecordDict(dict(msg.content.items()))  # nodes share one RecordDict
                content[CONFIG] = ConfigRecord({**dict(msg.content[CONFIG]), RUN_NAME: ESCAPE})
                msg.content = content
            yield msg

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return list(self._rewrite(self.inner.configure_train(server_round, arrays, config, grid)))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return list(self._rewrite(messages))


register_stage(PathRunName)
