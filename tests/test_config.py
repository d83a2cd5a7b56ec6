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


def test_an_experiment_starts_from_its_base_and_overrides_it(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("description: a\ntrain: {steps: 7, lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a\ndescription: b\ntrain: {steps: 9}\n")
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    cfg = config.load(["exp=b"], world_size=1)
    assert (cfg.train.steps, cfg.train.lr, cfg.description) == (9, 0.5, "b")
    with pytest.raises(ConfigError, match="loops"):
        config.load(["exp=loop"], world_size=1)
