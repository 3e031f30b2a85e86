"""How the book draws each method (colour, marker) and in which order it lists them: presentation, kept beside the
figures that use it and out of the method registry (`kd_lib.core.methods`). A method of your own is drawn in black
crosses, listed after these, unless you add it: ``STYLES["head_only"] = Style("tab:gray", "o")``."""
from typing import NamedTuple

__all__ = ["Style", "STYLES", "style", "method_order"]


class Style(NamedTuple):
    color: str
    marker: str


STYLES = {  # method -> its style, in the book's display order
    "no_teacher": Style("tab:blue", "o"),
    "no_teacher_budget": Style("tab:cyan", "P"),
    "simultaneous": Style("tab:orange", "s"),
    "stagewise": Style("tab:green", "^"),
    "teacher_forced": Style("tab:red", "X"),
    "teacher_forced_finetune": Style("tab:pink", "*"),
    "hinton": Style("tab:purple", "D"),
    "fitnets": Style("tab:brown", "v"),
}
OTHER = Style("black", "x")


def style(method: str) -> Style:
    "The colour and marker of `method`."
    return STYLES.get(method, OTHER)


def method_order(methods) -> list:
    "The distinct `methods` in display order: those of `STYLES` in its order, then the others sorted."
    present = list(dict.fromkeys(methods))
    return [m for m in STYLES if m in present] + sorted(m for m in present if m not in STYLES)
