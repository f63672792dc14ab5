"""Shared config pieces. Every field is commented; configs/*.py start from here.

Durations are all in steps (`*_steps`); the config is locked by `main`, so an
override with a typo fails instead of being silently ignored.
"""

from __future__ import annotations

import os

import ml_collections

from tavlo_datasets.schema import SCENARIOS


def parse_variants(arg: str | None, known) -> dict[str, str]:
  """'ezvsl+seed=2' -> {'ezvsl': '', 'seed': '2'}; unknown names fail loudly."""
  out = {}
  for part in (arg or '').split('+'):
    part = part.strip()
    if not part:
      continue
    name, _, value = part.partition('=')
    if name not in known:
      raise ValueError(f'unknown config variant {name!r}; known: {sorted(known)}')
    out[name] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # model init, data order and dropout all derive from it

  # ---- data ------------------------------------------------------------------
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'avatar_synth'           # TFDS name: avatar_synth | avatar | vggsound
  c.dataset.builder_config = 'small'        # TFDS builder config of that dataset
  c.dataset.data_dir = './data/tfds'        # where TFDS records live / are built
  c.dataset.manual_dir = ''                 # raw files for real data (AVATAR/VGGSound)
  c.dataset.build_if_missing = True         # synth only: build before training if absent
  c.dataset.build_workers = 2               # synth build: clip-generating processes (1 = in-process)
  c.dataset.eval_name = ''                  # evaluate on another dataset ('' = same), e.g. avatar
  c.dataset.eval_builder_config = ''
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'validation'        # calibrates Off-screen thresholds, never test ('' = none)
  c.dataset.eval_split = 'test'

  c.input = ml_collections.ConfigDict()
  c.input.num_frames = 16                   # T: frames per clip seen by the model
  c.input.frame_stride = 1                  # take every k-th stored frame
  c.input.clip_starts = 'any'               # training clip starts: 'any' stored frame |
  #                                           'key_frames' (H.264 segment starts: nothing decoded
  #                                           before the clip, but far fewer distinct clips)
  c.input.image_size = 64                   # frames are resized to this square size
  c.input.frame_format = 'rgb'              # training frames shipped as 'rgb' (uint8) | 'yuv420'
  #                                           (the decoder's 4:2:0 planes: half the bytes, no host
  #                                           colour conversion; RGB in the step; even image_size,
  #                                           colour jitter on the device) | 'yuv420_unscaled'
  #                                           (the same, but the crop box at the stored resolution
  #                                           in an `unscaled_window`: the step scales and flips)
  c.input.unscaled_window = (256, 344)      # (height, width), even: holds any crop box of a
  #                                           landscape frame of short side 256 (aspect <= 4/3)
  c.input.fps = 0.0                         # frames/s of the stored clips; 0 = from the dataset
  c.input.batch_size = 16                   # GLOBAL train batch (split over hosts/devices)
  c.input.eval_batch_size = 16              # GLOBAL eval batch; padded at the split's end
  c.input.num_workers = 0                   # grain worker processes (0 = in-process)
  c.input.prefetch = 2                      # batches prefetched per worker
  c.input.shuffle_buffer_seed = 0           # added to `seed` for the data order
  c.input.max_instances = 4                 # sounding boxes kept per frame in eval batches
  c.input.audio = ml_collections.ConfigDict()
  c.input.audio.sample_rate = 16000
  c.input.audio.columns_per_frame = 16      # spectrogram columns per video frame
  c.input.audio.block = 'centred'           # frame t's audio: 'centred' on its time or
  #                                           'trailing' (the frame interval ending at it)
  c.input.audio.n_fft = 512
  c.input.audio.n_mels = 40
  c.input.audio.fmin = 0.0
  c.input.audio.fmax = 8000.0
  c.input.audio.log_offset = 1e-5           # log(mel + offset)
  c.input.audio.features = 'log_mel'        # log_mel (n_mels bins) | log_stft (EZ-VSL's
  #                                           log power spectrogram, n_fft // 2 + 1 bins)
  c.input.audio.features_on = 'device'      # 'device' (jnp.fft in the step; measured faster
  #                                           on CPU, see BENCHMARKS.md) | 'host' (workers)
  c.input.augment = ml_collections.ConfigDict()
  c.input.augment.enabled = True            # master switch; never applied at eval
  c.input.augment.random_resized_crop = True
  c.input.augment.crop_scale = (0.6, 1.0)   # area fraction of the crop
  c.input.augment.flip = True               # horizontal flip, same for all frames
  c.input.augment.color_jitter = 0.2        # brightness/contrast/saturation strength
  c.input.augment.color_jitter_on = 'host'  # 'host' (numpy float64, in the workers) |
  #                                           'device' (float32 in the step; factors drawn on the host)
  c.input.augment.spec_time_masks = 1       # SpecAugment time masks per clip
  c.input.augment.spec_time_mask_width = 4  # columns, at most
  c.input.augment.spec_freq_masks = 1
  c.input.augment.spec_freq_mask_width = 6  # mel bins, at most

  # ---- model -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = 'tavlo'                    # tavlo | ezvsl (image-level baseline)
  c.model.dtype = 'float32'                 # compute dtype; params stay float32
  c.model.embed_dim = 64                    # Df: token width from the encoders
  c.model.temporal_pos_dim = 16             # Dt: temporal code concatenated (D = Df + Dt)
  c.model.num_layers = 1                    # AST blocks (spatial then temporal attention)
  c.model.num_heads = 4
  c.model.mlp_ratio = 2
  c.model.temporal_attention = True         # ablation switch
  c.model.temporal_window = 2               # attend to +-k frames; -1 = whole clip
  c.model.per_frame_audio = True            # False: one clip-level audio token, tiled
  c.model.cross_modal_attention = False     # True: audio and visual tokens attend to each
  #                                           other in the spatial step (leaks own audio)
  c.model.attention_impl = 'xla'            # xla (jax.nn.dot_product_attention) | blockwise |
  #                                           ring | all_to_all (time sharded over `seq`)
  c.model.attention_block = 128             # query/key block for blockwise/ring paths
  c.model.temperature = 0.07                # cosine similarity / temperature
  c.model.center_audio = True               # subtract the mean audio embedding (sign
  #                                           safeguard, see models/tavlo.py AudioCentering)
  c.model.motion_features = False           # visual features + their frame-to-frame
  #                                           change, per location (models/tavlo.py with_motion)
  c.model.fine_stride = 0                   # 0: map on the token grid (H/8); 4: H/4 map,
  #                                           tokens upsampled + local features (tavlo.py)
  c.model.fine_motion = False               # fine maps: the patch features' frame-to-frame
  #                                           change too (tavlo.py add_local_features)
  c.model.visual = ml_collections.ConfigDict()
  c.model.visual.stage_sizes = (1, 1)       # ResNet-18 is (2, 2, 2, 2)
  c.model.visual.width = 16                 # channels of the first stage (ResNet: 64)
  c.model.visual.stem = 'imagenet'          # imagenet (7x7/2 + maxpool) | small (3x3/1)
  c.model.visual.stage_strides = (1, 2)     # per-stage stride (first stage included)
  c.model.visual.norm = 'group'             # batch | group
  c.model.visual.output_stride = 8          # checked against stem/strides: H/8 grid
  c.model.visual.init_from = ''             # torchvision ResNet weights to start from
  #                                           (.safetensors/.npz; models/convert_torch.py);
  #                                           '' = from scratch
  c.model.audio = ml_collections.ConfigDict()
  c.model.audio.arch = 'tokens'             # tokens (one per frame, below) | resnet18
  #                                           (EZ-VSL's: one clip embedding; model.name=ezvsl)
  c.model.audio.channels = (16, 32)         # tokens: 2-D conv widths before the token conv
  c.model.audio.norm = 'group'

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'temporal_mil'              # temporal_mil (TAVLO) | ezvsl
  # Bag pooling over locations. peak = max - mean (a source is a small part of
  # the frame; see tavlo_jax/losses.py). The same for both sides, or it can
  # collapse: with max/mean (the paper's summarised form) one peaky token per
  # frame matches any audio, so max >> mean without using the audio.
  c.loss.positives = 'peak'                 # a clip's own frame: peak | max | mean
  c.loss.negatives = 'peak'                 # other clips: the same (mean collapses)
  c.loss.symmetric = True                   # both a->v and v->a directions
  # Out-of-sync negatives: K copies of each clip's own audio rolled by a
  # random number of frames (beyond the temporal window), scored as extra
  # negatives for its frames. The only term that rewards timing when a batch
  # holds no other clip of the same category; see losses.py. 0 = off (paper).
  c.loss.shifted_audio_negatives = 0

  # ---- optimisation ----------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'                # adamw | sgd (momentum 0.9)
  c.optimizer.learning_rate = 1e-3          # peak
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = 'cosine'           # cosine | constant
  c.optimizer.end_learning_rate_factor = 0.05
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip_norm = 1.0          # 0 disables
  c.optimizer.accumulate_steps = 1          # gradient accumulation (optax.MultiSteps)

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 500
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.train.max_to_keep = 2
  c.train.eval_every_steps = 0              # 0: evaluate only at the end
  c.train.on_nonfinite = 'stop'             # stop | skip (drop the update, keep going)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                          # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.seq = 1                            # shards the time axis (temporal attention)

  # ---- evaluation ------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.heatmap_thresholds = (0.1, 0.15, 0.2)   # AVATAR: on the min-max-normalised map
  c.eval.heatmap_threshold = 0.1                 # the one in the headline table
  c.eval.interpolation = 'bilinear'              # upsampling of maps to mask size
  c.eval.annotation_size = (0, 0)                # (H, W); (0, 0) = the dataset's mask size
  c.eval.offscreen_rule = 'raw_max'              # raw_max | peak_window (calibrated) | no_pixel_above
  c.eval.offscreen_target_tpr = 0.9              # calibration: keep 90% of on-screen frames
  c.eval.offscreen_window = 8                    # peak_window: frames within +- this (frame_index)
  c.eval.offscreen_window_quantile = 0.9         # ... pooled by this quantile of their peak
  c.eval.num_visualized_clips = 2                # heat-map overlays per scenario
  c.evals = ml_collections.ConfigDict()
  c.eval.protocol = 'avatar'                     # avatar | classic (top-50% binarisation)
  for s in ('total',) + SCENARIOS + ('cross_event',):
    c.evals[s] = ml_collections.ConfigDict()
    c.evals[s].frames = 'all' if s == 'total' else s   # which frames this entry pools
    c.evals[s].prefix = f'eval/{s}/'
  return c


def make_image_level(c: ml_collections.ConfigDict) -> None:
  """EZ-VSL-style: each frame alone, one clip-level audio embedding, max-MIL."""
  c.model.name = 'ezvsl'
  c.model.temporal_attention = False
  c.model.per_frame_audio = False
  c.model.motion_features = False     # it would see two frames
  c.model.fine_motion = False
  c.loss.name = 'ezvsl'
  c.loss.shifted_audio_negatives = 0  # one audio embedding per clip


def make_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks everything for a CPU smoke test.

  Synthetic data shrinks too (the `tiny` builder config); real datasets keep
  the builder config the variant chose, since they have no tiny version: the
  smoke test then runs the small model on the records a user built.
  """
  if c.dataset.name == 'avatar_synth':
    c.dataset.builder_config = 'tiny'
  c.input.num_frames = 8
  c.input.image_size = 32
  c.input.batch_size = 4
  c.input.eval_batch_size = 4
  c.model.embed_dim = 16
  c.model.temporal_pos_dim = 8
  c.model.num_heads = 2
  c.model.visual.width = 8
  c.model.audio.channels = (8, 16)
  c.input.audio.n_mels = 16
  c.train.total_steps = 4
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.optimizer.warmup_steps = 1


# ---- helpers for main's error messages and tests -------------------------------

def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:variant' -> the ConfigDict, as config_flags would build it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location('_tavlo_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def flatten_items(config, prefix: str = '') -> list[tuple[str, object]]:
  """[(dotted field name, value)] of every leaf field, in config order."""
  items = []
  for k, v in config.items():
    name = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      items.extend(flatten_items(v, name + '.'))
    else:
      items.append((name, v))
  return items


def flatten_keys(config, prefix: str = '') -> list[str]:
  return [name for name, _ in flatten_items(config, prefix)]


def check_override_type(config, key: str, value: str) -> None:
  """Raises TypeError if `value` cannot become the type of `config.<key>`."""
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(current, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise TypeError(f'expected a bool (true/false), got {value!r}')
  elif isinstance(current, int):
    try:
      int(value)
    except ValueError:
      raise TypeError(f'expected an int, got {value!r}') from None
  elif isinstance(current, float):
    try:
      float(value)
    except ValueError:
      raise TypeError(f'expected a float, got {value!r}') from None
