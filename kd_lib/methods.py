"""The distillation methods, each defined once: a `Method` says what a method trains, step by step, which
callbacks it adds, what it needs and how the book draws it. `METHODS` is the registry, in display order.

    from kd_lib.methods import Method, Step, register
    register(Method("head_only", (Step("head", ("head",)),), needs_teacher=False, color="tab:gray"))

makes ``train_student(method="head_only")``, the runner, the profiles and the figures know it.
"""
from dataclasses import dataclass
from typing import Callable

from .distill import FeatureLoss, SoftTargets
from .models import FEATURE_STAGES, STAGES

__all__ = ["FORCED", "Step", "Method", "METHODS", "STAGEWISE", "FORCED_STAGES", "register", "get_method"]


FORCED = "forced"  # the target of a step that trains the feature stages teacher-forced (kd_lib.forced)


@dataclass(frozen=True)
class Step:
    """One fit of a method: train the stages `parts` on `target`, a teacher feature stage (MSE), 'labels', or
    `FORCED` (every feature stage at once on the teacher's inputs and maps); for the configuration's field
    `epochs` or another one it names (a budget control: its twin's epochs, `Method.budget_of`)."""
    name: str
    parts: tuple = tuple(STAGES)
    target: str = "labels"
    epochs: str = "epochs"


@dataclass(frozen=True)
class Method:
    """A distillation method.

    `steps` run in order, each from the best checkpoint of the one before. A step with a feature target
    trains on the MSE to the teacher's map there; a label step trains on the cross entropy, plus what
    `callbacks(teacher, student, config)` adds (fastai callbacks, for example a teacher term in the loss).
    `needs_teacher`: a trained teacher must exist before the method runs. `cacheable`: every step trains
    some stages on one target, so `kd_lib.cache.FeatureCache` can serve it (`config.cache`). `color` and
    `marker` draw it in the figures; `cost` is the time of one epoch relative to no_teacher's (the runner's
    time estimate), `cached_cost` the same with `cache=True`. `budget_of`: the name of another method; this
    one's single step then trains for as many epochs as that method's run of the same dataset, student, fraction
    and seed used in all (its `budget twin`, which must be complete first), with a one-cycle schedule and no early
    stopping: a control given the other method's budget of optimizer steps on the same data.
    """
    name: str
    steps: tuple
    needs_teacher: bool = True
    cacheable: bool = False
    callbacks: Callable = None
    color: str = "tab:gray"
    marker: str = "o"
    cost: float = 1.0
    cached_cost: float = None
    budget_of: str = None
    description: str = ""

    def label_callbacks(self, teacher, student, config) -> list:
        "The callbacks this method adds to a label step's Learner of `student` (none by default)."
        return list(self.callbacks(teacher, student, config)) if self.callbacks else []

    def epoch_cost(self, cached: bool = False) -> float:
        """The relative time of one epoch (`epochs` of the configuration) of this method, with the cache when
        `cached`; a budget control's is that of one epoch per step of the method whose budget it takes."""
        steps = len(METHODS[self.budget_of].steps) if self.budget_of else 1
        return steps * (self.cached_cost if cached and self.cached_cost is not None else self.cost)


METHODS: dict = {}  # name -> Method, in display order
STAGEWISE = tuple(Step(s, (s,), s) for s in FEATURE_STAGES) + (Step("head", ("head",)),)  # the paper's six steps
FORCED_STAGES = Step("stages", tuple(FEATURE_STAGES), FORCED)


def register(method: Method) -> Method:
    "Add `method` to `METHODS` (or replace the one of the same name); returns it."
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    "The registered method `name`, or a ValueError naming the choices."
    if name not in METHODS: raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


register(Method("no_teacher", (Step("all"),), needs_teacher=False, cacheable=True, color="tab:blue", marker="o",
                description="the student alone, on the labels"))
register(Method("no_teacher_budget", (Step("all"),), needs_teacher=False, cacheable=True, color="tab:cyan",
                marker="P", budget_of="stagewise",
                description="no_teacher given stagewise's budget: as many epochs as its stagewise twin used in all "
                            "(its optimizer steps on the same data), one-cycle, no early stopping"))
register(Method("simultaneous", (Step("all"),),
                callbacks=lambda teacher, student, c: [FeatureLoss(teacher, student, truncate=c.truncate)],
                color="tab:orange", marker="s", cost=1.4,
                description="the whole student on the labels plus the five feature MSEs at once"))
register(Method("stagewise", STAGEWISE,
                cacheable=True, color="tab:green", marker="^", cost=3.4, cached_cost=1.3,
                description="the paper's: each feature stage on the MSE to the teacher's, in order, then the head"))
register(Method("teacher_forced", (FORCED_STAGES, STAGEWISE[-1]), cacheable=True, color="tab:red", marker="X",
                cost=1.5,
                description="the five feature stages at once, each on the teacher's map before it (teacher "
                            "forcing), then the head"))
register(Method("teacher_forced_finetune",
                (FORCED_STAGES, *(Step(f"{s.name}_finetune", s.parts, s.target, "finetune_epochs")
                                  for s in STAGEWISE[:-1]), STAGEWISE[-1]),
                cacheable=True, color="tab:pink", marker="*", cost=2.0,
                description="teacher_forced, then each stage in turn on the student's own inputs for "
                            "finetune_epochs (the drift repaired), then the head"))
register(Method("hinton", (Step("all"),), callbacks=lambda teacher, student, c: [SoftTargets(teacher, c.T, c.alpha)],
                color="tab:purple", marker="D", cost=1.3,
                description="Hinton et al.'s soft targets at temperature T, weight alpha"))
register(Method("fitnets", (Step("hint", ("stem", "layer1", "layer2"), "layer2"),
                            Step("classifier", ("layer3", "layer4", "head"))),
                cacheable=True, color="tab:brown", marker="v", cost=2.0,
                description="FitNets: a hint at layer2, then the rest on the labels"))
