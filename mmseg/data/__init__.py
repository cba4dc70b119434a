"""Datasets: the REFER-format reader and the SynthRef generator."""

from mmseg.data.refer import ReferDataset, ReferSample, load_image, load_refs, read_qa
from mmseg.data.synthetic import write_synthref

__all__ = ["ReferDataset", "ReferSample", "load_image", "load_refs", "read_qa", "write_synthref"]
