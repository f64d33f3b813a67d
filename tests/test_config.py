"""Config: YAML + overrides + schema types + validation messages, and the exit-2 contract."""
import resource

import pytest
import yaml

from helpers import REPO, script, user_error
from lib import config
from lib.errors import UserError


def test_precedence_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.5, name: sgd}\ntrain: {epochs: 3}\n")
    cfg = config.load(config.Config, f, ["optim.lr=1e-3", "model.init={name: xavier_uniform}"])
    assert cfg.optim.lr == 0.001                      # command line beats the file; 1e-3 parsed as a number
    assert cfg.optim.name == "sgd" and cfg.train.epochs == 3   # the file beats the defaults
    assert cfg.data.batch_size == 256                 # defaults elsewhere
    assert cfg.model.init == {"name": "xavier_uniform"}
    assert cfg._origins["optim.lr"] == "the command line" and cfg._origins["optim.name"] == str(f)


def test_another_optimizer_drops_the_script_defaults_options():
    """gan_train.py's defaults give Adam's betas; optim.name=sgd on the command line drops them (they
    belong to the default's choice) instead of refusing a key the user never set."""
    defaults = {"optim": {"name": "adam", "lr": 2e-4, "betas": [0.5, 0.999]}}
    sgd = config.load(config.GanConfig, None, ["optim.name=sgd", "optim.momentum=0.9"], script_defaults=defaults)
    assert sgd.optim.extra == {"momentum": 0.9} and sgd.optim.lr == 2e-4 and "optim.betas" not in sgd._origins
    adam = config.load(config.GanConfig, None, ["optim.lr=1e-3"], script_defaults=defaults)
    assert adam.optim.extra == {"betas": [0.5, 0.999]}
    kept = config.load(config.GanConfig, None, ["optim.name=adamw", "optim.betas=[0.9, 0.95]"],
                       script_defaults=defaults)
    assert kept.optim.extra == {"betas": [0.9, 0.95]}


def test_open_sections_collect_builder_arguments(cfg_of):
    cfg = cfg_of("optim.name=sgd", "optim.momentum=0.9", "loss.label_smoothing=0.1", "model.hidden=[64, 32]")
    assert cfg.optim.extra == {"momentum": 0.9}
    assert cfg.loss.extra == {"label_smoothing": 0.1}
    assert cfg.model.extra == {"hidden": [64, 32]}
    dumped = yaml.safe_load(config.dump(cfg))
    assert dumped["optim"]["momentum"] == 0.9 and "extra" not in dumped["optim"]
    assert config.to_dict(config.from_dict(config.Config, dumped)) == dumped   # round trip


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", None),                                    # open section: caught by the signature check
    ("optimizer.lr=1", ["unknown config key 'optimizer'", "did you mean 'optim'"]),
    ("train.epoch=3", ["unknown config key 'train.epoch'", "did you mean 'train.epochs'"]),
    ("train.epochs=ten", ["train.epochs must be an integer", "'ten'"]),
    ("train.precision=fp32", ["train.precision must be one of no, fp16, bf16"]),
    ("data.batch_size=0", ["data.batch_size", "must be at least 1"]),
    ("data.classes=5", ["data.classes must be a list"]),
    ("train.compile=maybe", ["train.compile must be true or false"]),
    ("dist.gpus=a,b", ["dist.gpus", "must list GPU indices"]),
    ("name=a/b", ["name", "plain folder name"]),
])
def test_bad_values_name_the_key(cfg_of, override, words):
    if words is None:
        cfg = cfg_of(override)
        assert cfg.optim.extra == {"lrr": 1}
        return
    with pytest.raises(UserError) as e:
        cfg_of(override)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "the command line" in str(e.value)


def test_yaml_words_and_numbers(cfg_of):
    assert cfg_of("train.precision=no").train.precision == "no"   # YAML reads `no` as false
    assert cfg_of("dist.gpus=2,3").dist.gpus == "2,3"
    assert cfg_of("dist.gpus=[0, 2]").dist.gpus == "0,2"
    assert cfg_of("train.clip_grad_norm=1").train.clip_grad_norm == 1.0


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(config.Config, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        config.load(config.Config, bad)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(config.Config, code)
    assert not (tmp_path / "pwned").exists()


# Packages a CLI that only prints must never load (train.py imports them inside main()).
HEAVY = ("torch", "torchvision", "numpy", "accelerate", "deepspeed", "wandb", "matplotlib", "scipy", "sklearn",
         "PIL", "pandas", "tensorboard")


def _cost(*cmd, cwd):
    """Run `python -X importtime *cmd`: (result, the top-level packages it imported, its CPU seconds).

    What a command imports and the CPU time it uses (user + sys of the child, from RUSAGE_CHILDREN)
    do not depend on how loaded the machine is, unlike its wall time."""
    from helpers import PY, run
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = run([PY, "-X", "importtime", *map(str, cmd)], cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    return r, imported, cpu


def test_help_is_fast_and_lists_keys(tmp_path):
    r, imported, cpu = _cost(REPO / "train.py", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "optim.lr" in r.stdout and "data.augment" in r.stdout, r.stderr
    assert not imported & set(HEAVY), f"--help imported {sorted(imported & set(HEAVY))}"   # never torch
    # ~0.1 s of CPU without torch; importing torch alone costs ~2 s.
    assert cpu < 1.0, f"--help used {cpu:.2f}s of CPU"


SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_preflight(tmp_path, name):
    """Each configs/*.yaml resolves through its script's pre-flight (--print-config, in this process)."""
    import helpers
    script_name = "gan_train.py" if name.startswith("dcgan") else "finetune.py" if name.startswith("finetune") \
        else "train.py"
    code, out, err = helpers.in_process(script_name, ["--config", REPO / "configs" / name, "--print-config"], tmp_path)
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["name"] == yaml.safe_load((REPO / "configs" / name).read_text())["name"]
    assert list(tmp_path.iterdir()) == []


def test_launcher_configs_are_consistent():
    import json
    for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3"):
        acc = yaml.safe_load((REPO / "configs/accelerate" / f"{name}.yaml").read_text())
        assert acc["num_machines"] == 1 and acc["num_processes"] >= 1
        if name == "ddp":
            assert acc["distributed_type"] == "MULTI_GPU" and acc["mixed_precision"] == "no"
        else:
            assert acc["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in acc
            ds_file = REPO / acc["deepspeed_config"]["deepspeed_config_file"]
            assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == int(name[-1])
    for stage in (1, 2, 3):
        ds = json.loads((REPO / f"configs/deepspeed/zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"


def test_print_config_is_fast(tmp_path):
    r, imported, cpu = _cost(REPO / "train.py", "--print-config", cwd=tmp_path)
    assert r.returncode == 0 and "fashion_cnn" in r.stdout, r.stderr
    heavy = imported & set(HEAVY) - {"torch", "numpy"}      # pre-flight needs torch (and torch numpy), no more
    assert not heavy, f"--print-config imported {sorted(heavy)}"
    # Its cost is torch's import plus a little: compared with `import torch` measured now, on the same
    # machine (torchvision alone would add about as much again).
    _, _, torch_cpu = _cost("-c", "import torch", cwd=tmp_path)
    assert cpu < 1.4 * torch_cpu + 0.3, f"--print-config used {cpu:.2f}s of CPU, import torch {torch_cpu:.2f}s"


def test_print_config_resolves_and_imports_no_optional_packages(tmp_path):
    probe = ("import sys, runpy; sys.argv = ['train.py', '--print-config', 'optim.lr=0.05']\n"
             f"sys.path.insert(0, {str(REPO)!r})\n"
             "try:\n    runpy.run_path(" + repr(str(REPO / "train.py")) + ", run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0, e.code\n"
             "bad = [m for m in ('deepspeed', 'wandb', 'matplotlib', 'torchvision') if m in sys.modules]\n"
             "print('IMPORTED', bad)\n")
    from helpers import run, PY
    r = run([PY, "-c", probe], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout
    cfg = yaml.safe_load(r.stdout.split("IMPORTED")[0])
    assert cfg["optim"]["lr"] == 0.05 and cfg["model"]["name"] == "fashion_cnn"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, words", [
    (["optim.lrr=0.1"], ["optim.lrr (set in the command line) is not an option", "did you mean 'optim.lr'"]),
    (["train.epochs=abc"], ["train.epochs must be an integer"]),
    (["model.name=resnet19"], ["unknown model 'resnet19'", "did you mean 'resnet'"]),
    (["data.name=csv", "data.csv=nowhere.csv"], ["data.csv=nowhere.csv: no such file"]),
])
def test_bad_configs_exit_2_with_one_sentence_and_write_nothing(tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    message = user_error(script("train.py", *args, cwd=tmp_path))
    for w in words:
        assert w in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "something was written"


# Issue 17 item 4: the recipe configs hold torchvision's documented values (README's recipe table).
RECIPES = {
    "resnet50_imagenet.yaml": {
        "model.name": "torchvision:resnet50", "data.batch_size": 32, "optim.name": "sgd", "optim.lr": 0.1,
        "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "sched.name": "step", "sched.step_size": 30,
        "sched.gamma": 0.1, "train.epochs": 90, "data.train_crop": 224, "data.eval_resize": 256,
        "data.eval_crop": 224, "data.interpolation": "bilinear", "data.normalize": "imagenet"},
    "resnet50_imagenet_v2.yaml": {
        "model.name": "torchvision:resnet50", "data.batch_size": 128, "optim.name": "sgd", "optim.lr": 0.5,
        "optim.momentum": 0.9, "optim.weight_decay": 2e-5, "optim.no_decay_norm_bias": True, "sched.name": "cosine",
        "sched.warmup_epochs": 5, "sched.warmup_start": 0.01, "train.epochs": 600, "data.train_crop": 176,
        "data.eval_resize": 232, "data.eval_crop": 224, "data.auto_augment": "trivialaugment",
        "data.random_erasing": 0.1, "data.mixup_alpha": 0.2, "data.cutmix_alpha": 1.0, "loss.label_smoothing": 0.1,
        "train.ema": round(1 - 2e-5 * 8 * 128 * 32 / 600, 6), "train.ema_every": 32, "train.ema_warmup_epochs": 5},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_configs_hold_torchvisions_values(tmp_path, name):
    import helpers
    code, out, err = helpers.in_process("train.py", ["--config", REPO / "configs" / name, "--print-config"], tmp_path)
    assert code == 0, err
    resolved = yaml.safe_load(out)
    for key, want in RECIPES[name].items():
        section, field = key.split(".")
        assert resolved[section][field] == pytest.approx(want) if isinstance(want, float) else \
            resolved[section][field] == want, key
