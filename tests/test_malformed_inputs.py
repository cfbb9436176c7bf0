"""Every malformed input is refused before any work: exit code 2, one line naming the key or file,
no run directory (issue 15). Each row goes through the real command line, in-process."""
from pathlib import Path

import pytest

from hfl_jax import cli
from hfl_jax.config import ConfigError, load_config, preflight
from hfl_jax.data.tasks import DataError, load_task

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"
HEADER = "text,sentiment\n"


def _files(d: Path) -> dict:
    """Small malformed files, by name, written into ``d``; returns name -> path."""
    good = "".join(f"{w} film .,{lab}\n" for w, lab in [("good", "positive"), ("bad", "negative")] * 5)
    contents = {
        "latin1.csv": (HEADER + good + "un film très bon .,positive\n").encode("latin-1"),
        "one_class.csv": (HEADER + "good film .,positive\n" * 6).encode(),
        "nan_label.csv": (HEADER + good + "odd film .,NaN\n").encode(),
        "none_label.csv": (HEADER + good + "odd film .,None\n").encode(),
        "empty_label.csv": (HEADER + good + "odd film .,\n").encode(),
        "third_class.csv": (HEADER + good + "odd film .,neutral\n").encode(),
        "no_label_col.csv": ("text,mood\n" + good).encode(),
        "empty.csv": b"",
        "garbage_profiles.yaml": b"\x00\x01\x02garbage\x00",
        "three_profiles.yaml": b"- {tier: tx2, count: 3}\n",
        "bad_yaml.yaml": b"train: {rounds: [1,\n",
        "list_top.yaml": b"- 1\n- 2\n",
        "missing_base.yaml": b"base: nowhere.yaml\n",
        "a_file": b"not a directory\n",
    }
    out = {}
    for name, data in contents.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


# (config or None for smoke.yaml, --set overrides, --out name or None, text the one line must hold)
CASES = [
    (None, ["train.bogus=1"], None, "train.bogus"),
    (None, ["train.rounds=ten"], None, "train.rounds"),
    (None, ["train.rounds=0"], None, "train.rounds"),
    (None, ["train.lr=.inf"], None, "train.lr"),
    (None, ["train.lr=.nan"], None, "train.lr"),
    (None, ["train.lr=-1"], None, "train.lr"),
    (None, ["train.optimizer=lion"], None, "train.optimizer"),
    (None, ["train.participation=1.5"], None, "train.participation"),
    (None, ["train.availability=0"], None, "train.availability"),
    (None, ["train.max_nonfinite_rounds=0"], None, "train.max_nonfinite_rounds"),
    (None, ["train.target_accuracy=2"], None, "train.target_accuracy"),
    (None, ["train.batch_size=[1]"], None, "train.batch_size"),
    (None, ["algorithm.depths=[]"], None, "algorithm.depths"),
    (None, ["algorithm.depths=[1,99]"], None, "algorithm.depths"),
    (None, ["algorithm.depths=[0]"], None, "algorithm.depths"),
    (None, ["algorithm.taus=[]"], None, "algorithm.taus"),
    (None, ["algorithm.name=fedsgd"], None, "algorithm.name"),
    (None, ["algorithm.num_groups=50"], None, "algorithm.num_groups"),
    (None, ["algorithm.fixed_depth=9"], None, "algorithm.fixed_depth"),
    (None, ["algorithm.bandit.gamma=0"], None, "algorithm.bandit.gamma"),
    (None, ["algorithm.hetlora.sparsity=x"], None, "algorithm.hetlora.sparsity"),
    (None, ["algorithm.hetlora.padding=x"], None, "algorithm.hetlora.padding"),
    (None, ["lora.targets=[query,foo]"], None, "lora.targets"),
    (None, ["lora.targets=[]"], None, "lora.targets"),
    (None, ["lora.targets=[query,query]"], None, "lora.targets"),
    (None, ["lora.rank=0"], None, "lora.rank"),
    (None, ["lora.alpha=.inf"], None, "lora.alpha"),
    (None, ["model.name=/no/such/model"], None, "model.name"),
    (None, ["model.name=./missing_model"], None, "model.name"),
    (None, ["model.name=a/b/c"], None, "model.name"),
    (None, ["model.compute_dtype=float16"], None, "model.compute_dtype"),
    (None, ["model.tiny.num_layers=x"], None, "model.tiny.num_layers"),
    (None, ["data.task=cola"], None, "data.task"),
    (None, ["data.custom.labl=sentiment"], None, "data.custom.labl"),
    (None, ["data.custom.label=null"], None, "data.custom.label"),
    (None, ["data.custom.train=no/such.csv"], None, "data.custom.train"),
    (None, ["data.custom.validation=null"], None, "data.custom.validation"),
    (None, ["data.custom.format=xlsx"], None, "data.custom.format"),
    (None, ["data.custom.encoding=klingon"], None, "data.custom.encoding"),
    (None, ["data.custom.text_a=missing_col"], None, "missing_col"),
    (None, ["data.custom.train={latin1.csv}"], None, "latin1.csv"),
    (None, ["data.custom.train={no_label_col.csv}"], None, "no_label_col.csv"),
    (None, ["data.custom.train={empty.csv}"], None, "empty.csv"),
    (None, ["data.task=sst2", "data.custom=null", "data.data_dir=/no/such/dir"], None, "data.data_dir"),
    (None, ["data.custom=null"], None, "data.custom"),
    (None, ["data.max_length=0"], None, "data.max_length"),
    (None, ["data.length_buckets=[]"], None, "data.length_buckets"),
    (None, ["data.tokenizer=/no/such/tokenizer"], None, "data.tokenizer"),
    (None, ["partition.method=zipf"], None, "partition.method"),
    (None, ["partition.alpha=-1"], None, "partition.alpha"),
    (None, ["partition.num_devices=0"], None, "partition.num_devices"),
    (None, ["devices.profiles={garbage_profiles.yaml}"], None, "garbage_profiles.yaml"),
    (None, ["devices.profiles=/no/such/profiles.yaml"], None, "devices.profiles"),
    (None, ["devices.profiles={three_profiles.yaml}"], None, "devices.profiles"),
    (None, ["devices.tiers=[pentium]"], None, "devices.tiers"),
    (None, ["devices.bandwidth_jitter=1"], None, "devices.bandwidth_jitter"),
    (None, ["checkpoint.keep=0"], None, "checkpoint.keep"),
    (None, ["seed=-1"], None, "seed"),
    (None, ["name=''"], None, "name"),
    (None, ["train.rounds"], None, "train.rounds"),
    (None, [], "a_file", "--out"),
    ("no_such_config.yaml", [], None, "no_such_config.yaml"),
    ("bad_yaml.yaml", [], None, "bad_yaml.yaml"),
    ("list_top.yaml", [], None, "list_top.yaml"),
    ("missing_base.yaml", [], None, "nowhere.yaml"),
    # found while reading the data (still before the model is loaded and the run directory made)
    (None, ["data.custom.train={one_class.csv}"], None, "one_class.csv"),
    (None, ["data.custom.train={nan_label.csv}"], None, "nan_label.csv row 11"),
    (None, ["data.custom.train={none_label.csv}"], None, "none_label.csv row 11"),
    (None, ["data.custom.train={empty_label.csv}"], None, "empty_label.csv row 11"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("malformed"))


@pytest.mark.parametrize("config, overrides, out_name, needle", CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_malformed_input_exits_2_with_one_line_and_no_run_dir(files, tmp_path, monkeypatch, capsys,
                                                              config, overrides, out_name, needle):
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)   # keep this process's jax config
    monkeypatch.chdir(tmp_path)
    config_path = SMOKE if config is None else files.get(config, tmp_path / config)
    out = files[out_name] if out_name else tmp_path / "run"
    argv = ["run", str(config_path), "--out", str(out), "--quiet"]
    for o in overrides:
        for name, path in files.items():
            o = o.replace("{" + name + "}", str(path))
        argv += ["--set", o]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("hfl-jax: error: ") and needle in err[0], err[0]
    assert out_name or not out.exists()


def test_table_has_at_least_40_rows():
    assert len(CASES) >= 40


def test_missing_labels_can_be_dropped(files):
    spec = {"train": str(files["nan_label.csv"]), "validation": str(files["nan_label.csv"]),
            "text_a": "text", "label": "sentiment"}
    with pytest.raises(DataError, match="looks missing"):
        load_task("custom", "train", custom=spec)
    ds = load_task("custom", "train", custom=dict(spec, drop_missing_labels=True))
    assert len(ds) == 10 and ds.label_names == ("negative", "positive")


def test_encoding_option_reads_latin1(files):
    spec = {"train": str(files["latin1.csv"]), "text_a": "text", "label": "sentiment", "encoding": "latin-1"}
    ds = load_task("custom", "train", custom=spec)
    assert ds.text_a[-1] == "un film très bon ."


def test_one_class_names_the_counts(files):
    with pytest.raises(DataError, match=r"1 class\(es\) \('positive': 6 rows\)"):
        load_task("custom", "train", custom={"train": str(files["one_class.csv"]), "text_a": "text",
                                             "label": "sentiment"})


def test_validation_label_outside_training_set_says_so(files):
    spec = {"train": str(files["nan_label.csv"]), "validation": str(files["third_class.csv"]),
            "text_a": "text", "label": "sentiment", "drop_missing_labels": True}
    with pytest.raises(DataError, match="third_class.csv row 11 has label 'neutral', outside the training split"):
        load_task("custom", "validation", custom=spec)


def test_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = preflight(load_config(SMOKE))
    assert Path(cfg.data.custom["train"]) == ROOT / "experiments" / "data" / "tiny_sentiment_train.csv"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(f"base: {SMOKE}\ndata: {{custom: {{validation: v.csv}}}}\n")
    raw_cfg = load_config(tmp_path / "sub" / "child.yaml")
    assert raw_cfg.data.custom["validation"] == str(tmp_path / "sub" / "v.csv")   # this file's directory
    assert raw_cfg.data.custom["train"] == cfg.data.custom["train"]               # the base file's
    with pytest.raises(ConfigError, match="data.custom.validation"):
        preflight(raw_cfg)
