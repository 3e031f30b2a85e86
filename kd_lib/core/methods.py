"""The distillation methods, each defined once: a `Method` says what a method trains, step by step (the steps
of `kd_lib.core.steps`, made for the run's `kd_lib.core.stages.Stages`), which callbacks it adds and what it needs (how
the book draws it is `kd_lib.evidence.style`'s; what an epoch costs, the runner's estimate's). `METHODS` is the
registry, in display order.

    from kd_lib.core.methods import Method, register
    from kd_lib.core.steps import Labels
    register(Method("head_only", (Labels("head", ("head",)),), needs_teacher=False))

makes ``train_student(method="head_only")``, the profiles and the figures know it; for the runner's notebooks
(which run in kernels of their own), put the definition in a module and name it in the profile's `imports`.
"""
from dataclasses import dataclass
from typing import Callable

from .distill import FeatureLoss, SoftTargets
from .stages import Stages
from .steps import Features, Forced, Labels

__all__ = ["Method", "METHODS", "register", "get_method"]


@dataclass(frozen=True)
class Method:
    """A distillation method.

    `steps`: the steps (`kd_lib.core.steps`), in order, each from the best checkpoint of the one before; a tuple, or a
    function of the run's `Stages` giving one (a method defined for any cut of the models). A `Features` step
    trains on the MSE to the teacher's map there; a `Labels` step trains on the cross entropy, plus what
    `callbacks(setting)` adds (fastai callbacks given the run's `kd_lib.core.steps.Setting`, e.g. a teacher term).
    `needs_teacher`: a trained teacher must exist before the method runs. `cacheable`: every step trains
    some stages on one target, so `kd_lib.speed.cache.FeatureCache` can serve it (`config.cache`). `budget_of`: the
    name of another method; this one's single step then trains for as many epochs as that method's run of the same
    dataset, student, fraction and seed used in all (its `budget twin`, which must be complete first), with a one-cycle
    schedule and no early stopping: a control given the other method's budget of optimizer steps on the same data.
    """
    name: str
    steps: object
    needs_teacher: bool = True
    cacheable: bool = False
    callbacks: Callable = None
    budget_of: str = None
    description: str = ""

    def steps_for(self, stages: Stages = None) -> tuple:
        "The steps of this method for `stages` (default: the paper's)."
        return tuple(self.steps(stages or Stages.paper()) if callable(self.steps) else self.steps)

    def label_callbacks(self, setting) -> list:
        "The callbacks this method adds to a label step's Learner (none by default), given the run's `Setting`."
        return list(self.callbacks(setting)) if self.callbacks else []


METHODS: dict = {}  # name -> Method, in display order


def register(method: Method) -> Method:
    "Add `method` to `METHODS` (or replace the one of the same name); returns it."
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    "The registered method `name`, or a ValueError naming the choices."
    if name not in METHODS: raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def _all(st: Stages) -> tuple: return (Labels("all", tuple(st.all)),)
def _head() -> Labels: return Labels("head", ("head",))
def _stagewise(st: Stages) -> tuple: return tuple(Features(s, (s,), target=s) for s in st.names) + (_head(),)
def _forced(st: Stages) -> Forced: return Forced("stages", tuple(st.names))


def _fitnets(st: Stages) -> tuple:
    "A hint at the middle feature stage (layer2 of the paper's five), then the rest on the labels."
    k = len(st.names) // 2
    return (Features("hint", tuple(st.names[:k + 1]), target=st.names[k]),
            Labels("classifier", (*st.names[k + 1:], "head")))


register(Method("no_teacher", _all, needs_teacher=False, cacheable=True,
                description="the student alone, on the labels"))
register(Method("no_teacher_budget", _all, needs_teacher=False, cacheable=True, budget_of="stagewise",
                description="no_teacher given stagewise's budget: as many epochs as its stagewise twin used in all "
                            "(its optimizer steps on the same data), one-cycle, no early stopping"))
register(Method("simultaneous", _all,
                callbacks=lambda s: [FeatureLoss(s.teacher, s.student, s.stages, truncate=s.config.truncate,
                                                 adapters=s.adapters)],
                description="the whole student on the labels plus the feature MSEs of every stage at once"))
register(Method("stagewise", _stagewise, cacheable=True,
                description="the paper's: each feature stage on the MSE to the teacher's, in order, then the head"))
register(Method("teacher_forced", lambda st: (_forced(st), _head()), cacheable=True,
                description="the feature stages at once, each on the teacher's map before it (teacher "
                            "forcing), then the head"))
register(Method("teacher_forced_finetune",
                lambda st: (_forced(st), *(Features(f"{s}_finetune", (s,), "finetune_epochs", target=s)
                                           for s in st.names), _head()),
                cacheable=True,
                description="teacher_forced, then each stage in turn on the student's own inputs for "
                            "finetune_epochs (the drift repaired), then the head"))
register(Method("hinton", _all, callbacks=lambda s: [SoftTargets(s.teacher, s.config.T, s.config.alpha)],
                description="Hinton et al.'s soft targets at temperature T, weight alpha"))
register(Method("fitnets", _fitnets, cacheable=True,
                description="FitNets: a hint at the middle stage, then the rest on the labels"))
