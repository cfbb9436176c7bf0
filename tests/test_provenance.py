"""hfl_jax.provenance: which code ran a run (the run directory's provenance.jsonl)."""
import json

from hfl_jax import provenance


def test_changes_lists_only_the_code_keys_that_differ():
    a = {"hfl_jax": "0.1.0", "git": "a" * 40, "dirty": False, "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "1",
         "optax": "2", "backend": "cpu", "host": "x", "devices": 1, "time": "t0"}
    assert provenance.changes(a, dict(a, host="y", devices=8, time="t1")) == []   # not what decides numbers
    b = dict(a, git="b" * 40, dirty=True, jax="0.11.0")
    assert provenance.changes(a, b) == [f"git: {'a' * 40} -> {'b' * 40}", "dirty: False -> True",
                                        "jax: 0.10.2 -> 0.11.0"]
    assert provenance.changes({}, a)[0] == "hfl_jax: None -> 0.1.0"   # a record missing a key differs


def test_append_reads_back_and_compares_with_the_first_line(tmp_path):
    assert provenance.read(tmp_path) == []   # runs made before the file existed
    rec = {"hfl_jax": "0.1.0", "git": None, "dirty": None, "jax": "1", "jaxlib": "1", "flax": "1", "optax": "1",
           "backend": "cpu"}
    assert provenance.append(tmp_path, "start", 0, rec) == []
    assert provenance.append(tmp_path, "resume", 5, rec) == []
    assert provenance.append(tmp_path, "resume", 10, dict(rec, jax="2")) == ["jax: 1 -> 2"]
    lines = [json.loads(x) for x in (tmp_path / provenance.FILE).read_text().splitlines()]
    assert [(x["event"], x["round"]) for x in lines] == [("start", 0), ("resume", 5), ("resume", 10)]
    assert provenance.read(tmp_path) == lines and all("time" in x for x in lines)


def test_git_state_outside_a_checkout_is_none(tmp_path):
    provenance.git_state.cache_clear()
    assert provenance.git_state(str(tmp_path)) == (None, None)
    provenance.git_state.cache_clear()


def test_code_record_names_this_checkout():
    import hfl_jax

    rec = provenance.code_record()
    assert rec["hfl_jax"] == hfl_jax.__version__ and rec["backend"] == "cpu" and rec["devices"] >= 1
    assert set(provenance.CODE_KEYS) <= set(rec)
    assert rec["git"] is None or (len(rec["git"]) == 40 and isinstance(rec["dirty"], bool))


def test_study_code_line_counts_versions_mixed_and_unrecorded_runs(tmp_path):
    from hfl_jax.study_report import code_line

    rec = {"hfl_jax": "0.1.0", "git": "a" * 40, "dirty": False, "jax": "1", "jaxlib": "1", "flax": "1",
           "optax": "1", "backend": "cpu"}
    dirs = [tmp_path / n for n in ("same", "mixed", "old", "unfinished")]
    for d in dirs:
        d.mkdir()
        if d.name != "unfinished":
            (d / "summary.json").write_text("{}")
    provenance.append(dirs[0], "start", 0, rec)
    provenance.append(dirs[0], "resume", 5, rec)
    provenance.append(dirs[1], "start", 0, rec)
    provenance.append(dirs[1], "resume", 5, dict(rec, git="b" * 40, dirty=True))
    provenance.append(dirs[3], "start", 0, rec)   # no summary.json: not counted
    assert code_line(dirs) == ("Code (provenance.jsonl): `aaaaaaa` with jax 1 (2 runs); `bbbbbbb+dirty` with jax 1 "
                               "(1 run); **1 run resumed under other code than it started with**; 1 run made "
                               "before runs recorded their code.")
    assert code_line([]) == "Code (provenance.jsonl): no finished run."
