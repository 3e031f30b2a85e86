"""What only a CUDA GPU can show: mixed precision runs (bf16, and fp16 with its loss scaler, which a resumed run
must carry on), the teacher under the Learner's autocast, a cached run resumed past its first step on the GPU, and
the resident data on the device. Skipped without a GPU; `benchmarks/gpu_check.sh` runs them where there is one."""
import pytest
import torch

from kd_lib.recipes.train import train_student

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY = dict(dataset="digits", size=16, bs=32, fraction=0.25, lr=1e-3, progress=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_learn(amp, tmp_path, teacher_path):
    if amp == "bf16" and not torch.cuda.is_bf16_supported(): pytest.skip("no bfloat16 on this GPU")
    r = train_student(**TINY, method="stagewise", epochs=2, amp=amp, out_dir=tmp_path, teacher_path=str(teacher_path))
    assert r["test_accuracy"] > 20 and r["versions"]["device"] != "cpu"


def test_a_resumed_fp16_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    "fp16's loss scale is part of the resume state: without it a resumed run scales (and skips) differently."
    from kd_lib.recipes import fitting
    args = dict(TINY, method="no_teacher", epochs=3, amp="fp16")
    whole = train_student(**args, out_dir=tmp_path / "a")
    real, n = fitting.BestCheckpoint.after_epoch, []
    def crash(self):
        real(self)
        n.append(1)
        if len(n) == 2: raise KeyboardInterrupt  # killed after epoch 2, its state written
    monkeypatch.setattr(fitting.BestCheckpoint, "after_epoch", crash)
    with pytest.raises(KeyboardInterrupt): train_student(**args, out_dir=tmp_path / "b")
    monkeypatch.undo()
    resumed = train_student(**args, out_dir=tmp_path / "b")
    assert resumed["stages"][0]["history"] == whole["stages"][0]["history"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_cached_run_resumed_past_its_first_step_runs_on_the_gpu(channels_last, tmp_path, teacher_path, monkeypatch):
    "Its weights load on the CPU: the cache once applied that CPU prefix to the CUDA tensors it holds."
    from kd_lib.recipes import records
    args = dict(TINY, method="stagewise", epochs=1, augment=False, cache=True, cache_dtype="float32",
                channels_last=channels_last, teacher_path=str(teacher_path))
    whole = train_student(**args, out_dir=tmp_path / "a")
    real = records.RunFolder.write_progress
    def stop(self, steps):
        real(self, steps)
        if len(steps) == 2: raise KeyboardInterrupt  # two steps done
    monkeypatch.setattr(records.RunFolder, "write_progress", stop)
    with pytest.raises(KeyboardInterrupt): train_student(**args, out_dir=tmp_path / "b")
    monkeypatch.undo()
    resumed = train_student(**args, out_dir=tmp_path / "b")
    assert [s["history"] for s in resumed["stages"]] == [s["history"] for s in whole["stages"]]


def test_resident_images_live_on_the_gpu():
    from kd_lib.data.loaders import get_data
    dls = get_data("digits", size=16, bs=32, augment=True)
    assert dls.split_info["resident"] and dls.train.dataset[0].device.type == "cuda"
    x, y = dls.one_batch()
    assert x.device.type == "cuda" and x.dtype == torch.float32
