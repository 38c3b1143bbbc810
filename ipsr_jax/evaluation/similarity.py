"""Blocked cosine-similarity identification: exact ranks and top-k without a [P, G] matrix.

A 1,000,000-face gallery against 10,000 probes is a 40 GB similarity matrix; here the gallery is
sorted by identity and cut into fixed blocks (default 4096 images), probes into blocks of 1024,
and one jitted `lax.scan` per probe block walks the gallery blocks. Only [probe_block,
gallery_block] scores exist at a time.

Identity max-pooling (an identity scores by its best image) must survive identities whose
images straddle block boundaries. Because the gallery is identity-sorted, the only identity a
block can share with the previous one is its first, continuing the previous block's last
(`continues`), so one carried value per probe stitches them: the still-open identity's score
(top-k) or whether it was already counted (ranks). Within a block, images map to local segment
ids and `segment_max` pools them.

`rank_of_true_identity` is exact and pessimistic (ties rank the true identity last), which is
all a CMC needs; `topk_identities` also returns the candidate lists, ordered the same way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ipsr_jax.ops import normalize as normalize_lib  # `normalize` is a flag here

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=('normalize',))
def cosine_similarity(a, b, normalize: bool = True) -> jax.Array:
  """[A, D] x [B, D] -> [A, B] cosine similarity (plain dot products when normalize=False)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if normalize:
    a, b = normalize_lib.unit_norm(a), normalize_lib.unit_norm(b)
  return jnp.dot(a, b.T, precision=_HIGHEST)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('emb', 'valid', 'labels', 'seg_ids', 'seg_labels', 'last_seg',
                                'continues'),
                   meta_fields=('num_identities',))
@dataclasses.dataclass(frozen=True)
class GalleryBlocks:
  """An identity-sorted, padded gallery cut into [num_blocks, block] pieces, on device."""
  emb: jax.Array         # [nb, B, D] float32 (normalised if asked), zero rows as padding
  valid: jax.Array       # [nb, B] bool
  labels: jax.Array      # [nb, B] int32, -1 for padding
  seg_ids: jax.Array     # [nb, B] int32 local segment (identity run) of each image
  seg_labels: jax.Array  # [nb, B] int32 label of local segment s, -1 where unused
  last_seg: jax.Array    # [nb] int32 local segment of the block's last real image
  continues: jax.Array   # [nb] bool: segment 0 continues the previous block's last identity
  num_identities: int


def make_gallery_blocks(gallery_emb, gallery_labels, block: int = 4096,
                        normalize: bool = True) -> GalleryBlocks:
  """Sort the gallery by identity, pad it to whole blocks and lay out the segment tables."""
  gallery_labels = np.asarray(gallery_labels)
  if gallery_labels.ndim != 1 or len(gallery_labels) != len(gallery_emb):
    raise ValueError(f'{len(gallery_emb)} gallery embeddings but labels of shape '
                     f'{gallery_labels.shape}')
  if len(gallery_labels) == 0:
    raise ValueError('empty gallery')
  if gallery_labels.min() < 0:
    raise ValueError('gallery labels must be >= 0 (-1 marks padding)')
  n = len(gallery_labels)
  block = int(min(block, n))
  nb = -(-n // block)
  order = np.argsort(gallery_labels, kind='stable')
  labels = np.full(nb * block, -1, np.int64)
  labels[:n] = gallery_labels[order]
  emb = np.zeros((nb * block, np.shape(gallery_emb)[1]), np.float32)
  emb[:n] = np.asarray(gallery_emb, np.float32)[order]
  if normalize:
    emb[:n] = normalize_lib.unit_norm(emb[:n])
  labels = labels.reshape(nb, block)
  new_seg = np.ones_like(labels, bool)
  new_seg[:, 1:] = labels[:, 1:] != labels[:, :-1]
  seg_ids = np.cumsum(new_seg, axis=1) - 1
  seg_labels = np.full_like(labels, -1)
  np.put_along_axis(seg_labels, seg_ids, labels, axis=1)  # every image of a run: same label
  valid = labels >= 0
  last_valid = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
  last_seg = seg_ids[np.arange(nb), last_valid]
  continues = np.zeros(nb, bool)
  continues[1:] = labels[1:, 0] == labels[:-1, -1]  # a padded block is always the last one
  return GalleryBlocks(
      emb=jnp.asarray(emb.reshape(nb, block, -1)), valid=jnp.asarray(valid),
      labels=jnp.asarray(labels, jnp.int32), seg_ids=jnp.asarray(seg_ids, jnp.int32),
      seg_labels=jnp.asarray(seg_labels, jnp.int32), last_seg=jnp.asarray(last_seg, jnp.int32),
      continues=jnp.asarray(continues), num_identities=len(np.unique(gallery_labels)))


def _block_scores(probes, gallery_block, valid):
  """[Pb, B] scores, -inf on padding rows."""
  s = jnp.dot(probes, gallery_block.T, precision=_HIGHEST)
  return jnp.where(valid[None, :], s, -jnp.inf)


def _segment_max(values, seg_ids):
  """[Pb, B] -> [Pb, B] max over each local segment (empty segments: dtype minimum)."""
  return jax.ops.segment_max(values.T, seg_ids, num_segments=values.shape[1],
                             indices_are_sorted=True).T


@jax.jit
def _ranks_block(probes, probe_labels, g: GalleryBlocks):
  xs = (g.emb, g.valid, g.labels, g.seg_ids, g.last_seg, g.continues)

  def true_best(best, x):
    emb, valid, labels, _, _, _ = x
    s = _block_scores(probes, emb, valid)
    s = jnp.where(labels[None, :] == probe_labels[:, None], s, -jnp.inf)
    return jnp.maximum(best, s.max(axis=1)), None

  best, _ = jax.lax.scan(true_best, jnp.full(probes.shape[0], -jnp.inf), xs)

  def count(carry, x):
    total, open_flag = carry
    emb, valid, labels, seg_ids, last_seg, continues = x
    s = _block_scores(probes, emb, valid)
    beats = (s >= best[:, None]) & valid[None, :] & (labels[None, :] != probe_labels[:, None])
    seg_flag = _segment_max(beats.astype(jnp.int32), seg_ids) > 0  # [Pb, B] per identity
    counted_before = continues & open_flag & seg_flag[:, 0]
    total = total + seg_flag.sum(axis=1) - counted_before
    tail = seg_flag[:, last_seg] | (continues & open_flag & (last_seg == 0))
    return (total, tail), None

  init = (jnp.zeros(probes.shape[0], jnp.int32), jnp.zeros(probes.shape[0], bool))
  (total, _), _ = jax.lax.scan(count, init, xs)
  return jnp.where(jnp.isfinite(best), total, -1)


def _probe_blocks(probe_emb, probe_labels, block: int, normalize: bool):
  probe_emb = np.asarray(probe_emb, np.float32)
  probe_labels = np.asarray(probe_labels)
  if len(probe_emb) != len(probe_labels):
    raise ValueError(f'{len(probe_emb)} probe embeddings but {len(probe_labels)} labels')
  # Power-of-two buckets: probe sets of similar size share one compiled program.
  block = int(min(block, 1 << max(0, len(probe_emb) - 1).bit_length()))
  for start in range(0, len(probe_emb), block):
    emb = probe_emb[start:start + block]
    labels = probe_labels[start:start + block]
    n = len(emb)
    if n < block:  # pad the tail so every call has one shape (one compilation)
      emb = np.concatenate([emb, np.zeros((block - n, emb.shape[1]), np.float32)])
      labels = np.concatenate([labels, np.full(block - n, -1, labels.dtype)])
    emb = jnp.asarray(emb)
    if normalize:
      emb = normalize_lib.unit_norm(emb)
    yield emb, jnp.asarray(labels, jnp.int32), n


def rank_of_true_identity(probe_emb, probe_labels, gallery_emb, gallery_labels, *,
                          gallery_block: int = 4096, probe_block: int = 1024,
                          normalize: bool = True) -> np.ndarray:
  """0-based rank of each probe's true identity among gallery identities, int [P].

  For each probe: s* = best score over its identity's gallery images; rank = number of OTHER
  identities with any image scoring >= s* (pessimistic ties). -1 where the identity has no
  gallery image. Equal to `metrics.identity_ranks(cosine_similarity(...))`, in blocks.
  `gallery_emb` may be a prepared `GalleryBlocks` (then gallery_labels is ignored) to reuse one
  gallery for several probe sets.
  """
  g = gallery_emb if isinstance(gallery_emb, GalleryBlocks) else make_gallery_blocks(
      gallery_emb, gallery_labels, gallery_block, normalize)
  out = [np.asarray(_ranks_block(p, l, g))[:n]
         for p, l, n in _probe_blocks(probe_emb, probe_labels, probe_block, normalize)]
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)


@functools.partial(jax.jit, static_argnames=('k',))
def _topk_block(probes, probe_labels, g: GalleryBlocks, k: int):
  pb = probes.shape[0]

  def merge(scores, labels):
    # Pessimistic order: score descending, then the true identity after equal-scoring others.
    is_true = (labels == probe_labels[:, None]).astype(jnp.int32)
    neg, _, labels = jax.lax.sort((-scores, is_true, labels), dimension=1, num_keys=2)
    return -neg[:, :k], labels[:, :k]

  def step(carry, x):
    top_s, top_l, open_s, open_l = carry
    emb, valid, seg_ids, seg_labels, last_seg, continues = x
    seg_s = _segment_max(_block_scores(probes, emb, valid), seg_ids)  # empty: -inf
    col = jnp.arange(seg_s.shape[1])[None, :]
    # The previous block's open identity either continues here (pool it into segment 0) or is
    # complete (it becomes a candidate).
    seg_s = jnp.where((col == 0) & continues, jnp.maximum(seg_s, open_s[:, None]), seg_s)
    done_s = jnp.where(continues, -jnp.inf, open_s)
    # This block's last identity may continue into the next block: hold it back.
    new_open_s = seg_s[:, last_seg]
    new_open_l = seg_labels[last_seg]
    seg_s = jnp.where(col == last_seg, -jnp.inf, seg_s)
    # Only the k best OTHER identities of the block can make the list; the true identity (at
    # most one segment per block) rides along separately, so a cheap top_k prefilter never
    # decides a tie against it and the exact two-key sort only sees 2k + 2 columns.
    is_true = seg_labels[None, :] == probe_labels[:, None]
    true_s = jnp.max(jnp.where(is_true, seg_s, -jnp.inf), axis=1)
    true_l = jnp.where(jnp.isfinite(true_s), probe_labels, -1)
    other_s, other_i = jax.lax.top_k(jnp.where(is_true, -jnp.inf, seg_s), min(k, seg_s.shape[1]))
    cand_s = jnp.concatenate([top_s, done_s[:, None], other_s, true_s[:, None]], axis=1)
    cand_l = jnp.concatenate([top_l, jnp.broadcast_to(open_l, (pb, 1)), seg_labels[other_i],
                              true_l[:, None]], axis=1)
    top_s, top_l = merge(cand_s, cand_l)
    return (top_s, top_l, new_open_s, new_open_l), None

  init = (jnp.full((pb, k), -jnp.inf), jnp.full((pb, k), -1, jnp.int32),
          jnp.full(pb, -jnp.inf), jnp.int32(-1))
  xs = (g.emb, g.valid, g.seg_ids, g.seg_labels, g.last_seg, g.continues)
  (top_s, top_l, open_s, open_l), _ = jax.lax.scan(step, init, xs)
  return merge(jnp.concatenate([top_s, open_s[:, None]], axis=1),
               jnp.concatenate([top_l, jnp.broadcast_to(open_l, (pb, 1))], axis=1))


def topk_identities(probe_emb, gallery_emb, gallery_labels, k: int, *, probe_labels=None,
                    gallery_block: int = 4096, probe_block: int = 1024,
                    normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The k best gallery identities per probe: (scores float32 [P, k], labels int [P, k]).

  Each identity appears once, scored by its best image. With `probe_labels`, ties are ordered
  pessimistically (the true identity after equal-scoring others), which makes
  `metrics.cmc_from_topk` exact; equal-scoring other identities come in no defined order.
  k is capped at the number of gallery identities.
  """
  g = gallery_emb if isinstance(gallery_emb, GalleryBlocks) else make_gallery_blocks(
      gallery_emb, gallery_labels, gallery_block, normalize)
  k = int(min(k, g.num_identities))
  if probe_labels is None:
    probe_labels = np.full(len(probe_emb), -1)
  scores, labels = [], []
  for p, l, n in _probe_blocks(probe_emb, probe_labels, probe_block, normalize):
    s, lab = _topk_block(p, l, g, k)
    scores.append(np.asarray(s)[:n])
    labels.append(np.asarray(lab)[:n])
  if not scores:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return np.concatenate(scores), np.concatenate(labels).astype(np.int64)
