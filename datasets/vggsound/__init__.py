"""VGGSound clips builder; importing registers `vggsound` with TFDS."""
from tavlo_datasets.vggsound.vggsound_dataset_builder import Builder
from tavlo_datasets.vggsound.vggsound_dataset_builder import VggsoundConfig
