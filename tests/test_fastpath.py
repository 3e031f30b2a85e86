"""The fast path gives the plain path's result: truncation exactly, the float32 cache exactly, the fp16 cache
within its rounding; the cache spills to files and cleans them up; what cannot be exact is refused."""
from contextlib import nullcontext

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.torch_core import set_seed

from kd_lib.speed.cache import FeatureCache, Store
from kd_lib.recipes.config import StudentConfig
from kd_lib.core.steps import StopOnNaN
from kd_lib.recipes.fitting import seed_everything
from kd_lib.data.loaders import data_dir, get_data
from kd_lib.core.models import resnet, teacher
from kd_lib.core.steps import Features, Labels
from kd_lib.recipes.train import load_teacher, train_student

from conftest import step_learner

EPOCHS = 1  # per stage; the resume test takes 2
RUN = "digits/resnet10-stagewise-f0.25-s0"


def _run(tmp, tiny, teacher_path, **kw):
    "A stagewise run without augmentation; its record and final weights."
    r = train_student(**(tiny | dict(method="stagewise", epochs=EPOCHS, augment=False, out_dir=tmp,
                                     teacher_path=teacher_path, progress=False) | kw))
    return r, torch.load(tmp / RUN / "stages" / "head.pth", weights_only=True)


def _losses(record) -> list:
    "Every epoch's train and valid loss, step after step."
    return [e[k] for s in record["stages"] for e in s["history"] for k in ("train_loss", "valid_loss")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny, teacher_path):
    return _run(tmp_path_factory.mktemp("plain"), tiny, teacher_path, truncate=False)


@pytest.fixture(scope="module")
def fast(tmp_path_factory, tiny, teacher_path):
    return _run(tmp_path_factory.mktemp("fast"), tiny, teacher_path)


@pytest.fixture(scope="module")
def cached32(tmp_path_factory, tiny, teacher_path):
    "A float32-cached run whose memory bound is tiny: most of the cache lives in memory-mapped files."
    files, empty = [], Store.empty

    def spy(self, shape):
        t = empty(self, shape)
        files.extend(self.dir.iterdir() if self.spilled else [])
        return t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "empty", spy)
        r, w = _run(tmp_path_factory.mktemp("cached32"), tiny, teacher_path, cache=True, cache_dtype="float32",
                    cache_bytes=200_000)
    return r, w, files


def test_truncated_stagewise_run_equals_the_papers_whole_forwards(plain, fast):
    (rp, wp), (rf, wf) = plain, fast
    assert _losses(rf) == _losses(rp)
    assert all(torch.equal(wf[k], wp[k]) for k in wp)
    assert rf["test_accuracy"] == rp["test_accuracy"]


def test_float32_cache_equals_the_plain_path(fast, cached32):
    "Bit for bit, as the book says: every loss of every epoch, every weight."
    (rf, wf), (rc, wc, _) = fast, cached32
    assert _losses(rc) == _losses(rf)
    assert all(torch.equal(wc[k], wf[k]) for k in wf)
    assert rc["test_accuracy"] == rf["test_accuracy"]
    assert all(s["cache_time_s"] > 0 for s in rc["stages"]) and rc["params"]["cache_dtype"] == "float32"


def test_cache_spills_to_files_and_removes_them(cached32):
    files = cached32[2]
    assert files and all(f.parent.parent == data_dir() / "cache" for f in files)  # some tensors lived in files
    assert not any(f.exists() for f in files) and not list((data_dir() / "cache").iterdir())  # and none is left


@pytest.mark.parametrize("method,last", [("no_teacher", "all"), ("fitnets", "classifier")])
def test_cache_serves_steps_of_several_stages_too(method, last, tmp_path, tiny, teacher_path):
    """no_teacher's one step trains the whole student on labels (its input: the cached images); FitNets' hint
    trains stem to layer2 on the teacher's layer2, then layer3 to the head on labels."""
    runs = [train_student(**(tiny | dict(method=method, epochs=1, augment=False, out_dir=tmp_path / str(c),
                                         teacher_path=teacher_path, progress=False, cache=c, cache_dtype="float32")))
            for c in (False, True)]
    w = [torch.load(tmp_path / str(c) / f"digits/resnet10-{method}-f0.25-s0/stages/{last}.pth", weights_only=True)
         for c in (False, True)]
    assert _losses(runs[1]) == _losses(runs[0])
    assert all(torch.equal(w[1][k], w[0][k]) for k in w[0])


def test_fp16_cache_is_within_its_rounding(tiny, teacher_path):
    """An fp16 cache holds the float32 cache's numbers rounded to fp16: exactly that at the first step; further on,
    where each step is computed from the one before as cached, the roundings of the steps before add up."""
    dls = get_data("digits", size=16, bs=32, fraction=0.25, augment=False)
    set_seed(0)
    student, tchr = resnet("resnet10"), load_teacher(teacher_path, 10)
    with FeatureCache(dls, student, tchr, "float32") as exact, FeatureCache(dls, student, tchr, "float16") as half:
        for k, (first, target) in enumerate((("stem", "stem"), ("layer3", "layer3"))):
            (x32, t32, _), (x16, t16, _) = exact.features(first, target), half.features(first, target)
            for a, b in zip([*x32, *t32], [*x16, *t16]):
                assert b.dtype == torch.float16
                if k == 0: assert torch.equal(b, a.half())
                else: assert 0 < float((b.float() - a).norm() / a.norm()) < 3 * 2 ** -11  # a few fp16 roundings


def test_store_keeps_its_bound(tmp_path):
    s = Store(torch.float16, max_bytes=100, folder=tmp_path)
    a, b = s.empty((5, 10)), s.empty((5, 10))  # 100 bytes in memory, then a file
    assert s.in_memory == 100 and s.spilled == 100 and len(list(s.dir.iterdir())) == 1
    b[:] = 2.
    assert b.dtype == torch.float16 and float(b.sum()) == 100
    s.free(b)
    assert not list(s.dir.iterdir())
    s.free(a)
    assert s.in_memory == 0
    s.empty((1000,))
    s.close()
    assert not list(tmp_path.iterdir())


class Crash(Exception):
    pass


def test_cached_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny, teacher_path, monkeypatch):
    args = dict(cache=True, epochs=2)  # fp16: a resumed run rebuilds the cache rounding where the whole run did
    whole, w_whole = _run(tmp_path / "a", tiny, teacher_path, **args)
    calls, n_batch = {"n": 0}, whole["data"]["sizes"]["train"] // tiny["bs"]
    after_loss = StopOnNaN.after_loss

    def crashing(self):  # in the second epoch of the layer1 step
        calls["n"] += self.training
        if calls["n"] == 2 * n_batch + n_batch + n_batch // 2: raise Crash("killed")
        after_loss(self)

    monkeypatch.setattr(StopOnNaN, "after_loss", crashing)
    with pytest.raises(Crash): _run(tmp_path / "b", tiny, teacher_path, cache_bytes=200_000, **args)
    assert (tmp_path / "b" / RUN / "layer1.state.pth").exists()
    assert not list((data_dir() / "cache").rglob("*"))  # a crash cleans the spilled cache up too
    monkeypatch.setattr(StopOnNaN, "after_loss", after_loss)
    resumed, w_resumed = _run(tmp_path / "b", tiny, teacher_path, **args)
    assert _losses(resumed) == _losses(whole) and resumed["test_accuracy"] == whole["test_accuracy"]
    assert all(torch.equal(w_resumed[k], w_whole[k]) for k in w_whole)


@pytest.mark.parametrize("kw,match", [
    (dict(augment=True), "augment=False"),
    (dict(freeze_bn=False), "freeze_bn=True"),
    (dict(truncate=False), "truncate=True"),
    (dict(method="hinton"), "cache=False"),
    (dict(cache_dtype="int8"), "float16, bfloat16, float32"),
    (dict(cache="train"), "False, True or 'valid'"),
])
def test_cache_refuses_what_it_cannot_reproduce(kw, match, tmp_path, tiny, teacher_path):
    with pytest.raises(ValueError, match=match):
        train_student(**(tiny | dict(method="stagewise", epochs=1, augment=False, cache=True, out_dir=tmp_path,
                                     teacher_path=teacher_path, progress=False) | kw))
    assert not (tmp_path / "digits").exists()  # refused before anything is written


def test_valid_cache_validates_without_the_teacher_and_changes_nothing(tiny, teacher_path):
    "With augmentation: the valid loader still runs (its random transforms draw numbers), the teacher does not."
    dls = get_data("digits", size=tiny["size"], bs=tiny["bs"], fraction=tiny["fraction"], augment=True)
    tchr = load_teacher(teacher_path, 10)
    calls = []
    tchr.body.layer1.register_forward_hook(lambda *a: calls.append(1))
    runs = []
    for cached in (False, True):
        set_seed(0)
        student, calls[:] = resnet("resnet10"), []
        with FeatureCache(dls, student, tchr, "float32", train=False) if cached else nullcontext() as cache:
            step = Features("layer1", ("layer1",), target="layer1")
            learn = step_learner(step, StudentConfig(lr=1e-3), student, tchr, dls,
                                 cache=cache)
            seed_everything(0, learn.dls)
            n_cache = len(calls)
            with learn.no_bar(), learn.no_logging(): learn.fit(2)
        runs.append((student.state_dict(), learn.recorder.values, len(calls) - n_cache))
    (w0, v0, n0), (w1, v1, n1) = runs
    assert v1 == v0 and all(torch.equal(w1[k], w0[k]) for k in w0)
    assert n0 == 2 * (len(dls.train) + len(dls.valid)) and n1 == 2 * len(dls.train)  # no teacher in validation


@pytest.mark.skipif(torch.cuda.is_available(), reason="amp runs on CUDA")
def test_amp_without_cuda_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(ValueError, match="CUDA"):
        train_student(**(tiny | dict(method="no_teacher", amp="bf16", out_dir=tmp_path)))
    with pytest.raises(ValueError, match="bf16, fp16"):
        train_student(**(tiny | dict(method="no_teacher", amp="fp8", out_dir=tmp_path)))


class _AutocastCPU(Callback):
    "Stands in for MixedPrecision on CPU: bfloat16 autocast from before_batch to after_loss."
    order = MixedPrecision.order

    def before_batch(self): self.ctx = torch.autocast("cpu", dtype=torch.bfloat16); self.ctx.__enter__()
    def after_loss(self): self.ctx.__exit__(None, None, None)


class _Look(Callback):
    "Notes the dtype of the first batch's teacher target, then stops the fit."
    order = MixedPrecision.order + 2

    def after_loss(self):
        self.dtype = self.yb[0].dtype
        raise CancelFitException


def test_teacher_runs_under_the_learners_autocast(tiny):
    dls = get_data("digits", size=tiny["size"], bs=tiny["bs"], fraction=tiny["fraction"], augment=False)
    torch.manual_seed(0)
    learn = step_learner(Features("layer1", ("layer1",), target="layer1"), StudentConfig(lr=1e-3), resnet("resnet10"),
                         teacher(10, pretrained=False), dls)
    look = _Look()
    learn.add_cbs([_AutocastCPU(), look])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert look.dtype == torch.bfloat16


def test_channels_last_puts_the_student_in_that_format(tiny):
    dls = get_data("digits", size=tiny["size"], bs=tiny["bs"], fraction=tiny["fraction"], augment=False)
    student = resnet("resnet10")
    learn = step_learner(Labels("head", ("head",)), StudentConfig(lr=1e-3, channels_last=True), student, None, dls)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    w = student.body.layer1[0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()


def test_a_steps_cache_is_freed_before_the_next_one_is_built(tmp_path, tiny, teacher_path, monkeypatch):
    "cache_bytes bounds the cache: the step before's Learner once held its tensors while the next were built (2x)."
    import gc
    import weakref
    from kd_lib.speed import cache
    real, alive, refs = cache.FeatureCache._step, [], []
    def spy(self, first, target):
        out = real(self, first, target)  # the step before's inputs, mapped to this step's, are given back to the store
        gc.collect()
        gone = [r for r in refs if all(r() is not t for t in out[0])]  # ... and nothing else holds them
        alive.append(sum(r() is not None for r in gone))
        refs[:] = [weakref.ref(t) for t in out[0]]  # this step's inputs, one per cached loader
        return out
    monkeypatch.setattr(cache.FeatureCache, "_step", spy)
    _run(tmp_path, tiny, teacher_path, cache=True, cache_dtype="float32")
    assert len(alive) == 6 and alive == [0] * 6


def test_a_cache_for_channels_last_models_is_laid_out_so():
    s = Store(torch.float32, max_bytes=4 * 8 * 4 * 4 * 4, channels_last=True)
    a, b = s.empty((4, 8, 4, 4)), s.empty((4, 8, 4, 4))  # in memory, then a memory-mapped file
    for t in (a, b): assert t.shape == (4, 8, 4, 4) and t.is_contiguous(memory_format=torch.channels_last)
    b[:] = torch.arange(4 * 8 * 16, dtype=torch.float32).view(4, 8, 4, 4)
    assert float(b[3, 7, 3, 3]) == 4 * 8 * 16 - 1 and b[torch.tensor([2, 0])].is_contiguous(
        memory_format=torch.channels_last)  # a batch taken out of it keeps the layout
    s.close()


def test_bf16_on_a_gpu_without_it_is_refused_before_anything_is_written(tmp_path, tiny, monkeypatch):
    "It was accepted, and failed in fastai's MixedPrecision after params.json and the cache existed."
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ValueError, match="bfloat16 \\(Tesla T4 has none\\)"):
        train_student(**(tiny | dict(method="stagewise", amp="bf16", cache=True, augment=False, out_dir=tmp_path)))
    assert not list(tmp_path.iterdir())
