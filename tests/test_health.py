"""The non-finite-round guard and the summary's dropped-update counts, on hand-made round records."""
import pytest

from hfl_jax.config import load_config
from hfl_jax.driver import TrainingHealthError, check_health, nonfinite_streak, round_health, summarize


def rec(r, participants, dropped, skipped_group=False):
    groups = [{"group": 0, "participants": participants, "skipped": False}]
    if skipped_group:
        groups.append({"group": 1, "participants": 0, "skipped": True})
    return {"round": r, "groups": groups, "dropped_devices": list(range(dropped)), "sim_time": float(r),
            "bytes_up": 1.0, "bytes_down": 2.0, "wall_time": 0.5}


def test_round_health_and_streak():
    assert round_health(rec(1, 4, 1, skipped_group=True)) == (4, 1)
    history = [rec(1, 4, 4), rec(2, 4, 1), rec(3, 4, 4), rec(4, 3, 3)]
    assert nonfinite_streak(history) == 2
    assert nonfinite_streak(history[:2]) == 0
    assert nonfinite_streak([rec(1, 0, 0, skipped_group=True)]) == 0   # nobody took part: not a failure


def test_guard_fires_after_the_configured_number_of_rounds():
    cfg = load_config(data={"train": {"max_nonfinite_rounds": 3, "lr": 1e30}}, check_model=False)
    history = [rec(1, 4, 4), rec(2, 4, 4)]
    check_health(history, cfg)   # 2 < 3: carry on
    history.append(rec(3, 4, 4))
    with pytest.raises(TrainingHealthError, match=r"rounds 1-3: .*non-finite.*4 of 4.*train.lr=1e\+30"):
        check_health(history, cfg)


def test_summary_counts_dropped_updates():
    cfg = load_config(data={"name": "x"}, check_model=False)
    s = summarize([rec(1, 4, 1), rec(2, 3, 0)], cfg)
    assert (s["device_updates"], s["dropped_updates"]) == (7, 1)
    assert s["rounds_wall_time"] == 1.0
