"""Reader for REFER-format referring-segmentation data (refCOCO, refCOCO+, refCOCOg, SynthRef).

Expected layout (the one of the REFER toolkit)::

    DATA/<dataset>/instances.json          COCO images / annotations / categories
    DATA/<dataset>/refs(<split_by>).p      pickled list of refs
    IMAGES/<file_name>                     e.g. COCO_train2014_000000xxxxxx.jpg, or
                                           DATA/images/synthref_*.png for SynthRef

A ref is a dict ``{ref_id, ann_id, image_id, split, category_id, sentences: [{sent_id,
sent, raw, tokens}], ...}``. ``ann_id`` may also be a list (gRefCOCO style, union of the
objects) and ``-1`` / ``[-1]`` / ``[]`` marks a no-target expression.

The refs pickle usually comes from the internet, so it is read with an unpickler that
refuses every class or function reference: only plain containers and scalars load.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mmseg.masks import decode_segmentation

__all__ = ["SPLITS_BY", "ReferDataset", "ReferSample", "load_image", "load_refs", "read_qa"]

# Documented splits of each REFER partition; splits found in a refs file are accepted too.
SPLITS_BY: dict[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
}

# Image folders tried, in this order, when no image_root is given (relative to data_root).
IMAGE_ROOT_CANDIDATES: tuple[str, ...] = (
    "images",  # SynthRef
    "images/mscoco/images/train2014",  # REFER toolkit's data/ folder
    "images/train2014",
    "train2014",
    "coco/train2014",
)

_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")

Box = tuple[float, float, float, float]


def _layout(data_root: Path | str, dataset: str, split_by: str) -> str:
    return (
        "expected layout:\n"
        f"  {data_root}/{dataset}/instances.json\n"
        f"  {data_root}/{dataset}/refs({split_by}).p\n"
        "  IMAGES/COCO_train2014_000000xxxxxx.jpg   (--image-root; SynthRef: DATA/images/*.png)"
    )


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that loads only built-in containers and scalars.

    Those need no ``find_class``; any global lookup (a class, ``os.system``, ...) is
    refused before it can be called, so a hostile file cannot run code.
    """

    def __init__(self, file: Any, source: Path) -> None:
        # refCOCO's pickles were written by Python 2: decode its byte strings as UTF-8
        super().__init__(file, encoding="utf-8", errors="replace")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        raise ValueError(
            f"refs file {self._source} contains object of type {module}.{name}; only plain containers "
            "(dict, list, tuple) and scalars (str, int, float, bool, None, bytes) are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError(f"refs file {self._source} uses persistent ids; only plain containers are allowed")


def load_refs(path: str | Path) -> Any:
    """Safely unpickle a REFER refs file (plain containers only; see :class:`_PlainUnpickler`)."""
    p = Path(path)
    with open(p, "rb") as f:
        try:
            return _PlainUnpickler(f, p).load()
        except ValueError:
            raise
        except Exception as exc:  # truncated / not a pickle at all
            raise ValueError(f"refs file {p} could not be read as a pickle: {exc}") from exc


@dataclass(frozen=True, eq=False)
class ReferSample:
    """One (image, sentence) pair.

    ``mask`` is bool (H, W) at the original image size (all False for no-target);
    ``box`` is XYXY float pixels from the annotation bbox, (0, 0, 0, 0) for no-target.
    """

    image_path: Path
    sentence: str
    mask: np.ndarray
    box: Box
    ref_id: int
    sent_id: int
    image_id: int
    has_target: bool
    expr_type: str | None
    category: str | None
    attributes: dict[str, Any] | None = None  # SynthRef's per-object extras (e.g. colour); None elsewhere


def _ann_ids(ref: dict[str, Any]) -> list[int]:
    """Target annotation ids of a ref; empty for a no-target ref."""
    raw = ref["ann_id"]
    ids = raw if isinstance(raw, (list, tuple)) else [raw]
    return [int(a) for a in ids if a is not None and int(a) >= 0]


class ReferDataset:
    """Samples of one split, one per sentence, in file order (ref order, then sentence order).

    Args:
        data_root: folder holding ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        dataset: e.g. ``"refcoco"``, ``"refcoco+"``, ``"refcocog"``, ``"synthref"``.
        split_by: ``"unc"`` (train/val/testA/testB), ``"umd"`` (train/val/test) or ``"google"`` (train/val).
        split: one of the split names above.
        image_root: folder with the image files; if None, :data:`IMAGE_ROOT_CANDIDATES` under
            ``data_root`` are tried and the first holding the split's first image is used.
    Masks are decoded lazily in ``__getitem__``.
    """

    def __init__(
        self,
        data_root: str | Path,
        dataset: str,
        split_by: str,
        split: str,
        image_root: str | Path | None = None,
    ) -> None:
        self.data_root = Path(data_root)
        self.dataset, self.split_by, self.split = dataset, split_by, split
        layout = _layout(self.data_root, dataset, split_by)
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"data root {self.data_root} does not exist\n{layout}")
        ds_dir = self.data_root / dataset
        refs_path = ds_dir / f"refs({split_by}).p"
        inst_path = ds_dir / "instances.json"
        if not refs_path.is_file():
            present = sorted(p.name for p in ds_dir.glob("refs(*).p")) if ds_dir.is_dir() else []
            extra = f" (found: {', '.join(present)})" if present else ""
            raise FileNotFoundError(f"refs file {refs_path} not found{extra}\n{layout}")
        if not inst_path.is_file():
            raise FileNotFoundError(f"instances file {inst_path} not found\n{layout}")

        refs = load_refs(refs_path)
        self._check_refs(refs, refs_path, layout)
        found_splits = {str(r["split"]) for r in refs}
        valid = sorted(set(SPLITS_BY.get(split_by, ())) | found_splits)
        if split not in valid:
            raise ValueError(f"unknown split {split!r} for {dataset}({split_by}); valid splits: {', '.join(valid)}")

        with open(inst_path, encoding="utf-8") as f:
            inst = json.load(f)
        if not isinstance(inst, dict) or not all(k in inst for k in ("images", "annotations")):
            raise ValueError(f"{inst_path} is not a COCO instances file (needs 'images' and 'annotations')\n{layout}")
        self.images: dict[int, dict[str, Any]] = {int(im["id"]): im for im in inst["images"]}
        self.annotations: dict[int, dict[str, Any]] = {int(a["id"]): a for a in inst["annotations"]}
        self.categories: dict[int, str] = {int(c["id"]): str(c["name"]) for c in inst.get("categories", [])}
        self._by_image: dict[int, list[dict[str, Any]]] = {}  # image id -> its annotations
        for ann in inst["annotations"]:
            self._by_image.setdefault(int(ann["image_id"]), []).append(ann)

        self.refs: list[dict[str, Any]] = [r for r in refs if r["split"] == split]
        self._index: list[tuple[int, int]] = [
            (ri, si) for ri, r in enumerate(self.refs) for si in range(len(r["sentences"]))
        ]
        if not self._index:
            raise ValueError(
                f"{refs_path} has no sentences for split {split!r} "
                f"(splits present: {', '.join(sorted(found_splits)) or 'none'})"
            )
        for r in self.refs:
            if int(r["image_id"]) not in self.images:
                raise ValueError(f"ref {r['ref_id']} points to image {r['image_id']}, missing from {inst_path}")
            for a in _ann_ids(r):
                if a not in self.annotations:
                    raise ValueError(f"ref {r['ref_id']} points to annotation {a}, missing from {inst_path}")
        self.image_root = self._find_image_root(image_root, layout)

    @staticmethod
    def _check_refs(refs: Any, path: Path, layout: str) -> None:
        """Raise ValueError unless ``refs`` is a list of dicts with the REFER keys."""
        if not isinstance(refs, list):
            raise ValueError(f"{path} must hold a list of refs, got {type(refs).__name__}\n{layout}")
        for i, r in enumerate(refs):
            if not isinstance(r, dict):
                raise ValueError(f"{path}: ref #{i} is a {type(r).__name__}, expected a dict\n{layout}")
            missing = [k for k in _REF_KEYS if k not in r]
            if missing:
                raise ValueError(f"{path}: ref #{i} lacks keys {missing} (needs {list(_REF_KEYS)})\n{layout}")
            sents = r["sentences"]
            if not isinstance(sents, list) or not all(isinstance(s, dict) and ("sent" in s or "raw" in s) for s in sents):
                raise ValueError(f"{path}: ref #{i} 'sentences' must be a list of dicts with 'sent' or 'raw'\n{layout}")

    def _find_image_root(self, image_root: str | Path | None, layout: str) -> Path:
        first = self.images[int(self.refs[0]["image_id"])]["file_name"]
        if image_root is not None:
            root = Path(image_root)
            if not root.is_dir():
                raise FileNotFoundError(f"image root {root} does not exist\n{layout}")
            return root
        tried = [self.data_root / c for c in IMAGE_ROOT_CANDIDATES]
        for cand in tried:
            if (cand / first).is_file():
                return cand
        listing = "\n".join(f"  {c}" for c in tried)
        raise FileNotFoundError(
            f"no image folder under {self.data_root} holds {first}; tried:\n{listing}\n"
            f"pass image_root (--image-root) explicitly\n{layout}"
        )

    def image_objects(self, image_id: int) -> list[tuple[np.ndarray, dict[str, str]]]:
        """Every annotated object of an image: ``(mask, labels)`` with a bool ``(H, W)`` mask at the original size
        and ``labels = {"kind": category name, **attributes}`` (SynthRef's attributes add e.g. ``"color"``)."""
        image = self.images[int(image_id)]
        h, w = self._image_size(image, self.image_root / image["file_name"])
        out = []
        for ann in self._by_image.get(int(image_id), []):
            labels = {k: str(v) for k, v in (ann.get("attributes") or {}).items() if isinstance(v, str)}
            category = self.categories.get(int(ann.get("category_id", -1)))
            if category is not None:
                labels["kind"] = category
            out.append((decode_segmentation(ann["segmentation"], h, w), labels))
        return out

    def union_mask(self, image_id: int, ann_ids: Sequence[int]) -> np.ndarray:
        """The union of some annotations of one image as a bool ``(H, W)`` mask at the original size (all False
        for no ids). Unknown ids, or ids of another image, raise ``KeyError``."""
        image = self.images[int(image_id)]
        h, w = self._image_size(image, self.image_root / image["file_name"])
        by_id = {int(ann["id"]): ann for ann in self._by_image.get(int(image_id), [])}
        out = np.zeros((h, w), dtype=bool)
        for ann_id in ann_ids:
            if int(ann_id) not in by_id:
                raise KeyError(f"annotation {ann_id} is not an annotation of image {image_id}")
            out |= decode_segmentation(by_id[int(ann_id)]["segmentation"], h, w)
        return out

    def ref_of(self, index: int) -> dict[str, Any]:
        """The ref (a dict of the refs file) that sample ``index`` belongs to, without decoding its mask."""
        return self.refs[self._index[index][0]]

    def keys(self) -> list[tuple[int, int]]:
        """``(ref_id, sent_id)`` of every sample, in sample order."""
        return [(int(self.refs[ri]["ref_id"]), int(self.refs[ri]["sentences"][si]["sent_id"])) for ri, si in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def _image_size(self, image: dict[str, Any], path: Path) -> tuple[int, int]:
        """(H, W) from instances.json, or from the file header if the entry lacks it."""
        if "height" in image and "width" in image:
            return int(image["height"]), int(image["width"])
        with Image.open(path) as im:
            return im.height, im.width

    def __getitem__(self, idx: int) -> ReferSample:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        ri, si = self._index[idx]
        ref = self.refs[ri]
        sent = ref["sentences"][si]
        image = self.images[int(ref["image_id"])]
        path = self.image_root / image["file_name"]
        h, w = self._image_size(image, path)
        ann_ids = _ann_ids(ref)
        mask = np.zeros((h, w), dtype=bool)
        box: Box = (0.0, 0.0, 0.0, 0.0)
        boxes = []
        for a in ann_ids:
            ann = self.annotations[a]
            mask |= decode_segmentation(ann["segmentation"], h, w)
            bx, by, bw, bh = (float(v) for v in ann.get("bbox") or (0, 0, 0, 0))
            if bw > 0 and bh > 0:
                boxes.append((bx, by, bx + bw, by + bh))
        if boxes:  # several targets: the box enclosing all of them
            box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        cat_id = self.annotations[ann_ids[0]].get("category_id") if ann_ids else ref.get("category_id")
        sent_ids = ref.get("sent_ids") or []
        sent_id = sent.get("sent_id", sent_ids[si] if si < len(sent_ids) else -1)
        return ReferSample(
            image_path=path,
            sentence=str(sent.get("sent") or sent.get("raw")),
            mask=mask,
            box=box,
            ref_id=int(ref["ref_id"]),
            sent_id=int(sent_id),
            image_id=int(ref["image_id"]),
            has_target=bool(ann_ids),
            expr_type=ref.get("expr_type"),
            category=self.categories.get(int(cat_id)) if cat_id is not None else None,
            attributes=self.annotations[ann_ids[0]].get("attributes") if len(ann_ids) == 1 else None,
        )


def load_image(sample: ReferSample) -> Image.Image:
    """Open a sample's image as PIL RGB (original size)."""
    with Image.open(sample.image_path) as im:
        return im.convert("RGB")


def read_qa(data_root: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """SynthRef questions ``{image_id, file_name, split, question, answer, ann_ids}`` of one split (all if None).
    ``ann_ids`` (optional; absent in older files) names the annotations the question is about.

    ``data_root`` is the folder holding ``synthref/qa.json`` (or the ``synthref`` folder itself).
    """
    root = Path(data_root)
    path = root / "synthref" / "qa.json"
    if not path.is_file() and (root / "qa.json").is_file():
        path = root / "qa.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found\nexpected layout:\n  {root}/synthref/qa.json")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if split is None:
        return rows
    out = [r for r in rows if r.get("split") == split]
    if not out:
        present = sorted({str(r.get("split")) for r in rows})
        raise ValueError(f"no questions for split {split!r} in {path}; splits present: {', '.join(present)}")
    return out
