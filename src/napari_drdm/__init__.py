"""napari-drdm: the Deformation-Recovery Diffusion Model (DRDM) for napari and the command line.

The engine (``napari_drdm.core``, ``napari_drdm.model``) needs only torch and numpy; napari and
Qt are imported only by the widgets.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _openmp_wait_policy() -> str:
    """Make OpenMP threads sleep, not spin, while they wait (unless the user chose otherwise).

    libgomp (loaded with torch) spins up to GOMP_SPINCOUNT = 300000 iterations at every barrier
    before it sleeps.  When the cores are shared (a viewer, another job), a spinning thread holds
    the core its partner needs, and each of the hundreds of parallel regions of a pass waits ~15 ms:
    on a loaded 2-core EPYC, a 2D 128 pass at 2 threads took 2.0 s (native kernels) / 4.0 s
    (oneDNN) with the default, 0.11 s / 0.16 s with OMP_WAIT_POLICY=PASSIVE.  libgomp
    reads the setting once, when it is loaded, so this works only when napari_drdm is imported
    before torch; it is skipped when OMP_WAIT_POLICY or GOMP_SPINCOUNT is set (set
    OMP_WAIT_POLICY=ACTIVE to keep spinning).  Returns what was done, for ``drdm info``."""
    env = _os.environ
    if env.get("OMP_WAIT_POLICY") or env.get("GOMP_SPINCOUNT"):
        return "left as set: " + ", ".join(f"{k}={env[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                                          if env.get(k))
    if "torch" in _sys.modules:
        return "OpenMP default (spinning): torch was imported before napari_drdm"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE set by napari_drdm (unset before torch was loaded)"


OPENMP_WAIT = _openmp_wait_policy()
OPENMP_PASSIVE = _os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"   # threads sleep

__all__ = ["load_model", "DRDM", "__version__"]


def __getattr__(name):  # lazy: keep `import napari_drdm` cheap (napari imports plugins at start-up)
    if name in ("load_model", "DRDM"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'napari_drdm' has no attribute {name!r}")
