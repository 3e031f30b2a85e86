"""Table 1 comes out exactly as the paper printed it (kd_lib.evidence.complexity)."""
import pytest
from torch import nn

from kd_lib.evidence.complexity import compare_with_paper, modern_macs, paper_flops, table1
from kd_lib.evidence.paper import paper_table1

PAPER_EXACT = {  # params, flops at 224 px, 10 classes (the paper's Table 1, exact counts)
    "resnet34": (21_549_642, 3_678_756_864),
    "resnet26": (17_712_202, 2_751_905_792),
    "resnet20": (12_622_154, 2_055_663_616),
    "resnet18": (11_441_482, 1_824_051_200),
    "resnet14": (11_072_074, 1_359_220_736),
    "resnet10": (5_170_762, 896_196_608),
}


@pytest.fixture(scope="module")
def t1():
    return table1()


def test_table1_integers_are_the_papers(t1):
    assert {m: (int(r.params), int(r.flops)) for m, r in t1.iterrows()} == PAPER_EXACT
    assert all(t1[c].dtype.kind == "i" for c in ["params", "flops", "macs"])


def test_table1_prints_as_the_paper(t1):
    table = compare_with_paper(t1, paper_table1())
    assert table["match"].to_dict() == {m: "not in paper" if m == "resnet18" else True for m in PAPER_EXACT}
    assert table.loc["resnet34", ["paper params", "paper flops"]].tolist() == ["21.550M", "3.679G"]


def test_modern_macs_are_below_paper_flops_and_ordered(t1):
    assert (t1.macs < t1.flops).all()
    assert list(t1.sort_values("macs").index) == list(t1.sort_values("flops").index)


def test_counting_rule_on_a_tiny_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    conv = 4 * 8 * 8 * 3 * 9
    bn = 4 * 4 * 8 * 8
    pool = 4 * (64 + 1)
    lin = 2 * 2 * 4
    assert paper_flops(net, size=8) == conv + bn + pool + lin
    assert modern_macs(net, size=8) == conv + 2 * 4


def test_table1_at_another_size_and_head():
    t = table1(size=32, n_classes=100)
    assert t.params["resnet10"] == PAPER_EXACT["resnet10"][0] + (256 + 1) * 90
    assert t.flops["resnet10"] < PAPER_EXACT["resnet10"][1] / 40
    assert compare_with_paper(t, paper_table1())["match"].drop("resnet18").eq(False).all()
