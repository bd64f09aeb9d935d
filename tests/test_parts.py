"""Which model entries travel (finetune, FedBN), their fingerprint, and FedBN's config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from omegaconf import OmegaConf

from fedvision.config import compose_config
from fedvision.errors import FedvisionError
from fedvision.fl.parts import check_local_bn, merge, subset
from fedvision.models import batchnorm_keys, build_model, fingerprint, split_parts


@pytest.fixture(scope="module")
def resnet18_models():
    return {
        ft: build_model("resnet18", 2, finetune=ft, last_k=1) for ft in ("full", "head", "last_k")
    }


def test_full_finetuning_shares_everything_and_fedbn_keeps_every_batchnorm(resnet18_models):
    model = resnet18_models["full"]
    keys = list(model.state_dict())
    assert split_parts(model) == split_parts(model, local_bn=False)
    parts = split_parts(model)
    params = tuple(n for n, _ in model.named_parameters())
    # Three kinds: parameters go to the strategy, statistics beside them, counters nowhere.
    assert parts.shared == params
    assert set(parts.stats) == {k for k in keys if k.endswith(("running_mean", "running_var"))}
    assert set(parts.counters) == {k for k in keys if k.endswith("num_batches_tracked")}
    assert len(parts.stats) == 40 and len(parts.counters) == 20 and not parts.frozen
    assert parts.counters[0] not in parts.unsent  # no layer reads them: no base file needed
    fedbn = split_parts(model, local_bn=True)
    bn = batchnorm_keys(model)
    # resnet18 has 20 BatchNorm layers, 5 entries each (weight, bias, mean, var, counter).
    assert len(bn) == 20 * 5 and fedbn.local == tuple(bn) and not fedbn.frozen
    assert set(fedbn.shared) == set(keys) - set(bn)


def test_head_shares_the_head_only_and_frozen_batchnorm_stays_frozen(resnet18_models):
    model = resnet18_models["head"]
    for local_bn in (False, True):  # no BatchNorm trains: FedBN has nothing to keep
        parts = split_parts(model, local_bn=local_bn)
        assert parts.shared == ("fc.weight", "fc.bias") and parts.local == ()
        assert len(parts.frozen) == len(model.state_dict()) - 2
    assert model.training  # the split leaves the model's modes as they were


def test_last_k_shares_the_last_block_with_its_statistics(resnet18_models):
    model = resnet18_models["last_k"]
    parts = split_parts(model)
    assert {k.split(".")[0] for k in parts.shared} == {"layer4", "fc"}
    assert "layer4.0.bn1.running_mean" in parts.stats  # its BatchNorm trains, so its stats move
    assert "layer4.0.bn1.num_batches_tracked" in parts.counters
    assert "layer3.1.bn2.running_mean" in parts.frozen  # frozen BatchNorm runs in eval mode
    fedbn = split_parts(model, local_bn=True)
    assert {k.rsplit(".", 1)[0] for k in fedbn.local} == {
        "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2",
    }  # fmt: skip
    assert fedbn.frozen == parts.frozen and fedbn.unsent == fedbn.local + fedbn.frozen


def test_fingerprint_reads_values_as_float32_and_sees_one_changed_value():
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)}
    as_sent = {"w": state["w"].numpy(), "n": np.asarray(7, dtype=np.float32)}
    assert fingerprint(state, ["w", "n"]) == fingerprint(as_sent, ["n", "w"])
    assert fingerprint(state, []) == ""
    changed = {**state, "w": state["w"].clone()}
    changed["w"][1, 2] += 1e-6
    assert fingerprint(changed, ["w", "n"]) != fingerprint(state, ["w", "n"])
    assert fingerprint(state, ["w"]) != fingerprint(state, ["w", "n"])


def test_subset_and_merge_keep_order_and_refuse_strangers():
    whole = ArrayRecord({k: Array(np.full(2, i, np.float32)) for i, k in enumerate("abc")})
    assert subset(whole, ["a", "b", "c"]) is whole
    part = subset(whole, ["c", "a"])
    assert list(part.keys()) == ["c", "a"]
    merged = merge(whole, ArrayRecord({"b": Array(np.full(2, 9, np.float32))}))
    assert list(merged.keys()) == ["a", "b", "c"]
    assert [float(merged[k].numpy()[0]) for k in "abc"] == [0.0, 9.0, 2.0]
    with pytest.raises(FedvisionError, match="lacks"):
        merge(whole, ArrayRecord({"z": Array(np.zeros(1, np.float32))}))


def _plain(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


FEDBN = ("client.local_bn=true", "strategy.fraction_evaluate=1.0", "strategy.min_evaluate_nodes=1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("model.name=squeezenet1_0",), "squeezenet1_0 has none"),
        (
            ("model.finetune=head",),
            "no BatchNorm layer of shufflenet_v2_x0_5 trains with model.finetune=head",
        ),
        (("strategy.fraction_evaluate=0.0",), "set strategy.fraction_evaluate > 0"),
    ],
)
def test_fedbn_settings_that_cannot_work_are_refused_in_one_line(extra, message):
    with pytest.raises(FedvisionError, match=message) as info:
        check_local_bn(_plain(*FEDBN, *extra))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_fedbn_composes_with_fedavg_fedprox_and_last_k(strategy):
    check_local_bn(_plain(*FEDBN, f"strategy={strategy}"))
    check_local_bn(_plain(*FEDBN, f"strategy={strategy}", "model.finetune=last_k"))
    check_local_bn(_plain("model.name=squeezenet1_0"))  # off: nothing to check


def test_a_trained_batchnorm_without_momentum_is_refused():
    # momentum=None is a cumulative average over num_batches_tracked, which never travels.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(FedvisionError, match="momentum=None"):
        split_parts(model)


def test_float32_arrays_leaves_a_float32_record_as_it_is_and_converts_the_rest():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedvision.fl.arrays import float32_arrays

    ready = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    assert float32_arrays(ready) is ready  # no copy of what is float32 already
    mixed = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32)), "n": Array(np.array(7))})
    out = float32_arrays(mixed)
    assert [a.dtype for a in out.values()] == ["float32", "float32"]
    assert out["n"].numpy().shape == () and out["n"].numpy() == np.float32(7)
