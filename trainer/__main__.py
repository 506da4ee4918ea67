"""`python -m trainer COMMAND`: same as the `trainer` console script."""

from trainer.main import run_main

run_main()
