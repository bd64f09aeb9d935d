"""In-process stand-ins for a Flower runtime's Grid, shared by the tests of the server loop.

- :class:`ScriptedGrid`: two nodes whose replies are scripted (failures staged exactly);
- :class:`InlineGrid`: fedvision's real ClientApp in this process, one Context per node;
- :class:`LoopbackGrid`: any ClientApps, every message serialised to Flower's protobuf and back,
  as a runtime does.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto

from fedvision import constants as C
from fedvision.fl import clientapp


class PushPull:
    """``push_messages``/``pull_messages`` (what the server loop uses) over ``send_and_receive``."""

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:  # a runtime gives each pushed message its id
            m.metadata.__dict__["_message_id"] = m.object_id
        self.pending = [*getattr(self, "pending", []), *self.send_and_receive(messages, None)]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        got = [r for r in self.pending if r.metadata.reply_to_message_id in ids]
        self.pending = [r for r in self.pending if r.metadata.reply_to_message_id not in ids]
        return got


class ScriptedGrid(PushPull):
    """Two nodes; node 101 holds partition 0. Nodes in ``failing`` fail to train."""

    def __init__(self, failing: set[int] = frozenset(), nodes: tuple[int, ...] = (101, 102)):
        self.failing = failing
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "query":
                metrics = MetricRecord({C.KEY_PARTITION_ID: node - 101})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=m))
            elif node in self.failing:
                replies.append(Message(Error(code=1, reason="ValueError: boom"), reply_to=m))
            else:
                metrics = MetricRecord({C.KEY_NUM_EXAMPLES: 5, C.KEY_TRAIN_LOSS: 0.7})
                content = RecordDict({"arrays": m.content["arrays"], "metrics": metrics})
                replies.append(Message(content, reply_to=m))
        return replies


class InlineGrid(PushPull):
    """Runs fedvision's real ClientApp in this process, one Context per node, like a runtime."""

    def __init__(self, run_dir, num_nodes: int) -> None:
        self.contexts = {
            1000 + p: Context(
                run_id=1,
                node_id=1000 + p,
                node_config={C.KEY_PARTITION_ID: p, C.KEY_NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={C.RUN_DIR_KEY: str(run_dir)},
            )
            for p in range(num_nodes)
        }
        self.sent: list[int] = []
        # (message, reply, the node's FedBN state after it) for every exchange, in order.
        self.log: list[tuple[Message, Message, dict[str, torch.Tensor] | None]] = []
        # Each reply's ArrayRecords as the client sent them: the server takes the BatchNorm
        # statistics out of a train reply before the strategy sees it.
        self.replied: list[dict[str, ArrayRecord]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):
        self.sent += [m.metadata.dst_node_id for m in messages]
        replies = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            reply = clientapp.app(m, ctx)
            own = ctx.state.get(C.STATE_LOCAL_BN)
            self.log.append((m, reply, None if own is None else own.to_torch_state_dict()))
            self.replied.append(dict(reply.content.array_records))
            replies.append(reply)
        return replies


def transported(msg: Message) -> Message:
    """``msg`` as the other side receives it: serialised to Flower's protobuf and back."""
    return message_from_proto(message_to_proto(msg))


class LoopbackGrid(PushPull):
    """Runs a ClientApp per node in this process; ``received`` keeps every reply, in order."""

    def __init__(self, apps: dict[int, ClientApp], node_config=None, run_config=None) -> None:
        self.apps = apps
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config=(node_config or {}).get(n, {}),
                state=RecordDict(),
                run_config=run_config or {},
            )
            for n in apps
        }
        self.run = SimpleNamespace(run_id=1)
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # a runtime sets it when pushed
            node = m.metadata.dst_node_id
            # A runtime serialises each message: clients must not share (and mutate) one object,
            # and the server must not see the client's objects.
            reply = self.apps[node](transported(m), self.contexts[node])
            replies.append(transported(reply))
        self.received += replies
        return replies
