"""Example workloads for ``batchlab study``, each a small LightningModule and LightningDataModule in one file,
offline and seconds per study on a CPU with ``--quick``:

- ``batchlab.examples.digits``: a small CNN with Adam on scikit-learn's bundled 8x8 digits (``configs/digits.yaml``;
  needs ``pip install 'batchlab[examples]'``);
- ``batchlab.examples.chars``: a causal character Transformer with AdamW on a deterministic synthetic grammar
  (``configs/chars.yaml``).

    batchlab study -c configs/chars.yaml --quick
    batchlab study --model.class_path batchlab.examples.digits.DigitsCNN \\
        --data.class_path batchlab.examples.digits.DigitsData --monitor val/acc --mode max --target 0.95

Their batch size is the data's ``batch_size`` hparam, read each time a training loader is built, and their learning
rate the model's ``lr``: the contracts the study sets them through.
"""
