"""kd_lib's wings and what each may import: the core on torch and fastai alone (copyable), the claims without torch,
nothing importing upward, and the public face importable from `kd_lib`."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kd_lib

PKG = Path(kd_lib.__file__).parent
# each wing, and the wings it may import (its own always)
MAY_IMPORT = {
    "core": set(),
    "infra": set(),
    "data": {"infra"},
    "speed": {"core", "data", "infra"},
    "recipes": {"core", "data", "speed", "infra"},
    "evidence": {"core", "data", "speed", "infra", "recipes"},
    "runner": {"core", "data", "speed", "infra", "recipes", "evidence"},
}
CORE_THIRD_PARTY = {"torch", "torchvision", "fastai", "fastcore", "pandas"}  # torch with its vision models; fastai with
#   what it installs and imports itself (fastcore, and pandas: `stages.module_table` gives a DataFrame)


def _imports(path: Path) -> list:
    "(absolute dotted module, line) of every import in the file at `path` (relative ones resolved)."
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: each x may be a module
                    out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
                    continue
            else: mod = node.module
            out.append((mod, node.lineno))
    return out


def _wing(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "kd_lib" and len(parts) > 1 and parts[1] in MAY_IMPORT else None


def test_every_module_lives_in_a_wing():
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "put them in a wing"
    assert {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()} == set(MAY_IMPORT)


def test_no_wing_imports_upward():
    wrong = []
    for path in PKG.rglob("*.py"):
        own = _wing("kd_lib." + ".".join(path.relative_to(PKG).parts))
        if own is None: continue  # kd_lib/__init__.py: the public face, loaded lazily
        for mod, line in _imports(path):
            if mod.split(".")[0] == "kd_lib" and mod not in ("kd_lib", "kd_lib.__version__") \
                    and (w := _wing(mod)) != own \
                    and w not in MAY_IMPORT[own]:
                wrong.append(f"{path.relative_to(PKG)}:{line} imports {mod}")
    assert wrong == []


def test_the_core_imports_torch_fastai_and_the_standard_library_only():
    wrong = []
    for path in (PKG / "core").rglob("*.py"):
        for mod, line in _imports(path):
            top = mod.split(".")[0]
            if mod.startswith("kd_lib.core") or top in CORE_THIRD_PARTY or top in sys.stdlib_module_names: continue
            wrong.append(f"core/{path.name}:{line} imports {mod}")
    assert wrong == []


def _python(code: str, cwd=None, env=None) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_claims_and_the_records_they_read_import_no_torch():
    out = _python("import sys, kd_lib.evidence.claims, kd_lib.evidence.collect, kd_lib.evidence.saturation\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai')))")
    assert out.strip() == "[]"


def test_the_public_face_names_what_the_readme_shows_and_loads_it_on_first_use():
    out = _python("import sys, kd_lib\nprint('torch' in sys.modules)\n"
                  "from kd_lib import train_student, train_teacher, Stages, StudentConfig, get_data, collect\n"
                  "from kd_lib.recipes.train import train_student as t\nprint(t is train_student)")
    assert out.split() == ["False", "True"]
    assert set(kd_lib.__all__) <= set(dir(kd_lib))
    for name in kd_lib.__all__: assert getattr(kd_lib, name) is not None


COPIED = '''
import sys
class NoKdLib:  # kd_lib must not be importable: the copy alone does the work
    def find_spec(self, name, path=None, target=None):
        if name == "kd_lib" or name.startswith("kd_lib."): raise ImportError("kd_lib is not installed here")
sys.meta_path.insert(0, NoKdLib())
try:
    import kd_lib
    raise SystemExit("kd_lib was importable")
except ImportError: pass

import torch
from types import SimpleNamespace
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch import nn
from torchvision.models import resnet18
from mykd.stages import Stages
from mykd.distill import frozen
from mykd.methods import get_method
from mykd.steps import Setting

torch.manual_seed(0)
xs, ys = torch.randn(48, 3, 16, 16), torch.randint(0, 3, (48,))
ds = list(zip(xs, ys))
dls = DataLoaders(DataLoader(ds[:32], bs=8, shuffle=True, drop_last=True), DataLoader(ds[32:], bs=8), device="cpu")
teacher, student = frozen(resnet18(num_classes=3)), resnet18(num_classes=3)
stages = Stages.torchvision_resnet()
adapters = stages.check(student, teacher, xs[:2], n_classes=3)
config = SimpleNamespace(lr=1e-3, freeze_bn=True, amp=None, channels_last=False, truncate=True)
stagewise = get_method("stagewise")
setting = Setting(config, stagewise, student, teacher, stages, adapters, dls)
for step in stagewise.steps_for(stages):  # as the page "Your own models" shows it
    before = {k: v.clone() for k, v in student.state_dict().items()}
    learn = step.learner(setting)
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    losses = [float(v[0]) for v in learn.recorder.values]  # the train loss (the MSE to the teacher's map, or CE)
    moved = {k.split(".")[0] for k, v in student.state_dict().items()
             if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    print(step.name, losses[-1] < losses[0], ",".join(sorted(moved)))
'''


def test_the_core_copied_alone_distils_a_torchvision_pair_with_fastai(tmp_path):
    """Copy kd_lib/core into a scratch folder as a package of one's own, make kd_lib unimportable, and distil a
    torchvision resnet18 pair stagewise in fastai Learners: each step learns and moves its own stage only."""
    shutil.copytree(PKG / "core", tmp_path / "mykd")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = _python(COPIED, cwd=tmp_path, env=env)
    assert out.splitlines() == ["stem True bn1,conv1", *(f"layer{k} True layer{k}" for k in range(1, 5)),
                                "head True fc"] or out.splitlines()[-1] == "head False fc"  # labels of noise
