"""finetune.py: the offline round trip (train.py on digits 0-4, finetune.py on 5-9 with the backbone
frozen), in one process and two, the exported model, weights from torchvision's cache, gradual
unfreezing, and the errors a user can make."""
import re

import pytest
import torch

import helpers
from helpers import ok, script, state_dict, torchrun, user_error

PRETRAIN = ["--config", helpers.REPO / "configs/resnet_digits.yaml", "data.image_size=16", "train.epochs=4",
            "log.plots=false"]
FINETUNE = ["--config", helpers.REPO / "configs/finetune_digits.yaml", "data.image_size=16", "train.epochs=15",
            "finetune.weights=runs/digits04/checkpoints/best.pt", "log.plots=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """train.py's small ResNet on digits 0-4 (the weights every test here starts from)."""
    cwd = tmp_path_factory.mktemp("pretrain")
    out = ok(script("train.py", *PRETRAIN, cwd=cwd))
    assert helpers.final_metrics(out)["val/acc"] > 0.95
    return cwd


def _frozen_unchanged(before, after):
    """Every backbone tensor (weights and batch-norm statistics) is bit-identical; the head changed."""
    for k, v in before.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(v, after[k]), f"{k} changed"
    assert after["fc.weight"].shape == (5, 128)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_round_trip_frozen_backbone_learns_new_digits(pretrained, launcher):
    run = script if launcher == "python" else torchrun
    same_global_batch = [] if launcher == "python" else ["data.batch_size=32"]   # 2 x 32 == 64: the same steps
    out = ok(run("finetune.py", *FINETUNE, *same_global_batch, f"name=ft_{launcher}", cwd=pretrained))
    assert "head fc rebuilt for 5 classes (dropped fc.bias, fc.weight)" in out
    assert "missing: none; unexpected: none (besides the head)" in out
    assert re.search(r"trainable 645 of [\d,]+ parameters", out)
    assert helpers.final_metrics(out)["val/acc"] >= 0.90, out[-1500:]
    before = state_dict(pretrained / "runs/digits04/checkpoints/best.pt")["model"]
    run_dir = pretrained / f"runs/ft_{launcher}"
    _frozen_unchanged(before, state_dict(run_dir / "model.pt"))
    _frozen_unchanged(before, state_dict(run_dir / "checkpoints/last.pt")["model"])
    table = (run_dir / "parameters.txt").read_text()
    assert "layer1.0.conv1.weight" in table and "fc.weight" in table


def test_exported_model_loads_in_train_py_and_finetune_py(pretrained):
    ok(script("finetune.py", *FINETUNE, "train.epochs=1", "name=ft_export", "finetune.head=[32]", cwd=pretrained))
    out = ok(script("train.py", "--config", "runs/ft_export/model.yaml", cwd=pretrained))
    evaluated = re.search(r"eval: (\{.*\})", out).group(1)
    trained = state_dict(pretrained / "runs/ft_export/checkpoints/last.pt")["metrics"]
    import json
    assert json.loads(evaluated)["val/acc"] == pytest.approx(trained["val/acc"])
    out = ok(script("finetune.py", *FINETUNE, "train.epochs=1", "name=ft_again", "model.head=[32]",
                    "finetune.head=keep", "finetune.weights=runs/ft_export/model.pt",
                    "finetune.freeze=[layer1, layer2]", cwd=pretrained))
    assert "head fc kept (5 classes)" in out       # the whole model, MLP head included, loads


def test_freeze_by_children_and_plus_with_gradual_unfreezing(pretrained):
    """The seed's recipe: the first 4 children (conv1, bn1, relu, maxpool) plus layer3.0 frozen for two
    epochs (batch-norm statistics too unless finetune.freeze_bn=false), then everything trains."""
    out = ok(script("finetune.py", *FINETUNE, "train.epochs=3", "name=ft_unfreeze",
                    "finetune.freeze={children: 4, plus: [layer3.0]}", "finetune.unfreeze_at_epoch=3",
                    "finetune.backbone_lr_mult=0.1", "optim.lr=0.01", "finetune.freeze_bn=false", cwd=pretrained))
    assert "epoch 3: unfroze" in out and "(lr 0.001)" in out
    before = state_dict(pretrained / "runs/digits04/checkpoints/best.pt")["model"]
    run = pretrained / "runs/ft_unfreeze"
    table = {line.split()[0]: line.split()[-1] for line in (run / "parameters.txt").read_text().splitlines()
             if line.split() and line.split()[-1] in ("yes", "no")}
    frozen = ("conv1.", "bn1.", "layer3.0.")
    assert all(v == "no" for k, v in table.items() if k.startswith(frozen))
    assert all(v == "yes" for k, v in table.items() if not k.startswith(frozen)) and "layer2.0.conv1.weight" in table
    epoch2 = [p for p in sorted(run.glob("checkpoints/step_*.pt")) if state_dict(p)["epoch"] == 2][0]
    mid = state_dict(epoch2)["model"]                          # after two epochs, before unfreezing
    for k, v in before.items():
        if k.startswith(frozen) and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, mid[k]), f"frozen {k} changed"
        elif k.startswith(("layer2.", "layer4.")) and k.endswith("weight"):
            assert not torch.equal(v, mid[k]), f"trainable {k} did not change"
    assert not torch.equal(before["layer3.0.bn1.running_mean"], mid["layer3.0.bn1.running_mean"])  # freeze_bn=false
    after = state_dict(run / "model.pt")
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])   # trained after unfreezing
    ckpt = state_dict(run / "checkpoints/last.pt")
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    assert ckpt["optimizer"]["param_groups"][1]["initial_lr"] == pytest.approx(0.001)


def test_torchvision_weights_from_the_cache_and_offline_message(tmp_path):
    import torchvision
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), hub / "resnet18-f37072fd.pth")
    args = ["model.name=torchvision:resnet18", "finetune.weights=IMAGENET1K_V1", "data.image_size=32",
            "finetune.freeze=backbone", "train.epochs=1", "data.batch_size=128", "train.max_steps=2"]
    out = ok(script("finetune.py", *args, cwd=tmp_path, TORCH_HOME=tmp_path / "torch_home"))
    assert "torchvision resnet18 IMAGENET1K_V1 (from the torch cache)" in out
    assert "first conv conv1.weight adapted from 3 to 1 input channel(s)" in out
    msg = user_error(script("finetune.py", *args, cwd=tmp_path, TORCH_HOME=tmp_path / "empty_home",
                            HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"))
    assert "needs resnet18-f37072fd.pth" in msg and "could not be downloaded" in msg and "copy" in msg


@pytest.mark.parametrize("args, words", [
    (["finetune.weights=missing/weights.pth"], ["no such file"]),
    (["model.widths=[8, 16, 32, 64]"], ["do not fit model ResNet", "shape"]),
    (["finetune.freeze=[lyaer1.*]"], ["pattern 'lyaer1.*' matches no module"]),
    (["finetune.head=swap"], ["must be replace, keep, or a list"]),
    (["finetune.head=keep", "model.head=[32]"], ["the kept head's fc.0.weight is not in the weights",
                                                 "or use finetune.head=replace"]),
])
def test_errors_exit_2_with_one_sentence(pretrained, args, words):
    msg = user_error(script("finetune.py", *FINETUNE, "name=bad", *args, cwd=pretrained))
    for w in words:
        assert w in msg, msg
    assert not (pretrained / "runs/bad").exists()


def test_regress_l2_is_a_registered_loss():
    from lib.losses import LOSSES
    x, y = torch.zeros(2, 3), torch.ones(2, 4, 3)
    assert LOSSES.get("regress_l2")()(x, y).item() == pytest.approx(12.0)     # 4 targets x 3 dims x 1^2
