"""hfl_jax.provenance: which code ran a run (the run directory's provenance.jsonl)."""
import json

from hfl_jax import provenance


def test_changes_lists_only_the_code_keys_that_differ():
    a = {"hfl_jax": "0.1.0", "source": "s1", "git": "a" * 40, "dirty": None, "jax": "0.10.2", "jaxlib": "0.10.2",
         "flax": "1", "optax": "2", "backend": "cpu", "host": "x", "devices": 1, "time": "t0"}
    # not what decides numbers: host, devices, time, and a commit that leaves the package's sources alone
    assert provenance.changes(a, dict(a, host="y", devices=8, time="t1", git="c" * 40)) == []
    b = dict(a, source="s2", git="b" * 40, dirty="d1", jax="0.11.0")
    assert provenance.changes(a, b) == ["source: s1 -> s2", "jax: 0.10.2 -> 0.11.0"]
    assert provenance.changes({}, a)[0] == "hfl_jax: None -> 0.1.0"   # a record missing a key differs


def test_append_reads_back_and_compares_with_the_first_line(tmp_path):
    assert provenance.read(tmp_path) == []   # runs made before the file existed
    rec = {"hfl_jax": "0.1.0", "source": "s", "git": None, "dirty": None, "jax": "1", "jaxlib": "1", "flax": "1",
           "optax": "1", "backend": "cpu"}
    assert provenance.append(tmp_path, "start", 0, rec) == []
    assert provenance.append(tmp_path, "resume", 5, rec) == []
    with open(tmp_path / provenance.FILE, "a") as f:
        f.write('{"event": "resu')   # a write cut short: skipped, and the next line still parses
    with open(tmp_path / provenance.FILE, "a") as f:
        f.write("\n")
    assert provenance.append(tmp_path, "resume", 10, dict(rec, jax="2")) == ["jax: 1 -> 2"]
    lines = provenance.read(tmp_path)
    assert [(x["event"], x["round"]) for x in lines] == [("start", 0), ("resume", 5), ("resume", 10)]
    assert all("time" in x for x in lines)
    assert provenance.append(tmp_path, "start", 0, dict(rec, jax="3"), fresh=True) == []   # starts over
    assert [(x["event"], x["jax"]) for x in provenance.read(tmp_path)] == [("start", "3")]


def test_git_state_outside_a_checkout_is_none(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    assert provenance.git_state(str(tmp_path)) == (None, None)


def test_source_hash_follows_the_package_sources(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "m.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not code")
    h = provenance.source_hash.__wrapped__(str(pkg))
    assert len(h) == 16 and h == provenance.source_hash.__wrapped__(str(pkg))
    (pkg / "notes.txt").write_text("edited")   # not a .py file: same hash
    assert provenance.source_hash.__wrapped__(str(pkg)) == h
    (pkg / "sub" / "m.py").write_text("y = 3\n")
    assert provenance.source_hash.__wrapped__(str(pkg)) != h


def test_code_record_names_this_checkout():
    import jax

    import hfl_jax

    rec = provenance.code_record()
    assert rec["hfl_jax"] == hfl_jax.__version__ and rec["backend"] == jax.default_backend()
    assert set(provenance.CODE_KEYS) <= set(rec) and rec["devices"] >= 1 and len(rec["source"]) == 16
    assert rec["git"] is None or (len(rec["git"]) == 40 and (rec["dirty"] is None or len(rec["dirty"]) == 16))


def test_study_code_line_counts_versions_mixed_and_unrecorded_runs(tmp_path):
    from hfl_jax.study_report import code_line

    rec = {"hfl_jax": "0.1.0", "source": "s1", "git": "a" * 40, "dirty": None, "jax": "1", "jaxlib": "1",
           "flax": "1", "optax": "1", "backend": "cpu"}
    dirs = [tmp_path / n for n in ("same", "mixed", "old", "unfinished", "old_resumed")]
    for d in dirs:
        d.mkdir()
        if d.name != "unfinished":
            (d / "summary.json").write_text("{}")
    provenance.append(dirs[0], "start", 0, rec)
    provenance.append(dirs[0], "resume", 5, rec)
    provenance.append(dirs[1], "start", 0, rec)
    provenance.append(dirs[1], "resume", 5, dict(rec, source="s2", git="b" * 40, dirty="d"))
    provenance.append(dirs[3], "start", 0, rec)   # no summary.json: not counted
    provenance.append(dirs[4], "resume", 10, rec)   # started before the record, resumed after
    assert code_line(dirs) == ("Code (provenance.jsonl): `aaaaaaa` (source `s1`) with jax 1 (3 runs); `bbbbbbb+dirty` "
                               "(source `s2`) with jax 1 (1 run); **1 run resumed under other code than it first "
                               "recorded**; 2 runs started before runs recorded their code.")
    assert code_line([]) == "Code (provenance.jsonl): no finished run."
