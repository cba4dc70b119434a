"""The two on-disk layouts the evaluator reads: REFER (via :class:`mmseg.data.ReferDataset`) and the lmms-lab
parquet copies of refCOCO (:class:`ParquetReferDataset`, same sample interface).

Both give samples with ``image_path`` (a path, or an in-memory PIL image for parquet), ``sentence``, ``mask``
(bool (H, W) at the original image size), ``box`` (XYXY), ``ref_id``, ``sent_id``, ``image_id``,
``has_target``, in a fixed order, one per sentence; and :func:`sample_keys` gives the ``(ref_id, sent_id)`` of
every sample in that order without decoding any mask.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmseg.data.refer import ReferDataset
from mmseg.masks import decode_segmentation

__all__ = ["DataError", "LAYOUT_TREE", "PARQUET_VAL_WARNING", "ParquetReferDataset", "ParquetSample",
           "detect_layout", "open_dataset", "sample_keys", "validate_template"]

LAYOUT_TREE = """\
expected layout (REFER, as LISA / GLaMM / Sa2VA use it):
  DATA/
    refcoco/   instances.json  refs(unc).p  [refs(google).p]
    refcoco+/  instances.json  refs(unc).p
    refcocog/  instances.json  refs(umd).p  [refs(google).p]
    synthref/  instances.json  refs(unc).p              (SynthRef: images in DATA/images/)
  IMAGES/      COCO_train2014_000000xxxxxx.jpg ...      (--image-root; if omitted: DATA/images,
               DATA/images/mscoco/images/train2014, DATA/images/train2014, DATA/train2014, DATA/coco/train2014)
or the lmms-lab parquet copies (--layout parquet, DATA = the downloaded dataset repo):
  DATA/data/   val-00000-of-00004.parquet ...  testA-*.parquet  testB-*.parquet  test-*.parquet"""

PARQUET_VAL_WARNING = (
    "the lmms-lab parquet 'val' split is NOT the UNC val of refCOCO (it has a different, larger set of "
    "samples): its numbers are not comparable with the val numbers papers report"
)

# Parquet file patterns tried for a split, relative to the data root (lmms-lab's data/ and HF's converted default/).
_PARQUET_PATTERNS = ("{split}-*.parquet", "data/{split}-*.parquet", "{split}/*.parquet", "default/{split}/*.parquet",
                     "*/{split}-*.parquet")
_PARQUET_REQUIRED = ("image", "answer", "segmentation")


class DataError(ValueError):
    """The data root, refs file, parquet files or one sample cannot be read; the message shows the layout."""


def _with_tree(message: str) -> str:
    """``message`` followed by the full layout tree (replacing the shorter one ReferDataset appends)."""
    return f"{message.split(chr(10) + 'expected layout')[0]}\n{LAYOUT_TREE}"


def detect_layout(data_root: str | Path) -> str:
    """``"parquet"`` if parquet files lie at (or just under) ``data_root``, else ``"refer"``."""
    root = Path(data_root)
    if root.is_file() and root.suffix == ".parquet":
        return "parquet"
    if root.is_dir():
        for pattern in ("*.parquet", "data/*.parquet", "default/*/*.parquet", "*/*.parquet"):
            if next(iter(root.glob(pattern)), None) is not None:
                return "parquet"
    return "refer"


def open_dataset(layout: str, data_root: str | Path, dataset: str, split_by: str, split: str,
                 image_root: str | Path | None = None) -> tuple[Any, list[str]]:
    """Open one split; returns ``(dataset, notes)`` where notes are warnings to print and store with the numbers.

    Raises :class:`DataError` (with the expected directory tree) for anything wrong with the data.
    """
    if layout == "auto":
        layout = detect_layout(data_root)
    notes: list[str] = []
    try:
        if layout == "refer":
            return ReferDataset(data_root, dataset, split_by, split, image_root=image_root), notes
        if layout == "parquet":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = ParquetReferDataset(data_root, split, dataset=dataset, image_root=image_root)
            notes.extend(str(w.message) for w in caught)
            return ds, notes
    except DataError:
        raise
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(_with_tree(str(err))) from None
    raise DataError(f"unknown layout {layout!r}; valid layouts: auto, refer, parquet")


def sample_keys(dataset: Any) -> list[tuple[int, int]]:
    """``(ref_id, sent_id)`` of every sample in order, cheaply (no mask decoding) where the dataset allows it."""
    if hasattr(dataset, "keys") and callable(dataset.keys):
        return list(dataset.keys())
    if isinstance(dataset, ReferDataset):
        # ReferDataset's documented order: refs in file order, then their sentences in order.
        keys = []
        for ref in dataset.refs:
            sent_ids = ref.get("sent_ids") or []
            for si, sent in enumerate(ref["sentences"]):
                sid = sent.get("sent_id", sent_ids[si] if si < len(sent_ids) else -1)
                keys.append((int(ref["ref_id"]), int(sid)))
        return keys
    return [(int(s.ref_id), int(s.sent_id)) for s in (dataset[i] for i in range(len(dataset)))]


# -- lmms-lab parquet ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ParquetSample:
    """Same fields as :class:`mmseg.data.ReferSample`; ``image_path`` is a PIL image (or a path) and
    ``question_id`` / ``file_name`` come from the row."""

    image_path: Any
    sentence: str
    mask: np.ndarray
    box: tuple[float, float, float, float]
    ref_id: int
    sent_id: int
    image_id: int
    has_target: bool
    expr_type: str | None
    category: str | None
    question_id: str | None
    file_name: str | None


def _polygons(segmentation: Any) -> list[list[float]]:
    """lmms-lab stores one flat polygon ``[x1, y1, ...]``; also accept a list of polygons."""
    if segmentation is None:
        return []
    seg = list(segmentation)
    if not seg:
        return []
    if isinstance(seg[0], (int, float, np.integer, np.floating)):
        return [[float(v) for v in seg]]
    return [[float(v) for v in p] for p in seg]


class ParquetReferDataset:
    """lmms-lab refCOCO / refCOCO+ / refCOCOg parquet files of one split: one row per ref, with columns
    ``question_id, image ({bytes, path}), question, answer (list of sentences), segmentation (flat polygon),
    bbox (xywh), iscrowd, file_name``. One sample per sentence, in file order (files sorted by name, rows,
    then sentences). ``ref_id`` = row number over the split, ``sent_id`` = sample number; the row's
    ``question_id`` is kept. Images are decoded lazily, one row group at a time."""

    def __init__(self, data_root: str | Path, split: str, dataset: str = "refcoco",
                 image_root: str | Path | None = None) -> None:
        import pyarrow.parquet as pq

        self.data_root, self.split, self.dataset = Path(data_root), split, dataset
        self.split_by = "lmms-lab"
        self.image_root = Path(image_root) if image_root is not None else None
        if not self.data_root.exists():
            raise DataError(_with_tree(f"data root {self.data_root} does not exist"))
        self.files = self.find_files(self.data_root, split)
        if not self.files:
            found = sorted(self.available_splits(self.data_root))
            extra = f"; splits found: {', '.join(found)}" if found else ""
            raise DataError(_with_tree(f"no parquet files for split {split!r} under {self.data_root}{extra}"))
        self._pfs = []
        self._rows: list[dict[str, Any]] = []
        self._row_loc: list[tuple[int, int, int]] = []  # (file, row group, row within group)
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError for broken files
                raise DataError(_with_tree(f"cannot read parquet file {path}: {err}")) from None
            names = set(pf.schema_arrow.names)
            missing = [c for c in _PARQUET_REQUIRED if c not in names]
            if missing:
                raise DataError(_with_tree(f"{path} lacks columns {missing} (has {sorted(names)})"))
            meta_cols = [c for c in ("question_id", "answer", "segmentation", "bbox", "file_name") if c in names]
            self._rows.extend(pf.read(columns=meta_cols).to_pylist())
            for g in range(pf.metadata.num_row_groups):
                self._row_loc.extend((fi, g, r) for r in range(pf.metadata.row_group(g).num_rows))
            self._pfs.append(pf)
        self._index: list[tuple[int, int]] = []
        for ri, row in enumerate(self._rows):
            answers = row.get("answer")
            if isinstance(answers, str):
                answers = [answers]
                row["answer"] = answers
            self._index.extend((ri, j) for j in range(len(answers or [])))
        if not self._index:
            raise DataError(_with_tree(f"parquet files for split {split!r} under {self.data_root} hold no sentences"))
        self._cache: tuple[tuple[int, int], list[Any]] | None = None
        if split == "val" and dataset in ("refcoco", "refcoco+", "refcocog"):
            warnings.warn(PARQUET_VAL_WARNING, UserWarning, stacklevel=2)

    @staticmethod
    def find_files(root: Path, split: str) -> list[Path]:
        if root.is_file():
            return [root]
        seen: dict[Path, None] = {}
        for pattern in _PARQUET_PATTERNS:
            for p in sorted(root.glob(pattern.format(split=split))):
                seen.setdefault(p, None)
        return list(seen)

    @staticmethod
    def available_splits(root: Path) -> set[str]:
        out = set()
        for pattern in ("*.parquet", "*/*.parquet", "default/*/*.parquet"):
            for p in root.glob(pattern):
                out.add(p.stem.split("-")[0] if "-" in p.stem else p.parent.name)
        return out

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[tuple[int, int]]:
        return [(ri, k) for k, (ri, _) in enumerate(self._index)]

    def _image_cell(self, ri: int) -> Any:
        fi, g, r = self._row_loc[ri]
        if self._cache is None or self._cache[0] != (fi, g):
            column = self._pfs[fi].read_row_group(g, columns=["image"]).column("image").to_pylist()
            self._cache = ((fi, g), column)
        return self._cache[1][r]

    def _open_image(self, ri: int) -> tuple[Any, tuple[int, int]]:
        """The row's image (PIL, not yet decoded, or a path) and its (H, W) from the header."""
        cell = self._image_cell(ri)
        data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, (bytes, bytearray)) else None
        if data:
            try:
                image = Image.open(io.BytesIO(data))
            except Exception as err:
                raise DataError(f"row {ri} of split {self.split}: image bytes unreadable ({err}); "
                                "the ground-truth size is unknown") from None
            return image, (image.height, image.width)
        rel = cell.get("path") if isinstance(cell, dict) else None
        rel = rel or self._rows[ri].get("file_name")
        if not rel:
            raise DataError(f"row {ri} of split {self.split} has neither image bytes nor a path")
        base = self.image_root or self.files[self._row_loc[ri][0]].parent
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        try:
            with Image.open(path) as im:
                size = (im.height, im.width)
        except Exception as err:
            raise DataError(f"row {ri}: cannot open image {path} ({err}); pass --image-root") from None
        return path, size

    def __getitem__(self, idx: int) -> ParquetSample:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        ri, j = self._index[idx]
        row = self._rows[ri]
        image, (h, w) = self._open_image(ri)
        polys = [p for p in _polygons(row.get("segmentation")) if len(p) >= 6]
        mask = decode_segmentation(polys, h, w) if polys else np.zeros((h, w), dtype=bool)
        bbox = row.get("bbox") or [0, 0, 0, 0]
        x, y, bw, bh = (float(v) for v in bbox)
        qid = row.get("question_id")
        return ParquetSample(
            image_path=image, sentence=str(row["answer"][j]), mask=mask, box=(x, y, x + bw, y + bh),
            ref_id=ri, sent_id=idx, image_id=ri, has_target=bool(mask.any()), expr_type=None, category=None,
            question_id=None if qid is None else str(qid), file_name=row.get("file_name"),
        )


def validate_template(template: str) -> str:
    """A prompt template must contain ``{expression}`` exactly as a format field and nothing else."""
    try:
        probe = template.format(expression="X")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"--prompt {template!r} is not a valid template ({err}); use {{expression}} "
                         "for the sentence, e.g. 'Please segment {expression}.'") from None
    if "X" not in probe or "{expression}" not in template:
        raise ValueError(f"--prompt {template!r} must contain {{expression}}, e.g. 'Please segment {{expression}}.'")
    return template

