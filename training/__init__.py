"""Training and experiment drivers of the reference model (kept in the repository, outside the wheel).

Run from the repository root: ``python -m training.train``, ``python -m training.heldout``,
``python -m training.readout_sweep``.
"""
