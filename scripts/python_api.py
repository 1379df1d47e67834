"""batchlab from Python, without the command line: find the largest batch that fits, then study which batch size
reaches a target soonest, on any LightningModule and LightningDataModule (here batchlab's own toy regression).

    python scripts/python_api.py                 # a quick study: seconds
    python scripts/python_api.py --full          # the full study: a few minutes on 2 CPU cores

Both calls return the result objects the ``batchlab tune`` and ``batchlab study`` commands print
(``batchlab.tune.TuneResult``, ``batchlab.study.StudyResult``); ``docs/python.md`` walks through them.
"""

import argparse
import tempfile

from batchlab import find_batch_size, run_study
from batchlab.data import ToyRegressionData
from batchlab.model import MLPRegressor
from batchlab.study import format_study


def default_study_setup() -> tuple[MLPRegressor, ToyRegressionData]:
    """The default study's model and data (``configs/study.yaml``): the seed's MLP with momentum, 36,864 noisy
    samples of y = x1 + x2 on centred features, validated against the noise-free targets."""
    data = ToyRegressionData(n_samples=36864, noise=1.0, x_range=(-5.0, 5.0), clean_eval=True, val_fraction=0.111111,
                             eval_batch_size=4096, batch_size=32)
    return MLPRegressor(hidden_sizes=[8], lr=0.004, momentum=0.9), data


def main(full: bool = False, out: str = "studies/python-api") -> None:
    # The finder writes the size it found into the data's batch_size, as Lightning's does: give it its own copy.
    model, data = default_study_setup()
    with tempfile.TemporaryDirectory() as scratch:  # the search's temporary checkpoint goes here
        found = find_batch_size(model, data, mode="binsearch", max_val=4096, default_root_dir=scratch)
    print(f"batch size found {found.batch_size}, stopped because {found.stopped_because}, {len(found.trials)} trials")

    # The study: every B of the grid, its speed, its steps to val/loss 0.05 with the learning rate re-tuned.
    model, data = default_study_setup()
    result = run_study(model, data, target=0.05, gns_batch_size=4096, quick=not full, out=out, accelerator="cpu")
    print(format_study(result))
    print(f"recommended batch size {result.recommended_batch_size}, lr {result.recommended_lr:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full study instead of the quick one")
    parser.add_argument("--out", default="studies/python-api", help="the study's folder")
    args = parser.parse_args()
    main(args.full, args.out)
