"""The two-tier system model (docs/time_model.md, "Links"): a hand-computed two-device example,
per-tier fields in metrics.jsonl / summary.json / the report, and the single-tier switch."""
import dataclasses

import numpy as np
import pytest

from hfl_jax.algos.stages import tier_record
from hfl_jax.fed import timemodel
from hfl_jax.fed.cost import Workload, group_cost
from hfl_jax.fed.profiles import CLOUD_LINK_FRACTION, DeviceProfile, profiles_to_arrays
from hfl_jax.models import EncoderConfig

CFG = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                    max_position_embeddings=16, num_labels=2)
E, B, T, R, TARGETS = 2, 4, 8, 2, ("query", "value")
MB = 1e6


def _profiles():
    # device 0 computes slowly, device 1 has slow links (so the two intra-rounds' critical devices differ)
    return profiles_to_arrays([
        DeviceProfile("slow_compute", flops=1e6, up_bw=1 * MB, down_bw=2 * MB, memory=1e9,
                      cloud_up_bw=0.1 * MB, cloud_down_bw=0.2 * MB),
        DeviceProfile("slow_link", flops=1e9, up_bw=0.001 * MB, down_bw=0.002 * MB, memory=1e9,
                      cloud_up_bw=0.0005 * MB, cloud_down_bw=0.001 * MB),
    ])


def _work(**kw):
    return Workload(local_steps=E, batch_size=B, seq_len=T, rank=R, targets=TARGETS, edge_cloud_bandwidth=10 * MB,
                    edge_latency=0.01, cloud_latency=0.1, two_tier=True, **kw)


def test_hierarchical_group_hand_computed():
    prof, depth, tau = _profiles(), 1, 2
    out = group_cost(CFG, prof, _work(hierarchical=True), np.arange(2), np.full(2, R), depth, tau)
    head = timemodel.head_bytes(CFG)
    up = timemodel.lora_bytes(CFG, depth, R, TARGETS) + head          # a device's upload per intra-round
    full = timemodel.lora_bytes(CFG, 2, R, TARGETS) + head            # every layer + head
    comp = E * timemodel.step_flops(CFG, B, T, depth, R, TARGETS) / prof["flops"]
    first = comp + up / prof["up_bw"] + full / prof["down_bw"] + 2 * 0.01   # downloads every layer
    later = comp + up / prof["up_bw"] + up / prof["down_bw"] + 2 * 0.01     # only its top layers
    hop = (up + full) / (10 * MB) + 2 * 0.1                                 # edge <-> cloud, group model
    assert out["time"] == pytest.approx(first.max() + later.max() + hop, rel=1e-12)
    assert out["time_cloud"] == pytest.approx(hop, rel=1e-12)
    i1, i2 = np.argmax(first), np.argmax(later)
    assert out["time_compute"] == pytest.approx(comp[i1] + comp[i2], rel=1e-12)
    assert out["time_compute"] + out["time_edge"] + out["time_cloud"] == pytest.approx(out["time"], rel=1e-12)
    assert out["edge_bytes_up"] == 2 * tau * up                  # 2 devices x tau uploads
    assert out["edge_bytes_down"] == 2 * full + 2 * (tau - 1) * up
    assert (out["cloud_bytes_up"], out["cloud_bytes_down"]) == (up, full)
    assert out["bytes_up"] == out["edge_bytes_up"] + out["cloud_bytes_up"]
    assert out["bytes_down"] == out["edge_bytes_down"] + out["cloud_bytes_down"]


def test_flat_devices_talk_to_the_cloud_over_their_wan_links():
    prof, L = _profiles(), 2
    out = group_cost(CFG, prof, _work(hierarchical=False), np.arange(2), np.full(2, R), L, 1)
    full = timemodel.lora_bytes(CFG, L, R, TARGETS) + timemodel.head_bytes(CFG)
    comp = E * timemodel.step_flops(CFG, B, T, L, R, TARGETS) / prof["flops"]
    dev = comp + full / prof["cloud_up_bw"] + full / prof["cloud_down_bw"] + 2 * 0.1
    assert out["time"] == pytest.approx(dev.max(), rel=1e-12)
    assert out["time_edge"] == 0 and out["edge_bytes_up"] == out["edge_bytes_down"] == 0
    assert (out["cloud_bytes_up"], out["cloud_bytes_down"]) == (2 * full, 2 * full)
    # single-tier switch: LAN links, no latency (the model of earlier versions)
    single = dataclasses.replace(_work(hierarchical=False), two_tier=False)
    old = group_cost(CFG, prof, single, np.arange(2), np.full(2, R), L, 1)
    lan = comp + full / prof["up_bw"] + full / prof["down_bw"]
    assert old["time"] == pytest.approx(lan.max(), rel=1e-12)


def test_tier_record_sums_traffic_and_splits_the_slowest_groups_time():
    prof = _profiles()
    a = group_cost(CFG, prof, _work(), np.array([0]), np.array([R]), 1, 1)
    b = group_cost(CFG, prof, _work(), np.array([1]), np.array([R]), 2, 2)
    rec = tier_record([a, b])
    slow = max(a, b, key=lambda c: c["time"])
    for k in ("edge_bytes_up", "edge_bytes_down", "cloud_bytes_up", "cloud_bytes_down"):
        assert rec[k] == a[k] + b[k]
    assert [rec[k] for k in ("time_compute", "time_edge", "time_cloud")] == \
        [slow[k] for k in ("time_compute", "time_edge", "time_cloud")]


def test_profiles_default_cloud_links_are_a_fraction_of_the_lan():
    p = DeviceProfile("x", flops=1.0, up_bw=8.0, down_bw=16.0, memory=1.0)
    assert (p.cloud_up_bw, p.cloud_down_bw) == (CLOUD_LINK_FRACTION * 8, CLOUD_LINK_FRACTION * 16)
    with pytest.raises(ValueError, match="cloud_up_bw"):
        DeviceProfile("x", flops=1.0, up_bw=8.0, down_bw=16.0, memory=1.0, cloud_up_bw=0)
