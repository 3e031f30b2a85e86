"""The recipes: learning happens, records say so, runs resume exactly, failures are loud."""
import json
import os
import signal
import subprocess
import sys
import time
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision.models import _api as tv_api

from fastai.callback.core import Callback
from fastai.learner import Learner
from kd_lib.core.models import PretrainedUnavailable, resnet, teacher
from kd_lib.evidence.collect import collect
from kd_lib.infra.files import read_json
from kd_lib.data.loaders import get_data
from kd_lib.core.steps import StopOnNaN
from kd_lib.recipes.fitting import accuracy_of
from kd_lib.core.methods import METHODS
from kd_lib.recipes.train import RunExists, load_teacher, train_student, train_teacher


def _student(tmp, tiny, teacher_path, **kw):
    return train_student(**(tiny | dict(out_dir=tmp, teacher_path=teacher_path, progress=False) | kw))


def _weights(run):
    return torch.load(run / "stages" / f"{read_json(run / 'progress.json')['steps'][-1]['name']}.pth",
                      weights_only=True)


def _no_time(record):
    """A record without what differs from run to run on the same machine: times (wall and CPU), dates, and
    how many epochs a killed run had done before it resumed."""
    r = json.loads(json.dumps(record))
    for k in ("wall_time_s", "finished", "versions"): r.pop(k)
    for s in r["stages"]: s.pop("time_s"), s.pop("cpu_s"), s.pop("resumed_after")
    return r


def test_learning_happens_without_a_teacher(tmp_path, tiny):
    r = train_student(**(tiny | dict(method="no_teacher", epochs=6, out_dir=tmp_path, progress=False)))
    h = r["stages"][0]["history"]
    assert h[-1]["train_loss"] < 0.6 * h[0]["train_loss"]
    assert r["test_accuracy"] > 60 and r["valid_accuracy"] > 60  # chance is 10
    assert r["stages"][0]["best_value"] == max(e["accuracy"] for e in h)


def test_stagewise_record_has_every_field(tmp_path, tiny, teacher_path):
    r = _student(tmp_path, tiny, teacher_path, method="stagewise", epochs=2)
    assert r["status"] == "complete" and r["kind"] == "student"
    assert [s["name"] for s in r["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    for s in r["stages"]:
        assert {"name", "parts", "target", "epochs", "monitor", "best_epoch", "best_value", "time_s", "history"} <= set(s)
        assert len(s["history"]) == 2 and s["time_s"] > 0
    feature = r["stages"][2]
    assert feature["monitor"] == "valid_loss"
    assert feature["best_value"] == min(e["valid_loss"] for e in feature["history"])
    assert r["stages"][-1]["monitor"] == "accuracy"
    assert r["params"]["method"] == "stagewise" and r["params"]["fraction"] == tiny["fraction"]
    assert {"train", "valid", "test", "unused"} <= set(r["data"]["hashes"])
    assert r["data"]["sizes"]["train"] == sum(r["data"]["counts"]["train"].values())
    assert {"torch", "fastai", "device", "kd_lib"} <= set(r["versions"])
    assert 0 <= r["test_accuracy"] <= 100 and 0 <= r["valid_accuracy"] <= 100
    assert r["teacher"]["path"] == str(teacher_path)
    run = tmp_path / "digits" / "resnet10-stagewise-f0.25-s0"
    assert read_json(run / "record.json") == r
    assert not list(run.glob("*.state.pth"))  # resume states are removed once a step is done
    assert all(k.startswith(("body.", "head.")) for k in _weights(run))  # the student alone, no teacher
    rows = collect(tmp_path)
    assert len(rows) == 1 and rows.method[0] == "stagewise" and rows.test_accuracy[0] == r["test_accuracy"]


@pytest.mark.parametrize("method", ["simultaneous", "hinton", "fitnets"])
def test_other_methods_learn_and_record(method, tmp_path, tiny, teacher_path):
    r = _student(tmp_path, tiny, teacher_path, method=method, epochs=2)
    assert [s["name"] for s in r["stages"]] == [s.name for s in METHODS[method].steps_for()]
    assert r["test_accuracy"] > 25  # chance is 10
    if method == "fitnets":  # the hint kept the epoch of its lowest valid MSE to the teacher's layer2 ...
        hint, classifier = r["stages"]
        assert hint["parts"] == ["stem", "layer1", "layer2"] and hint["target"] == "layer2"
        assert hint["best_value"] == min(h["valid_loss"] for h in hint["history"])
        # ... and the classifier step left stem to layer2 as the hint kept them: their map is still that MSE away
        assert r["feature_mse"]["layer2"] == pytest.approx(hint["best_value"], rel=1e-5)
        assert classifier["parts"] == ["layer3", "layer4", "head"] and classifier["monitor"] == "accuracy"


def test_finished_run_is_not_retrained(tmp_path, tiny, monkeypatch):
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)
    first = train_student(**args)
    monkeypatch.setattr(Learner, "fit", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert train_student(**args) == first
    with pytest.raises(RunExists, match="epochs"):
        train_student(**(args | dict(epochs=2)))


def test_force_retrains(tmp_path, tiny):
    args = tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)
    first = train_student(**args)
    assert train_student(**(args | dict(epochs=2, force=True)))["params"]["epochs"] == 2 != first["params"]["epochs"]


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny, teacher_path, monkeypatch):
    args = dict(method="stagewise", epochs=2)
    whole = _student(tmp_path / "a", tiny, teacher_path, **args)
    # crash in the middle of the second epoch of the layer1 stage (the 3rd step: stem is done)
    calls, n_batch = {"n": 0}, whole["data"]["sizes"]["train"] // tiny["bs"]
    after_loss = StopOnNaN.after_loss

    def crashing(self):
        calls["n"] += self.training
        if calls["n"] == 2 * n_batch + n_batch + n_batch // 2: raise Crash("killed")
        after_loss(self)

    monkeypatch.setattr(StopOnNaN, "after_loss", crashing)
    with pytest.raises(Crash):
        _student(tmp_path / "b", tiny, teacher_path, **args)
    run = tmp_path / "b" / "digits" / "resnet10-stagewise-f0.25-s0"
    assert (run / "layer1.state.pth").exists() and not (run / "record.json").exists()
    monkeypatch.setattr(StopOnNaN, "after_loss", after_loss)
    resumed = _student(tmp_path / "b", tiny, teacher_path, **args)
    assert _no_time(resumed) | {"params": 0} == _no_time(whole) | {"params": 0}
    assert any(s["resumed_after"] for s in resumed["stages"]) and not any(s["resumed_after"] for s in whole["stages"])
    a = _weights(tmp_path / "a" / "digits" / "resnet10-stagewise-f0.25-s0")
    b = _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLED = """
import sys, torch
from kd_lib.recipes.train import train_student
torch.set_num_threads(1)
train_student(method="no_teacher", dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3, epochs=4,
              out_dir=sys.argv[1], progress=False)
"""


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path, tiny):
    run = tmp_path / "b" / "digits" / "resnet10-no_teacher-f0.25-s0"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "b")], env=os.environ | {"KD_PROGRESS": "0"})
    deadline = time.time() + 120
    while not (run / "all.state.pth").exists() and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "record.json").exists()
    args = tiny | dict(method="no_teacher", epochs=4, progress=False)
    with pytest.warns(UserWarning, match="no longer running"):  # the killed run's lock, taken over
        resumed = train_student(**args, out_dir=tmp_path / "b")
    whole = train_student(**args, out_dir=tmp_path / "a")
    assert _no_time(resumed) | {"params": 0} == _no_time(whole) | {"params": 0}
    assert any(s["resumed_after"] for s in resumed["stages"]) and not any(s["resumed_after"] for s in whole["stages"])


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, tiny, monkeypatch):
    import kd_lib.core.steps
    monkeypatch.setattr(kd_lib.core.steps, "CrossEntropyLossFlat", lambda: (lambda pred, y: pred.sum() * float("nan")))
    with pytest.raises(FloatingPointError, match="Lower the learning rate"):
        train_student(**(tiny | dict(method="no_teacher", epochs=1, out_dir=tmp_path, progress=False)))
    assert not list(tmp_path.rglob("record.json"))


def test_mismatched_stage_shapes_are_a_clear_error():
    from kd_lib.core.stages import StageMismatch, Stages
    t = teacher(10, pretrained=False)
    t.body.layer4 = torch.nn.Identity()
    with pytest.raises(StageMismatch, match=r"layer4: student \(512, 1, 1\), teacher \(256, 2, 2\)"):
        Stages.paper().check(resnet("resnet10"), t, torch.zeros(1, 3, 32, 32))


def test_missing_teacher_says_how_to_get_one(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="train_teacher"):
        train_student(**(tiny | dict(method="stagewise", epochs=1, out_dir=tmp_path, progress=False)))


def test_unknown_method_is_named(tmp_path):
    with pytest.raises(ValueError, match="choose one of no_teacher, no_teacher_budget, simultaneous, stagewise"):
        train_student(method="stagewize", out_dir=tmp_path)


def _offline(monkeypatch):
    def fail(*a, **k): raise URLError("offline")
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fail)


def test_teacher_recipe_trains_records_and_loads(tmp_path, tiny, monkeypatch):
    _offline(monkeypatch)
    args = dict(dataset="digits", size=16, bs=32, epochs=2, lr=1e-3, out_dir=tmp_path, progress=False)
    with pytest.raises(PretrainedUnavailable):
        train_teacher(**args, pretrained=True)
    with pytest.warns(UserWarning, match="from scratch"):
        r = train_teacher(**args, pretrained=None)
    assert r["kind"] == "teacher" and r["imagenet_weights"] is False and r["test_accuracy"] > 10
    assert r["stages"][0]["epochs_run"] == 2
    t = load_teacher(tmp_path / "digits" / "teacher", 10)
    kept = torch.load(tmp_path / "digits" / "teacher" / "teacher.pth")
    assert {v.dtype for v in kept.values() if v.is_floating_point()} == {torch.float16}  # kept at half the size
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(t.state_dict().values(), kept.values()))
    dls = get_data("digits", size=16, bs=32, selection="valid")  # the teacher evaluated is the one kept
    assert round(accuracy_of(t, dls.loaders[2]), 4) == pytest.approx(r["test_accuracy"], abs=1e-3)
    # what it called each test image, in the order of the test split's items, its accuracy the record's
    said = r["test_predictions"]
    assert said["labels"] == [list(dls.vocab).index(c) for _, c in dls.items["test"]]
    right = np.mean(np.array(said["predicted"]) == np.array(said["labels"]))
    assert 100 * right == pytest.approx(r["test_accuracy"], abs=1e-3) and len(set(said["predicted"])) > 1
    # students find the dataset's teacher in out_dir by default, and record its accuracy
    s = train_student(**(tiny | dict(method="simultaneous", epochs=1, out_dir=tmp_path, progress=False)))
    assert s["teacher"]["test_accuracy"] == r["test_accuracy"]


@pytest.mark.parametrize("lr,stops", [(0.0, True), (0.005, False)])
def test_patience_stops_a_flat_fit_and_lets_a_learning_one_run(tmp_path, lr, stops):
    """lr 0: the valid loss never moves, so the fit stops `patience` epochs after its first; a learning fit, whose
    valid loss falls by more than its standard error, runs on, and is judged unconverged: still falling."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from kd_lib.recipes.fitting import fit
    torch.manual_seed(0)
    x = torch.randn(1024, 4)
    data = list(zip(x, (x[:, 0] > 0).long()))
    dls = DataLoaders(DataLoader(data[:512], bs=32, shuffle=True), DataLoader(data[512:], bs=64))
    learn = Learner(dls, torch.nn.Linear(4, 2), loss_func=torch.nn.CrossEntropyLoss(), path=tmp_path)
    s = fit(learn, "toy", epochs=8, lr=lr, monitor="valid_loss", run=tmp_path, progress=False, patience=2)
    assert s["stopped_early"] is stops and s["epochs_run"] == (3 if stops else 8)
    # convergence is judged from the curve, never from the stop: 3 epochs are too few to judge
    assert s["converged"] is (None if stops else False)
    assert all(0 < h["valid_loss_se"] < 0.05 for h in s["history"])


def _toy_learner(path):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    data = list(zip(x, (x[:, 0] > 0).long()))
    dls = DataLoaders(DataLoader(data[:192], bs=16, shuffle=True), DataLoader(data[192:], bs=64))
    return Learner(dls, torch.nn.Linear(4, 2), loss_func=torch.nn.CrossEntropyLoss(), path=path)


class _Lrs(Callback):
    "The learning rate and momentum of every training batch, as the schedulers left them (fastai's run at 60)."
    order = 61
    def before_fit(self): self.seen = []
    def before_batch(self):
        if self.training: self.seen += [self.opt.hypers[0]["lr"], self.opt.hypers[0]["mom"]]


def test_one_cycle_follows_fastais_schedule_and_a_resumed_fit_the_same_curve(tmp_path):
    "It was once checked by counting epochs: here every batch's lr and momentum are fastai's fit_one_cycle's."
    from kd_lib.recipes.fitting import fit, one_cycle
    ours, theirs = _Lrs(), _Lrs()
    learn = _toy_learner(tmp_path / "a")
    learn.add_cb(ours)
    fit(learn, "toy", epochs=4, lr=0.01, monitor="valid_loss", run=tmp_path / "a", one_cycle_lr=True, progress=False)
    ref = _toy_learner(tmp_path / "b")
    ref.add_cb(theirs)
    with ref.no_bar(), ref.no_logging(): ref.fit_one_cycle(4, 0.01, pct_start=0.25, div_final=1e5)
    assert len(ours.seen) == 2 * 4 * 12 and ours.seen == pytest.approx(theirs.seen, rel=1e-9)
    assert max(ours.seen[::2]) == pytest.approx(0.01, rel=1e-3) and ours.seen[-2] < 0.01 / 100  # annealed
    later = _toy_learner(tmp_path / "c")  # epochs 3 and 4 of a fit resumed after 2: the second half of the curve
    later.add_cb(half := _Lrs())
    with later.no_bar(), later.no_logging(): later.fit(2, 0.01, cbs=one_cycle(4, 0.01, start_epoch=2))
    assert half.seen == pytest.approx(theirs.seen[2 * 24:], rel=1e-9)


def test_measuring_test_accuracy_every_epoch_leaves_training_unchanged(tmp_path, tiny):
    "test_each_epoch evaluates the test set after every epoch: the run must train exactly as one that does not."
    args = tiny | dict(method="no_teacher", epochs=2, progress=False)
    on = train_student(**args, out_dir=tmp_path / "on", test_each_epoch=True)
    off = train_student(**args, out_dir=tmp_path / "off")
    assert all("test_accuracy" in h for h in on["stages"][0]["history"])
    assert [{k: v for k, v in h.items() if k != "test_accuracy"} for h in on["stages"][0]["history"]] == \
        off["stages"][0]["history"]
    w = [torch.load(p / "digits" / "resnet10-no_teacher-f0.25-s0" / "stages" / "all.pth", weights_only=True)
         for p in (tmp_path / "on", tmp_path / "off")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
