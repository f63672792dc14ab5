"""AVATAR-Synth. Importing this package registers the TFDS builder `avatar_synth`."""

from tavlo_datasets.avatar_synth import avatar_synth_dataset_builder  # noqa: F401  (registers)
from tavlo_datasets.avatar_synth.avatar_synth_dataset_builder import Builder  # noqa: F401
from tavlo_datasets.avatar_synth.generator import SynthConfig  # noqa: F401
