"""Config composition and validation: pure, no MPI."""
import pytest

from harness import config
from harness.config import ConfigError


def test_defaults_come_from_the_experiment_and_overrides_win():
    cfg = config.load(["train.steps=5", "model.width=128", "pipeline.split=[10,6]"], world_size=2)
    assert cfg.exp == "deep_mlp"
    assert cfg.train.steps == 5 and cfg.model.width == 128
    assert cfg.model.layers == 16  # from experiments/deep_mlp.yaml
    assert cfg.pipeline.split == [10, 6]


@pytest.mark.parametrize("argv, world, names", [
    (["train.stepz=3"], 1, ["train.stepz", "train.steps"]),             # unknown key, lists allowed
    (["trainx.steps=3"], 1, ["trainx"]),
    (["train.steps=abc"], 1, ["train.steps", "int"]),                   # wrong type
    (["quiet=maybe"], 1, ["quiet", "bool"]),
    (["exp=nope"], 1, ["exp='nope'", "deep_mlp"]),                       # unknown experiment
    (["model.layers=2"], 3, ["model.layers=2", "world size 3"]),         # more stages than layers
    (["pipeline.split=[3,5]"], 2, ["pipeline.split", "16"]),             # split does not sum
    (["pipeline.split=[16]"], 2, ["pipeline.split", "one entry per rank"]),
    (["pipeline.microbatches=3"], 1, ["pipeline.microbatches=3", "data.batch_size=256"]),
    (["device=tpu"], 1, ["device", "auto, cpu, cuda"]),
    (["train.steps=0"], 1, ["train.steps=0"]),
    (["train.lr=-1"], 1, ["train.lr"]),
    (["threads=-2"], 1, ["threads"]),
    (["malloc=jemalloc"], 1, ["malloc='jemalloc'", "keep, system"]),
    (["debug.fail_rank=5"], 2, ["debug.fail_rank=5"]),
    (["debug.slow_rank=2"], 2, ["debug.slow_rank=2"]),
    (["debug.slow_ms=-1"], 2, ["debug.slow_ms=-1"]),
    (["debug.slow_ms=inf"], 2, ["debug.slow_ms=inf"]),
    (["steps"], 1, ["key=value"]),                                        # not key=value
    (["+train.steps=3"], 1, ["key=value"]),
])
def test_bad_input_names_the_key_and_what_is_allowed(argv, world, names):
    with pytest.raises(ConfigError) as e:
        config.load(argv, world_size=world)
    msg = str(e.value)
    assert "\n" not in msg, "errors are one line"
    for n in names:
        assert n in msg, f"{n!r} missing from: {msg}"


def test_cuda_requested_without_cuda_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device=cuda"):
        config.load(["device=cuda"], world_size=1)


def test_world_sizes_declared_by_an_experiment_are_enforced(tmp_path, monkeypatch):
    (tmp_path / "two_only.yaml").write_text("description: needs two\nworld_sizes: [2]\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    assert config.load(["exp=two_only"], world_size=2).world_sizes == [2]
    with pytest.raises(ConfigError, match="world size 3.*two_only.*2 ranks"):
        config.load(["exp=two_only"], world_size=3)


def test_the_experiment_list_follows_files_changed_added_and_removed(tmp_path, monkeypatch):
    """_scan keeps what it read until a file changes: a same-size edit (only its mtime tells),
    a new file and a removed one are each seen at the next load."""
    import os
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    a = tmp_path / "a.yaml"
    a.write_text("description: one\n")
    assert config.experiments() == {"a": "one"}
    st = a.stat()
    a.write_text("description: two\n")                         # the same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert config.experiments() == {"a": "two"}
    (tmp_path / "b.yaml").write_text("description: [unclosed\n")
    assert config.experiments() == {"a": "two"} and len(config.unreadable_warnings()) == 1
    (tmp_path / "b.yaml").unlink()
    assert config.unreadable_warnings() == []
    # a caller that changes what it was given does not change the next answer
    config.experiments()["c"] = "x"
    assert config.experiments() == {"a": "two"}
    # the cached schema is copied by every load: one run's values never reach the next
    assert config.load(["exp=a", "train.steps=7"]).train.steps == 7
    assert config.load(["exp=a"]).train.steps == config.TrainCfg().steps


def test_help_lists_experiments_and_every_key_with_its_meaning():
    text = config.help_text()
    assert "deep_mlp" in text
    for key, meaning, _ in config.keys():
        if key in ("exp", "description", "base"):
            continue
        assert key in text
        assert meaning, f"{key} has no documented meaning"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    from omegaconf import OmegaConf
    cfg = config.load(["train.steps=7", "pipeline.split=[8,8]"], world_size=2)
    (tmp_path / "c.yaml").write_text(config.to_yaml(cfg))
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config.Config),
                                               OmegaConf.load(tmp_path / "c.yaml")))
    assert back == cfg


@pytest.mark.parametrize("exp", sorted(config.experiments()))
def test_config_yaml_is_what_omegaconf_writes(exp):
    # to_yaml dumps the dataclass with OmegaConf's dumper; OmegaConf's structured config is
    # the second way, on every experiment and strings that YAML would read as another type
    from omegaconf import OmegaConf
    cfg = config.load([f"exp={exp}", "pipeline.split=null", "trace.kineto=1:2"], world_size=2)
    for d in ("1e3", "yes", "null", "a: b", "${x}", "12:30", "é/r"):
        cfg.run.dir = d
        assert config.to_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.structured(cfg)), d


def test_an_experiment_starts_from_its_base_and_overrides_it(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("description: a\ntrain: {steps: 7, lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a\ndescription: b\ntrain: {steps: 9}\n")
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    cfg = config.load(["exp=b"], world_size=1)
    assert (cfg.train.steps, cfg.train.lr, cfg.description) == (9, 0.5, "b")
    with pytest.raises(ConfigError, match="loops"):
        config.load(["exp=loop"], world_size=1)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "-Infinity"])
@pytest.mark.parametrize("key", ["train.lr", "train.momentum", "data.noise", "comm.timeout_s",
                                 "comm.poll_us", "trace.sample_interval_ms",
                                 "debug.clock_offset_ms", "debug.clock_drift_ppm"])
def test_non_finite_numbers_are_refused_for_every_float_key(key, value):
    with pytest.raises(ConfigError) as e:
        config.load([f"{key}={value}"], world_size=1)
    assert str(e.value).startswith(f"{key}=") and "finite" in str(e.value)


@pytest.mark.parametrize("arg, says", [("trace.block_repeats=0", "must be >= 1"),
                                       ("trace.clock_exchanges=0", "must be >= 1")])
def test_counts_below_one_are_refused(arg, says):
    with pytest.raises(ConfigError, match=f"^{arg}: {says}$"):
        config.load([arg], world_size=1)


def test_non_finite_numbers_in_an_experiment_file_are_refused(tmp_path, monkeypatch):
    (tmp_path / "x.yaml").write_text("train: {lr: .inf}\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"train\.lr=inf: must be a finite number"):
        config.load(["exp=x"], world_size=1)


BROKEN = "description: broken\ntrain:\n  steps: [1, 2\n  lr: 0.1\n"


def test_a_broken_experiment_file_breaks_only_itself(tmp_path, monkeypatch):
    (tmp_path / "good.yaml").write_text("description: fine\n")
    (tmp_path / "broken.yaml").write_text(BROKEN)
    (tmp_path / "child.yaml").write_text("base: broken\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    assert config.load(["exp=good"], world_size=1).description == "fine"
    assert "good" in config.help_text() and "broken" not in config.experiments()
    warn = config.unreadable_warnings()
    assert len(warn) == 1 and str(tmp_path / "broken.yaml") in warn[0] and "\n" not in warn[0]
    with pytest.raises(ConfigError) as e:                      # asking for it: file:line:col
        config.load(["exp=broken"], world_size=1)
    assert str(e.value).startswith(f"{tmp_path / 'broken.yaml'}:4:5: YAML syntax error")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"base='broken'.*broken\.yaml:4:5"):
        config.load(["exp=child"], world_size=1)


def test_a_broken_experiment_file_end_to_end(tmp_path):
    """The real CLI with a broken file in experiments/: --help and other experiments work with
    one warning line; asking for it is one error line and exit 2, on every rank."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers import REPO, SMALL
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "harness", repo / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "experiments", repo / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "experiments" / "my_sweep.yaml").write_text(BROKEN)
    env = dict(os.environ, PYTHONPATH=str(repo))
    run = lambda *a: subprocess.run([sys.executable, "-m", "harness.run", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, cwd=tmp_path,
                                    timeout=120)
    h = run("--help")
    assert h.returncode == 0 and "deep_mlp" in h.stdout
    assert h.stderr.count("\n") == 1 and "my_sweep.yaml:4:5" in h.stderr and "warning" in h.stderr
    bad = run("exp=my_sweep")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if "error" in ln] == [
        ln for ln in bad.stderr.splitlines() if "my_sweep.yaml:4:5: YAML syntax error" in ln]
    good = run(*SMALL, "train.steps=1", f"run.dir={tmp_path / 'r'}")
    assert good.returncode == 0, good.stderr
    assert good.stderr.count("my_sweep.yaml") == 1 and "Traceback" not in good.stderr
