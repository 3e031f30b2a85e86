"""`kd_lib.core.optim.fastai_adam`, the teacher's optimizer: fastai's default Adam as one fused torch AdamW. Its updates
are fastai's within float rounding (norm layers and biases not decayed, as a `Learner` has it, and the scheduled
momentum followed), and the teacher's Learner trains with it."""
import pytest
import torch
import torch.nn.functional as F
from fastai.optimizer import Adam
from fastai.torch_core import norm_bias_params

from kd_lib.data.loaders import get_data
from kd_lib.core.optim import fastai_adam
from kd_lib.recipes.fitting import seed_everything
from kd_lib.core.models import resnet, teacher
from kd_lib.recipes.train import train_teacher


def _fastai(model, lr):
    "fastai's Adam as `Learner.create_opt` makes it: norm layers' parameters and biases not decayed."
    opt = Adam(list(model.parameters()), lr=lr)
    for p in norm_bias_params(model): opt.state[p]["do_wd"] = False
    return opt


def _trained(name: str, make, batches: list, double: bool = False) -> torch.Tensor:
    "Every parameter of `name`, flattened, after a step on each of `batches`; momentum changed halfway, as one-cycle."
    torch.manual_seed(0)
    model = teacher(10, pretrained=False) if name == "teacher" else resnet(name)
    model = model.double() if double else model
    opt = make(model, 3e-3)
    for i, (x, y) in enumerate(batches):
        if i == len(batches) // 2: opt.set_hyper("mom", 0.85)
        torch.manual_seed(i)  # the teacher head's dropout, alike
        F.cross_entropy(model(x.double() if double else x), y).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name,steps", [("resnet10", 8), ("teacher", 4)])
def test_its_updates_are_fastais_within_rounding(name, steps, tiny):
    """A few steps on the digits. In float64 the fused weights are fastai's to 1e-9 of the distance they moved, where
    decaying the norm layers and biases too, or torch's default betas, is farther than 1e-6. In float32 they are no
    farther from fastai's than fastai's own float32 weights are from its float64 run (training amplifies rounding:
    see test_centre_tap)."""
    seed_everything(0)
    dls = get_data("digits", size=16, bs=32, fraction=tiny["fraction"], augment=False)
    batches = [(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dls.train][:steps]
    torch.manual_seed(0)
    start = torch.cat([p.detach().double().flatten() for p in (teacher(10, pretrained=False) if name == "teacher"
                                                               else resnet(name)).parameters()])
    def ours(m, lr): return fastai_adam(m)(m.parameters(), lr=lr)
    def decays_all(m, lr): return Adam(list(m.parameters()), lr=lr)
    def torch_betas(m, lr): return Adam(list(m.parameters()), lr=lr, sqr_mom=0.999)
    exact = _trained(name, _fastai, batches, double=True)
    moved = float((exact - start).norm())
    def apart(make, double): return float((_trained(name, make, batches, double) - exact).norm()) / moved
    assert apart(ours, double=True) < 1e-9
    assert apart(decays_all, double=True) > 1e-6 and apart(torch_betas, double=True) > 1e-6
    assert apart(ours, double=False) <= 1.25 * apart(_fastai, double=False) + 1e-5


def test_norm_layers_and_biases_are_not_decayed():
    model = resnet("resnet10")
    opt = fastai_adam(model)(model.parameters(), lr=1e-3)
    kept = {id(p) for p in norm_bias_params(model)}
    decay = {pg["weight_decay"]: {id(p) for p in pg["params"]} for pg in opt.opt.param_groups}
    assert decay == {0.01: {id(p) for p in model.parameters()} - kept, 0.0: kept}
    assert opt.hypers[0]["mom"] == 0.9 and opt.hypers[0]["sqr_mom"] == 0.99 and opt.hypers[0]["eps"] == 1e-5


def test_the_teacher_trains_with_it(tmp_path, monkeypatch):
    "train_teacher's Learner gets `fastai_adam`'s optimizer (a fused AdamW), and the teacher learns."
    made = []
    import kd_lib.recipes.train as train
    monkeypatch.setattr(train, "fastai_adam", lambda m: (lambda *a, **k: made.append(fastai_adam(m)(*a, **k))
                                                         or made[-1]))
    record = train_teacher(dataset="digits", size=16, bs=32, epochs=2, lr=3e-3, out_dir=tmp_path, pretrained=False,
                           progress=False)
    assert made and isinstance(made[0].opt, torch.optim.AdamW) and made[0].opt.defaults["fused"]
    assert record["test_accuracy"] > 20  # above the 10 % of chance on ten classes
