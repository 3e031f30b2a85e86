"""`python -m kd_lib.runner`: the runner's command line (`kd_lib.runner.cli`)."""
from .cli import main

main()
