"""Training configuration: one source of truth (the data section composes the data package's
dataclasses), every error at parse time naming the key as the user wrote it, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmcap.config import ConfigError
from mmcap.data.config import BatchConfig, ImageConfig, SamplerConfig
from mmcap.train.__main__ import main
from mmcap.train.config import TrainConfig
from mmcap.train.overrides import load_train_config

REPO = Path(__file__).resolve().parents[2]


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_train_config("debug-gemma", None, list(overrides))
    return str(e.value)


def test_data_section_is_the_data_package_configs():
    cfg = load_train_config("debug-gemma", None, [])
    assert isinstance(cfg.data.sampler, SamplerConfig)
    assert isinstance(cfg.data.batch, BatchConfig)
    assert isinstance(cfg.data.image, ImageConfig)
    # the defaults are the data package's own
    assert cfg.data.batch == BatchConfig()
    assert cfg.data.sampler.balancing == SamplerConfig().balancing
    # the run fills in the sampler's run fields
    cfg = load_train_config("debug-gemma", None, ["global_batch_size=16", "seed=7"])
    assert cfg.data.sampler.global_batch_size == 16 and cfg.data.sampler.seed == 7
    cfg = load_train_config(
        "debug-gemma",
        None,
        ["data.sampler.balancing=generalist-finetune", "data.batch.max_prompt_tokens=24"],
    )
    assert cfg.data.sampler.balancing == "generalist-finetune"
    assert cfg.data.batch.max_prompt_tokens == 24


@pytest.mark.parametrize(
    "override, names",
    [
        ("data.sampler.balancing=typo", "data.sampler.balancing"),
        ("data.balancing=typo", "data.balancing"),  # the earlier flat key: says where it moved
        ("data.batch.pad_to=never", "data.batch.pad_to"),
        ("data.batch.max_target_tokens=0", "data.batch.max_target_tokens"),
        ("data.image.backend=gif", "data.image.backend"),
        ("data.sampler.global_batch_size=3", "data.sampler.global_batch_size"),
        ("data.image.size=768", "data.image.size"),
        ("data.train=some/dir", "data.train"),  # a list without brackets
        ("train_steps=abc", "train_steps"),
        ("optim.lr=fast", "optim.lr"),
        ("seed=abc", "seed"),
        ("logging.log_interval=0", "logging.log_interval"),
        ("eval.micro_batch_size=0", "eval.micro_batch_size"),
        ("exit_interval=0", "exit_interval"),
        ("precision.fp8=hybrid", "precision.fp8"),
        ("model.decoder.num_layers=abc", "model.decoder.num_layers"),
        ("model.decoder=3", "model.decoder"),
        ("optim.nope=1", "optim.nope"),
    ],
)
def test_errors_name_the_key(override, names):
    msg = _error(override)
    assert msg.startswith(names + ":"), msg


def test_moved_key_names_the_new_key():
    assert "data.sampler.balancing" in _error("data.balancing=task-lang-balancing")
    assert "data.batch.max_prompt_tokens" in _error("data.max_prompt_tokens=24")


def test_yaml_recipes_load():
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        cfg = load_train_config(None, path, [])
        assert isinstance(cfg, TrainConfig), path


def test_cli_print_config(capsys):
    assert main(["--preset", "debug-gemma", "--print-config", "data.balancing=typo"]) == 2
    assert "data.balancing" in capsys.readouterr().err
    assert main(["--preset", "debug-gemma", "--print-config", "data.sampler.balancing=x"]) == 2
    assert "data.sampler.balancing" in capsys.readouterr().err
    assert main(["--preset", "debug-gemma", "--print-config", "model.decoder.num_layers=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # the resolved model, not the overrides: a complete, valid configuration
    assert printed["model"]["decoder"]["num_layers"] == 2
    assert printed["model"]["decoder"]["hidden_size"] > 0
    assert printed["data"]["sampler"]["balancing"] == "task-lang-balancing"


def test_wandb_project_without_wandb_is_a_parse_time_error(monkeypatch, capsys):
    """Refused when the configuration is parsed (before any model is built), naming the key
    and both fixes; an empty value is off."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb package
    assert main(["--preset", "debug-gemma", "logging.wandb_project=myproj"]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb_project: set to 'myproj'" in err and "pip install wandb" in err, err
    assert "logging.wandb_project=null" in err and "Traceback" not in err
    cfg = load_train_config("debug-gemma", None, ["logging.wandb_project="])
    assert cfg.logging.wandb_project is None


@pytest.mark.slow
def test_cli_subprocess_exit_code():
    """As a user runs it: exit 2, one line on stderr naming the key, no traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "mmcap.train", "--preset", "debug-gemma", "--print-config",
         "data.balancing=typo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p
    assert "data.balancing" in p.stderr and "Traceback" not in p.stderr
