"""`kd_lib.recipes.fitting.accuracy_of` (the test set every epoch, `test_each_epoch`) gives the model plain tensors, as
a fastai `Learner` does, not the loader's `TensorImage`s (whose every torch operation goes through Python), and counts
the same accuracy as the typed batches give."""
import torch
from fastai.torch_core import TensorImage

from kd_lib.data.loaders import get_data
from kd_lib.recipes.fitting import accuracy_of, seed_everything
from kd_lib.core.models import evaluating, resnet


def test_accuracy_of_feeds_plain_tensors_and_counts_the_same(tiny):
    seed_everything(0)
    dls = get_data("digits", size=16, bs=32, fraction=tiny["fraction"], augment=False)
    model = resnet("resnet10")
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))
    assert type(next(iter(dls.valid))[0]) is TensorImage  # what the loader gives
    acc = accuracy_of(model, dls.valid)
    hook.remove()
    assert seen and set(seen) == {torch.Tensor}
    with torch.no_grad(), evaluating(model):
        typed = [(model(xb).argmax(1) == yb) for xb, yb in dls.valid]  # the same batches, as the loader types them
    assert acc == 100 * float(torch.cat(typed).sum()) / len(torch.cat(typed))
