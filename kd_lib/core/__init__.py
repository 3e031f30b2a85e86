"""The distillation core: models, stages, the callbacks, the steps, the method registry and the optimizers, on
torch and fastai alone (its modules import each other and nothing else of kd_lib, so the folder can be copied)."""
