"""Run infrastructure, nothing a user copies: atomic files and one JSON reader, run-folder locks, progress lines."""
