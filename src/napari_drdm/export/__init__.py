"""Dataset export: Algorithms 3 and 4 over folders of images, shared by the ``drdm`` CLI and the napari widget.

* Algorithm 3 (``mode="augment"``, ``drdm augment``): for each image (+ labels), N DRDM
  deformations phi (Algorithm 2); writes the deformed image (input dtype and range), the deformed
  labels (only the input's values), phi as a NIfTI displacement image in mm and, optionally, its
  inverse.
* Algorithm 4 (``mode="pairs"``, ``drdm synthesize-pairs``): registration pairs (moving, fixed,
  phi_syn) + moving/fixed labels.

Everything happens on the input's own grid: fields generated on the model's S^d grid are resized
to the original grid before warping or composing.  One module per idea:

==================  ===============================================================================
:mod:`.discovery`   which inputs a run reads and under which names (label pairing rule)
:mod:`.jobspec`     what each output is: T' specification, per-output seeds, file paths
:mod:`.sample`      one input read, checked and prepared for its model (:class:`LoadedSample`)
:mod:`.compute`     one batch through the model: fields, warped images and labels, inverses
:mod:`.manifest`    the crash-safe journal and the manifest built from it
:mod:`.outdir`      output-folder rules: not among the inputs, empty, resumable or overwritten
:mod:`.options`     the run's options: checks, the settings ``run.json`` records, what a model bounds
:mod:`.engine`      the run: the loop, the files written, events for a progress display
:mod:`.reproduce`   regenerate one manifest row bit for bit
==================  ===============================================================================
"""
from __future__ import annotations

from .discovery import ArrayInput, Sample, Skipped, discover
from .engine import ExportEvent, iter_export, run_export
from .jobspec import derive_seed, parse_t_prime
from .manifest import load_manifest, verify_row, write_manifest
from .options import ExportOptions
from .reproduce import reproduce_row
from .sample import LoadedSample, ModelProvider, load_sample

__all__ = ["ExportOptions", "ExportEvent", "iter_export", "run_export", "reproduce_row", "ArrayInput", "Sample",
           "Skipped", "discover", "parse_t_prime", "derive_seed", "load_manifest", "verify_row", "write_manifest",
           "LoadedSample", "ModelProvider", "load_sample"]
