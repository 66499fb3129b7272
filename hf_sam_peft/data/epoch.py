"""Tell the training dataset which epoch runs, under every launcher (kept apart: it imports transformers).

accelerate 1.15's ``DataLoaderShard.set_epoch`` (accelerate/data_loader.py, ``set_epoch`` ~l. 622-639) forwards
to ``dataset.set_epoch`` only in an ``elif`` after the sampler branches; with several processes the batch
sampler is a ``BatchSamplerShard`` around a ``SeedableRandomSampler`` (transformers' default
``use_seedable_sampler=True``), that branch is taken and the dataset never hears of the epoch (checked with
``prepare_data_loader(num_processes=2)``). This callback makes it explicit for one process and for DDP.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


class SetEpochCallback(TrainerCallback):
    """Calls ``dataset.set_epoch(epoch)`` at ``on_epoch_begin``.

    ``Trainer`` calls ``on_epoch_begin`` right before ``_run_epoch`` creates the epoch's iterator (and its
    non-persistent DataLoader workers, which copy the dataset then). The epoch is ``floor(state.epoch)``:
    0 at the start, ``e`` after ``e`` full epochs (``state.epoch = epoch + (step + 1) / steps_in_epoch``
    reaches ``e`` exactly), and the interrupted epoch when resuming from a checkpoint — the same number the
    Trainer passes to ``train_dataloader.set_epoch``. Use: ``trainer.add_callback(SetEpochCallback(train_ds))``.
    """

    def __init__(self, dataset):
        if not callable(getattr(dataset, "set_epoch", None)):
            raise TypeError(f"dataset: expected an object with set_epoch(epoch), got {type(dataset).__name__}")
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is a float (epoch + (step + 1) / steps_in_epoch): the 1e-9 keeps a value a rounding error below
        # the integer e from flooring to e - 1, which would replay the previous epoch's patches
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-9)))
        return control


def add_epoch_callback(trainer, dataset) -> bool:
    """Add a :class:`SetEpochCallback` for ``dataset`` to ``trainer`` when the dataset draws anew per epoch
    (has ``set_epoch``: :class:`~hf_sam_peft.data.sampling.RandomPatchDataset`); fixed rows need none.
    Returns whether one was added. Shared by `train` and the demo, so both reach the epoch the same way."""
    if not callable(getattr(dataset, "set_epoch", None)):
        return False
    trainer.add_callback(SetEpochCallback(dataset))
    return True
