"""napari-drdm: the Deformation-Recovery Diffusion Model (DRDM) for napari and the command line."""
__version__ = "0.1.0"
