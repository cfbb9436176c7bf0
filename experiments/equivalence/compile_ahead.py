"""Issue 16's results check: the same run with the rounds' programs compiled lazily
(``train.compile_ahead=false``) and ahead of time, each in its own process with a cold XLA cache;
metrics.jsonl compared byte for byte (``wall_time`` aside).

    python experiments/equivalence/compile_ahead.py [--rounds 3]   # writes compile_ahead.txt here

Configs: the smoke config (as shipped: ``train.depth_program: shared``; and with ``per_depth``) and
the SST-2 study config (``experiments/configs/sst2_cpu/hierfedlora.yaml``, MiniLM on an SST-2 subset;
needs ../shared/data/glue).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GLUE = (ROOT / "../shared/data/glue").resolve()
CASES = {
    "smoke": ("experiments/configs/smoke.yaml", []),
    "smoke_per_depth": ("experiments/configs/smoke.yaml", ["train.depth_program=per_depth"]),
    "sst2_hierfedlora": ("experiments/configs/sst2_cpu/hierfedlora.yaml", [f"data.data_dir={GLUE}"]),
}


def metrics(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("wall_time", None)
    return recs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, HFL_JAX_CACHE="off", PYTHONPATH=str(ROOT))
    lines, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, over) in CASES.items():
            got = {}
            for ahead in ("false", "true"):
                out = Path(tmp) / f"{name}_{ahead}"
                sets = [a for o in over + [f"train.rounds={args.rounds}", f"train.compile_ahead={ahead}"]
                        for a in ("--set", o)]
                subprocess.run([sys.executable, "-m", "hfl_jax", "run", str(ROOT / config), "--out", str(out),
                                "--quiet", "--no-plots", *sets], check=True, env=env, stdout=subprocess.DEVNULL)
                got[ahead] = metrics(out)
            same = got["true"] == got["false"]
            ok &= same
            lines.append(f"{'same' if same else 'DIFF'}    {name}: {len(got['true'])} rounds "
                         f"{'bit-identical' if same else 'differ'} (compile_ahead false vs true)")
            print(lines[-1], flush=True)
    (HERE / "compile_ahead.txt").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
