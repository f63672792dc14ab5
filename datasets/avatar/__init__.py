"""AVATAR release builder; importing registers `avatar` with TFDS."""
from tavlo_datasets.avatar.avatar_dataset_builder import AvatarConfig, Builder
