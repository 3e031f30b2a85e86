"""Opt-in CPU speed, applied by the recipes on every run (so kept records stay bit for bit): tap convolutions, the
feature cache, freed memory kept."""
