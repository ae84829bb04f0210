"""Writing (or appending) cases to a dataset, ``dataset.json`` last, under the folder's lock
(``folder_locks.folder_lock``): two exports into one folder would each read the old ``dataset.json``
and the second would drop the first one's cases."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..catalogue import EXPORT_FORMATS, SEGMENT_DEFAULTS
from ..files import (BROWSER_FILES, WriteError, check_writable_folder, missing_folders, remove_if_empty,
                     replace_path, write_error, write_json_atomic)
from ..folder_locks import LOCK_FILE, folder_lock
from ..progress import check_cancel, report
from .checks import KnownCases, case_fingerprints, check_case, merge_label_names, stored_as
from .index import DATASET_JSON, FILE_ENDING, LAYOUT_VERSION, DatasetInfo, check_slice_axis, read_dataset
from .slice_formats import (ensure_slice_index, remove_slice_index, remove_unlisted_slice_indexes, slice_outputs,
                            write_slice_indexes)
from .splits import assign_splits

SLICE_FORMATS = tuple(f for f in EXPORT_FORMATS if f != "msd")
# What a folder may hold and still count as empty: this export's own lock, and what file browsers leave.
NOT_CONTENT = BROWSER_FILES | {LOCK_FILE}


def export_dataset(cases: Iterable[Tuple[str, Any, Any]], output_dir: str, fmt: str = "msd",
                   val_fraction: float = 0.2, seed: int = 0, label_names: Optional[Dict[int, str]] = None,
                   progress=None, cancel=None, groups: Optional[Dict[str, str]] = None,
                   splits: Optional[Dict[str, str]] = None, modality: Optional[str] = None,
                   name: Optional[str] = None, axis: Optional[str] = None, window: Optional[str] = None,
                   corrected: Optional[Dict[str, Dict[str, List[int]]]] = None,
                   slice_axes: Optional[Dict[str, str]] = None, replace: Iterable[str] = (),
                   known: Optional[KnownCases] = None) -> Dict[str, Any]:
    """Write (or append) cases to a dataset; returns a summary dict.

    ``cases``: (case_id, volume, label volume) with ``volume_io.Volume``-like objects (``array``
    KJI, ``spacing``, ``origin``, ``direction``). ``groups`` maps case id -> patient id so that
    one patient's cases share a split; ``splits`` forces a split per case; ``corrected`` maps case
    id -> {axis: slice indices a person corrected} (kept in the case's record as what a person
    checked; training samples every slice alike); ``slice_axes`` maps case id -> the axis it was
    segmented along (its record's ``slice_axis``: training and scoring slice it so,
    ``CaseEntry.slicing_axis``). The MSD/nnU-Net files are always written (training reads them);
    ``fmt`` "finetune-sam" or "coco" adds the slice PNGs (along ``axis``, windowed with
    ``window``; by default those the dataset records, else axial and "auto") and their CSV or
    COCO index. Every slice format the dataset holds is written again for all its cases, so its
    CSV and COCO files never miss a case or mix axes.

    The folder must be empty or hold a SAMFineTune dataset, and no file the export adds may be
    there already: it never overwrites what it did not write. A failed export removes the case files
    it added, so the same case ids can be exported again. A case already in the dataset is refused,
    unless its id is in ``replace`` (the same case exported again, corrected further): its files
    are written again, its split and group kept, and it is left alone when its volume and label
    map are those the dataset holds (``checks.volume_fingerprint``, kept in each record; a record
    written without fingerprints is compared with its stored files, ``checks.stored_as``, and given
    the fingerprints when they match). The summary lists the case ids ``added``, ``replaced``,
    ``unchanged`` and ``skipped``. ``known``: the ``checks.KnownCases`` the caller named its cases
    with, so that neither ``dataset.json`` (while unchanged) nor a volume is read or hashed again.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of: {', '.join(EXPORT_FORMATS)}")
    notes = _case_notes(corrected or {}, slice_axes or {})
    root = os.path.abspath(str(output_dir))
    created = _make_root(root)
    try:
        with folder_lock(root, "export"):
            return _export(list(cases), root, fmt, val_fraction, seed, label_names, progress, cancel, groups, splits,
                           modality, name, axis, window, notes, set(replace), known)
    finally:
        remove_if_empty(created)  # only what nothing was written into: a refused export leaves no trace


def _case_notes(corrected: Dict[str, Dict[str, List[int]]], slice_axes: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """What a case's record keeps besides its files: the slices a person corrected per axis
    (``corrected_slices``) and the axis it was segmented along (``slice_axis``); a ValueError for
    an axis the engine does not know, before anything is written."""
    notes: Dict[str, Dict[str, Any]] = {}
    for case, by_axis in corrected.items():
        slices = {name: sorted(int(i) for i in indices) for name, indices in by_axis.items() if indices}
        if slices:
            notes.setdefault(case, {})["corrected_slices"] = slices
    for case, name in slice_axes.items():
        check_slice_axis(case, name)
        notes.setdefault(case, {})["slice_axis"] = name
    return notes


def _make_root(root: str) -> List[str]:
    """Create the dataset folder if needed (the folders it made, its parents too); clear errors for a
    path that is a file or a folder that takes no files, before any case is read or checked."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"the dataset folder {root} is a file; choose a folder (new or an earlier export)")
    if os.path.isdir(root):
        check_writable_folder(root, "the dataset")
        return []
    parent = os.path.dirname(root)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"cannot create the dataset folder {root}: {parent} is a file")
    created = missing_folders(root)
    try:
        os.makedirs(root)
    except OSError as exc:
        remove_if_empty(created)
        raise WriteError(f"cannot create the dataset folder {root}: {exc.strerror or exc}; choose a folder you can "
                         "write to", exc.errno or errno.EACCES) from None
    return created


def _export(cases: List[Tuple[str, Any, Any]], root: str, fmt: str, val_fraction: float, seed: int,
            label_names: Optional[Dict[int, str]], progress, cancel, groups: Optional[Dict[str, str]],
            splits: Optional[Dict[str, str]], modality: Optional[str], name: Optional[str], axis: Optional[str],
            window: Optional[str], notes: Dict[str, Dict[str, Any]], replace: set,
            known: Optional[KnownCases]) -> Dict[str, Any]:
    """``export_dataset`` with the folder created and locked."""
    old = _old_dataset(root, known)
    known = KnownCases(old, known)
    existing = old.cases if old else []
    old_records = {e.case: dict(e.record) for e in existing}
    old_section = old.meta["samfinetune"] if old else {}
    label_names = merge_label_names(old.labels if old else {}, label_names)
    summary: Dict[str, Any] = {"dataset": root, "format": fmt, "added": [], "replaced": [], "unchanged": [],
                               "skipped": [], "warnings": []}
    checked = _checked_cases(cases, set(old_records) - replace, label_names, summary, known)
    checked = _changed(checked, old_records, summary, known)
    if label_names is None:
        label_names = {v: f"label_{v}" for *_, present, _ in checked for v in present}
    fresh = [c for c in checked if c[0] not in old_records]
    groups = {**dict(groups or {}), **{cid: record.get("group", cid) for cid, record in old_records.items()}}
    split_of = assign_splits([(c[0], str(groups.get(c[0], c[0]))) for c in fresh], existing,
                             val_fraction, seed, splits)
    split_of.update({c[0]: old_records[c[0]]["split"] for c in checked if c[0] in old_records})
    old_formats = list(old_section.get("formats", ["msd"]))
    formats = sorted(set(old_formats) | {fmt})
    _check_case_clash([c[0] for c in fresh], list(old_records))
    new_files = _new_files(root, fresh, [f for f in formats if f not in old_formats])
    slicing = (axis or old_section.get("slice_axis") or SEGMENT_DEFAULTS["axis"],
               window or old_section.get("slice_window") or SEGMENT_DEFAULTS["window"])
    previous = _keep_previous(root, [c[0] for c in checked if c[0] in old_records])
    try:
        records = _write_all(root, checked, split_of, groups, summary, progress, cancel, notes,
                             list(old_records.values()), label_names, formats, slicing)
        old_modality = old.meta.get("channel_names", {}).get("0") if old else None
        meta = _dataset_json(records, label_names, modality or old_modality,
                             name or (old.meta.get("name") if old else None) or os.path.basename(root),
                             formats, *slicing)
        write_json_atomic(os.path.join(root, DATASET_JSON), meta)
    except BaseException:
        _remove_new_files(root, new_files, [c[0] for c in checked] if old is None else [])
        _restore(previous, put_back=True)
        raise
    _restore(previous, put_back=False)
    report(progress, len(checked), len(checked), "done")
    summary.update(cases=len(records), train=sum(r["split"] == "train" for r in records),
                   val=sum(r["split"] == "val" for r in records), labels={str(k): v for k, v in label_names.items()})
    if summary["val"] == 0 and val_fraction > 0:
        _warn(summary, f"the dataset has {summary['cases']} case(s) and none held out for validation: training "
                       "needs at least one validation case to choose its best epoch; export at least one more case "
                       "(of another patient)")
    return summary


def _old_dataset(root: str, known: Optional[KnownCases]) -> Optional[DatasetInfo]:
    """The dataset already in ``root`` (None if there is none; ``known``'s reading while its file is
    still there); a ValueError, before anything is written, for a folder the export does not own:
    another tool's dataset, or a folder with files but no ``dataset.json`` (whatever is there could
    be overwritten)."""
    if not os.path.isfile(os.path.join(root, DATASET_JSON)):
        found = sorted(set(os.listdir(root)) - NOT_CONTENT)
        if found:
            raise ValueError(f"{root} is not empty ({found[0]}{', ...' if len(found) > 1 else ''}) and holds no "
                             f"{DATASET_JSON}; export into an empty folder or an existing SAMFineTune dataset")
        return None
    old = known.info if known is not None and known.current(root) else read_dataset(root)
    if "samfinetune" not in old.meta:
        raise ValueError(f"{root} holds a dataset not written by SAMFineTune; export into a new folder")
    return old


def _check_case_clash(fresh: List[str], old: List[str]) -> None:
    """A ValueError for a new case id that differs only in case from another: Windows and macOS
    file names ignore case, so its files would overwrite the other case's (a dataset may be copied
    there even when written on Linux)."""
    seen = {case_id.casefold(): case_id for case_id in old}
    for case_id in fresh:
        other = seen.setdefault(case_id.casefold(), case_id)
        if other != case_id:
            raise ValueError(f"case '{case_id}' and case '{other}' differ only in upper and lower case, which "
                             "Windows and macOS file names ignore; give one of them another id")


def _new_files(root: str, checked: List[tuple], added_formats: List[str]) -> List[str]:
    """The files this export adds (each case's volume and label map, the index files of a format
    the dataset gains); a ValueError naming those already there, which ``dataset.json`` does not
    list and an export must not overwrite."""
    new = [rel for c in checked for rel in _case_files(c[0])]
    new += [rel for f in added_formats if f in SLICE_FORMATS for rel in slice_outputs(f)]
    there = [rel for rel in new if os.path.lexists(os.path.join(root, rel))]
    if there:
        raise ValueError(f"{root} already holds {', '.join(there[:3])}{', ...' if len(there) > 3 else ''}, which "
                         f"{DATASET_JSON} does not list; move them away (an interrupted export may have left them) "
                         "or choose other case ids")
    return new


def _remove_new_files(root: str, new_files: List[str], case_ids: List[str]) -> None:
    """After a failed export: remove the files it added, and the slice indexes of ``case_ids``
    with the layout folders left empty when it was the folder's first export, which can then
    simply be run again. An append keeps its new cases' slice PNGs: CSV or COCO files it wrote
    before failing list them, and the next export removes them (``remove_unlisted_slice_indexes``)."""
    for rel in new_files:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(root, rel))
    for case_id in case_ids:
        remove_slice_index(root, case_id)
    for folder in ("slices/images", "slices/masks", "slices", "imagesTr", "labelsTr"):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, folder))


def _keep_previous(root: str, case_ids: List[str]) -> List[Tuple[str, str]]:
    """(file, a second name of it) for each file of the cases about to be written again: a hard
    link (no space taken; a copy where the file system has none), put back by ``_restore`` when
    the export fails, so the ``dataset.json`` it leaves describes the files beside it."""
    kept: List[Tuple[str, str]] = []
    for path in (os.path.join(root, rel) for case_id in case_ids for rel in _case_files(case_id)):
        second = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.previous")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(second)  # a killed export's, of a file still there
            try:
                os.link(path, second)
            except OSError:
                shutil.copy2(path, second)
        except OSError as exc:
            _restore(kept, put_back=False)
            with contextlib.suppress(OSError):
                os.remove(second)
            raise write_error(second, exc) from None
        kept.append((path, second))
    return kept


def _restore(kept: List[Tuple[str, str]], put_back: bool) -> None:
    """Put the previous files back (``put_back``), or drop their second names. A file not written
    again is still the one its second name links to, which a rename onto it would leave in place."""
    for path, second in kept:
        with contextlib.suppress(OSError):
            if put_back and not os.path.samefile(second, path):
                replace_path(second, path)
            else:
                os.remove(second)


def _write_all(root: str, checked: List[tuple], split_of: Dict[str, str], groups: Dict[str, str],
               summary: Dict[str, Any], progress, cancel, notes: Dict[str, Dict[str, Any]],
               records: List[Dict[str, Any]], label_names: Dict[int, str], formats: List[str],
               slicing: Tuple[str, str]) -> List[Dict[str, Any]]:
    """Write the new cases, then every slice format the dataset records (old cases included, so
    its CSV and COCO files list every case); all records."""
    slice_formats = [f for f in formats if f in SLICE_FORMATS]
    for folder in ("imagesTr", "labelsTr") + (("slices",) if slice_formats else ()):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    listed = [r["case"] for r in records]
    written = {r["case"]: r for r in _write_cases(root, checked, split_of, groups, summary, progress, cancel,
                                                  set(listed))}
    for record in written.values():
        record.update(notes.get(record["case"], {}))
    records = [written.pop(r["case"], r) for r in records] + list(written.values())
    check_cancel(cancel)
    if slice_formats:
        remove_unlisted_slice_indexes(root, listed)
        for record in records:
            report(progress, len(checked), len(checked), f"slices of {record['case']}")
            ensure_slice_index(root, record, *slicing)
        for slice_format in slice_formats:
            write_slice_indexes(root, records, label_names, slice_format)
    return records


def _warn(summary: Dict[str, Any], message: str) -> None:
    warnings.warn(message, stacklevel=4)
    summary["warnings"].append(message)


def _checked_cases(cases: List[Tuple[str, Any, Any]], seen: set, label_names: Optional[Dict[int, str]],
                   summary: Dict[str, Any], known: KnownCases) -> List[tuple]:
    """(case_id, image, label, label array, label values, fingerprints) of every case worth writing,
    all checked before anything is written; an empty label map is skipped with a warning."""
    checked: List[tuple] = []
    for case_id, image, label in cases:
        if case_id in seen:
            where = "twice in this export" if case_id in {c for c, *_ in checked} else "already in the dataset"
            raise ValueError(f"case '{case_id}' is {where}; an export never rewrites a case: give it another id")
        seen.add(case_id)
        array, present = check_case(case_id, image, label, label_names)
        if not present:
            summary["skipped"].append({"case": case_id, "reason": "empty label"})
            _warn(summary, f"case '{case_id}' skipped: its label map is empty (nothing segmented)")
            continue
        prints = case_fingerprints(image, array, known)
        checked.append((case_id, image, label, array, present, prints))
    return checked


def _changed(checked: List[tuple], old_records: Dict[str, Dict[str, Any]], summary: Dict[str, Any],
             known: KnownCases) -> List[tuple]:
    """``checked`` less the cases the dataset holds as they are (the same volume on the same grid,
    the same label map). A record without fingerprints is compared with its stored files; a record
    of the same case missing some of them is given the case's (in ``old_records``), so the next
    export tells it by them."""
    kept = []
    for case in checked:
        case_id, image, _, array, _, prints = case
        record = old_records.get(case_id)
        held = (record or {}).get("fingerprints") or {}
        if held:
            same = held.get("image") == prints["image"] and held.get("label") == prints["label"]
        else:
            entry = known.info.case(case_id) if record is not None else None
            same = entry is not None and stored_as(np.asarray(image.array), image, entry.image) and stored_as(
                array, image, entry.label)
        if same:
            record["fingerprints"] = prints
            summary["unchanged"].append(case_id)
        else:
            kept.append(case)
    return kept


def _write_cases(root: str, checked: List[tuple], split_of: Dict[str, str], groups: Dict[str, str],
                 summary: Dict[str, Any], progress, cancel, replaced: set) -> List[Dict[str, Any]]:
    """Write each checked case's volume and label map (over its files for a case of ``replaced``);
    their records for ``dataset.json``."""
    from ..volume_io import Volume, write_volume

    records = []
    for n, (case_id, image, label, array, present, prints) in enumerate(checked):
        check_cancel(cancel)
        report(progress, n, len(checked), f"writing case {case_id}")
        image_rel, label_rel = _case_files(case_id)
        write_volume(Volume(np.asarray(image.array), tuple(image.spacing), tuple(image.origin),
                            tuple(image.direction)), os.path.join(root, image_rel))
        write_volume(Volume(array, tuple(image.spacing), tuple(image.origin), tuple(image.direction)),
                     os.path.join(root, label_rel))
        records.append({"case": case_id, "image": image_rel, "label": label_rel, "split": split_of[case_id],
                        "group": str(groups.get(case_id, case_id)), "shape_kji": list(array.shape),
                        "spacing": [float(s) for s in image.spacing], "labels": present, "fingerprints": prints})
        summary["replaced" if case_id in replaced else "added"].append(case_id)
    return records


def _case_files(case_id: str) -> Tuple[str, str]:
    """A case's volume and label map, relative to the dataset folder."""
    return f"imagesTr/{case_id}_0000{FILE_ENDING}", f"labelsTr/{case_id}{FILE_ENDING}"


def _dataset_json(records: List[Dict[str, Any]], label_names: Dict[int, str], modality: Optional[str], name: str,
                  formats: List[str], axis: str, window: str) -> Dict[str, Any]:
    def listing(split: str) -> List[Dict[str, str]]:
        return [{"image": "./" + r["image"], "label": "./" + r["label"]} for r in records if r["split"] == split]

    return {
        "name": name,
        "description": "exported by SAMFineTune",
        "channel_names": {"0": modality or "CT"},
        "labels": dict([("background", 0)] + [(n, int(v)) for v, n in sorted(label_names.items())]),
        "numTraining": len(records),
        "file_ending": FILE_ENDING,
        "training": listing("train"),
        "validation": listing("val"),
        "test_labelled": listing("test"),
        "samfinetune": {"version": LAYOUT_VERSION, "formats": formats, "slice_axis": axis, "slice_window": window,
                        "cases": records},
    }
