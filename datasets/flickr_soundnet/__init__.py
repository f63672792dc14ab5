"""Flickr-SoundNet test-set builder; importing registers `flickr_soundnet` with TFDS."""
from tavlo_datasets.flickr_soundnet.flickr_soundnet_dataset_builder import Builder
