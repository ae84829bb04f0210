"""Training sets: export volumes + label maps to disk, and read them back as per-slice samples.

The on-disk layout is the one nnU-Net, MONAI and the Medical Segmentation Decathlon use::

    DATASET/
      dataset.json                 labels, channel names, per-case split (the index: written last)
      imagesTr/<case>_0000.nii.gz  the volume, geometry kept
      labelsTr/<case>.nii.gz       integer label map (0 = background)
      train.csv, val.csv           --format finetune-sam: image,mask slice PNG paths (no header)
      coco_train.json, coco_val.json   --format coco: slice PNGs + RLE masks (finestSAM)
      slices/                      the slice PNGs and one small index per case for those formats
      .embeddings/                 (optional) encoder outputs a shared set carries; training reads them
                                   first and caches its own in the user's folder (training.samples)

``dataset.json`` is nnU-Net v2's (``channel_names``, ``labels`` name -> value, ``numTraining``,
``file_ending``) plus MONAI's ``training`` / ``validation`` lists (``load_decathlon_datalist``)
and a ``samfinetune`` section with one record per case (split, group, shape, spacing).

Rules: splits are by case or by group (patient), never by slice; exporting into an existing
dataset appends and never drops a case, nor rewrites one unless asked to (``replace``: the same
case exported again, which keeps its split); an export goes only into an empty folder or
a SAMFineTune dataset and never writes over a file that ``dataset.json`` does not list; every
file is written to a temporary name and renamed, and ``dataset.json`` is replaced last, so a
crash or cancel mid-export leaves the previous dataset's cases and index as they were (a failed
export removes the case files it added and puts back those of the cases it wrote again; a killed
one may leave some, which the next export names instead of overwriting; CSV and COCO files already
rewritten may list the new cases until the next export). The CSV and COCO files of every format
the dataset holds are written again for all its cases on each export; a case's slice PNGs are
reused only while its index records the same axis, window and files
(``slice_formats.ensure_slice_index``). Geometry mismatches and unknown label values are errors;
an empty label map is skipped with a warning (returned in the summary and issued through
``warnings``).

Modules: ``index`` (reading ``dataset.json``), ``checks`` and ``splits`` (what an export
checks and decides), ``export``, ``slice_formats`` (CSV and COCO slices, RLE), ``samples``
(per-slice samples for training and evaluation), ``cli`` (the ``export`` command).
"""
from ..catalogue import EXPORT_FORMATS as FORMATS
from ..catalogue import SPLITS
from ..progress import Cancelled
from ..volume_io import read_image_any
from .checks import check_case
from .cli import add_arguments, main
from .export import export_dataset
from .index import DATASET_JSON, EMBEDDING_DIR, FILE_ENDING, CaseEntry, DatasetInfo, read_dataset
from .samples import SliceSample, case_samples, load_case, load_samples
from .slice_formats import rle_decode, rle_encode

__all__ = [
    "Cancelled", "CaseEntry", "DATASET_JSON", "DatasetInfo", "EMBEDDING_DIR", "FILE_ENDING", "FORMATS", "SPLITS",
    "SliceSample", "add_arguments", "case_samples", "check_case", "export_dataset", "load_case", "load_samples",
    "main", "read_dataset", "read_image_any", "rle_decode", "rle_encode",
]
