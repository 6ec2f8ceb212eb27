"""fb.fuse on real models (torchvision, timm, transformers built from their configs, no weights
downloaded) and hand-written modules: what it fuses, what it leaves and why, and that the fused
model is exactly the unfused one (outputs, gradients, state-dict keys, train and eval mode) and
still deep-copies, pickles, torch.save's and torch.compile's."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import fused_backprop as fb

NAMES = r"\('relu', 'sigmoid', 'tanh', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu'\)"

def fused_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, fb.FusedLinearAct)]


def run(model, inputs, mode, seed=0):
    """Output and gradients (of the inputs and of each parameter, by name) of one step."""
    model.train(mode)
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out, [t.grad for t in inputs if t.is_floating_point()], grads


def assert_same_model(fused, ref, inputs):
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for mode in (True, False):
        out, dx, grads = run(fused, inputs, mode)
        want_out, want_dx, want_grads = run(ref, inputs, mode)
        assert_close(out, want_out)
        assert_close(dx, want_dx)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            assert_close(grads[name], want_grads[name], msg=name)


def assert_round_trips(fused, inputs):
    fused.eval()
    with torch.no_grad():
        want = fused(*inputs)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert other.state_dict().keys() == fused.state_dict().keys()
        assert fused_layers(other) == fused_layers(fused)
        with torch.no_grad():
            assert_close(other(*inputs), want)


def check(make, inputs, n_fused, *, round_trips=True, recompute=False, **kwargs):
    """Fuse a fresh model, compare with its unfused copy; returns (fused model, report)."""
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    report = fb.fuse_report(model, **kwargs)
    fused = fb.fuse(model, recompute=recompute, **kwargs)
    assert len(fused_layers(fused)) == n_fused == sum(r.fused for r in report)
    assert len(report) == sum(isinstance(m, nn.Linear) for m in ref.modules())
    assert_same_model(fused, ref, inputs)
    if round_trips:
        assert_round_trips(fused, inputs)
    return fused, {r.name: r for r in report}


# --- models from the packages -----------------------------------------------------------------

def test_torchvision_mlp():
    torchvision = pytest.importorskip("torchvision")
    fused, report = check(lambda: torchvision.ops.MLP(64, [128, 128, 10], dropout=0.2), [torch.randn(5, 64)], 2)
    assert fused_layers(fused) == ["0", "3"] and isinstance(fused[1], nn.Identity)
    assert report["6"].reason == "no activation after it"


def test_torchvision_vgg11():
    torchvision = pytest.importorskip("torchvision")
    fused, report = check(torchvision.models.vgg11, [torch.randn(1, 3, 32, 32)], 2, round_trips=False)
    assert fused_layers(fused) == ["classifier.0", "classifier.3"]
    assert isinstance(fused, torchvision.models.VGG)


def test_timm_mlp_relu():
    timm = pytest.importorskip("timm")
    make = lambda: timm.layers.Mlp(64, 128, act_layer=nn.ReLU, drop=0.1)  # noqa: E731
    fused, report = check(make, [torch.randn(3, 7, 64)], 1)
    assert type(fused) is timm.layers.Mlp and isinstance(fused.act, nn.Identity)  # the class stays
    assert report["fc1"].activation == "relu" and report["fc2"].reason == "no activation after it"


def test_timm_vit_gelu():
    timm = pytest.importorskip("timm")
    make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16,  # noqa: E731
                                     depth=2, num_classes=10)
    fused, report = check(make, [torch.randn(2, 3, 32, 32)], 2, round_trips=False)
    assert fused_layers(fused) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert all(report[n].activation == "gelu" for n in fused_layers(fused))
    assert isinstance(fused.blocks[0].mlp.fc1, fb.FusedLinearGELU) and fused.blocks[0].mlp.fc1.approximate == "none"
    assert report["blocks.0.mlp.fc2"].reason == "no activation after it"


def test_timm_mlp_gelu_tanh_and_silu():
    timm = pytest.importorskip("timm")
    for act_layer, name in ((lambda: nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU, "silu")):
        fused, report = check(lambda: timm.layers.Mlp(32, 64, act_layer=act_layer), [torch.randn(3, 5, 32)], 1)
        assert report["fc1"].activation == name and isinstance(fused.act, nn.Identity)


def test_transformers_bert_gelu_and_tanh():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    make = lambda: transformers.BertModel(config)  # noqa: E731
    fused, report = check(make, [torch.randint(0, 100, (2, 9))], 3, round_trips=False)
    # GELUActivation is a wrapper around F.gelu: seen through
    assert [n for n, r in report.items() if r.activation == "gelu"] == \
        ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert report["pooler.dense"].activation == "tanh"  # BertPooler: dense -> nn.Tanh


# --- hand-written modules ---------------------------------------------------------------------

class NewActivations(nn.Module):
    """Every new activation in every form fuse knows: nn modules, functions, tensor methods."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(13))
        self.leaky, self.leaky_neg = nn.LeakyReLU(0.2), nn.LeakyReLU(-0.5)
        self.gelu, self.gelu_tanh, self.silu, self.tanh = nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh()
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        f = self.fcs
        hs = [torch.tanh(f[0](x)), F.tanh(f[1](x)), f[2](x).tanh(), F.leaky_relu(f[3](x), negative_slope=-0.25),
              F.leaky_relu(f[4](x)), F.gelu(f[5](x)), F.gelu(f[6](x), approximate="tanh"), F.silu(f[7](x)),
              self.leaky(f[8](x)), self.leaky_neg(f[9](x)), self.gelu(f[10](x)), self.gelu_tanh(f[11](x)),
              self.silu(self.tanh(f[12](x)))]
        return self.out(sum(hs))


class LeakyPositional(nn.Module):
    """F.leaky_relu with its slope (and inplace) positional."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.leaky_relu(self.fc(x), 0.3, True)


def test_every_activation_in_every_form():
    fused, report = check(NewActivations, x8, 13)
    want = {"0": "tanh", "1": "tanh", "2": "tanh", "3": "leaky_relu", "4": "leaky_relu", "5": "gelu",
            "6": "gelu_tanh", "7": "silu", "8": "leaky_relu", "9": "leaky_relu", "10": "gelu", "11": "gelu_tanh",
            "12": "tanh"}
    assert {n: report[f"fcs.{n}"].activation for n in want} == want
    slopes = {n: fused.fcs[int(n)].negative_slope for n in ("3", "4", "8", "9")}
    assert slopes == {"3": -0.25, "4": 0.01, "8": 0.2, "9": -0.5}  # the model's, carried to the layer
    assert [type(fused.fcs[i]) for i in (0, 3, 5, 6, 7)] == [fb.FusedLinearTanh, fb.FusedLinearLeakyReLU,
                                                             fb.FusedLinearGELU, fb.FusedLinearGELU, fb.FusedLinearSiLU]


def test_positional_leaky_relu_slope_is_carried():
    fused, report = check(LeakyPositional, x8, 1)
    assert report["fc"].activation == "leaky_relu" and fused.fc.negative_slope == 0.3


@pytest.mark.parametrize("recompute", [False, True])
def test_sequential_of_new_activations_with_recompute(recompute):
    def make():
        return nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(-0.1), nn.Linear(8, 8), nn.LeakyReLU(0.0),
                             nn.Dropout(0.0), nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 8), nn.SiLU())
    fused, report = check(make, x8, 4, recompute=recompute)
    assert [fused[i].negative_slope for i in (0, 2)] == [-0.1, 0.0]
    assert all(fused[i].recompute == recompute for i in (0, 2, 5, 7))
    assert [r.activation for r in report.values()] == ["leaky_relu", "leaky_relu", "gelu_tanh", "silu"]


class Styles(nn.Module):
    """The function, method, torch.sigmoid and attribute styles in one forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4, self.out = (nn.Linear(8, 8) for _ in range(5))
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.0)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        a = F.relu(self.fc1(x))
        b = torch.sigmoid(self.fc2(x))
        c = self.fc3(x).relu()
        d = self.act(self.drop(self.fc4(x)))
        return self.out(a + b + c + d * self.scale)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return x + h + F.relu(h)


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.Sigmoid()

    def forward(self, x):
        h = self.fc(x)
        return self.act(h) * h


class SharedReLU(nn.Module):
    """One nn.ReLU called twice: each call goes, the module stays."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).sigmoid_()
        return x


x8 = [torch.randn(4, 8)]


def test_function_method_and_attribute_styles():
    fused, report = check(Styles, x8, 4)
    assert isinstance(fused, torch.fx.GraphModule) and fused.__class__.__name__ == "Styles"
    assert {n: r.activation for n, r in report.items()} == \
        {"fc1": "relu", "fc2": "sigmoid", "fc3": "relu", "fc4": "relu", "out": None}
    assert "F.relu" not in fused.code and "sigmoid" not in fused.code


def test_root_promise():
    """In place and the same object, except when the root's own forward must be rewritten."""
    model = nn.Sequential(Styles(), nn.Linear(8, 8), nn.ReLU())
    inner = model[0]
    assert fb.fuse(model) is model
    assert isinstance(model[0], torch.fx.GraphModule) and isinstance(model[1], fb.FusedLinearReLU)
    plain = Styles()
    ref = copy.deepcopy(plain)
    fused = fb.fuse(plain)
    assert fused is not plain and type(plain) is Styles and type(plain.fc1) is nn.Linear  # left as it was
    assert_close(plain(x8[0]), ref(x8[0]))
    assert fused.fc1.weight is plain.fc1.weight  # shared parameters
    assert type(inner.fc1) is nn.Linear


def test_shared_activation_module_and_module_list():
    fused, _ = check(SharedReLU, x8, 2)
    assert isinstance(fused.relu, nn.ReLU)
    fused, _ = check(Loop, x8, 3)
    assert fused_layers(fused) == ["layers.0", "layers.1", "layers.2"]


@pytest.mark.parametrize("make,reason", [
    (Residual, "pre-activation used elsewhere"),
    (TwoConsumers, "pre-activation used elsewhere"),
])
def test_reuse_stays_unfused(make, reason):
    fused, report = check(make, x8, 0)
    assert report["fc"].reason == reason and type(fused) is make


@pytest.mark.parametrize("hook", ["register_forward_hook", "register_forward_pre_hook"])
def test_hooks_stay_unfused(hook):
    def make():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        getattr(model[0], hook)(lambda *args: None)
        return model
    fused, report = check(make, x8, 1, round_trips=False)
    assert report["0"].reason == "has hooks" and report["2"].fused


class Sub(nn.Linear):
    """A Linear subclass: its forward may differ, so it stays."""


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sub, self.act = nn.Linear(8, 8), Sub(8, 8), nn.ReLU()

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * 2
        return self.act(h) + F.relu(self.sub(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.inner = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return self.inner(x)
        return F.relu(self.fc(x))


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

    def forward(self, x, mask=None):
        return self.act(self.fc1(x)) + F.relu(self.fc2(x))


def test_what_cannot_be_proven_stays():
    _, report = check(Branchy, x8, 0)
    assert report["fc"].reason == "forward branches on training mode or optional arguments"
    assert report["sub"].reason == "subclass of nn.Linear"
    _, report = check(Untraceable, x8, 1)
    assert report["fc"].reason == "untraceable forward" and report["inner.0"].fused  # the rest still fuses
    fused, report = check(OptionalArg, x8, 1)
    assert type(fused) is OptionalArg and report["fc1"].fused
    assert report["fc2"].reason == "activation called in a forward with optional arguments"


def test_activations_argument_and_bad_input():
    fused, report = check(Styles, x8, 1, activations=["sigmoid"])
    assert report["fc1"].reason == "activation 'relu' not selected" and report["fc2"].fused
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fb.fuse(lambda x: x)
    with pytest.raises(ValueError, match="activations: 'swish' is unknown; choose from " + NAMES):
        fb.fuse(Styles(), activations=["swish"])
    fused, report = check(Styles, x8, 0, activations="gelu")  # a name alone; nothing of it in Styles
    assert report["fc2"].reason == "activation 'sigmoid' not selected"
    with pytest.raises(ValueError, match="backend"):
        fb.fuse(Styles(), backend="nope")
    with pytest.raises(TypeError, match="recompute"):
        fb.fuse(Styles(), recompute="yes")


def test_verbose_report_and_options(capsys):
    model = fb.fuse(Styles(), verbose=True, recompute=True, backend="torch")
    out = capsys.readouterr().out
    assert "fuse: 4 of 5 Linear layers fused" in out and "fc2: fused with sigmoid" in out
    assert "out: left (no activation after it)" in out
    assert model.fc1.recompute and model.fc1.backend == "torch"


def test_torch_compile_of_a_fused_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Styles(), nn.Linear(8, 8), nn.ReLU(), SharedReLU())
    ref = copy.deepcopy(model)
    fused = fb.fuse(model)
    assert len(fused_layers(fused)) == 7
    compiled = torch.compile(fused, fullgraph=False)
    out, dx, grads = run(compiled, x8, True)
    want_out, want_dx, want_grads = run(ref, x8, True)
    assert_close(out, want_out)
    assert_close(dx, want_dx)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, msg=name)
