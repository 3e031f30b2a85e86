"""Freed memory kept for reuse (`kd_lib.speed.memory.keep_freed_memory`) and handed back after each epoch
(`hand_back_freed_memory`): the weights training steps make are the same to the last bit, every fit keeps the memory
and hands it back each epoch, and handing back returns freed pages from the middle of the heap. Each case in a fresh
process (the setting is process-wide and kept).
How many page faults it saves depends on the machine's allocator and kernel: benchmarks/freed_memory.py measures it."""
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch, torch.nn.functional as F
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from kd_lib.recipes.fitting import fit
    from kd_lib.core.optim import paper_adam
    import kd_lib.speed.memory
    from kd_lib.speed.memory import keep_freed_memory
    from kd_lib.core.models import resnet
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    model = resnet("resnet10")
    if mode == "keep": keep_freed_memory()
    if mode == "fit":  # a fit, in a process that has not asked for the memory to be kept
        ds = list(zip(x.repeat(8, 1, 1, 1), y.repeat(8)))
        learn = Learner(DataLoaders.from_dsets(ds, ds[:32], bs=32, device="cpu", num_workers=0), model,
                        loss_func=F.cross_entropy, opt_func=paper_adam, path=Path(out).parent)
        assert keep_freed_memory.cache_info().currsize == 0
        handed = []
        kd_lib.speed.memory.hand_back_freed_memory = lambda: handed.append(learn.epoch)
        fit(learn, "fit", 3, 1e-3, "valid_loss", Path(out).parent, progress=False)
        print(json.dumps(dict(kept=keep_freed_memory.cache_info().currsize == 1, answer=keep_freed_memory(),
                              handed_back_after=handed)))
        sys.exit()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    def step():
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    for _ in range(10): step()  # the heap grows to its steady size over the first steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10): step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    torch.save(model.state_dict(), out)
    print(json.dumps(dict(faults=faults)))
""")


def _run(mode: str, tmp_path):
    out = tmp_path / mode / "weights.pth"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), out


def test_kept_memory_trains_the_same_weights(tmp_path):
    """Where a tensor lives changes no number: 20 training steps with the memory kept give the weights of 20
    steps without, bit for bit."""
    import torch
    (_, plain), (_, kept) = _run("default", tmp_path), _run("keep", tmp_path)
    w_plain, w_kept = (torch.load(p, weights_only=True) for p in (plain, kept))
    assert w_plain.keys() == w_kept.keys() and all(torch.equal(w_plain[k], w_kept[k]) for k in w_plain)


def test_every_fit_keeps_the_memory_and_hands_it_back_each_epoch(tmp_path):
    """A fit (`kd_lib.recipes.fitting.fit`, which every recipe's training goes through) sets the process to keep the
    memory, and hands it back after every epoch (a long fit's heap otherwise fragments, its free pages adding up)."""
    said, _ = _run("fit", tmp_path)
    assert said == dict(kept=True, answer=True, handed_back_after=[0, 1, 2, 2])  # each epoch, and the fit's end


def test_it_answers_where_malloc_is_glibcs():
    from kd_lib.speed.memory import hand_back_freed_memory, keep_freed_memory
    assert keep_freed_memory() is True and keep_freed_memory() is True  # once per process, the same answer
    assert hand_back_freed_memory() is True


HAND_BACK = textwrap.dedent("""
    import json, sys, torch
    from kd_lib.speed.memory import hand_back_freed_memory, keep_freed_memory
    def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
    keep_freed_memory()
    big, pins = [], []
    for _ in range(256):  # 1 MB blocks from the heap, each followed by a small one that stays: free pages in its middle
        big.append(torch.ones(2 ** 18)); pins.append(torch.ones(16))
    held = rss(); big.clear()
    if sys.argv[1] == "hand_back": hand_back_freed_memory()
    print(json.dumps(dict(returned_mb=held - rss())))
""")


@pytest.mark.parametrize("mode", ["keep", "hand_back"])
def test_handing_back_returns_the_freed_pages_a_kept_heap_holds(mode):
    """256 MB freed in the middle of a kept heap stay in the process (kept), until `hand_back_freed_memory` returns
    them to the system: the control arm keeps them, so the check can fail."""
    done = subprocess.run([sys.executable, "-c", HAND_BACK, mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    returned = json.loads(done.stdout.strip().splitlines()[-1])["returned_mb"]
    assert (returned > 200) if mode == "hand_back" else (returned < 20)
