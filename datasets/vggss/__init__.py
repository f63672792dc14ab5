"""VGG-SS builder; importing registers `vggss` with TFDS."""
from tavlo_datasets.vggss.vggss_dataset_builder import Builder
