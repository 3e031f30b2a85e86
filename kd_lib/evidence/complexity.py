"""Parameters and FLOPs of the paper's models (Table 1).

`flops` follows the counting rule of the profiler the paper used (thop, late
2019), so Table 1 comes out to the digit; `macs` is today's count from
`torch.utils.flop_counter` (multiply-accumulates of convolutions and matmuls), every tap of every kernel counted
(the architecture's count, whatever taps `kd_lib.speed.taps.TapConv2d` leaves out on 1x1 maps).
`compare_with_paper` checks our counts against the paper's printed Table 1.
"""
import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.models import BLOCKS, STUDENTS, evaluating, resnet
from ..speed.taps import n_params
from .paper import paper_format

__all__ = ["paper_flops", "modern_macs", "table1", "compare_with_paper"]

TABLE1_MODELS = ["resnet34", *reversed(STUDENTS)]  # the teacher, then the students from the largest


def _thop2019(m: nn.Module, inp, out) -> int:
    "Operations thop (2019) counted for one call of leaf module `m`."
    x = inp[0]
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups * kh * kw + (m.bias is not None))
    if isinstance(m, nn.BatchNorm2d):
        return 4 * x.numel()
    if isinstance(m, nn.AdaptiveAvgPool2d):
        window = (x.shape[-2] // out.shape[-2]) * (x.shape[-1] // out.shape[-1])
        return out.numel() * (window + 1)
    if isinstance(m, nn.Linear):
        return out.numel() * 2 * m.in_features
    return 0  # ReLU, max pools, flatten and concatenation count nothing


@torch.no_grad()
def paper_flops(model: nn.Module, size: int = 224) -> int:
    "FLOPs of one forward pass at `size` px by the paper's counting rule (thop, 2019)."
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += _thop2019(m, inp, out)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with evaluating(model): model(torch.zeros(1, 3, size, size))
    finally:
        for h in handles: h.remove()
    return total


@torch.no_grad()
def modern_macs(model: nn.Module, size: int = 224) -> int:
    "Multiply-accumulates of one forward pass, from `torch.utils.flop_counter`, every kernel tap counted."
    with FlopCounterMode(display=False) as counter, evaluating(model):
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def table1(size: int = 224, n_classes: int = 10) -> pd.DataFrame:
    "Table 1 of the paper: `params`, `flops` (paper's rule) and `macs` of each model, student head on every row."
    rows = {}
    for name in TABLE1_MODELS:
        model = resnet(name, n_classes)
        rows[name] = dict(blocks="-".join(map(str, BLOCKS[name])), params=n_params(model),
                          flops=paper_flops(model, size), macs=modern_macs(model, size))
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model"
    return df.astype({"params": "int64", "flops": "int64", "macs": "int64"})


def compare_with_paper(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """`ours` (a `table1`) with the paper's printed `params` and `flops` (`kd_lib.evidence.paper.paper_table1`) beside
    them and `match`: True where both our exact counts, written the paper's way (`paper_format`), are the
    paper's strings, 'not in paper' for the models the paper's table lacks (ResNet18)."""
    table = ours.assign(**{f"paper {c}": paper[c].reindex(ours.index) for c in ("params", "flops")})
    match = (table["params"].map(paper_format).eq(table["paper params"])
             & table["flops"].map(paper_format).eq(table["paper flops"]))
    table["match"] = match.where(table["paper params"].notna(), other="not in paper")
    return table[["blocks", "params", "paper params", "flops", "paper flops", "macs", "match"]]
