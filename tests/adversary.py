"""A compromised site for the deployment tests: fedllm's real ClientApp, then an attack.

A site's node config `adversary` lists `action@round` items:

- `replay@R`: in round 1 it keeps its genuine, signed reply; in round R it sends that again.
- `tamper@R`: in round R it signs its update, then changes a tensor before sending.
- `stall@R`: in round R it writes `<marker-dir>/stalled-<partition-id>` and hangs, so the
  test can kill its SuperNode mid-round.

It holds the site's real keys, as a compromised site or a man in the middle after TLS would;
the coordinator must catch every one of these from the signature alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import evaluate, train

app = ClientApp()

_STASH = ("arrays", "metrics", "spend", "signature")  # every record of its reply


def _plan(context: Context) -> dict[str, int]:
    spec = str(context.node_config.get("adversary", ""))
    return {a: int(r) for a, _, r in (item.partition("@") for item in spec.split(",") if item)}


@app.train()
def _train(msg: Message, context: Context) -> Message:
    plan, server_round = _plan(context), int(msg.content["config"]["server-round"])
    if plan.get("stall") == server_round:
        marker = Path(str(context.node_config["marker-dir"]))
        (marker / f"stalled-{context.node_config['partition-id']}").write_text(str(time.time()))
        time.sleep(3600)
    reply = train(msg, context, {})
    if "replay" in plan and server_round == 1:
        for name in _STASH:  # context.state survives between rounds at the SuperNode
            context.state[f"replay-{name}"] = reply.content[name]
    if plan.get("replay") == server_round:
        old = RecordDict({name: context.state[f"replay-{name}"] for name in _STASH})
        return Message(content=old, reply_to=msg)
    if plan.get("tamper") == server_round:
        arrays = reply.content["arrays"]
        name = next(iter(arrays))
        arrays[name] = Array.from_numpy_ndarray(arrays[name].numpy() + np.float32(0.5))
    return reply


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return evaluate(msg, context, {})
