"""The cohort worker's ClientApp (``fedvision.fl.cohort_clientapp:app``), for
``runtime.cohort_workers > 0`` (:mod:`fedvision.fl.cohort`).

A worker node holds no partition of its own: each train message names the partitions it trains
this round. It trains them one after another with the engine's ``train_local`` (no training loop
here), each from the received global model, on the model this process keeps resident (the
ClientApp's cache), and replies with their example-weighted mean, their example total and one
ConfigRecord of per-client results. A client that fails is reported with its reason and left
out of the mean; the others still count.

Under client-level DP with a fixed clipping norm the worker clips each client's update to it
before summing, as Flower's ``fixedclipping_mod`` does on a client, and weighs every client 1
(the server's noise is calibrated to a plain mean of clipped updates; it still adds it).

Under FedNova the worker sums each client's normalised update ``(x - y_i) / a_i`` and its work
``a_i``, both example-weighted, and replies the model ``x - a_c * d_c`` with ``a_c`` as its steps
(``a_c``, ``d_c``: the cohort's weighted means). FedNova's aggregate over such replies is its
aggregate over the clients themselves (:mod:`fedvision.fl.cohort`).

Under simulated devices (``system``) the server sends each client's local work (its step cap
and epochs) and, with a deadline, its simulated transfer time and speed: a client that would
finish after the deadline trains (its work is reported) but stays out of the mean, as a late
reply does.

Under SCAFFOLD each client's ``c_i`` lives in the run directory's client-state folder, which the
server names in the round config (:mod:`fedvision.fl.client_state`: any worker may train the
client next, and a resumed run continues it), and the worker replies the unweighted means of its
clients' models and control-variate changes, with their count.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvision import constants as C
from fedvision.engine import train_local
from fedvision.errors import FedvisionError
from fedvision.fl.client_state import client_state
from fedvision.fl.clientapp import client_indices, load_global, node_settings
from fedvision.fl.round_config import to_train_config
from fedvision.privacy.client import equal_weights
from fedvision.system.model import is_late
from strategies.fednova import momentum_steps
from strategies.scaffold import (
    Controls,
    controls_of,
    grad_correction,
    store_controls,
    update_controls,
)

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which worker this node is, and prove the run's data opens here."""
    node = node_settings(context)
    client_indices({**node, C.KEY_PARTITION_ID: 0})
    metrics = MetricRecord({C.KEY_PARTITION_ID: int(node[C.KEY_PARTITION_ID])})
    return Message(content=RecordDict({C.KEY_METRICS: metrics}), reply_to=msg)


def _reason(exc: Exception) -> str:
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _flat(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> torch.Tensor:
    """``keys`` of ``state`` as one float64 vector, in the order ``fedvision.fl.arrays.pack``
    packs them (float32 values, as a per-client reply carries)."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in keys]).double()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this round's cohort; reply with its example-weighted mean and per-client results."""
    worker = node_settings(context)
    record = msg.content[C.KEY_CONFIG]
    # The round's model, built once: each client starts from these tensors, on the model this
    # process keeps resident (no per-client unpacking of the received record).
    model, parts, _ = load_global(
        record, msg.content[C.KEY_ARRAYS], worker, context.state,  # no FedBN in cohorts
        stats=msg.content.array_records.get(C.KEY_BN_STATS),
    )  # fmt: skip
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sent = {C.KEY_ARRAYS: parts.shared, C.KEY_BN_STATS: parts.stats}
    start_flat = _flat(start, parts.shared)
    sums = {key: torch.zeros_like(_flat(start, keys)) for key, keys in sent.items() if keys}
    totals = dict.fromkeys(sums, 0.0)  # the weights summed into each of them
    device = next(model.parameters()).device
    clip = record.get(C.KEY_COHORT_CLIP)  # client-level DP's fixed norm, clipped per client
    equal = equal_weights(record)  # client-level DP: every client weighs 1
    normalise = bool(record.get(C.KEY_COHORT_NORMALISE, False))  # FedNova
    control = msg.content.array_records.get(C.KEY_CONTROL)  # SCAFFOLD's c
    if control is not None and not record.get(C.KEY_CLIENT_STATE):
        # The worker's own Context is one for all its clients: c_i must be kept per client.
        raise FedvisionError(
            "SCAFFOLD in cohorts needs the client-state folder in the round config; the server "
            "sent none (server and worker run different fedvision versions)"
        )
    if control is not None:
        sums[C.KEY_CONTROL_DELTA], totals[C.KEY_CONTROL_DELTA] = torch.zeros_like(start_flat), 0.0
        start32 = start_flat.to(torch.float32).numpy()
    # SCAFFOLD and client-level DP take the plain mean of the models, the others weigh examples.
    plain = equal or control is not None
    done, counts, losses, norms, failed, reasons = [], [], [], [], [], []
    trained, steps_done, samples_done, late = [], [], [], []
    weight_sum = loss_sum = acc_sum = seconds = work_sum = 0.0
    deadline = record.get(C.KEY_COHORT_DEADLINE)
    for j, pid in enumerate(int(p) for p in record[C.KEY_COHORT]):
        node = {**worker, C.KEY_PARTITION_ID: pid}
        node.pop(C.NODE_PARTITION_INDEX, None)  # the partition file's own index: pid
        own = dict(record)
        if C.KEY_COHORT_LOCAL_STEPS in record:  # this client's simulated device's work
            own[C.KEY_LOCAL_STEPS] = int(record[C.KEY_COHORT_LOCAL_STEPS][j])
            own[C.KEY_LOCAL_EPOCHS] = int(record[C.KEY_COHORT_LOCAL_EPOCHS][j])
        try:
            cache, train_idx, _ = client_indices(node)
            model.load_state_dict(start)
            cfg = to_train_config(own, pid)
            controls: Controls | None = None
            if control is not None:
                store = client_state(record, context, pid)
                own_c = store.get(C.STATE_CONTROL)
                stored = None if own_c is None else own_c[C.KEY_FLAT].numpy().reshape(-1)
                controls = controls_of(control, stored, start_flat.numel())
            result = train_local(
                model, cache.images, cache.labels, train_idx, cfg, device,
                grad_correction=(
                    None if controls is None else grad_correction(controls, model, parts.shared)
                ),
            )  # fmt: skip
        except Exception as exc:  # one client's failure is its own, as in a per-client run
            failed.append(pid)
            reasons.append(_reason(exc))
            continue
        state = model.state_dict()
        delta = None
        if controls is not None:  # option II, as the per-client ClientApp does it
            y32 = _flat(state, parts.shared).to(torch.float32).numpy()
            c_i, delta = update_controls(controls, start32, y32, result.steps, cfg.lr, cfg.momentum)
            store_controls(store, c_i)
        trained.append(pid)
        steps_done.append(int(result.steps))
        samples_done.append(int(result.samples_seen))
        if deadline is not None:  # Profile.seconds, as the server's clock computes it
            sim_s = float(record[C.KEY_COHORT_TRANSFER][j])
            sim_s += int(result.samples_seen) / float(record[C.KEY_COHORT_SPEED][j])
            if is_late(sim_s, float(deadline)):  # it trained, but its reply would not count
                late.append(pid)
                continue
        n = int(result.num_examples)
        w = 1 if equal else n
        work = momentum_steps(result.steps, cfg.momentum)
        if delta is not None:
            sums[C.KEY_CONTROL_DELTA] += torch.from_numpy(delta).double()
            totals[C.KEY_CONTROL_DELTA] += 1
        for key, keys in sent.items():
            if not keys:
                continue
            flat = _flat(state, keys)
            weight = n  # BatchNorm statistics: example-weighted, the server's rule for them
            if key == C.KEY_ARRAYS:
                norm = float(torch.linalg.vector_norm(flat - start_flat))
                norms.append(norm)  # before clipping: the server records what it needs
                if clip is not None and norm > float(clip):
                    flat = start_flat + (flat - start_flat) * (float(clip) / norm)
                if normalise:  # FedNova's d_i = (x - y_i) / a_i
                    flat = (start_flat - flat) / work
                weight = 1 if plain else n
            sums[key] += weight * flat
            totals[key] += weight
        work_sum += w * work
        done.append(pid)
        counts.append(n)
        losses.append(float(result.loss))
        weight_sum += w
        loss_sum += w * float(result.loss)
        acc_sum += w * float(result.accuracy)
        seconds += float(result.seconds)
    model.load_state_dict(start)  # the next message's clients must not see this one's last
    total = sum(counts)
    content = RecordDict()
    work_mean = work_sum / weight_sum if weight_sum else 0.0
    for key, value in sums.items():
        mean = value / max(totals[key], 1)
        if normalise and key == C.KEY_ARRAYS:  # the model whose FedNova update is the cohort's
            mean = start_flat - work_mean * mean
        content[key] = ArrayRecord({C.KEY_FLAT: Array(mean.to(torch.float32).cpu().numpy())})
    content[C.KEY_METRICS] = MetricRecord(
        {
            # The cohort's weight: its examples, or its clients where each weighs 1.
            C.KEY_NUM_EXAMPLES: int(weight_sum),
            C.KEY_NUM_TRAIN: total,
            C.KEY_TRAIN_LOSS: loss_sum / weight_sum if weight_sum else 0.0,
            C.KEY_TRAIN_ACC: acc_sum / weight_sum if weight_sum else 0.0,
            C.KEY_TRAIN_SECONDS: seconds,
            # FedNova's a_c, as plain SGD steps: momentum_steps(a_c, 0) = a_c.
            **({C.KEY_STEPS: work_mean, C.KEY_MOMENTUM: 0.0} if normalise else {}),
            # SCAFFOLD: the arrays are the plain mean of this many clients.
            **({C.KEY_COHORT_CLIENTS: len(done)} if control is not None else {}),
        }
    )
    content[C.KEY_COHORT_REPORT] = ConfigRecord(
        {
            C.KEY_COHORT_DONE: done,
            C.KEY_COHORT_NUM_TRAIN: counts,
            C.KEY_COHORT_LOSSES: losses,
            C.KEY_COHORT_NORMS: norms,
            C.KEY_COHORT_FAILED: failed,
            C.KEY_COHORT_REASONS: reasons,
            C.KEY_COHORT_TRAINED: trained,
            C.KEY_COHORT_STEPS: steps_done,
            C.KEY_COHORT_SAMPLES: samples_done,
            C.KEY_COHORT_LATE: late,
        }
    )
    return Message(content=content, reply_to=msg)
