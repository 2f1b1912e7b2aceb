"""`python -m trainer` is `halflabel-train`."""

from trainer.cli import main

main()
