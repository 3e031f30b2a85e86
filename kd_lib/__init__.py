"""kd_lib: Stagewise Knowledge Distillation on fastai."""
__version__ = "0.1.0"
