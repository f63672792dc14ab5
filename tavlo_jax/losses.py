"""Multiple-instance contrastive losses over per-frame similarity maps.

For frame t, clip i's audio token a_i^t is scored against clip j's visual bag
{v_jn^t : n in h*w locations}:
  pooled(i, j, t) = max_n  cos(a_i^t, v_jn^t)   (positives, i == j)
                  = max_n or mean_n  cos(...)     (negatives, i != j)
logits[t, i, j] = pooled / temperature; cross-entropy over j (audio -> visual)
and over i (visual -> audio), averaged over frames, clips and directions.
Everything is plain jnp over the GLOBAL batch: under jit with a sharded batch
the negatives are all other clips of the global batch (XLA gathers them).

Why the paper's summarised form (positives max, negatives MEAN) collapses
(reproduced in tests/test_losses.py):
  the positive and the negatives are pooled by different statistics of the
  same kind of map, so the model can separate them without the audio. Make
  every frame's visual map have one "peaky" token aligned with a shared
  direction u, the rest anti-aligned, and let every audio token be near u.
  Then for ANY audio a, max_n cos(a, v_n) ~ 1 while mean_n cos(a, v_n) ~ -1:
  the positive (max) beats every negative (mean) by ~2/temperature whatever
  the audio is, and the loss goes to ~0 with the audio carrying no
  information. It is provable: with identical audio for every clip, a loss
  that pools positives and negatives the SAME way (max/max or mean/mean)
  cannot go below log(B) (each logit row is then the same vector, and the
  average cross-entropy of a shared row over its diagonal is >= log B), while
  max/mean goes to 0. What trains: the same pooling for both (max for both is
  EZ-VSL's and our default; mean for both also stays honest but dilutes the
  positive over background). The paper's form could only work if something
  else forbade the degenerate map (e.g. a fixed objectness prior or an
  audio-independent visual branch trained with another objective); we have
  neither, so it is kept as `negatives='mean'` for the ablation only.

Inverted maps: max pooling constrains only the arg-max
location, and every logit compares audios against each other, so the part of
the map that is the same for every audio, v . E[a], costs the loss nothing and
is free to take any shape. In our default model it became "objects are cold":
~85% of each map's spatial variance was the same whatever audio was used, and
the source was the MINIMUM on 45-49% of test frames (argmax 0.0%). The
safeguard is in the model, not here: `AudioCentering` (models/tavlo.py,
config.model.center_audio) subtracts the batch's mean audio embedding, so the
map keeps only what a clip's own audio adds; the same run then points at the
source. `peak` pooling (max - mean over locations, for both positives and
negatives) encodes the other prior, that a source is a small part of the
frame; alone it did NOT fix the sign (argmax on source 0.0% at 250 steps).
The run-time check is `map_polarity` / the evaluator's sign check.

Out-of-sync negatives (`extra_audio`, config.loss.shifted_audio_negatives).
The cross-clip loss rewards timing only through negatives of the SAME
category: a bag's max can sit on either of two identical objects, so telling
the sounding twin from the silent one pays only when another clip of the
batch sounds like this one at other times. With 8 categories and a batch of
16 that is ~2 negatives in 15, and the default run reached 52% pointing on
Multi-entity (chance ~42%). The model's `audio_shifts` rolls each clip's
audio tokens by a random number of frames (more than the temporal window) and
runs them through the audio path again: same category, same sound, wrong
times. Scored as negatives for the clip's own frames (v->a), they can be told
apart only by matching sound events to visual actions, so every clip becomes
a lesson in synchrony (the classic audio-visual synchronisation pretext task,
Owens & Efros 2018, made per frame). `sync_accuracy` in `aux` is how often a
frame's bag prefers its in-sync audio to all of its out-of-sync copies (0.5 =
blind to timing, for K = 1). Off in the base config (it is not in the
paper). Alone, at the CPU budget, it lowered pointing on every scenario (250
steps); with `config.model.motion_features`, which let the visual tokens see
an instance act, it raised Multi-entity pointing in both seeds measured, and
the synthetic config turns both on (numbers in docs/research_log.md).

Categories that are never learned. At the CPU budget, pointing per category
is all or nothing: each seed leaves one to three of the 8 synthetic categories
at 0-10% (about chance or below), the map cold on the category's own object. A
likely cause is the audio centring itself: centred audio embeddings sum to
zero over the batch, so if the visual features share an "objectness"
direction o (objects vs background), the categories' audio cannot ALL point
along +o; whichever ends up along -o makes maps that are cold on every object,
its own included. `python -m tavlo_jax.category_probe` measures both numbers
per category. On the three TAVLO seeds of the earlier
default (no motion features), red (never learned) had the
most negative audio component on o in every seed (-0.19, -0.14, -0.25; the
others -0.11..+0.14). In a run with three stuck categories (red, blue, cyan)
those three were the only ones whose own-object map was below background
(-0.04, -0.14, -0.26; the others +0.39..+0.49), blue and cyan with the two
most negative components on o (-0.28, -0.40). It does not explain every
case: magenta, stuck in one seed, had a positive component there. `peak`
pooling barely penalises a map that is cold on one object (it scores s/N
above a flat map) and sends the cold location no gradient towards its own
audio.

Collapse detectors in `aux`: `retrieval_accuracy` always scores with max/max
pooling (is the audio actually matched to its own clip?) and
`max_margin` = mean(pos max) - mean(neg max); a falling loss with
retrieval_accuracy at chance (1/B) and max_margin ~0 is the collapse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

POOLINGS = ('max', 'mean', 'peak')


def similarity_bags(visual, audio):
  """cos(a_i^t, v_jn^t) -> [T, B_audio, B_visual, N] in float32.

  visual: [B, T, ..., D] (any spatial axes, flattened) or [B, ..., D] with
  T = 1 when audio is [B, D]; audio: [B, T, D], or [B, D] for one global
  embedding shared by every frame.
  """
  if audio.ndim == 2:
    audio = audio[:, None]
    if visual.ndim == 4:               # [B, h, w, D] image-level batch
      visual = visual[:, None]
  b, t = visual.shape[:2]
  if audio.shape[0] != b or audio.shape[1] not in (1, t):
    raise ValueError(f'audio {audio.shape} does not match visual '
                     f'{visual.shape} (expected [B, T, D] or [B, D])')
  visual = visual.reshape(b, t, -1, visual.shape[-1]).astype(jnp.float32)
  audio = jnp.broadcast_to(audio, (b, t, audio.shape[-1])).astype(jnp.float32)
  return jnp.einsum('itd,jtnd->tijn', audio, visual)


def _pool(sims, how):
  if how == 'max':
    return sims.max(-1)
  if how == 'mean':
    return sims.mean(-1)
  if how == 'peak':
    # How far the best location stands above the frame's average: high only
    # for a map with a few hot locations on a cold background. See
    # "Inverted maps" in the module docstring.
    return sims.max(-1) - sims.mean(-1)
  raise ValueError(f'pooling {how!r}; expected one of {POOLINGS} '
                   '(config.loss.positives / config.loss.negatives)')


def temporal_mil_loss(visual, audio, temperature: float, negatives: str = 'max',
                      symmetric: bool = True, mask=None,
                      positives: str = 'max', extra_audio=None):
  """Temporal-bag MIL contrastive loss. Returns (scalar loss, aux dict).

  visual [B, T, h, w, D], audio [B, T, D] (or [B, D]): L2-normalised.
  mask: bool [B] or [B, T]; False entries (padding clips, missing frames) are
  neither anchors nor negatives.
  extra_audio: optional [K, B, T, D] audio tokens that are negatives for
  every visual bag (v->a direction only: they have no positive of their own),
  e.g. each clip's own audio out of sync (see "Out-of-sync negatives").
  aux: per_example [B] (mean over the clip's valid frames of its terms),
  loss_a2v, loss_v2a, and the similarity statistics described above; with
  extra_audio also sync_accuracy, how often a clip's bag scores its in-sync
  audio above every out-of-sync copy of it.
  """
  sims = similarity_bags(visual, audio)                 # [T, B, B, N]
  t, b = sims.shape[:2]
  diag = jnp.eye(b, dtype=bool)[None]
  logits = jnp.where(diag, _pool(sims, positives), _pool(sims, negatives))
  logits = logits / temperature                         # [T, Ba, Bv]

  if mask is None:
    valid = jnp.ones((t, b), bool)
  else:
    mask = jnp.asarray(mask, bool)
    valid = jnp.broadcast_to(mask.reshape(b, -1), (b, t)).T    # [T, B]
  pair_ok = valid[:, :, None] & valid[:, None, :]
  masked = jnp.where(pair_ok, logits, -jnp.inf)
  positive = jnp.diagonal(logits, axis1=1, axis2=2)    # [T, B]
  # Rows of invalid anchors are all -inf; the where() below drops them, and
  # the +0 guard keeps their (discarded) value finite so gradients stay clean.
  safe = lambda x: jnp.where(valid, x, 0.0)
  a2v = safe(jax.nn.logsumexp(jnp.where(valid[:, :, None], masked, 0.0), 2)
             - positive)
  v2a_scores = jnp.where(valid[:, None, :], masked, 0.0)          # [T, Ba, Bv]
  sync = {}
  if extra_audio is not None:
    extra = jnp.stack([_pool(similarity_bags(visual, a), negatives)
                       for a in extra_audio], 1) / temperature     # [T, K, Ba, Bv]
    k = extra.shape[1]
    extra = extra.reshape(t, k * b, b)                              # [T, K*Ba, Bv]
    extra_ok = jnp.tile(valid, (1, k))[:, :, None] & valid[:, None, :]
    v2a_scores = jnp.concatenate(
        [v2a_scores, jnp.where(extra_ok, extra, -jnp.inf)], axis=1)
    own_shifted = jnp.diagonal(extra.reshape(t, k, b, b), axis1=2, axis2=3)
    sync = dict(sync_accuracy=(positive > own_shifted.max(1)))    # [T, B]
  v2a = safe(jax.nn.logsumexp(v2a_scores, 1) - positive)
  terms = (a2v + v2a) / 2 if symmetric else a2v         # [T, B]

  n_valid = jnp.maximum(valid.sum(), 1)
  mean_valid = lambda x: jnp.where(valid, x, 0.0).sum() / n_valid
  frames_per_clip = jnp.maximum(valid.sum(0), 1)
  per_example = terms.sum(0) / frames_per_clip

  max_pooled = sims.max(-1)
  mean_pooled = sims.mean(-1)
  neg_ok = pair_ok & ~diag
  n_neg = jnp.maximum(neg_ok.sum(), 1)
  mean_neg = lambda x: jnp.where(neg_ok, x, 0.0).sum() / n_neg
  retrieved = jnp.argmax(jnp.where(pair_ok, max_pooled, -jnp.inf), axis=2)
  pos_max = mean_valid(jnp.diagonal(max_pooled, axis1=1, axis2=2))
  neg_max = mean_neg(max_pooled)
  aux = dict(
      per_example=per_example,
      loss_a2v=mean_valid(a2v),
      loss_v2a=mean_valid(v2a),
      pos_max_sim=pos_max,
      pos_mean_sim=mean_valid(jnp.diagonal(mean_pooled, axis1=1, axis2=2)),
      neg_max_sim=neg_max,
      neg_mean_sim=mean_neg(mean_pooled),
      max_margin=pos_max - neg_max,
      retrieval_accuracy=mean_valid(retrieved == jnp.arange(b)[None]),
      **{name: mean_valid(v) for name, v in sync.items()},
  )
  return mean_valid(terms), aux


def ezvsl_loss(visual, audio, temperature: float, mask=None,
               pooling: str = 'max', extra_audio=None):
  """EZ-VSL's MIL loss: one global audio embedding ([B, D] or tiled
  [B, T, D]) against each frame's bag, the same pooling for all pairs (max in
  the paper; our configs give it the TAVLO runs' pooling so that the two
  differ only in the model), both directions. The temporal loss with T
  frames of identical audio."""
  return temporal_mil_loss(visual, audio, temperature, negatives=pooling,
                           positives=pooling, symmetric=True, mask=mask,
                           extra_audio=extra_audio)


def map_polarity(heatmap, gt_mask):
  """Mean map value inside the sounding region minus outside, per frame.

  heatmap [..., h, w]; gt_mask [..., h, w] (resize one to the other first).
  Negative on average over annotated frames = inverted maps.
  Frames with an empty or full mask give NaN; average with jnp.nanmean.
  """
  m = gt_mask.astype(jnp.float32)
  inside = (heatmap * m).sum((-2, -1)) / m.sum((-2, -1))
  outside = (heatmap * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1))
  return inside - outside


def make_loss(config: ml_collections.ConfigDict):
  """The configured loss as fn(model_outputs, mask=None) -> (loss, aux)."""
  name, temperature = config.loss.name, config.model.temperature
  if name == 'temporal_mil':
    fn = functools.partial(temporal_mil_loss, temperature=temperature,
                           negatives=config.loss.negatives,
                           symmetric=config.loss.symmetric,
                           positives=config.loss.positives)
  elif name == 'ezvsl':
    if config.loss.positives != config.loss.negatives:
      raise ValueError('the ezvsl loss pools positives and negatives alike; got '
                       f'config.loss.positives={config.loss.positives!r}, '
                       f'negatives={config.loss.negatives!r}')
    fn = functools.partial(ezvsl_loss, temperature=temperature,
                           pooling=config.loss.negatives)
  else:
    raise ValueError(f'config.loss.name={name!r}; expected temporal_mil|ezvsl')
  return lambda outputs, mask=None: fn(
      outputs['visual'], outputs['audio'], mask=mask,
      extra_audio=outputs.get('shifted_audio'))
