"""Every registry entry (model, init, loss, optimizer, scheduler) exercised, plus the educational layers."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layers import CenteredLayer, Conv2D, DenseDict, DenseList, corr2d, pool2d
from lib import config, losses, optim
from lib.errors import UserError
from lib.init import INITS, apply_init
from lib.losses import LOSSES, build_loss
from lib.models import MODELS, build_model
from lib.models.tv import torchvision_names
from lib.models.weights import load_weights
from lib.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from lib.registry import Registry


def section(cls, **kw):
    s = cls()
    for k, v in kw.items():
        if any(f == k for f in s.__dataclass_fields__):
            setattr(s, k, v)
        else:
            s.extra[k] = v
    return s


# ---------------------------------------------------------------------------------------------
# Registry semantics
# ---------------------------------------------------------------------------------------------

def test_registry_duplicates_and_unknown_names():
    r = Registry("thing")
    r.add("alpha", 1)
    with pytest.raises(ValueError, match="registered twice"):
        r.add("alpha", 2)
    with pytest.raises(UserError, match="unknown thing 'alpah' \\(did you mean 'alpha'\\?\\)"):
        r.get("alpah")
    assert r.names() == ["alpha"] and "alpha" in r and "beta" not in r


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

MODEL_CASES = {
    "mlp": dict(input_shape=(1, 28, 28), extra={"hidden": [32, 16], "dropout": 0.1}),
    "lenet": dict(input_shape=(1, 28, 28)),
    "alexnet": dict(input_shape=(1, 224, 224)),
    "fashion_cnn": dict(input_shape=(1, 28, 28)),
    "convnet": dict(input_shape=(3, 32, 32), extra={"batch_norm": True}),
    "resnet": dict(input_shape=(3, 32, 32), extra={"widths": [8, 16, 32, 64]}),
    "lstm": dict(input_shape=(20, 1), num_classes=1),
}
TORCHVISION_CASES = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_y_400mf"]


def _forward_backward(model, shape, k):
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, k)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"


CLASSIFIERS = sorted(n for n in MODELS if not n.endswith("*") and "generation" not in MODELS.meta(n).get("tasks", ()))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_model_builds_and_trains(name):
    case = MODEL_CASES[name]
    shape = case["input_shape"]
    k = case.get("num_classes", 7)
    m = section(config.ModelCfg, name=name, **case.get("extra", {}))
    model = build_model(m, num_classes=k, in_channels=shape[0], image_size=shape[-1], input_shape=shape)
    again = build_model(m, num_classes=k, in_channels=shape[0], image_size=shape[-1], input_shape=shape)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())), \
        "same seed must give the same initial weights"
    _forward_backward(model, shape, k)


def test_every_registered_model_is_covered():
    generators = {"dcgan_generator", "dcgan_discriminator"}          # shapes: tests/test_gan.py
    assert set(n for n in MODELS if not n.endswith("*")) == set(MODEL_CASES) | generators


@pytest.mark.parametrize("name", ["dcgan_generator", "dcgan_discriminator"])
def test_dcgan_registry_entries(name):
    net = MODELS.get(name)(channels=3, image_size=32, features=8)
    x = torch.randn(2, 64, 1, 1) if name == "dcgan_generator" else torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == ((2, 3, 32, 32) if name == "dcgan_generator" else (2,))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", TORCHVISION_CASES)
def test_torchvision_models(name):
    m = section(config.ModelCfg, name=f"torchvision:{name}")
    model = build_model(m, num_classes=5, in_channels=1, image_size=64, input_shape=(1, 64, 64))
    _forward_backward(model, (1, 64, 64), 5)


def test_torchvision_names_and_cifar_stem():
    names = torchvision_names()
    assert "resnet18" in names and "vit_b_16" in names and len(names) > 50
    assert f"torchvision:{names[0]}" in MODELS
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        MODELS.get("torchvision:resnet81")
    m = section(config.ModelCfg, name="torchvision:resnet18", cifar_stem=True)
    model = build_model(m, num_classes=10, in_channels=3)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)


def test_heads_are_found_and_replaced_linear_or_convolutional():
    from lib.models.heads import head_name, replace_head
    sq = build_model(section(config.ModelCfg, name="torchvision:squeezenet1_1"), num_classes=5, in_channels=1,
                     image_size=64)
    assert head_name(sq) == "classifier.1"                    # SqueezeNet classifies with a 1x1 conv
    replace_head(sq, 7)
    assert sq(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    with pytest.raises(UserError, match="1x1 convolution"):
        replace_head(sq, 7, hidden=[32])
    r = build_model(section(config.ModelCfg, name="resnet"), num_classes=10, in_channels=3)
    assert [n for n, _ in r.named_children()][:4] == ["conv1", "bn1", "relu", "maxpool"]   # torchvision's order
    replace_head(r, 5, hidden=[400, 300])                     # the seed's 512 -> 400 -> ReLU -> 300 head
    assert [m.out_features for m in r.fc if isinstance(m, nn.Linear)] == [400, 300, 5]


def test_our_resnet_loads_torchvision_weights(tmp_path):
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    ours = build_model(section(config.ModelCfg, name="resnet", stem="imagenet"), num_classes=10, in_channels=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    load_weights(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    tv.eval(), ours.eval()
    assert torch.allclose(tv(x), ours(x), atol=1e-5)


def test_load_weights_reports_mismatch(tmp_path):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="does not fit model"):
        load_weights(build_model(section(config.ModelCfg, name="lenet"), num_classes=10, in_channels=1,
                                 image_size=28), tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------
# Init schemes and per-layer policies
# ---------------------------------------------------------------------------------------------

def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 4), nn.LSTM(4, 4))


def _fans(w):
    k = w[0, 0].numel()                                    # receptive field: 1 for a Linear, 3x3 for the conv
    return w.shape[1] * k, w.shape[0] * k                  # fan_in, fan_out


def _std_is(w, want, rel=0.05):
    got = w.std().item()
    assert abs(got - want) <= rel * want, f"std {got:.4g}, theory {want:.4g}"


def _mean_is(w, want, std):
    assert abs(w.mean().item() - want) <= 0.05 * std, f"mean {w.mean().item():.4g}, theory {want}"


def _uniform_is(w, lo, hi):
    """U(lo, hi): never outside, reaches both ends, mean (lo+hi)/2, std (hi-lo)/sqrt(12)."""
    assert lo <= w.min() < lo + 0.02 * (hi - lo) and hi - 0.02 * (hi - lo) < w.max() <= hi, (w.min(), w.max())
    _mean_is(w, (lo + hi) / 2, (hi - lo) / math.sqrt(12))
    _std_is(w, (hi - lo) / math.sqrt(12))


def _bounded_is(w, bound):
    _uniform_is(w, -bound, bound)


def _normal_is(w, mean, std, bell=True):
    _mean_is(w, mean, std)
    _std_is(w, std)
    if bell:                                               # a normal, not a uniform of the same std (57.7%)
        inside = ((w - mean).abs() < std).float().mean().item()
        assert abs(inside - 0.6827) < 0.02, f"{inside:.3f} within one std, a normal has 0.683"


def _orthogonal_is(w, gain):
    m = w.flatten(1)
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    assert torch.allclose(small, gain ** 2 * torch.eye(len(small)), atol=1e-4)


def _trunc_normal_std(std, a, b, mean):
    """Standard deviation of N(mean, std) truncated to [a, b], from the closed form."""
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)   # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))          # noqa: E731
    al, be = (a - mean) / std, (b - mean) / std
    z = cdf(be) - cdf(al)
    var = 1 + (al * phi(al) - be * phi(be)) / z - ((phi(al) - phi(be)) / z) ** 2
    return std * math.sqrt(var)


def _trunc_normal_is(w, mean, std, a, b):
    assert a <= w.min() and w.max() <= b, (w.min(), w.max())
    _normal_is(w, mean, _trunc_normal_std(std, a, b, mean), bell=False)


def _sparse_is(w, sparsity, std):
    zeros = (w == 0).sum(0)                                # torch zeroes ceil(sparsity * rows) of each column
    assert torch.all(zeros == math.ceil(sparsity * w.shape[0])), zeros.unique()
    _normal_is(w[w != 0], 0.0, std)


RELU, TANH, LEAKY_05 = math.sqrt(2), 5 / 3, math.sqrt(2 / (1 + 0.5 ** 2))   # torch.nn.init.calculate_gain
# name -> [(scheme arguments, check(weight, weight before): False or an AssertionError when wrong)].
# The layers are never square (fan_in != fan_out) and big enough that the empirical std is within
# ~1% of the theory, so a fan-mode mix-up (a factor 2 here) or a lost gain fails the 5% tolerance.
SCHEME_CASES = {
    "default": [({}, lambda w, before: torch.equal(w, before))],
    "uniform": [({"a": -0.1, "b": 0.3}, lambda w, _: _uniform_is(w, -0.1, 0.3))],
    "normal": [({"mean": 0.5, "std": 0.02}, lambda w, _: _normal_is(w, 0.5, 0.02))],
    "constant": [({"val": 0.3}, lambda w, _: torch.all(w == 0.3))],
    "ones": [({}, lambda w, _: torch.all(w == 1))],
    "zeros": [({}, lambda w, _: torch.all(w == 0))],
    "eye": [({}, lambda w, _: torch.equal(w, torch.eye(*w.shape)))],
    "dirac": [({}, None)],                                 # checked by its output below
    "xavier_uniform": [
        ({}, lambda w, _: _bounded_is(w, math.sqrt(6 / sum(_fans(w))))),
        ({"gain": 1.5}, lambda w, _: _bounded_is(w, 1.5 * math.sqrt(6 / sum(_fans(w)))))],
    "xavier_normal": [
        ({}, lambda w, _: _normal_is(w, 0.0, math.sqrt(2 / sum(_fans(w))))),
        ({"gain": 0.5}, lambda w, _: _normal_is(w, 0.0, 0.5 * math.sqrt(2 / sum(_fans(w)))))],
    "kaiming_uniform": [                                   # bound gain * sqrt(3 / fan), fan_in by default
        ({"nonlinearity": "relu"}, lambda w, _: _bounded_is(w, RELU * math.sqrt(3 / _fans(w)[0]))),
        ({"mode": "fan_out", "nonlinearity": "tanh"}, lambda w, _: _bounded_is(w, TANH * math.sqrt(3 / _fans(w)[1])))],
    "kaiming_normal": [                                    # std gain / sqrt(fan)
        ({"nonlinearity": "relu"}, lambda w, _: _normal_is(w, 0.0, RELU / math.sqrt(_fans(w)[0]))),
        ({"mode": "fan_out", "nonlinearity": "leaky_relu", "a": 0.5},
         lambda w, _: _normal_is(w, 0.0, LEAKY_05 / math.sqrt(_fans(w)[1])))],
    "orthogonal": [({}, lambda w, _: _orthogonal_is(w, 1.0)), ({"gain": 2.0}, lambda w, _: _orthogonal_is(w, 2.0))],
    "sparse": [({"sparsity": 0.3, "std": 0.02}, lambda w, _: _sparse_is(w, 0.3, 0.02))],
    "trunc_normal": [({"mean": 0.5, "std": 1.0, "a": -1.5, "b": 2.5},
                      lambda w, _: _trunc_normal_is(w, 0.5, 1.0, -1.5, 2.5))],
}


@pytest.mark.parametrize("name", sorted(INITS.names()))
def test_every_init_scheme(name):
    ranks = INITS.meta(name)["ranks"]
    for args, ok in SCHEME_CASES[name]:
        torch.manual_seed(0)
        # fan_in 400 / 16*9 = 144 and fan_out 100 / 64*9 = 576: kaiming's two modes differ by 2x
        layers = [nn.Linear(400, 100), nn.Conv2d(16, 64, 3, padding=1)]
        layers = [m for m in layers if ranks is None or ranks == "2+" or m.weight.dim() in ranks]
        assert layers, name
        for layer in layers:
            before = layer.weight.detach().clone()
            apply_init(layer, {"name": name, "bias": 0.25, **args})
            w = layer.weight.detach()
            if name == "dirac":                            # identity convolution: the first 16 outputs are
                x = torch.randn(2, 16, 7, 7)               # the input, the other 48 only the bias
                out = layer(x).detach()
                assert torch.allclose(out[:, :16], x + 0.25, atol=1e-6) and torch.all(out[:, 16:] == 0.25)
            else:
                result = ok(w, before)                     # a bool, or None from the asserting checks
                assert result is None or bool(result), (name, args, type(layer).__name__)
            assert torch.all(layer.bias == 0.25)


def test_init_policies_by_layer_type():
    net = _net()
    apply_init(net, {"name": "zeros", "bias": 1.0,
                     "conv": {"name": "constant", "val": 2.0, "bias": 3.0},
                     "norm": {"name": "normal", "mean": 1.0, "std": 0.02, "bias": 0.0},
                     "rnn": {"name": "orthogonal"}})
    conv, bn, lin, lstm = net[0], net[1], net[3], net[4]
    assert torch.all(conv.weight == 2) and torch.all(conv.bias == 3)
    assert abs(bn.weight.mean() - 1) < 0.05 and torch.all(bn.bias == 0)
    assert torch.all(lin.weight == 0) and torch.all(lin.bias == 1)
    w = lstm.weight_hh_l0.detach()
    assert torch.allclose(w.T @ w, torch.eye(4), atol=1e-5)


def test_init_refusals():
    with pytest.raises(UserError, match="eye needs 2-D weights but 0.weight is 4-D"):
        apply_init(_net(), {"name": "eye"})
    with pytest.raises(UserError, match="unknown init scheme 'kaiming'"):
        apply_init(_net(), {"name": "kaiming"})
    with pytest.raises(UserError, match="model.init.gian is not an option"):
        apply_init(_net(), {"name": "xavier_uniform", "gian": 2})


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _natural_inputs(name):
    """Inputs a refused loss takes in its own domain (to show the registry entry works)."""
    a, p, n = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.randn(4, 8)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    return {
        "ctc": (torch.randn(12, 2, 5, requires_grad=True).log_softmax(2), torch.randint(1, 5, (2, 4)),
                torch.full((2,), 12), torch.full((2,), 4)),
        "margin_ranking": (a[:, 0], p[:, 0], sign),
        "hinge_embedding": (a, torch.ones(4, 8)),
        "cosine_embedding": (a, p, sign),
        "triplet_margin": (a, p, n),
        "triplet_margin_with_distance": (a, p, n),
        "gaussian_nll": (a, p, torch.ones(4, 8)),
        "poisson_nll": (a, p.abs()),
        "adaptive_log_softmax": (a, torch.randint(0, 10, (4,))),
    }.get(name)


NATURAL_ARGS = {"adaptive_log_softmax": {"in_features": 8, "n_classes": 10, "cutoffs": [4]}}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss(name):
    meta = LOSSES.meta(name)
    cfg = config.load(config.Config, None, [f"loss.name={name}"])
    if "classification" in meta["tasks"]:
        losses.check(cfg, "classification")
        fn = build_loss(cfg.loss, "classification")
        logits = torch.randn(6, 5, requires_grad=True)
        loss = fn(logits, torch.randint(0, 5, (6,)))
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss) and logits.grad.abs().sum() > 0
    else:
        with pytest.raises(UserError, match="cannot train classification"):
            losses.check(cfg, "classification")
    if "regression" in meta["tasks"]:
        losses.check(cfg, "regression")
        pred = torch.randn(6, 3, requires_grad=True)
        loss = build_loss(cfg.loss, "regression")(pred, torch.rand(6, 3))
        loss.backward()
        assert torch.isfinite(loss) and pred.grad is not None
    if not meta["tasks"]:
        if name == "linear_cross_entropy":   # a fused projection + loss; refused everywhere (message tested above)
            fn = LOSSES.get(name)(in_features=8, num_classes=5)
            w = torch.randn(5, 8)
            with torch.no_grad():
                fn.linear.weight.copy_(w)                # its own final layer: logits = h @ W.T
            h, y = torch.randn(6, 8, requires_grad=True), torch.randint(0, 5, (6,))
            loss = fn(h, y)
            loss.backward()
            h_ref, w_ref = h.detach().clone().requires_grad_(), w.clone().requires_grad_()
            ref = F.cross_entropy(h_ref @ w_ref.T, y)
            ref.backward()
            assert loss.dim() == 0 and torch.allclose(loss, ref, atol=1e-6), (loss, ref)
            assert torch.allclose(h.grad, h_ref.grad, atol=1e-6)
            assert torch.allclose(fn.linear.weight.grad, w_ref.grad, atol=1e-6)
            return
        loss = LOSSES.get(name)(**NATURAL_ARGS.get(name, {}))(*_natural_inputs(name))
        loss = getattr(loss, "loss", loss)                 # adaptive_log_softmax returns (output, loss)
        assert torch.isfinite(loss)


def test_loss_options_and_our_losses():
    cfg = config.load(config.Config, None, ["loss.label_smoothing=0.2", "loss.weight=[1, 2, 3]"])
    fn = build_loss(cfg.loss, "classification")
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    ref = F.cross_entropy(logits, y, label_smoothing=0.2, weight=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(fn(logits, y), ref)
    with pytest.raises(UserError, match="loss.label_smothing.*did you mean 'loss.label_smoothing'"):
        losses.check(config.load(config.Config, None, ["loss.label_smothing=0.1"]), "classification")
    with pytest.raises(UserError, match="reduction=sum is not supported"):
        losses.check(config.load(config.Config, None, ["loss.reduction=sum"]), "classification")
    focal0 = LOSSES.get("focal")(gamma=0.0)
    assert torch.allclose(focal0(logits, y), F.cross_entropy(logits, y))
    # regress_l2: x (B, D) against y (B, K, D): sum over K and D of squared distances, mean over B
    x, t = torch.randn(4, 3), torch.randn(4, 2, 3)
    expected = sum(((x[b] - t[b, k]) ** 2).sum() for b in range(4) for k in range(2)) / 4
    assert torch.allclose(LOSSES.get("regress_l2")()(x, t), expected)


def test_loss_snake_names():
    assert losses.snake("BCEWithLogitsLoss") == "bce_with_logits"
    assert losses.snake("KLDivLoss") == "kl_div"
    assert losses.snake("MultiLabelSoftMarginLoss") == "multilabel_soft_margin"
    assert losses.snake("SmoothL1Loss") == "smooth_l1"


# ---------------------------------------------------------------------------------------------
# Optimizers and parameter groups
# ---------------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer(name):
    o = section(config.OptimCfg, name=name, lr=0.01)
    meta = OPTIMIZERS.meta(name)
    model = _mlp()
    if meta["sparse"]:
        with pytest.raises(UserError, match="only updates sparse gradients"):
            build_optimizer(o, model)
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)           # an all-sparse model is accepted
        opt = build_optimizer(section(config.OptimCfg, name=name, lr=0.1), emb)
        rows, target = torch.tensor([1, 2, 1, 7]), torch.randn(4, 4)
        before = emb.weight.detach().clone()

        def sparse_loss():
            return (emb(rows) - target).square().sum()

        first = sparse_loss().item()
        for _ in range(5):
            opt.zero_grad()
            sparse_loss().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        changed = (emb.weight.detach() != before).any(1)
        assert changed.tolist() == [i in (1, 2, 7) for i in range(10)], changed   # only rows with gradients
        assert sparse_loss().item() < first
        return
    if meta["matrices_only"]:
        with pytest.raises(UserError, match="only optimizes 2-D weight matrices"):
            build_optimizer(o, model)
        model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
    opt = build_optimizer(o, model)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(5):
        if optim.needs_closure(opt):
            opt.step(closure)
        else:
            closure()
            opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert F.cross_entropy(model(x), y).item() < first


def test_lbfgs_refusals(cfg_of):
    with pytest.raises(UserError, match="grad_accum"):
        optim.check(cfg_of("optim.name=lbfgs", "train.grad_accum=2"))
    with pytest.raises(UserError, match="fp16"):
        optim.check(cfg_of("optim.name=lbfgs", "train.precision=fp16"))


def test_param_groups_by_module_patterns():
    from lib.models.resnet import ResNet
    model = ResNet(num_classes=5, widths=(8, 8, 8, 8))
    o = section(config.OptimCfg, name="sgd", lr=0.1, weight_decay=1e-4, no_decay_norm_bias=True,
                param_groups=[{"params": "fc.*", "lr": 1e-2}, {"params": ["layer4"], "lr": 1e-5, "momentum": 0.5}],
                momentum=0.9)
    opt = build_optimizer(o, model)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], []).append(g)
    fc_ids = {id(p) for p in model.fc.parameters()}
    assert {id(p) for g in by_lr[1e-2] for p in g["params"]} == fc_ids
    l4 = {id(p) for p in model.layer4.parameters()}
    assert {id(p) for g in by_lr[1e-5] for p in g["params"]} == l4
    assert all(g["momentum"] == 0.5 for g in by_lr[1e-5])
    for g in opt.param_groups:   # biases and batch-norm parameters have no weight decay
        assert g["weight_decay"] == (0.0 if all(p.dim() == 1 for p in g["params"]) else 1e-4)
    covered = sum(len(g["params"]) for g in opt.param_groups)
    assert covered == len(list(model.parameters()))
    bad = section(config.OptimCfg, name="sgd", param_groups=[{"params": "head.*"}])
    with pytest.raises(UserError, match="matches no trainable parameter"):
        build_optimizer(bad, model)


def test_frozen_parameters_are_left_out():
    model = _mlp()
    model[0].requires_grad_(False)
    opt = build_optimizer(section(config.OptimCfg, name="adam"), model)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in model[0].parameters()}


# ---------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------

def _lrs(name, steps=100, per_epoch=10, warmup=0.0, **kw):
    opt = torch.optim.SGD(_mlp().parameters(), lr=1.0, momentum=0.9)
    s = section(config.SchedCfg, name=name, warmup_epochs=warmup, **kw)
    sched = build_scheduler(s, opt, steps_per_epoch=per_epoch, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt, sched


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler(name):
    lrs, opt, sched = _lrs(name, warmup=1.0 if name != "onecycle" else 0.0)
    plain, _, _ = _lrs(name)
    expect = {
        "none": lambda lr: lr[10:] == [1.0] * 90,
        "step": lambda lr: lr[15] == 1.0,                       # step_size 30 epochs > 10 epochs here
        "multistep": lambda lr: lr[50] == 1.0,
        "exponential": lambda lr: abs(lr[50] - 0.95 ** 5) < 1e-9,
        "cosine": lambda lr: abs(lr[55] - 0.5) < 0.02 and lr[-1] < 0.01,   # cosine over the 90 steps after warmup
        "linear": lambda lr: abs(lr[55] - 0.5) < 0.02,
        "onecycle": lambda lr: abs(max(lr) - 1.0) < 1e-6 and lr[0] < 0.05 and lr[-1] < 1e-3,
    }[name]
    assert expect(lrs), lrs[::10]
    if name != "onecycle":                                   # linear warmup over the first epoch
        main = 1.0 if name in ("cosine", "linear") else plain[5]   # these two decay after the warmup
        assert lrs[0] == 0.0 and abs(lrs[5] - 0.5 * main) < 1e-9
    # resumable: stop after 37 steps, save, load into a fresh optimizer + schedule, go on to 100
    warm = 1.0 if name != "onecycle" else 0.0

    def fresh():
        o = torch.optim.SGD(_mlp().parameters(), lr=1.0, momentum=0.9)
        return o, build_scheduler(section(config.SchedCfg, name=name, warmup_epochs=warm), o,
                                  steps_per_epoch=10, total_steps=100)
    opt1, s1 = fresh()
    for _ in range(37):
        opt1.step()
        s1.step()
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "sched": s1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, s2 = fresh()
    opt2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sched"])
    resumed = []
    for _ in range(63):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        s2.step()
    assert resumed == lrs[37:], (name, resumed[:3], lrs[37:40])


def test_onecycle_warmup_sets_the_peak_and_a_stretched_resume_is_refused(tmp_path):
    lrs, opt, sched = _lrs("onecycle", warmup=3.0)            # 3 of 10 epochs: the peak at step 30
    assert max(range(100), key=lambda i: lrs[i]) == 30 and lrs[0] < 0.05
    from lib import checkpoint
    longer = build_scheduler(section(config.SchedCfg, name="onecycle"), opt, steps_per_epoch=10, total_steps=200)
    with pytest.raises(UserError, match="one-cycle schedule cannot be stretched"):
        checkpoint.restore_objects({"scheduler": sched.state_dict()}, {"scheduler": longer}, tmp_path / "x.pt")


def test_step_schedules_in_epochs():
    lrs, _, _ = _lrs("step", step_size=2, gamma=0.5)
    assert lrs[19] == 1.0 and lrs[20] == 0.5 and lrs[40] == 0.25
    lrs, _, _ = _lrs("multistep", milestones=[3, 7], gamma=0.1)
    assert lrs[29] == 1.0 and abs(lrs[30] - 0.1) < 1e-12 and abs(lrs[70] - 0.01) < 1e-12


def test_checkpoint_states_load_weights_only(tmp_path):
    """Scheduler and optimizer states of every kind load with weights_only=True."""
    for name in SCHEDULERS.names():
        _, opt, sched = _lrs(name, steps=5)
        torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
        torch.load(tmp_path / "s.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------
# The educational layers against torch's own ops
# ---------------------------------------------------------------------------------------------

def test_corr2d_and_conv2d_match_torch():
    x, k = torch.randn(7, 9), torch.randn(3, 2)
    assert torch.allclose(corr2d(x, k), F.conv2d(x[None, None], k[None, None])[0, 0], atol=1e-5)
    layer = Conv2D((2, 2))
    ref = F.conv2d(x[None, None], layer.weight[None, None], layer.bias)[0, 0]
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_conv2d_learns_an_edge_detector():
    """d2l.ai 7.2.4: learn the kernel [1, -1] from input/output pairs."""
    x = torch.ones(6, 8)
    x[:, 2:6] = 0
    y = corr2d(x, torch.tensor([[1.0, -1.0]]))
    torch.manual_seed(0)
    layer = Conv2D((1, 2))
    for _ in range(300):
        loss = ((layer(x) - y) ** 2).sum()
        layer.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.01 * p.grad
    assert torch.allclose(layer.weight.detach(), torch.tensor([[1.0, -1.0]]), atol=0.05)


def test_pool2d_matches_torch():
    x = torch.randn(6, 7)
    assert torch.allclose(pool2d(x, (2, 3), "max"), F.max_pool2d(x[None, None], (2, 3), stride=1)[0, 0])
    assert torch.allclose(pool2d(x, (2, 3), "avg"), F.avg_pool2d(x[None, None], (2, 3), stride=1)[0, 0], atol=1e-6)


def test_dense_layers_match_linear_algebra():
    torch.manual_seed(0)
    dense = DenseList([5, 4, 3])
    x = torch.randn(2, 5)
    ref = torch.relu(x @ dense.weights[0] + dense.biases[0]) @ dense.weights[1] + dense.biases[1]
    assert torch.allclose(dense(x), ref) and len(list(dense.parameters())) == 4
    d = DenseDict({"linear1": (5, 4), "linear2": (5, 2)})
    assert d(x, "linear2").shape == (2, 2) and torch.allclose(d(x, "linear1"), x @ d.params["linear1"])
    lin = nn.Linear(5, 4)
    single = DenseList([5, 4])
    with torch.no_grad():
        single.weights[0].copy_(lin.weight.T)
        single.biases[0].copy_(lin.bias)
    assert torch.allclose(single(x), lin(x), atol=1e-6)


def test_centered_layer():
    y = CenteredLayer()(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.allclose(y, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    net = nn.Sequential(nn.Linear(8, 16), CenteredLayer())
    assert abs(net(torch.rand(4, 8)).mean().item()) < 1e-6
