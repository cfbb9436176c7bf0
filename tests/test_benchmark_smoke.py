"""Smoke test: benchmarks/round_speed.py runs end to end on a tiny model and prints its table."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_round_speed_prints_table(tmp_path):
    out_json = tmp_path / "r.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "round_speed.py"), "--model", "tiny", "-M", "2", "-E", "1",
           "-T", "16", "-B", "2", "-n", "1", "--methods", "vmap,loop", "--peak-size", "256",
           "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for c in ("method", "M", "B", "T", "E", "d", "compile s", "best s", "median s", "examples/s", "tokens/s",
              "GFLOP/s", "% peak", "XLA MiB", "RSS MiB", "speedup of vmap"):
        assert c in cols, (c, cols)
    rows = [line for line in lines if line.startswith("| vmap |") or line.startswith("| loop |")]
    assert len(rows) == 2, proc.stdout
    assert all(len(r.strip("|").split("|")) == len(cols) for r in rows)
    assert "matmul peak" in proc.stdout and "speedup of vmap over loop" in proc.stdout
    assert out_json.is_file()


def test_round_speed_help_documents_flags():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "round_speed.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0
    for flag in ("--model", "--devices", "--batch", "--seq-len", "--steps", "--depth", "--rank", "--repeats",
                 "--methods", "--sweep"):
        assert flag in proc.stdout


def test_e2e_peer_draws_epoch_style_batches():
    """benchmarks/e2e_peft.py's sampler: E batches of min(count, B) rows, no row twice within an epoch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np
    from e2e_peft import device_batches

    batches = device_batches(np.random.default_rng(0), 10, 5, 4)
    assert [len(b) for b in batches] == [4] * 5
    stream = np.concatenate(batches)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    small = device_batches(np.random.default_rng(0), 3, 2, 8)
    assert all(sorted(b) == [0, 1, 2] for b in small)


def test_profile_wall_split_hand_checked():
    """benchmarks/profile_round.py --bound: the round's wall time splits into product thunks, other thunks
    alone, and no thunk, from overlapping trace intervals (us)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from profile_round import _union, wall_split

    assert _union([]) == 0.0
    assert _union([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20.0
    info = {"ynn_fusion.1": ("f32[8,8]", "fusion", ""), "dot.2": ("f32[8]", "dot", ""),
            "add_fusion.3": ("f32[8]", "fusion", ""), "copy.4": ("f32[8]", "copy", "")}
    thunks = [{"name": "ynn_fusion.1", "ts": 0, "dur": 10},     # product 0-10
              {"name": "add_fusion.3", "ts": 5, "dur": 10},     # other 5-15: 10-15 alone
              {"name": "copy.4", "ts": 20, "dur": 10},          # other alone 20-30
              {"name": "dot.2", "ts": 25, "dur": 10}]           # product 25-35; idle 15-20
    assert wall_split(thunks, info) == {"span": 35, "products": 20, "other_only": 10, "idle": 5}
