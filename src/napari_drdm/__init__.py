"""napari-drdm: the Deformation-Recovery Diffusion Model (DRDM) for napari and the command line.

The engine (``napari_drdm.core``, ``napari_drdm.model``) needs only torch and numpy; napari and
Qt are imported only by the widgets.
"""
__version__ = "0.1.0"

__all__ = ["load_model", "DRDM", "__version__"]


def __getattr__(name):  # lazy: keep `import napari_drdm` cheap (napari imports plugins at start-up)
    if name in ("load_model", "DRDM"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'napari_drdm' has no attribute {name!r}")
