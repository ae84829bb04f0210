"""Checks of input volumes before any slow work: image files that hold every voxel their header
promises, no NaN or infinite voxels, and a box whose voxels carry some contrast.

SimpleITK alone lets bad input through silently: a truncated ``.nii.gz`` (or ``.nii``) reads
back zero-filled, NIfTI NaN voxels read back as 0, and it does not raise when a write is cut
short. So NIfTI files are checked here against their own header (the payload length, and the
raw float values), other formats by reading them back, and arrays by counting what is not finite.

Imports numpy and the standard library only; SimpleITK is imported when a check needs it.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .volume_facts import remembered

_CHUNK = 16 << 20
# NIfTI datatype codes whose voxels can be NaN or infinite, and their numpy kind.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
# At most this many voxels go into a percentile (a strided sample of a larger region).
_SAMPLE = 1 << 20


class NiftiLayout:
    """Where a NIfTI file's voxels are and how many bytes they take, from its header."""

    def __init__(self, offset: int, nbytes: int, dtype: Optional[np.dtype], sizes: Sequence[int] = ()):
        self.offset, self.nbytes, self.dtype = offset, nbytes, dtype
        self.sizes = tuple(int(n) for n in sizes)  # voxels along i, j, k (and any further axes)


def is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def nifti_layout(head: bytes) -> Optional[NiftiLayout]:
    """The voxel layout a single-file NIfTI-1 or NIfTI-2 header describes; None if ``head`` is not one."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dims[1:dims[0] + 1]):
        return None
    sizes = dims[1:dims[0] + 1]
    voxels = int(np.prod([int(n) for n in sizes], dtype=np.int64))
    kind = _NIFTI_FLOATS.get(datatype)
    return NiftiLayout(max(offset, 348), voxels * bitpix // 8, np.dtype(order + kind) if kind else None, sizes)


def check_sizes(path: str, sizes: Sequence[int]) -> None:
    """A ValueError naming ``path`` and its empty axis when an image holds no voxels at all (a size
    of 0 along i, j, k or a further axis): no reader can make a volume of it (SimpleITK reads such
    a NIfTI as one slice of whatever bytes follow its header)."""
    for axis, size in enumerate(sizes):
        if int(size) == 0:
            raise empty_axis_error(path, axis, sizes)


def empty_axis_error(path: str, axis: int, sizes: Sequence[int] = ()) -> ValueError:
    """The one line for an image whose size along ``axis`` (0 = i) is 0."""
    name = "ijktuvw"[axis] if 0 <= axis < 7 else str(axis)
    shape = f" ({' x '.join(str(int(n)) for n in sizes)} voxels)" if sizes else ""
    return ValueError(f"{path} holds no voxels: its size along axis {name} is 0{shape}, so it was saved from an "
                      "empty image; save or export the volume again from its source")


def check_image_file(path: str, values: bool = True) -> None:
    """A ValueError naming ``path`` when a NIfTI file's voxels are cut short (compressed or not)
    or (``values``) hold NaN / infinite values, which SimpleITK would read back as zeros. Other
    formats are checked as SimpleITK reads them (it raises for short NRRD and MetaImage data)."""
    if not is_nifti(path):
        return
    compressed = path.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            layout = nifti_layout(handle.read(540))
    except (OSError, EOFError, zlib.error):
        layout = None  # not even a header: SimpleITK's own error says so
    if layout is None:
        return
    check_sizes(path, layout.sizes)
    expected = layout.offset + layout.nbytes
    if not values:
        layout.dtype = None
    if layout.dtype is None and compressed and _gzip_size_field(path) == expected % (1 << 32):
        return  # the gzip trailer agrees with the header: complete (a cut file's last bytes are not a trailer)
    if layout.dtype is None and not compressed and os.path.getsize(path) >= expected:
        return
    got, nan, inf = _scan_voxels(_file_chunks(path, compressed), layout)
    if got < layout.nbytes:
        raise ValueError(f"{path} is cut short: its header promises {layout.nbytes} bytes of voxels but the file "
                         f"holds {got}; it was not copied or written completely (copy or export it again)")
    check_finite_counts(nan, inf, layout.nbytes // layout.dtype.itemsize if layout.dtype else 0, str(path))


def _gzip_size_field(path: str) -> int:
    """The gzip trailer's ISIZE: the uncompressed length modulo 2**32 (of a complete file)."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]


def _file_chunks(path: str, compressed: bool) -> Iterator[bytes]:
    """The file's bytes (decompressed), as far as they go: a gzip stream that ends early or turns
    corrupt yields what came before (``gzip`` would raise and lose it)."""
    with open(path, "rb") as handle:
        if not compressed:
            yield from iter(lambda: handle.read(_CHUNK), b"")
            return
        inflate = zlib.decompressobj(31)
        for raw in iter(lambda: handle.read(1 << 20), b""):
            while raw:
                try:
                    out = inflate.decompress(raw, _CHUNK)
                except zlib.error:
                    return
                if out:
                    yield out
                if inflate.eof:  # a gzip file may hold several members, one after the other
                    raw, inflate = inflate.unused_data, zlib.decompressobj(31)
                else:
                    raw = inflate.unconsumed_tail


def _scan_voxels(chunks: Iterator[bytes], layout: NiftiLayout) -> Tuple[int, int, int]:
    """(voxel bytes present, NaN count, infinite count) of a NIfTI file read as ``chunks``."""
    position, got, nan, inf = 0, 0, 0, 0
    carry = b""
    for chunk in chunks:
        start = max(0, layout.offset - position)
        position += len(chunk)
        if start >= len(chunk):
            continue
        part = chunk[start:start + layout.nbytes - got]
        got += len(part)
        if layout.dtype is not None:
            data = carry + part if carry else part
            count = len(data) // layout.dtype.itemsize
            values = np.frombuffer(data, dtype=layout.dtype, count=count)
            finite = int(np.count_nonzero(np.isfinite(values)))
            if finite < count:  # rare: only then tell NaN from infinite
                bad_nan = int(np.count_nonzero(np.isnan(values)))
                nan, inf = nan + bad_nan, inf + count - finite - bad_nan
            carry = data[count * layout.dtype.itemsize:]
        if got >= layout.nbytes:
            break
    return got, nan, inf


def check_finite_counts(nan: int, inf: int, total: int, what: str) -> None:
    if nan or inf:
        parts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n]
        raise ValueError(f"{what} has {' and '.join(parts)} voxels (of {total}); replace them (e.g. with the "
                         "background value) before using it")


def check_finite(array: np.ndarray, what: str) -> None:
    """A ValueError counting NaN and infinite voxels, if there are any."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    check_finite_counts(nan, int(array.size - np.count_nonzero(finite)) - nan, int(array.size), what)


def verify_image_file(path: str, shape_kji: Sequence[int]) -> None:
    """Read back an image just written: a ValueError unless it holds ``shape_kji`` voxels, all of
    them (SimpleITK does not raise when the disk fills or a file-size limit cuts a write)."""
    import SimpleITK as sitk

    expected = tuple(int(n) for n in reversed(tuple(shape_kji)))
    try:
        if is_nifti(path):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(reader.GetSize())
        else:
            size = tuple(sitk.ReadImage(str(path)).GetSize())
    except RuntimeError:
        raise ValueError(f"{os.path.getsize(path)} bytes, unreadable") from None
    if size != expected:
        raise ValueError(f"it holds {size} voxels instead of {expected}")
    try:
        check_image_file(path, values=False)
    except ValueError:
        raise ValueError(f"{os.path.getsize(path)} bytes, short of the voxels its header promises") from None


def check_contrast(array: np.ndarray, box: Optional[Sequence[int]] = None, what: str = "the volume",
                   prompt: str = "the box") -> List[str]:
    """A ValueError when every voxel inside ``box`` (inclusive i0, j0, k0, i1, j1, k1; default the
    whole array) has the same value, or values too close to tell apart: no segmentation of it can
    mean anything. Returns warnings (one line each) when nearly all of them share one value.
    ``prompt`` names what the user placed there (the box, the ROI, a click)."""
    region = np.asarray(array)
    where = what
    if box is not None:
        i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
        region = region[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
        where = f"{prompt} {list(box)} of {what}"
    if region.size == 0:
        return []
    low, high = float(region.min()), float(region.max())
    if high - low <= 1e-6 * max(abs(low), abs(high)):
        spread = f"is {low:g}" if low == high else f"lies between {low:g} and {high:g}"
        raise ValueError(f"every voxel inside {where} {spread}: there is nothing to segment; check that {prompt} "
                         "is on the right volume and that the volume loaded completely")
    sample = region.reshape(-1)[:: max(1, region.size // _SAMPLE)]
    p1, p99 = np.percentile(sample, [1, 99])
    if p1 == p99:
        share = 100.0 * np.count_nonzero(sample == p1) / sample.size
        return [f"{share:.1f}% of the voxels inside {where} have the value {p1:g}: the structure may not be "
                f"visible there; check {prompt} and the window"]
    return []


def check_same_grid(volume, other, what: str) -> None:
    """A ValueError unless ``other`` (a label map, a mask; named by ``what``) lies on ``volume``'s
    voxel grid: the same shape, and spacing, origin and direction within what a file's float
    precision moves. A map on another grid of the same shape would be taken voxel for voxel, off
    the anatomy it was drawn on."""
    shape, other_shape = np.shape(volume.array), np.shape(other.array)
    if other_shape != shape:
        raise ValueError(f"{what} shape {other_shape} does not match the volume's {shape}; give one made on this "
                         "volume")
    spacing = np.asarray(volume.spacing, float)
    for name, ours, theirs, tol in (("spacing", volume.spacing, other.spacing, 1e-4 * spacing.max()),
                                    ("origin", volume.origin, other.origin, 1e-3 * spacing.min()),
                                    ("direction", volume.direction, other.direction, 1e-4)):
        if not np.allclose(np.asarray(ours, float), np.asarray(theirs, float), rtol=0.0, atol=tol):
            raise ValueError(f"{what} {name} {_rounded(theirs)} does not match the volume's {_rounded(ours)}; "
                             "resample it onto the volume first")


def _rounded(values: Sequence[float]) -> Tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def check_adapter(path: str, model: Optional[str] = None) -> Dict[str, Any]:
    """The model card of an adapter folder named on the command line, before the model loads: a
    folder holding a readable card, trained on ``model`` when one is named (the checkpoint's own
    fingerprint is compared once the model is loaded)."""
    from .adapter_folders import COMPLETE_MARK

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"the adapter {path} is a file; give the adapter folder 'train' wrote (it holds "
                         f"{COMPLETE_MARK})")
    from .adapters import read_model_card

    card = read_model_card(path)
    base = card.get("base_model", {}).get("name")
    if model is not None and base != model:
        raise ValueError(f"the adapter {path} was trained on {base}, not {model}: give --model {base} (with its "
                         f"checkpoint), or an adapter trained on {model}")
    return card


def check_triplanar(triplanar: bool, adapter: Optional[str]) -> None:
    """Tri-planar voting is for the base model: an adapter learned the slices of the axis it was
    trained along and answers the other two poorly (docs/accuracy.md), so their votes would
    outweigh its own. Checked before the volume is read or the model loads."""
    if triplanar and adapter:
        raise ValueError(f"tri-planar voting is for the base model: the adapter {adapter} learned the slices of one "
                         "axis and answers the other two poorly; segment without tri-planar, or without the adapter")


def check_float32_range(array: np.ndarray, what: str) -> None:
    """A ValueError when voxels lie beyond float32's range: the slices are windowed in float32, where
    they would turn infinite and the whole slice undefined."""
    array = np.asarray(array)
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4 or array.size == 0:
        return
    limit = float(np.finfo(np.float32).max)
    if max(abs(float(array.min())), abs(float(array.max()))) > limit:
        raise ValueError(f"{what} holds values beyond {limit:.3g}, which the engine cannot window (it works in "
                         "float32); rescale the volume first")


def validate_volume(volume) -> None:
    """A ``volume_io.Volume`` the Segmenter can slice: a 3D array of finite real numbers, and a spacing."""
    array = volume.array
    if not isinstance(array, np.ndarray):
        raise ValueError(f"volume must be a numpy array, got {type(array).__name__}")
    if array.ndim == 4 and array.shape[-1] in (3, 4):
        raise ValueError(f"volume has shape {array.shape}: RGB/vector volumes are not supported, use a scalar volume")
    if array.ndim != 3:
        raise ValueError(f"volume must be 3D (k, j, i); got a {array.ndim}D array of shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"volume has a zero-size axis: shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"volume must hold real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = remembered(array, "non-finite voxels", lambda: int(array.size - np.count_nonzero(np.isfinite(array))))
        if bad:
            raise ValueError(f"volume contains {bad} NaN or infinite voxels; fill or mask them before segmenting")
    spacing = np.asarray(volume.spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers (x, y, z) in mm, got {volume.spacing}")


def validate_box(box: Sequence, shape_kji: Sequence[int]) -> Tuple[int, ...]:
    """Six whole voxel indices (i0, j0, k0, i1, j1, k1) of a non-empty box inside a volume of ``shape_kji``."""
    values = np.asarray(box, dtype=float).reshape(-1) if box is not None else np.empty(0)
    if values.size != 6:
        raise ValueError(f"box must be six voxel indices (i0, j0, k0, i1, j1, k1), got {box!r}")
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError(f"box indices must be whole numbers, got {list(box)}")
    i0, j0, k0, i1, j1, k1 = (int(v) for v in values)
    limits = {"i": shape_kji[2], "j": shape_kji[1], "k": shape_kji[0]}
    for name, lo, hi in (("i", i0, i1), ("j", j0, j1), ("k", k0, k1)):
        if hi < lo:
            raise ValueError(f"empty box: {name}1={hi} is before {name}0={lo}")
        if lo < 0 or hi >= limits[name]:
            raise ValueError(f"box is outside the volume along {name}: {lo}..{hi}, valid 0..{limits[name] - 1}")
    return (i0, j0, k0, i1, j1, k1)


def validate_roi(roi: Sequence, shape_kji: Sequence[int]) -> Tuple[int, ...]:
    """``validate_box`` for the ROI a segment came from, named so beside a click's 2D box."""
    try:
        return validate_box(roi, shape_kji)
    except ValueError as exc:
        raise ValueError(f"roi: {exc}") from None


def check_volume_input(volume, what: str = "the volume") -> None:
    """What every command checks about the volume it segments, before a model loads: finite voxels
    within float32's range, and a 3D scalar volume with a valid spacing."""
    check_finite(volume.array, what)
    check_float32_range(volume.array, what)
    validate_volume(volume)


def check_segment_input(volume, box: Sequence[int], what: str = "the volume") -> Tuple[Tuple[int, ...], List[str]]:
    """Everything a segmentation checks about its input, before a model loads: the volume
    (``check_volume_input``), a box inside it, contrast inside the box. Returns the box as six
    ints and the warnings."""
    check_volume_input(volume, what)
    box = validate_box(box, volume.array.shape)
    return box, check_contrast(volume.array, box, what)
