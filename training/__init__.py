"""Training for the DRDM engine: the data kit, datasets, losses and the training loop.

Imports ``napari_drdm.core`` but never Qt or napari.
"""
