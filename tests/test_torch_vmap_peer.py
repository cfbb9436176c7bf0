"""The torch.func.vmap(grad) peer of benchmarks/round_speed.py equals the PyTorch + PEFT loop after one
round (float32, tiny RoBERTa and BERT, depth below full so that frozen layers are skipped)."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import round_speed as rs  # noqa: E402


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_vmap_peer_equals_peft_loop(model_type):
    setup = rs.build_model("tiny", seed=0)
    if model_type == "roberta":
        cfg = dataclasses.replace(setup.model.cfg, model_type="roberta", pad_token_id=1, type_vocab_size=1)
        model = dataclasses.replace(setup.model, cfg=cfg)
        setup = rs.Setup("tiny-roberta", model, model.init(rs.jax.random.PRNGKey(0)), None)
    w = rs.Work(M=3, B=2, T=8, E=2, d=1, rank=4, alpha=8.0, lr=1e-2)
    device = torch.device("cpu")
    torch.set_num_threads(1)
    _, loop = rs.make_torch_peft_round(setup, w, 0, device)
    _, peer = rs.make_torch_vmap_round(setup, w, 0, device, mode="eager", chunk=2)  # chunks of 2 + 1 devices
    ref, got = loop(), peer()
    assert set(ref) == set(got) and any(".classifier." in k for k in ref)
    assert any("lora_B" in k for k in ref) and not any(".layer.0." in k for k in ref)  # depth 1 of 2
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), atol=1e-5, rtol=1e-4, err_msg=k)
