"""``python -m tiramisu_brats`` runs the command line."""

from tiramisu_brats.cli import run

run()
