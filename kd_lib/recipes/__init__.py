"""Recipes: run settings, run folders and records, budgets, one fit with exact resume, `train_teacher` and
`train_student`, loading what a run saved."""
