"""Loading what a run saved: weights (weights-only, on the CPU), a teacher of `kd_lib.recipes.train.train_teacher`, the
student of a finished `kd_lib.recipes.train.train_student` run (its folder found by the name the docs give)."""
import re
from pathlib import Path

import torch
from torch import nn

from ..core.models import STUDENTS, resnet, teacher
from ..infra.files import read_json
from ..speed.taps import tapped
from .records import RunFolder

__all__ = ["load_weights", "load_teacher", "load_student"]


def load_weights(path: Path) -> dict:
    "The state dict saved at `path`, weights-only, on the CPU (weights saved on a GPU load anywhere)."
    try: return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on a file that is not a checkpoint (pickle, zip, index errors)
        raise ValueError(f"{path} is not a PyTorch weights file saved by kd_lib ({type(e).__name__}): it is corrupt, "
                         "truncated, or another kind of file. Train it again (delete its run folder first), or pass "
                         "the right file; never load a file you do not trust with weights_only=False.") from e


def load_teacher(path, n_classes: int, model: nn.Module = None) -> nn.Module:
    """The teacher saved by `train_teacher` at `path` (its run folder or its .pth), loaded weights-only: the paper's
    ResNet34, or `model` for a teacher of your own (`train_teacher(model=...)`; built as it was)."""
    path = Path(path)
    if path.is_dir(): path = RunFolder(path).teacher_file
    if not path.exists():
        raise FileNotFoundError(f"No teacher at {path}: train it first with kd_lib.recipes.train.train_teacher(...) "
                                "or notebooks/teacher.ipynb, or pass teacher_path (or a model of your own as "
                                "train_student(teacher=<nn.Module>)).")
    params = (read_json(RunFolder(path.parent).record_file) or {}).get("params")
    own = params.get("model") if isinstance(params, dict) else None  # a teacher of one's own names its model
    if own and model is None:
        raise ValueError(f"{path} holds a teacher of your own ({own!r}): build it as it was and load it with "
                         "kd_lib.recipes.train.load_teacher(path, n_classes, model=...); a student distils it as "
                         "train_student(teacher=<that model>).")
    model, weights = model if model is not None else tapped(teacher(n_classes, pretrained=False)), load_weights(path)
    try: model.load_state_dict(weights)
    except RuntimeError as e:
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        extra, missing = sorted(set(weights) - set(mine)), sorted(set(mine) - set(weights))
        shapes = [k for k in mine if k in weights and tuple(weights[k].shape) != mine[k]]
        what = (f"{len(missing)} of the teacher's tensors are missing and {len(extra)} are not the teacher's "
                "(a student's weights, or a model of another kind?)" if missing or extra else
                f"tensors of other shapes ({shapes[:3]}: a teacher of another number of classes than {n_classes}?)")
        raise ValueError(f"{path} does not hold a {own or 'ResNet34'} teacher of {n_classes} classes as "
                         f"train_teacher saves one: {what}. Pass the teacher's run folder or its teacher.pth; a model "
                         "of your own goes in as train_student(teacher=<nn.Module with its weights>, "
                         "stages=...).") from e
    return model


def _run_folder(run) -> RunFolder:
    """The run folder `run`, also when its fraction is written otherwise than kd_lib names it (`-f1.0-` for
    `-f1-`: `f<fraction:g>`); when there is none, a `FileNotFoundError` naming the run folders beside it."""
    path = Path(run)
    if not path.is_dir() and (m := re.fullmatch(r"(.+)-f(.+)-s(\d+)", path.name)):
        try: path = path.with_name(f"{m[1]}-f{float(m[2]):g}-s{m[3]}")
        except ValueError: pass  # not a fraction: the error below names what is there
    if not path.is_dir():
        there = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        raise FileNotFoundError(f"No run folder {run}" + (f"; {path.parent} holds {', '.join(there[:20])}" if there
                                                          else "") + ". A student's run folder is named "
                                "<student>-<method>-f<fraction:g>-s<seed>, e.g. resnet10-stagewise-f1-s0 or -f0.25-.")
    return RunFolder(path)


def load_student(run, model: nn.Module = None) -> nn.Module:
    """The trained student of a finished run folder (in eval mode): its model with the weights its last step kept.
    A student of Table 1 is rebuilt from its name; a model of your own is `model` (of the class the record names).
    `run` may write its fraction as given (`-f1.0-`) or as the folder is named (`-f1-`)."""
    run = _run_folder(run)
    if (record := run.record()) is None:
        raise FileNotFoundError(f"No finished student run in {run.path}: train it with "
                                "kd_lib.recipes.train.train_student.")
    name = record["params"]["student"]
    if model is None:
        if name not in STUDENTS:
            cls = (record.get("models") or {}).get("student", {}).get("cls", "a model of your own")
            raise ValueError(f"{run.path} trained {name!r}, a model of your own ({cls}): pass it, built as it was, "
                             "as load_student(run, model=...).")
        model = tapped(resnet(name, len(record["data"]["vocab"])))
    model.load_state_dict(load_weights(run.stage_file(record["stages"][-1]["name"])))
    return model.eval()
