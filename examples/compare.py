r"""Optimizers compared on the examples: a learning-rate grid, seeds, plots.

  python examples/compare.py [--task {convnet,resnet,transformer,diffusion}]
      [--data PATH] [--optimizers muon,adamw,nadamw,sgd,optax_muon]
      [--variant NAME=BASE:KEY=VALUE,...] [--seeds N] [--first-seed K]
      [--epochs E | --steps S] [--train-size N] [--lr-grid NAME=LR,LR ...]
      [--tune-budget F] [--set FIELD=VALUE ...] [--mesh DATA,FSDP]
      [--out DIR] [--merge DIR ...]

The harness around the four examples (each runs alone through its
`main.py`; the harness is the package `harness/`): for each optimizer, one seed-0 run per learning rate of its grid,
judged by the final validation metric (a test split is never looked at for
this); then the other seeds at the chosen learning rate. Every run has the
same budget, data order per seed and schedule shape (linear warm-up, linear
decay). Writes DIR/summary.md, DIR/results.json, DIR/*.png and, as it goes,
DIR/runs.partial.jsonl (one line per finished run).

With no arguments: the ConvNet on scikit-learn's bundled digits, about a
minute on two CPU cores.
"""

import pathlib
import sys

# `import harness` and the examples (`convnet`, ...) from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from harness.cli import main  # noqa: E402

if __name__ == '__main__':
  main()
