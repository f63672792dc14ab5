"""AVATAR-Synth: procedural audio-visual clips with exact ground truth (numpy).

Every clip is a pure function of (config, split, index): the random generator
is seeded with `[config.seed, crc32(split), index]`, so any clip can be
regenerated alone, in any order, on any machine.

The world (see the README next to this file):
- K categories. Visual identity: a shape and a colour. Acoustic identity: a
  harmonic tone, a noise band or a percussive roll at a category-specific
  frequency. Visual action: hop, squash, flash or scale pulse.
- A sounding instance emits notes (events); during each note it performs its
  action with the note's own envelope. Silent instances perform the same kind
  of action at times that keep `guard_s` away from every audible event of the
  clip, so "it moves" never identifies the source: only timing does.
- Instances drift slowly, can poke out of the frame and occlude each other
  (later drawn = in front). A mask is what is VISIBLE of an instance.

A frame is annotated when it is on the `annotate_every_k_frames` grid AND some
source (visible or not) is sounding at its time; frames of pure background
noise carry no localisation target. Its tags come from what is on screen at
that frame (see `_frame_tags`), so they are true by construction.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import zlib

import numpy as np

from tavlo_datasets import schema

SPLITS = ('train', 'validation', 'test')

SHAPES = ('circle', 'square', 'diamond', 'triangle', 'ring', 'cross',
          'hexagon', 'capsule')
# Ordered so that the first 8 are far apart in colour.
PALETTE = (
    ('red', (0.92, 0.16, 0.14)), ('yellow', (0.96, 0.86, 0.10)),
    ('blue', (0.16, 0.36, 0.96)), ('green', (0.14, 0.78, 0.22)),
    ('magenta', (0.90, 0.18, 0.82)), ('cyan', (0.10, 0.86, 0.90)),
    ('orange', (1.00, 0.56, 0.06)), ('purple', (0.52, 0.22, 0.88)),
    ('pink', (1.00, 0.60, 0.72)), ('lime', (0.66, 0.96, 0.30)),
    ('navy', (0.10, 0.12, 0.50)), ('teal', (0.06, 0.50, 0.48)),
    ('brown', (0.50, 0.28, 0.10)), ('olive', (0.50, 0.52, 0.08)),
    ('sky', (0.52, 0.78, 1.00)), ('maroon', (0.50, 0.04, 0.16)),
)
SOUND_KINDS = ('tone', 'noise', 'drum')
ACTIONS = ('hop', 'squash', 'flash', 'pulse')


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Every knob of the generator. Times in seconds, sizes as image fractions."""
  image_size: int = 128               # frames and masks are square, this many px
  fps: float = 8.0                    # frame t shows the scene at time t / fps
  duration_s: float = 4.0             # clip length (frames = duration * fps)
  sample_rate: int = 16000            # mono waveform rate
  num_categories: int = 8             # <= 16 (8 shapes x 16 colours, see PALETTE)
  seed: int = 0                       # the whole dataset changes with it

  # Objects. Diameter in image fractions: 0.22-0.34 is 14-22 px at 64 px, i.e.
  # 2-3 cells of an 8x8 feature grid (smaller objects cannot be localised by
  # any 8x8 map).
  object_size: tuple[float, float] = (0.22, 0.34)
  drift_speed: float = 0.06           # max centre speed, image sizes per second
  centre_margin: float = 0.1          # centres stay in [m, 1-m]: objects may poke out
  min_centre_distance: float = 0.8    # start/end separation, in object diameters
  min_visible_fraction: float = 0.2   # less of the shape visible = "not in view"
  action_strength: float = 0.35       # hop height / squash / pulse, x diameter
  background_contrast: float = 0.12   # amplitude of the drifting texture
  background_drift_hz: float = 0.15   # how fast the texture's phases turn

  # Sound events.
  event_duration_s: tuple[float, float] = (0.15, 0.6)
  event_gap_s: tuple[float, float] = (0.2, 0.8)        # single / multi / off-screen
  mixed_event_gap_s: tuple[float, float] = (0.1, 0.4)  # denser: events overlap
  silent_action_gap_s: tuple[float, float] = (0.2, 0.8)
  guard_s: float = 0.1                # silent actions keep this far from any audible event
  hangover_s: float = 0.1             # "sounding" lasts this long after a note ends
  snr_db: float = 10.0                # notes vs background noise, over the active samples

  # Scenarios.
  max_silent_distractors: int = 2     # silent instances of other categories
  multi_instances: tuple[int, int] = (2, 3)   # identical look-alikes
  mixed_sources: tuple[int, int] = (2, 3)     # sounding instances, distinct categories
  cross_event_fraction: float = 0.5   # train only; eval splits alternate exactly
  switch_time: tuple[float, float] = (0.4, 0.6)  # cross-event switch, x duration
  offscreen_walk_in_fraction: float = 0.25   # the source walks into view midway
  offscreen_same_category_fraction: float = 0.85  # of the others: silent twin visible
  walk_in_time: tuple[float, float] = (0.3, 0.6)  # x duration
  walk_in_duration_s: float = 0.75
  # Train scenario mixture, in schema.SCENARIOS order; eval splits are balanced.
  train_mix: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)

  # Split sizes (validation/test: a multiple of 4, one quarter per scenario).
  num_train: int = 3000
  num_validation: int = 200
  num_test: int = 400
  annotate_every_k_frames: int = 1        # validation / test
  train_annotate_every_k_frames: int = 4  # train labels are never used for training

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f'SynthConfig.{field}={getattr(self, field)!r}: '
                       f'expected {expected}')
    if self.image_size < 16:
      bad('image_size', '>= 16')
    if not 1 <= self.num_categories <= len(PALETTE):
      bad('num_categories', f'in [1, {len(PALETTE)}]')
    if self.num_categories < 3:
      bad('num_categories', '>= 3 (off-screen clips need other categories)')
    if round(self.duration_s * self.fps) < 2:
      bad('duration_s', 'at least 2 frames at fps')
    for field in ('num_validation', 'num_test'):
      if getattr(self, field) % len(schema.SCENARIOS):
        bad(field, f'a multiple of {len(schema.SCENARIOS)} (balanced scenarios)')
    if abs(sum(self.train_mix) - 1.0) > 1e-6 or len(self.train_mix) != 4:
      bad('train_mix', '4 probabilities summing to 1')
    lo, hi = self.event_duration_s
    if not 0 < lo <= hi:
      bad('event_duration_s', '0 < min <= max')
    if self.multi_instances[0] < 2:
      bad('multi_instances', 'at least 2')
    if self.mixed_sources[0] < 2 or self.mixed_sources[1] > self.num_categories:
      bad('mixed_sources', f'in [2, num_categories={self.num_categories}]')

  @property
  def num_frames(self) -> int:
    return int(round(self.duration_s * self.fps))

  @property
  def num_samples(self) -> int:
    return int(round(self.duration_s * self.sample_rate))

  def num_examples(self, split: str) -> int:
    return {'train': self.num_train, 'validation': self.num_validation,
            'test': self.num_test}[_check_split(split)]


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return split


# ----------------------------------------------------------------- categories


@dataclasses.dataclass(frozen=True)
class Category:
  index: int
  name: str                   # `audio_visual_category`, e.g. "red circle"
  shape: str
  colour: tuple[float, float, float]
  action: str
  sound: str                  # tone | noise | drum
  freq_hz: float              # fundamental / band centre / drum pitch


def categories(cfg: SynthConfig) -> list[Category]:
  out = []
  for k in range(cfg.num_categories):
    colour_name, rgb = PALETTE[k]
    shape = SHAPES[k % len(SHAPES)]
    # Spread pitches over ~4 octaves in an order unrelated to the sound kind,
    # so neither the kind nor the pitch alone gives the category away.
    pitch_rank = (k * 5) % cfg.num_categories
    out.append(Category(
        index=k, name=f'{colour_name} {shape}', shape=shape, colour=rgb,
        action=ACTIONS[k % len(ACTIONS)], sound=SOUND_KINDS[k % len(SOUND_KINDS)],
        freq_hz=float(round(200.0 * 2 ** (4.0 * pitch_rank / cfg.num_categories)))))
  return out


def category_names(cfg: SynthConfig) -> list[str]:
  return [c.name for c in categories(cfg)]


# ---------------------------------------------------------------------- scene


@dataclasses.dataclass
class Instance:
  """One object of a clip (possibly never on screen: an off-screen source)."""
  category: int
  diameter: float                    # px
  xs: np.ndarray                     # f32 [N] centre per frame, px
  ys: np.ndarray
  audible: list                      # [(onset, offset)] notes it emits, seconds
  silent: list                       # [(onset, offset)] actions without sound
  silent_ok: bool = True             # False: a pure source, it never acts silently


@dataclasses.dataclass
class Scene:
  scenario: str                      # what the clip was generated as
  variant: str                       # e.g. 'cross_event', 'walk_in', 'same_category'
  instances: list                    # drawing order: later ones occlude earlier
  cross_event: bool


def clip_rng(cfg: SynthConfig, split: str, index: int) -> np.random.Generator:
  split_id = zlib.crc32(_check_split(split).encode())
  return np.random.default_rng([cfg.seed, split_id, int(index)])


def clip_scenario(cfg: SynthConfig, split: str, index: int,
                  rng: np.random.Generator) -> tuple[str, bool]:
  """(scenario, cross_event). Eval splits: exact quarters, half cross-event."""
  if split == 'train':
    scenario = schema.SCENARIOS[rng.choice(4, p=cfg.train_mix)]
    cross = scenario == 'multi' and rng.random() < cfg.cross_event_fraction
    return scenario, bool(cross)
  scenario = schema.SCENARIOS[index % 4]
  return scenario, scenario == 'multi' and (index // 4) % 2 == 0


def video_id(cfg: SynthConfig, split: str, index: int) -> str:
  del cfg
  return f'synth_{split}_{index:06d}'


def _schedule(rng, start, end, durations, gaps, forbidden=()):
  """Non-overlapping (onset, offset) intervals in [start, end).

  `forbidden` intervals (already widened by any guard) are jumped over, so a
  silent action never touches an audible event.
  """
  out = []
  t = start + rng.uniform(0, gaps[1])
  while True:
    d = rng.uniform(*durations)
    if t + d > end:
      return out
    clash = [b for a, b in forbidden if a < t + d and t < b]
    if clash:
      t = max(clash) + rng.uniform(0, 0.05)
      continue
    out.append((float(t), float(t + d)))
    t += d + rng.uniform(*gaps)


def _silent_schedule(rng, cfg, forbidden):
  """Silent actions; at least one whenever a gap in the sound allows it, so a
  look-alike is never told apart by simply never moving."""
  for _ in range(10):
    acts = _schedule(rng, 0, cfg.duration_s, cfg.event_duration_s,
                     cfg.silent_action_gap_s, forbidden)
    if acts:
      return acts
  # Fallback: the shortest action, centred in the widest free gap.
  edges = sorted((max(a, 0.0), min(b, cfg.duration_s)) for a, b in forbidden)
  free, t = [], 0.0
  for a, b in edges + [(cfg.duration_s, cfg.duration_s)]:
    if a > t:
      free.append((t, a))
    t = max(t, b)
  d = cfg.event_duration_s[0]
  wide = [(b - a, a, b) for a, b in free if b - a > d]
  if not wide:
    return []
  _, a, b = max(wide)
  mid = (a + b) / 2
  return [(float(mid - d / 2), float(mid + d / 2))]


def _audible_schedule(rng, cfg, start, end, gaps):
  # A source always emits at least one note inside its window.
  for _ in range(20):
    notes = _schedule(rng, start, end, cfg.event_duration_s, gaps)
    if notes:
      return notes
  d = cfg.event_duration_s[0]
  return [(float(start), float(start + d))]


def _track(rng, cfg, diameter, others):
  """Linear drift; start and end keep `min_centre_distance` from `others`."""
  size, n = cfg.image_size, cfg.num_frames
  lo, hi = cfg.centre_margin * size, (1 - cfg.centre_margin) * size
  max_move = cfg.drift_speed * size * cfg.duration_s
  best = None
  for _ in range(30):
    p0 = rng.uniform(lo, hi, 2)
    angle = rng.uniform(0, 2 * np.pi)
    move = rng.uniform(0.3, 1.0) * max_move
    p1 = np.clip(p0 + move * np.array([np.cos(angle), np.sin(angle)]), lo, hi)
    gap = min([np.inf] + [
        min(np.linalg.norm(p0 - q0), np.linalg.norm(p1 - q1)) / max(diameter, d)
        for q0, q1, d in others])
    if best is None or gap > best[0]:
      best = (gap, p0, p1)
    if gap >= cfg.min_centre_distance:
      break
  _, p0, p1 = best
  f = np.linspace(0.0, 1.0, n, dtype=np.float32)
  xs = (p0[0] + (p1[0] - p0[0]) * f).astype(np.float32)
  ys = (p0[1] + (p1[1] - p0[1]) * f).astype(np.float32)
  others.append((p0, p1, diameter))
  return xs, ys


def _offscreen_track(rng, cfg, diameter):
  """A centre just outside a random edge (entirely out of view), drifting along it."""
  size, n = cfg.image_size, cfg.num_frames
  out = diameter * 0.75 + 2
  along = rng.uniform(0.2, 0.8) * size + np.linspace(
      0, rng.uniform(-0.1, 0.1) * size, n)
  edge = rng.integers(4)
  across = np.full(n, -out if edge % 2 == 0 else size + out)
  xs, ys = (along, across) if edge < 2 else (across, along)
  return xs.astype(np.float32), ys.astype(np.float32)


def _walk_in(cfg, xs, ys, target, t_in):
  """Moves an off-screen track to `target` over walk_in_duration_s from t_in."""
  t = np.arange(cfg.num_frames) / cfg.fps
  f = np.clip((t - t_in) / cfg.walk_in_duration_s, 0.0, 1.0)
  f = f * f * (3 - 2 * f)  # smoothstep: starts and ends at rest
  return ((xs + (target[0] - xs) * f).astype(np.float32),
          (ys + (target[1] - ys) * f).astype(np.float32))


def make_scene(cfg: SynthConfig, split: str, index: int,
               rng: np.random.Generator | None = None) -> Scene:
  """Who is where, what it looks like, and when it sounds or acts."""
  rng = clip_rng(cfg, split, index) if rng is None else rng
  scenario, cross = clip_scenario(cfg, split, index, rng)
  k, dur = cfg.num_categories, cfg.duration_s
  diam = lambda: float(rng.uniform(*cfg.object_size) * cfg.image_size)  # noqa: E731
  placed = []                       # start/end centres for spacing
  insts: list[Instance] = []
  variant = scenario

  def add(category, diameter, audible=(), silent_ok=True):
    xs, ys = _track(rng, cfg, diameter, placed)
    insts.append(Instance(category, diameter, xs, ys, list(audible), [],
                          silent_ok))
    return insts[-1]

  def distractors(exclude, at_least=0, at_most=cfg.max_silent_distractors):
    pool = [c for c in range(k) if c not in exclude]
    n = int(rng.integers(at_least, max(at_least, at_most) + 1))
    for c in rng.choice(pool, size=min(n, len(pool)), replace=False):
      add(int(c), diam())

  if scenario == 'single':
    c = int(rng.integers(k))
    add(c, diam(), _audible_schedule(rng, cfg, 0, dur, cfg.event_gap_s), False)
    distractors({c})
  elif scenario == 'mixed':
    n = int(rng.integers(cfg.mixed_sources[0], cfg.mixed_sources[1] + 1))
    cs = [int(c) for c in rng.choice(k, size=n, replace=False)]
    for c in cs:
      add(c, diam(), _audible_schedule(rng, cfg, 0, dur, cfg.mixed_event_gap_s),
          False)
    # At most 4 objects in all, so that 64 px frames are not crowded.
    distractors(set(cs), 0, min(cfg.max_silent_distractors, 4 - len(cs)))
  elif scenario == 'multi':
    c = int(rng.integers(k))
    d = diam()                       # ONE template: same shape, size, colour
    n = int(rng.integers(cfg.multi_instances[0], cfg.multi_instances[1] + 1))
    twins = [add(c, d) for _ in range(n)]
    src = int(rng.integers(n))
    if cross:
      variant = 'cross_event'
      t_sw = rng.uniform(*cfg.switch_time) * dur
      nxt = (src + 1 + int(rng.integers(n - 1))) % n
      twins[src].audible = _audible_schedule(rng, cfg, 0, t_sw, cfg.event_gap_s)
      twins[nxt].audible = _audible_schedule(rng, cfg, t_sw, dur, cfg.event_gap_s)
    else:
      twins[src].audible = _audible_schedule(rng, cfg, 0, dur, cfg.event_gap_s)
    # Draw order random, so the source is not always in front.
    order = rng.permutation(len(insts))
    insts = [insts[i] for i in order]
  else:  # offscreen
    c = int(rng.integers(k))
    d = diam()
    walk_in = rng.random() < cfg.offscreen_walk_in_fraction
    same = not walk_in and rng.random() < cfg.offscreen_same_category_fraction
    xs, ys = _offscreen_track(rng, cfg, d)
    src = Instance(c, d, xs, ys,
                   _audible_schedule(rng, cfg, 0, dur, cfg.event_gap_s), [],
                   silent_ok=False)
    if same:
      # A visible, SILENT twin of the sounding category, so that category
      # matching alone gives a false positive (without it, Off-screen frames
      # are trivially separable even for an image-level model).
      variant = 'same_category'
      add(c, d)
      distractors({c})
    else:
      distractors({c}, at_least=1)
    if walk_in:
      # After walking in, the clip is Single-sound: no twin on screen.
      variant = 'walk_in'
      target_xs, target_ys = _track(rng, cfg, d, placed)
      t_in = rng.uniform(*cfg.walk_in_time) * dur
      src.xs, src.ys = _walk_in(cfg, xs, ys, (target_xs[0], target_ys[0]), t_in)
    insts.append(src)                # in front: walks over the others

  # Silent actions keep clear of every audible event (and its hangover).
  forbidden = [(a - cfg.guard_s, b + cfg.hangover_s + cfg.guard_s)
               for inst in insts for a, b in inst.audible]
  for inst in insts:
    if not inst.silent_ok:
      continue
    own = []
    if inst.audible:                 # switching source: silent outside its turn
      margin = cfg.guard_s + cfg.hangover_s
      own = [(inst.audible[0][0] - margin, inst.audible[-1][1] + margin)]
    inst.silent = _silent_schedule(rng, cfg, forbidden + own)
  return Scene(scenario, variant, insts, cross)


# ---------------------------------------------------------------- envelopes


def note_envelope(tau: np.ndarray, duration: float) -> np.ndarray:
  """Amplitude of a note (and of its visible action) `tau` s after onset.

  10 ms attack, slow exponential decay (still ~0.5 at the end, so every frame
  inside a note shows the action clearly), 20 ms release; 0 outside the note.
  """
  tau = np.asarray(tau, np.float32)
  attack = np.clip(tau / 0.01, 0, 1)
  release = np.clip((duration - tau) / 0.02, 0, 1)
  env = attack * release * np.exp(-tau / (1.5 * duration))
  return np.where((tau >= 0) & (tau <= duration), env, 0.0).astype(np.float32)


def action_envelope(intervals, times: np.ndarray) -> np.ndarray:
  """Sum of note envelopes of `intervals` sampled at `times` (seconds)."""
  out = np.zeros(len(times), np.float32)
  for a, b in intervals:
    out += note_envelope(times - a, b - a)
  return out


def covered(intervals, times: np.ndarray, hangover: float = 0.0) -> np.ndarray:
  out = np.zeros(len(times), bool)
  for a, b in intervals:
    out |= (times >= a) & (times <= b + hangover)
  return out


# ------------------------------------------------------------------ rendering


def shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance in units of the radius (shape spans about [-1, 1])."""
  au, av = np.abs(u), np.abs(v)
  if shape == 'circle':
    return np.sqrt(u * u + v * v) - 1.0
  if shape == 'square':
    return np.maximum(au, av) - 0.84
  if shape == 'diamond':
    return (au + av - 1.0) * np.float32(0.7071)
  if shape == 'triangle':
    w = v - 0.2
    return np.maximum(w - 0.55, 0.866 * au * 1.15 - 0.5 * w - 0.55)
  if shape == 'ring':
    return np.abs(np.sqrt(u * u + v * v) - 0.68) - 0.32
  if shape == 'cross':
    return np.minimum(np.maximum(au - 1.0, av - 0.38),
                      np.maximum(au - 0.38, av - 1.0))
  if shape == 'hexagon':
    return np.maximum(au * 0.866 + av * 0.5, av) - 0.9
  if shape == 'capsule':
    du = np.maximum(au - 0.45, 0.0)
    return np.sqrt(du * du + v * v) - 0.55
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


@dataclasses.dataclass
class Pose:
  """Per-frame drawing parameters of one instance (all arrays [N])."""
  x: np.ndarray
  y: np.ndarray
  rx: np.ndarray          # horizontal radius, px
  ry: np.ndarray
  flash: np.ndarray       # 0..1 blend towards white


def pose(cfg: SynthConfig, cat: Category, diameter: float, xs, ys,
         amplitude: np.ndarray) -> Pose:
  """Where and how the instance is drawn, given its action amplitude."""
  a = np.asarray(amplitude, np.float32) * np.float32(cfg.action_strength)
  r = np.float32(diameter / 2)
  x, y = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
  rx, ry = np.full_like(a, r), np.full_like(a, r)
  flash = np.zeros_like(a)
  if cat.action == 'hop':
    y = y - a * 2 * r
  elif cat.action == 'squash':
    rx, ry = r * (1 + a), r * (1 - a)
    y = y + r * a                    # squashes onto its base
  elif cat.action == 'flash':
    flash = np.minimum(1.0, 2.5 * a)
  elif cat.action == 'pulse':
    rx = ry = r * (1 + a)
  return Pose(x, y, rx, ry, flash)


def coverage(cfg: SynthConfig, shape: str, p: Pose):
  """Anti-aliased coverage [N, h, w] in a window (y0, x0) of the frame."""
  size = cfg.image_size
  x0 = int(max(0, np.floor((p.x - p.rx).min()) - 1))
  x1 = int(min(size, np.ceil((p.x + p.rx).max()) + 2))
  y0 = int(max(0, np.floor((p.y - p.ry).min()) - 1))
  y1 = int(min(size, np.ceil((p.y + p.ry).max()) + 2))
  if x1 <= x0 or y1 <= y0:
    return None, (0, 0)
  px = np.arange(x0, x1, dtype=np.float32) + 0.5    # pixel centres
  py = np.arange(y0, y1, dtype=np.float32) + 0.5
  u = (px[None, None, :] - p.x[:, None, None]) / p.rx[:, None, None]
  v = (py[None, :, None] - p.y[:, None, None]) / p.ry[:, None, None]
  d = shape_sdf(shape, u, v) * np.minimum(p.rx, p.ry)[:, None, None]
  return np.clip(0.5 - d, 0.0, 1.0), (y0, x0)


def background(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
  """f32 [3, N, H, W] (planar): a grey-ish texture whose gratings drift slowly."""
  n, size, g = cfg.num_frames, cfg.image_size, 4
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  freq = rng.uniform(1.0, 4.0, g) * 2 * np.pi
  ang = rng.uniform(0, np.pi, g)
  phase = rng.uniform(0, 2 * np.pi, g)
  arg = (freq[:, None, None] * (np.cos(ang)[:, None, None] * xx
                                + np.sin(ang)[:, None, None] * yy)
         + phase[:, None, None]).astype(np.float32)
  # sin(arg + w t) = sin(arg) cos(w t) + cos(arg) sin(w t): the per-frame
  # texture is a weighted sum of 2g fixed patterns. Summed by hand, not with a
  # matmul: BLAS threads crawl on a shared 2-core machine.
  patterns = np.concatenate([np.sin(arg), np.cos(arg)]).reshape(2 * g, -1)
  t = np.arange(n) / cfg.fps
  w = rng.uniform(-1, 1, g) * 2 * np.pi * cfg.background_drift_hz
  amp = rng.uniform(0.5, 1.0, g) * cfg.background_contrast / np.sqrt(g)
  coef = np.concatenate([np.cos(np.outer(t, w)), np.sin(np.outer(t, w))], 1)
  coef = (coef * np.concatenate([amp, amp])[None]).astype(np.float32)  # [N, 2g]
  lum = coef[:, 0, None] * patterns[0][None]
  for j in range(1, 2 * g):
    lum += coef[:, j, None] * patterns[j][None]                      # [N, H*W]
  tint = (1.0 + 0.3 * rng.standard_normal(3)).astype(np.float32)
  base = np.array(colorsys.hsv_to_rgb(rng.random(), 0.15, rng.uniform(0.3, 0.5)))
  still = (base + 0.03 * rng.standard_normal((size * size, 3))).astype(np.float32)
  # Channel-planar [3, N, H, W]: numpy is slow on a trailing axis of 3.
  bg = np.empty((3, n, size * size), np.float32)
  for c in range(3):
    np.multiply(lum, tint[c], out=bg[c])
    bg[c] += still[:, c]
  return bg.reshape(3, n, size, size)


def render(cfg: SynthConfig, scene: Scene, rng: np.random.Generator):
  """(frames uint8 [N,H,W,3], visible masks bool [I,N,H,W], full masks bool
  [I,N,H,W] before occlusion), instances in drawing order."""
  cats = categories(cfg)
  n, size = cfg.num_frames, cfg.image_size
  times = np.arange(n, dtype=np.float32) / cfg.fps
  frames = background(cfg, rng)
  full = np.zeros((len(scene.instances), n, size, size), bool)
  for i, inst in enumerate(scene.instances):
    cat = cats[inst.category]
    amp = action_envelope(inst.audible + inst.silent, times)
    p = pose(cfg, cat, inst.diameter, inst.xs, inst.ys, amp)
    alpha, (y0, x0) = coverage(cfg, cat.shape, p)
    if alpha is None:
      continue
    h, w = alpha.shape[1:]
    colour = np.asarray(cat.colour, np.float32)
    colour = colour + (1 - colour) * p.flash[:, None]          # [N, 3]
    for c in range(3):                                         # "over" compositing
      region = frames[c, :, y0:y0 + h, x0:x0 + w]
      region += alpha * (colour[:, c, None, None] - region)
    full[i, :, y0:y0 + h, x0:x0 + w] = alpha >= 0.5
  # Visible = own pixels minus everything drawn later (in front).
  visible = np.empty_like(full)
  in_front = np.zeros(full.shape[1:], bool)
  for i in range(len(scene.instances) - 1, -1, -1):
    visible[i] = full[i] & ~in_front
    in_front |= full[i]
  out = np.empty((n, size, size, 3), np.uint8)
  for c in range(3):
    out[..., c] = np.clip(frames[c] * 255 + 0.5, 0, 255)
  return out, visible, full


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
  """Area of a shape of radius 1, from a fine raster (for `min_visible_fraction`)."""
  g = (np.arange(400) + 0.5) / 200 - 1.0
  u, v = np.meshgrid(g, g)
  return float((shape_sdf(shape, u, v) <= 0).mean() * 4.0)


# ---------------------------------------------------------------------- audio


@functools.lru_cache(maxsize=64)
def _carrier(cfg: SynthConfig, category: int) -> np.ndarray:
  """A category's unit-RMS sound, 2 clip lengths long; clips take a random slice.

  Cached per category: synthesis costs milliseconds, a slice costs nothing.
  """
  cat = categories(cfg)[category]
  sr, n = cfg.sample_rate, 2 * cfg.num_samples
  t = np.arange(n) / sr
  rng = np.random.default_rng([cfg.seed, 7919, category])
  f = cat.freq_hz
  if cat.sound == 'tone':
    slope = 0.6 + 1.2 * ((category * 3) % 5) / 4       # spectral tilt per class
    x = sum(h ** -slope * np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6.3))
            for h in range(1, 7) if h * f < sr / 2)
  elif cat.sound == 'noise':
    spec = np.fft.rfft(rng.standard_normal(n))
    fr = np.fft.rfftfreq(n, 1 / sr)
    centre, width = 2 * f, 0.25                          # a 1/4-octave band
    band = np.exp(-0.5 * (np.log2(np.maximum(fr, 1) / centre) / width) ** 2)
    x = np.fft.irfft(spec * band, n)
  else:  # drum: a damped membrane struck at a class-specific rate
    rate = 6.0 + 2.0 * (category % 5)
    tau = np.mod(t, 1 / rate)
    x = (np.sin(2 * np.pi * f * tau) * np.exp(-tau / 0.03)
         + 0.3 * rng.standard_normal(n) * np.exp(-tau / 0.008))
  x = np.asarray(x, np.float64)
  return (x / (np.sqrt(np.mean(x * x)) + 1e-12)).astype(np.float32)


def source_audio(cfg: SynthConfig, category: int, notes, offset: int) -> np.ndarray:
  """f32 [S]: the category's timbre gated by its notes' envelopes."""
  sr, s = cfg.sample_rate, cfg.num_samples
  carrier = _carrier(cfg, category)[offset:offset + s]
  out = np.zeros(s, np.float32)
  for a, b in notes:
    i0, i1 = int(np.floor(a * sr)), min(s, int(np.ceil(b * sr)) + 1)
    tau = np.arange(i0, i1, dtype=np.float32) / sr - a
    out[i0:i1] += carrier[i0:i1] * note_envelope(tau, b - a)
  return out


def mix_audio(cfg: SynthConfig, scene: Scene, rng: np.random.Generator):
  """(waveform f32 [S], per-instance stems f32 [I, S]) at the configured SNR."""
  s = cfg.num_samples
  stems = np.zeros((len(scene.instances), s), np.float32)
  for i, inst in enumerate(scene.instances):
    if inst.audible:
      gain = rng.uniform(0.7, 1.0)
      stems[i] = gain * source_audio(cfg, inst.category, inst.audible,
                                     int(rng.integers(s)))
  signal = stems.sum(0)
  active = np.abs(signal) > 0
  p_signal = float(np.mean(signal[active] ** 2)) if active.any() else 1.0
  noise_rms = np.sqrt(p_signal / 10 ** (cfg.snr_db / 10))
  wave = signal + noise_rms * rng.standard_normal(s, dtype=np.float32)
  peak = float(np.abs(wave).max())
  scale = np.float32(0.9 / peak) if peak > 0.9 else np.float32(1.0)
  return (wave * scale).astype(np.float32), stems * scale


# --------------------------------------------------------------------- record


def _frame_tags(sounding_visible, others_visible_cats, source_out_of_view):
  """Scenario tags of one annotated frame, from what is on screen.

  |S| = visible sounding instances. |S| >= 2 -> mixed; |S| == 1 -> multi when a
  silent look-alike (same category) is also visible, else single; |S| == 0 ->
  offscreen (a source sounds but none is in view).
  """
  tags = np.zeros(len(schema.SCENARIOS), bool)
  if len(sounding_visible) >= 2:
    tags[1] = True
  elif len(sounding_visible) == 1:
    tags[2 if sounding_visible[0] in others_visible_cats else 0] = True
  if not sounding_visible and source_out_of_view:
    tags[3] = True
  return tags


def boxes_of(masks: np.ndarray) -> np.ndarray:
  """f32 [R, 4] tight [x, y, w, h] of non-empty masks [R, H, W] (pixel units)."""
  rows, cols = masks.any(2), masks.any(1)
  y0, x0 = rows.argmax(1), cols.argmax(1)
  y1 = rows.shape[1] - rows[:, ::-1].argmax(1)
  x1 = cols.shape[1] - cols[:, ::-1].argmax(1)
  return np.stack([x0, y0, x1 - x0, y1 - y0], 1).astype(np.float32)


def generate_clip_debug(cfg: SynthConfig, split: str, index: int):
  """(record, debug): the record plus the scene, per-instance action envelopes,
  audio stems and full (unoccluded) masks, for tests and pictures."""
  rng = clip_rng(cfg, split, index)
  scene = make_scene(cfg, split, index, rng)
  frames, visible, full = render(cfg, scene, rng)
  waveform, stems = mix_audio(cfg, scene, rng)
  cats = categories(cfg)
  n = cfg.num_frames
  times = np.arange(n, dtype=np.float32) / cfg.fps
  vid = video_id(cfg, split, index)

  every = (cfg.train_annotate_every_k_frames if split == 'train'
           else cfg.annotate_every_k_frames)
  sounding = np.stack([covered(inst.audible, times, cfg.hangover_s)
                       for inst in scene.instances])              # [I, N]
  area = visible.reshape(len(scene.instances), n, -1).sum(-1)      # [I, N]
  need = np.array([cfg.min_visible_fraction * _unit_area(cats[i.category].shape)
                   * (i.diameter / 2) ** 2 for i in scene.instances])
  in_view = (area >= need[:, None]) & (area > 0)                   # [I, N]

  ann, inst_rows = [], []
  for t in range(0, n, every):
    if not sounding[:, t].any():
      continue                      # nothing sounds: no localisation target
    ids = [i for i in range(len(scene.instances)) if in_view[i, t]]
    s_cats = [scene.instances[i].category for i in ids if sounding[i, t]]
    other_cats = {scene.instances[i].category for i in ids if not sounding[i, t]}
    out_of_view = any(sounding[i, t] and not in_view[i, t]
                      for i in range(len(scene.instances)))
    a = len(ann)
    ann.append(dict(frame_index=t, time=np.float32(times[t]),
                    frame_id=f'{vid}/{t}',
                    tags=_frame_tags(s_cats, other_cats, out_of_view),
                    cross_event=scene.cross_event))
    for i in ids:
      inst_rows.append(dict(annotation_index=a, instance_id=i,
                            mask=visible[i, t],
                            category=scene.instances[i].category,
                            category_name=cats[scene.instances[i].category].name,
                            sounding=bool(sounding[i, t])))

  size = cfg.image_size
  if inst_rows:
    instances = {key: [r[key] for r in inst_rows] for key in inst_rows[0]}
    instances = {
        'annotation_index': np.array(instances['annotation_index'], np.int32),
        'instance_id': np.array(instances['instance_id'], np.int32),
        'box': boxes_of(np.stack(instances['mask'])),
        'mask': np.stack(instances['mask']).view(np.uint8),
        'category': np.array(instances['category'], np.int32),
        'category_name': instances['category_name'],
        'sounding': np.array(instances['sounding'], np.bool_),
    }
  else:
    instances = schema.empty_instances(size, size)
  record = {
      'video_id': vid,
      'frames': frames,
      'frame_times': times,
      'waveform': waveform,
      'sample_rate': np.int32(cfg.sample_rate),
      'fps': np.float32(cfg.fps),
      'original_width': np.int32(size),
      'original_height': np.int32(size),
      'frames_annotated': {
          'frame_index': np.array([a['frame_index'] for a in ann], np.int32),
          'time': np.array([a['time'] for a in ann], np.float32),
          'frame_id': [a['frame_id'] for a in ann],
          'tags': np.array([a['tags'] for a in ann], np.bool_).reshape(-1, 4),
          'cross_event': np.array([a['cross_event'] for a in ann], np.bool_),
      },
      'instances': instances,
  }
  amps = np.stack([action_envelope(i.audible + i.silent, times)
                   for i in scene.instances])
  debug = dict(scene=scene, action=amps, sounding=sounding, in_view=in_view,
               stems=stems, full_masks=full, visible_masks=visible)
  return record, debug


def generate_clip(cfg: SynthConfig, split: str, index: int) -> dict:
  """One record in the `tavlo_datasets.schema` format."""
  return generate_clip_debug(cfg, split, index)[0]
