"""Procedural synthetic faces: a download-free identity source for demos and tests.

Each identity is a fixed set of attributes at three scales, drawn from an rng keyed by
(seed, identity). Coarse (head shape, skin tone, hair style and colour, glasses, beard) comes from
one of `_LOOKS` shared looks plus a small jitter, so many identities look alike at 7x6 or 16x16.
Medium (eye spacing, size and tilt, brows, nose, mouth, ears, iris colour) is each identity's own:
it blurs at 16x16 but leaves traces that a model which restores faces can use. Fine (moles,
freckles, skin blemishes, scars, wrinkles, eyelid, lip and hair-strand detail) is clear at
128x128 and gone at 16x16. Each image redraws only nuisances, from an rng keyed by (seed, identity,
image): small pose (shift, in-plane rotation, scale, slight yaw), lighting, exposure and white
balance, expression, gaze, clothing, background and sensor noise.

`tests/test_synthetic.py` measures the result with an LDA matcher fit on training identities (a
proxy for a face embedder trained at high resolution): rank-1 on held-out identities is ~0.97 at
128x128 and 32x32, ~0.7 at 16x16 and ~0.1 at 7x6, while LDA fit on 16x16 faces too finds ~0.94.

Shapes are drawn with analytic coverage from signed distances (antialiased without supersampling),
each only inside its bounding box, channels-first in float32, so one core renders a few hundred
faces per second.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ipsr_jax.data.sources.base import FaceSource, Record

# Anchor colours (RGB, 0..255): looks interpolate along the skin ramp and jitter the hair, frame
# and iris anchors.
_SKIN = np.array([[255, 224, 196], [241, 194, 167], [224, 172, 135], [198, 134, 96], [160, 104, 70],
                  [118, 72, 46], [84, 52, 34]], np.float32)
_HAIR = np.array([[22, 18, 16], [52, 36, 26], [96, 64, 40], [150, 110, 70], [214, 184, 128],
                  [150, 70, 36], [170, 170, 170], [236, 232, 226]], np.float32)
_HAIR_P = (.28, .24, .16, .08, .09, .06, .05, .04)
_IRIS = np.array([[70, 42, 24], [110, 70, 36], [60, 110, 160], [90, 130, 80], [120, 130, 140],
                  [140, 110, 50]], np.float32)
_IRIS_P = (.35, .2, .18, .1, .09, .08)
_FRAME = np.array([[20, 20, 20], [90, 60, 30], [160, 160, 170], [140, 30, 30], [30, 50, 120],
                   [200, 170, 80]], np.float32)
_SCLERA = np.array([240, 236, 228], np.float32)
_PUPIL = np.array([12, 10, 10], np.float32)
_GLINT = np.array([250, 250, 250], np.float32)
_LID = np.array([35, 25, 22], np.float32)
_MOUTH_INSIDE = np.array([60, 20, 25], np.float32)
_MOLE = np.array([40, 20, 10], np.float32)
_LENS = np.array([200, 220, 240], np.float32)
_ZOOM = 1.1          # face-to-frame scale: the head spans ~60-75% of the width, as in aligned crops


def _rgb(x) -> np.ndarray:
  return np.clip(np.asarray(x, np.float32), 0.0, 255.0)


def _mix(palette: np.ndarray, t: float) -> np.ndarray:
  """Colour at position t in [0, 1] along a palette ramp."""
  x = min(max(t, 0.0), 1.0) * (len(palette) - 1)
  i = min(int(x), len(palette) - 2)
  return palette[i] + (x - i) * (palette[i + 1] - palette[i])


@dataclasses.dataclass(frozen=True)
class Identity:
  """Everything about a face that stays the same across its images.

  Face units: the head is about 1 wide; u points right, v down, origin at the head's centre.
  """
  head_a: float                 # head half-width
  head_b: float                 # head half-height
  jaw: float                    # narrows the lower head (0 round .. 0.25 pointed chin)
  skin: np.ndarray
  cheek_alpha: float            # blush strength
  hair: np.ndarray
  hair_style: int               # 0 short, 1 long, 2 receding, 3 fringe, 4 side part, 5 bald
  hair_volume: float
  hairline: float               # v of the hairline at the centre
  hairline_tilt: float
  hairline_curve: float
  hair_freq: float              # strand texture frequency (per radian around the crown)
  hair_phase: float
  ear_r: tuple[float, float]
  ear_v: float
  eye_u: float                  # half the distance between the eye centres
  eye_v: float
  eye_w: float
  eye_h: float
  eye_tilt: float
  iris: np.ndarray
  iris_r: float
  lid: float                    # upper eyelid line thickness
  brow_gap: float
  brow_len: float
  brow_thick: float
  brow_angle: float
  brow_arch: float
  brow_color: np.ndarray
  nose_len: float               # v of the nose tip
  nose_w: float
  nostril: float
  mouth_v: float
  mouth_w: float
  lip_up: float
  lip_low: float
  lip_color: np.ndarray
  mouth_curve: float            # resting smile (+) or frown (-)
  beard: int                    # 0 none, 1 moustache, 2 full beard, 3 goatee
  beard_alpha: float
  glasses: int                  # 0 none, 1 round, 2 rectangular
  glasses_color: np.ndarray
  glasses_r: tuple[float, float]
  glasses_thick: float
  moles: np.ndarray             # [K, 4]: u, v, radius, darkness
  freckles: np.ndarray          # [K, 3]: u, v, radius
  freckle_alpha: float
  spots: np.ndarray             # [K, 3]: u, v, radius of faint skin blemishes all over the face
  spot_alpha: float
  dots: np.ndarray              # [K, 7]: u, v, radius, alpha, r, g, b of all the dots above
  scar: tuple[float, ...]       # (u0, v0, u1, v1, width) or () when none
  wrinkles: np.ndarray          # [K, 2]: v, bend of the forehead lines
  dimple: float                 # chin dimple strength, 0 for none


@dataclasses.dataclass(frozen=True)
class Nuisance:
  """What changes from one image of an identity to the next."""
  shift: tuple[float, float]
  angle: float
  scale: float
  yaw: float                    # -1..1: squashes the head and slides the features sideways
  light: tuple[float, float]    # direction (x, y) times strength
  ambient: float
  gains: np.ndarray             # white balance per channel
  smile: float
  mouth_open: float
  brow_raise: float
  eye_open: float
  gaze: tuple[float, float]
  bg: tuple[np.ndarray, np.ndarray]
  bg_dir: float
  shirt: np.ndarray
  noise: float
  noise_offset: tuple[int, int]


# Identities fall into this many coarse "looks" (head shape, skin tone, hair, glasses, beard), as
# many real people share a coarse appearance: what tells them apart is medium-scale geometry (eyes,
# brows, nose, mouth), which blurs at 16x16, and fine marks, which vanish there.
_LOOKS = 24


@functools.lru_cache(maxsize=256)
def _look(look: int, seed: int) -> dict:
  """The coarse attributes that the identities of one look share (before a small jitter)."""
  rng = np.random.default_rng([int(seed), int(look), 0xC0A5])

  def u(lo, hi):
    return float(rng.uniform(lo, hi))

  head_a = u(0.50, 0.62)
  tone = float(rng.beta(1.6, 2.2))                     # 0 fair .. 1 dark
  hair_kind = int(rng.choice(len(_HAIR), p=_HAIR_P))
  glasses = int(rng.choice(3, p=(.7, .15, .15)))
  return dict(
      head_a=head_a, head_b=head_a * u(1.22, 1.42), jaw=u(0.0, 0.25), tone=tone,
      skin=_mix(_SKIN, tone), hair_kind=hair_kind, hair=_HAIR[hair_kind] * u(0.85, 1.15),
      hair_style=int(rng.choice(6, p=(.3, .25, .1, .15, .15, .05))), hair_volume=u(0.03, 0.12),
      hairline=u(-0.62, -0.45), hairline_tilt=u(-0.15, 0.15), hairline_curve=u(0.0, 0.8),
      glasses=glasses, glasses_color=_FRAME[rng.integers(len(_FRAME))],
      glasses_r=(u(0.11, 0.15), u(0.08, 0.12)), glasses_thick=u(0.012, 0.03),
      beard=int(rng.choice(4, p=(.72, .1, .12, .06))), beard_alpha=u(0.45, 0.9))


@functools.lru_cache(maxsize=4096)
def identity_params(identity: int, seed: int = 0) -> Identity:
  """The fixed attributes of one identity; the same in any process and in any call order."""
  if identity < 0:
    raise ValueError(f'identity must be >= 0, got {identity}')
  rng = np.random.default_rng([int(seed), int(identity), 0x1D])

  def u(lo, hi):
    return float(rng.uniform(lo, hi))

  def us(lo, hi, n):
    return rng.uniform(lo, hi, n).astype(np.float32)

  look = _look(int(rng.integers(_LOOKS)), int(seed))
  head_a = look['head_a'] * u(0.98, 1.02)
  head_b = look['head_b'] * u(0.98, 1.02)
  tone = look['tone']
  skin = _rgb(look['skin'] * us(0.97, 1.03, 3))
  hair = _rgb(look['hair'] * us(0.95, 1.05, 3))
  # Fine cues correlate with coarse ones, as in real faces (dark skin: brown eyes; fair skin or red
  # hair: freckles), so a super-resolver can partly infer them from a low-resolution face.
  iris_p = (1 - tone) * np.array(_IRIS_P) + tone * np.array([.6, .4, 0, 0, 0, 0])
  freckle_p = 0.08 + 0.35 * (tone < 0.3) + 0.35 * (look['hair_kind'] in (4, 5))
  eye_w = u(0.085, 0.12)
  n_moles = int(rng.choice(5, p=(.15, .3, .3, .15, .1)))
  moles = np.stack([us(-0.4, 0.4, n_moles) * head_a / 0.56, us(-0.25, 0.55, n_moles),
                    us(0.010, 0.026, n_moles), us(0.35, 0.75, n_moles)], axis=1)
  n_freckles = int(rng.integers(15, 45)) if u(0, 1) < freckle_p else 0
  side = rng.choice(np.array([-1.0, 1.0], np.float32), n_freckles)
  freckles = np.stack([side * us(0.08, 0.36, n_freckles), us(0.0, 0.25, n_freckles),
                       us(0.006, 0.013, n_freckles)], axis=1)
  n_spots = int(rng.integers(6, 24))
  spots = np.stack([us(-0.75, 0.75, n_spots) * head_a, us(-0.45, 0.75, n_spots) * head_b,
                    us(0.008, 0.018, n_spots)], axis=1)
  scar = ()
  if u(0, 1) < 0.2:
    cu, cv, t, half = u(-0.35, 0.35), u(-0.35, 0.5), u(0, math.pi), u(0.06, 0.18)
    scar = (cu - half * math.cos(t), cv - half * math.sin(t), cu + half * math.cos(t),
            cv + half * math.sin(t), u(0.008, 0.016))
  n_wrinkles = int(rng.choice(4, p=(.5, .2, .2, .1)))
  wrinkles = np.stack([-0.38 + 0.055 * np.arange(n_wrinkles, dtype=np.float32)
                       + us(-0.01, 0.01, n_wrinkles), us(-0.2, 0.3, n_wrinkles)], axis=1)
  freckle_alpha, spot_alpha = u(0.25, 0.55), u(0.15, 0.35)
  dots = np.concatenate([
      np.concatenate([pts, np.full((len(pts), 1), alpha, np.float32),
                      np.broadcast_to(_rgb(color), (len(pts), 3))], axis=1)
      for pts, alpha, color in ((spots, spot_alpha, skin * (0.7, 0.6, 0.6)),
                                (freckles, freckle_alpha, skin * 0.62))]
      + [np.concatenate([moles, np.broadcast_to(_MOLE, (len(moles), 3))], axis=1)])
  return Identity(
      head_a=head_a, head_b=head_b, jaw=look['jaw'] + u(-0.02, 0.02), skin=skin,
      cheek_alpha=u(0.0, 0.25), hair=hair, hair_style=look['hair_style'],
      hair_volume=look['hair_volume'] * u(0.9, 1.1), hairline=look['hairline'] + u(-0.02, 0.02),
      hairline_tilt=look['hairline_tilt'], hairline_curve=look['hairline_curve'],
      hair_freq=u(25, 50), hair_phase=u(0, 2 * math.pi),
      ear_r=(u(0.06, 0.1), u(0.11, 0.17)), ear_v=u(-0.12, 0.0),
      eye_u=u(0.19, 0.27), eye_v=u(-0.16, -0.07), eye_w=eye_w, eye_h=eye_w * u(0.38, 0.6),
      eye_tilt=u(-0.15, 0.15),
      iris=_rgb(_IRIS[rng.choice(len(_IRIS), p=iris_p)] * us(0.85, 1.15, 3)),
      iris_r=u(0.032, 0.048), lid=u(0.006, 0.016),
      brow_gap=u(0.07, 0.13), brow_len=u(0.1, 0.15), brow_thick=u(0.015, 0.045),
      brow_angle=u(-0.25, 0.3), brow_arch=u(0.0, 1.5), brow_color=_rgb(hair * u(0.6, 1.0)),
      nose_len=u(0.12, 0.24), nose_w=u(0.06, 0.11), nostril=u(0.012, 0.025),
      mouth_v=u(0.32, 0.42), mouth_w=u(0.13, 0.22), lip_up=u(0.015, 0.035), lip_low=u(0.02, 0.05),
      lip_color=_rgb(skin * np.array([0.85, 0.6, 0.6], np.float32) * u(0.85, 1.05)),
      mouth_curve=u(-0.4, 0.4),
      beard=look['beard'], beard_alpha=look['beard_alpha'],
      glasses=look['glasses'], glasses_color=_rgb(look['glasses_color'] * us(0.9, 1.1, 3)),
      glasses_r=look['glasses_r'], glasses_thick=look['glasses_thick'],
      moles=moles, freckles=freckles, freckle_alpha=freckle_alpha,
      spots=spots, spot_alpha=spot_alpha, dots=dots.astype(np.float32), scar=scar,
      wrinkles=wrinkles,
      dimple=u(0.0, 0.3) * (u(0, 1) < 0.3),
  )


def _image_rng(seed: int, identity: int, image: int, stream: int) -> np.random.Generator:
  """A counter-based generator keyed by (seed, identity, image): 4x cheaper to make than
  default_rng's seed hashing, and the same stream on every platform."""
  for name, x in (('seed', seed), ('identity', identity), ('image', image)):
    if not 0 <= x < 2 ** 32:
      raise ValueError(f'{name} must be in [0, 2**32), got {x}')
  key = np.array([(seed << 32) | stream, (identity << 32) | image], np.uint64)
  return np.random.Generator(np.random.Philox(key=key))


def nuisance_params(identity: int, image: int, seed: int = 0, size: int = 128) -> Nuisance:
  """The per-image variation of one identity's image."""
  rng = _image_rng(seed, identity, image, 0x17)
  # One draw for all of them: per-call rng overhead would rival drawing the face.
  lo, hi = np.array(_NUISANCE_RANGES, np.float64).T
  x = (lo + (hi - lo) * rng.random(len(lo))).tolist()
  (sx, sy, angle, scale, yaw, light_t, light_s, ambient, gr, gg, gb, smile, mouth_open, brow_raise,
   eye_open, gaze_u, gaze_v, grey, b0r, b0g, b0b, b1r, b1g, b1b, bg_dir, shr, shg, shb, noise,
   noise_y, noise_x) = x
  bg0 = _rgb((grey + b0r, grey + b0g, grey + b0b))
  return Nuisance(
      shift=(sx, sy), angle=angle, scale=_ZOOM * scale, yaw=yaw,
      light=(light_s * math.cos(light_t), light_s * math.sin(light_t)), ambient=ambient,
      gains=np.array([gr, gg, gb], np.float32)[:, None, None],
      smile=smile, mouth_open=max(0.0, mouth_open), brow_raise=brow_raise, eye_open=eye_open,
      gaze=(gaze_u, gaze_v), bg=(bg0, _rgb(bg0 + (b1r, b1g, b1b))), bg_dir=bg_dir,
      shirt=_rgb((shr, shg, shb)), noise=noise,
      noise_offset=(int(noise_y * size) % size, int(noise_x * size) % size),
  )


# (low, high) of each nuisance, in the order nuisance_params unpacks them. Pose is small, as after
# face alignment; exposure and white balance vary more, blurring the coarse colour cues.
_NUISANCE_RANGES = (
    (-0.012, 0.012), (-0.012, 0.012),        # shift (x, y), under 1 px at 128x128
    (-0.025, 0.025), (0.988, 1.012), (-1, 1),  # in-plane rotation (rad), scale, yaw
    (0, 2 * math.pi), (0.05, 0.35),          # light direction and strength
    (0.82, 1.15),                            # exposure
    (0.9, 1.1), (0.9, 1.1), (0.9, 1.1),      # white balance gains
    (-0.3, 1.0), (-0.6, 1.0),                # smile, mouth open (< 0: closed)
    (-0.01, 0.03), (0.65, 1.0),              # brow raise, eyelid opening
    (-0.25, 0.25), (-0.15, 0.15),            # gaze
    (40, 220), (-45, 45), (-45, 45), (-45, 45),  # background: grey level, tint
    (-50, 50), (-50, 50), (-50, 50), (0, 2 * math.pi),  # background gradient: far colour, direction
    (20, 230), (20, 230), (20, 230),         # shirt
    (1.0, 4.0), (0, 1), (0, 1),              # sensor noise sigma, noise window offset
)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel centres in normalised image coordinates [-1, 1] (y down): a row [1, W], a column [H, 1].

  Every map over the image that is affine in (x, y) is then one broadcast add of a row and a column.
  """
  c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
  return c[None, :], c[:, None]


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
  """Fixed unit Gaussian noise [3, 2*size, 2*size]; each image reads a window at its own offset.

  Drawing fresh Gaussian noise costs more than drawing the whole face; a random window of a fixed
  field is just as unpredictable to a model that never sees the offset.
  """
  rng = np.random.default_rng(0x5EED)
  return rng.standard_normal((3, 2 * size, 2 * size), np.float32)


def _clip(x, lo, hi, out=None):
  # Two bare ufuncs: np.clip's Python wrapper costs more than the work on these small patches.
  return np.minimum(np.maximum(x, lo, out=out), hi, out=out)


def _cover(d: np.ndarray, inv_px: float) -> np.ndarray:
  """Analytic antialiased coverage of a shape with signed distance d (face units)."""
  a = 0.5 - d * inv_px
  return _clip(a, 0.0, 1.0, out=a)


def _ellipse_sd(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipse (Quilez's gradient estimate)."""
  ua, vb = u * (1.0 / a), v * (1.0 / b)
  k0 = np.sqrt(ua * ua + vb * vb)
  ua *= 1.0 / a
  vb *= 1.0 / b
  k1 = np.sqrt(ua * ua + vb * vb) + 1e-6
  return k0 * (k0 - 1.0) / k1


class _Canvas:
  """An image being drawn (float32 [3, H, W]) and the pose that maps face coordinates to pixels."""

  def __init__(self, size: int, n: Nuisance):
    self.size = size
    self.cos, self.sin = math.cos(n.angle), math.sin(n.angle)
    self.scale = n.scale
    self.squash = 1.0 - 0.03 * abs(n.yaw)
    self.shift = n.shift
    gx, gy = _pixel_grid(size)
    x = (gx - n.shift[0]) * (1.0 / n.scale)
    y = (gy - n.shift[1]) * (1.0 / n.scale)
    self.u = (self.cos / self.squash) * x + (self.sin / self.squash) * y
    self.v = self.cos * y - self.sin * x
    self.inv_px = size * n.scale / 2.0            # pixels per face unit
    # Background: a linear gradient between two colours in a random direction.
    bg0, dbg = n.bg[0][:, None, None], (n.bg[1] - n.bg[0])[:, None, None]
    self.img = ((bg0 + 0.5 * dbg) + (0.35 * math.cos(n.bg_dir)) * dbg * gx[None]) + (
        (0.35 * math.sin(n.bg_dir)) * dbg * gy[None])
    self.fg = np.zeros((size, size), np.float32)   # coverage of the person, for lighting

  def box(self, cu: float, cv: float, ru: float, rv: float):
    """Pixel slices covering the face-space box (cu, cv) +- (ru, rv), or None if off the image."""
    xu = cu * self.squash
    x = self.scale * (self.cos * xu - self.sin * cv) + self.shift[0]
    y = self.scale * (self.sin * xu + self.cos * cv) + self.shift[1]
    ex = self.scale * (abs(self.cos) * ru * self.squash + abs(self.sin) * rv)
    ey = self.scale * (abs(self.sin) * ru * self.squash + abs(self.cos) * rv)
    h = self.size / 2.0
    x0, x1 = max(int((x - ex + 1) * h) - 1, 0), min(int((x + ex + 1) * h) + 2, self.size)
    y0, y1 = max(int((y - ey + 1) * h) - 1, 0), min(int((y + ey + 1) * h) + 2, self.size)
    if x0 >= x1 or y0 >= y1:
      return None
    return slice(y0, y1), slice(x0, x1)

  def uv(self, sl, cu: float = 0.0, cv: float = 0.0):
    return self.u[sl] - cu, self.v[sl] - cv

  def pair(self, cu: float, cv: float, sep: float, ru: float, rv: float):
    """A left-right pair of shapes at cu +- sep: one box, mirrored coordinates.

    Returns (slices, m, v, side) with m the distance from the nearer shape's centre, positive
    outward (away from cu), and side = -1 / +1 on the left / right; None if off the image.
    """
    sl = self.box(cu, cv, sep + ru, rv)
    if sl is None:
      return None
    u, v = self.uv(sl, cu, cv)
    return sl, np.abs(u) - sep, v, np.where(u < 0, np.float32(-1), np.float32(1))

  def cover(self, d: np.ndarray) -> np.ndarray:
    return _cover(d, self.inv_px)

  def paint(self, sl, alpha: np.ndarray, color: np.ndarray, person: bool = False) -> None:
    """Composite `color` with coverage `alpha`; `person` marks shapes the lighting shades."""
    img = self.img[:, sl[0], sl[1]]
    delta = color[:, None, None] - img
    delta *= alpha
    img += delta
    if person:
      fg = self.fg[sl]
      fg += alpha * (1.0 - fg)

  def modulate(self, sl, alpha: np.ndarray, texture: np.ndarray) -> None:
    """Multiply the pixels by `texture` where alpha covers them (hair strands)."""
    self.img[:, sl[0], sl[1]] *= 1.0 + (texture - 1.0) * alpha


def _draw_ellipse(c: _Canvas, cu, cv, a, b, color, alpha=1.0, person=False):
  sl = c.box(cu, cv, a, b)
  if sl is not None:
    u, v = c.uv(sl, cu, cv)
    c.paint(sl, c.cover(_ellipse_sd(u, v, a, b)) * alpha, color, person)


def _blob(u, v, a, b):
  """A soft Gaussian spot (shading, blush)."""
  return np.exp(-((u * (1 / a)) ** 2 + (v * (1 / b)) ** 2))


def _curve_sd(u, v, half_len, thick, angle, bend, taper=0.0):
  """Distance to a stroke along t = bend * s^2 in a frame rotated by `angle`, tapered at its ends.

  With bend > 0 the ends hang lower than the middle (an arch).
  """
  ca, sa = math.cos(angle), math.sin(angle)
  s = ca * u + sa * v
  t = ca * v - sa * u
  ss = _clip(s, -half_len, half_len)
  off = np.abs(t - bend * ss * ss)
  slope = 2 * bend * ss
  w = 0.5 * thick * (1.0 - taper * (ss * (1.0 / half_len)) ** 2)
  return np.maximum(off / np.sqrt(1 + slope * slope) - w, np.abs(s) - half_len)


def _curve_box(half_len, thick, bend):
  r = half_len + thick
  return r, r + abs(bend) * half_len ** 2


def _draw_curve(c: _Canvas, cu, cv, half_len, thick, angle, bend, color, alpha=1.0, taper=0.0):
  sl = c.box(cu, cv, *_curve_box(half_len, thick, bend))
  if sl is not None:
    u, v = c.uv(sl, cu, cv)
    c.paint(sl, c.cover(_curve_sd(u, v, half_len, thick, angle, bend, taper)) * alpha, color)


def _draw_dots(c: _Canvas, dots: np.ndarray, du: float = 0.0):
  """Small discs [K, 7] (u, v, radius, alpha, r, g, b) in one vectorised pass, shifted by du."""
  if len(dots) == 0:
    return
  us, vs = (dots[:, 0] + du) * c.squash, dots[:, 1]
  h = c.size / 2.0
  xp = (c.scale * (c.cos * us - c.sin * vs) + c.shift[0] + 1) * h - 0.5   # pixel index coordinates
  yp = (c.scale * (c.sin * us + c.cos * vs) + c.shift[1] + 1) * h - 0.5
  rp = dots[:, 2] * (c.scale * h)
  p = int(2 * rp.max() + 3)
  off = np.arange(p) - (p - 1) // 2
  cx, cy = np.rint(xp).astype(np.int64), np.rint(yp).astype(np.int64)
  x0, y0 = max(int(cx.min()) - p, 0), max(int(cy.min()) - p, 0)
  x1, y1 = min(int(cx.max()) + p, c.size), min(int(cy.max()) + p, c.size)
  if x0 >= x1 or y0 >= y1:
    return
  ix = (cx - x0)[:, None, None] + off[None, None, :]        # [K, 1, p] and [K, p, 1] in the box
  iy = (cy - y0)[:, None, None] + off[None, :, None]
  dx, dy = ix + (x0 - xp[:, None, None]), iy + (y0 - yp[:, None, None])
  a = _clip(0.5 + rp[:, None, None] - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
  a *= dots[:, 3, None, None]
  ww, hh = x1 - x0, y1 - y0
  a *= (ix >= 0) & (ix < ww)
  a *= (iy >= 0) & (iy < hh)
  flat = (np.clip(iy, 0, hh - 1) * ww + np.clip(ix, 0, ww - 1)).ravel()
  # Premultiplied colour accumulated with bincount (far faster than a per-dot loop); where dots
  # overlap, rare, their coverage adds up to at most 1.
  a = a.reshape(len(dots), -1)
  coverage = np.bincount(flat, a.ravel(), hh * ww)
  premul = np.stack([np.bincount(flat, (a * dots[:, 4 + k, None]).ravel(), hh * ww)
                     for k in range(3)])
  scale = 1.0 / np.maximum(coverage, 1.0)
  coverage *= scale
  premul *= scale
  img = c.img[:, y0:y1, x0:x1]
  img *= (1.0 - coverage).reshape(hh, ww).astype(np.float32)
  img += premul.reshape(3, hh, ww).astype(np.float32)


def _head_sd(idp: Identity, u, v):
  """The head outline: an ellipse whose lower half narrows toward the chin."""
  narrow = 1.0 - idp.jaw * _clip(v * (1.0 / idp.head_b), 0.0, 1.0) ** 2
  return _ellipse_sd(u / narrow, v, idp.head_a, idp.head_b)


def _hairline(idp: Identity, u):
  """The v of the hair's lower edge at each u: above it, hair covers the forehead."""
  h = idp.hairline + idp.hairline_tilt * u + idp.hairline_curve * u * u
  if idp.hair_style == 2:    # horseshoe: a bald crown, hair only at the sides and back
    h = np.where(np.abs(u) < 0.6 * idp.head_a, -2.0, h + 0.1)
  elif idp.hair_style == 3:  # fringe: a ragged cut low on the forehead
    h = np.maximum(h, idp.hairline + 0.17 + 0.02 * np.cos(u * 40 + idp.hair_phase))
  elif idp.hair_style == 4:  # side part: a fringe sweeping down from a part off-centre
    sweep = 0.3 if idp.hairline_tilt > 0 else -0.3
    h = np.maximum(h, idp.hairline + _clip(0.08 + sweep * u, 0.0, 0.16))
  # Sideburns: near the ears the hair comes down the sides of the head.
  side = _clip((np.abs(u) - 0.8 * idp.head_a) * (1 / (0.12 * idp.head_a)), 0.0, 1.0)
  return h + side * (0.5 - h)


def _hair_texture(idp: Identity, u, v, strength=0.18):
  """Strand-like stripes fanning out from above the crown: fine, identity-specific detail."""
  # theta ~ the angle seen from a point above the crown (no arctan); a triangle wave (no sine).
  x = u / (v + (idp.head_b + 0.35)) * (idp.hair_freq / (2 * math.pi)) + idp.hair_phase
  x -= np.floor(x)
  x -= 0.5
  return (1.0 - strength) + (4.0 * strength) * np.abs(x)


def _draw_back_hair(c: _Canvas, idp: Identity):
  if idp.hair_style != 1:
    return
  a, b, cv = idp.head_a + idp.hair_volume + 0.08, idp.head_b + 0.25, 0.2
  sl = c.box(0, cv, a, b)
  if sl is None:
    return
  u, v = c.uv(sl)
  alpha = c.cover(np.maximum(_ellipse_sd(u, v - cv, a, b), v - 0.95))
  c.paint(sl, alpha, idp.hair * 0.8, person=True)
  c.modulate(sl, alpha, _hair_texture(idp, u, v))


def _draw_body(c: _Canvas, idp: Identity, n: Nuisance):
  # Neck: a column under the head; shirt: a wide ellipse at the bottom of the frame.
  neck_w, neck_v = idp.head_a * 0.55, idp.head_b + 0.1
  sl = c.box(0, neck_v, neck_w, 0.5)
  if sl is not None:
    u, v = c.uv(sl)
    c.paint(sl, c.cover(np.maximum(np.abs(u) - neck_w, np.abs(v - neck_v) - 0.5)), idp.skin * 0.82,
            person=True)
  _draw_ellipse(c, 0, idp.head_b + 0.62, idp.head_a * 2.0, 0.45, n.shirt, person=True)


def _draw_ears(c: _Canvas, idp: Identity, du: float):
  ra, rb = idp.ear_r
  for s in (-1.0, 1.0):
    cu = s * idp.head_a * 0.98 + du * 0.5
    sl = c.box(cu, idp.ear_v, ra, rb)
    if sl is None:
      continue
    u, v = c.uv(sl, cu, idp.ear_v)
    c.paint(sl, c.cover(_ellipse_sd(u, v, ra, rb)), idp.skin * 0.92, person=True)
    inner = _ellipse_sd(u - s * ra * 0.15, v, ra * 0.55, rb * 0.65)
    c.paint(sl, c.cover(inner) * 0.6, idp.skin * 0.75)


def _draw_head(c: _Canvas, idp: Identity):
  sl = c.box(0, 0, idp.head_a, idp.head_b)
  if sl is not None:
    u, v = c.uv(sl)
    c.paint(sl, c.cover(_head_sd(idp, u, v)), idp.skin, person=True)


def _draw_front_hair(c: _Canvas, idp: Identity):
  if idp.hair_style == 5:
    return
  a = idp.head_a + idp.hair_volume
  b = idp.head_b + idp.hair_volume * 0.8
  cv = -idp.hair_volume * 0.6
  sl = c.box(0, cv, a, b)
  if sl is None:
    return
  u, v = c.uv(sl)
  below_line = v - _hairline(idp, u)
  if idp.hair_style != 2:  # around the head the hair shows wherever it has volume
    below_line = np.minimum(below_line, -_head_sd(idp, u, v))
  d = np.maximum(_ellipse_sd(u, v - cv, a, b), below_line)
  if idp.hair_style != 1:  # short styles stop above the jaw
    d = np.maximum(d, v - 0.05)
  alpha = c.cover(d)
  c.paint(sl, alpha, idp.hair, person=True)
  c.modulate(sl, alpha, _hair_texture(idp, u, v))


def _draw_eyes(c: _Canvas, idp: Identity, n: Nuisance, du: float):
  p = c.pair(du, idp.eye_v, idp.eye_u, idp.eye_w + 0.03, idp.eye_h + 0.05)
  if p is None:
    return
  sl, m, v, side = p
  h, r = idp.eye_h * n.eye_open, idp.iris_r
  v = v + idp.eye_tilt * m                      # tilt: outer corners up when eye_tilt > 0
  # Almond: the upper lid arches higher than the lower one.
  d_eye = _ellipse_sd(m, v, idp.eye_w, np.where(v < 0, np.float32(h), np.float32(h * 0.7)))
  eye = c.cover(d_eye)
  c.paint(sl, c.cover(d_eye - 0.012) * 0.35, idp.skin * 0.7)   # socket shadow
  c.paint(sl, eye, _SCLERA)
  iu = m - side * (n.gaze[0] * idp.eye_w * 0.5)  # both eyes look the same way
  iv = v - n.gaze[1] * h * 0.5
  d_iris = np.sqrt(iu * iu + iv * iv)
  c.paint(sl, c.cover(d_iris - r) * eye, idp.iris)
  c.paint(sl, c.cover(np.abs(d_iris - r * 0.92) - r * 0.1) * eye * 0.6, idp.iris * 0.4)  # limbus
  c.paint(sl, c.cover(d_iris - r * 0.42) * eye, _PUPIL)
  gu, gv = iu + side * (0.35 * r), iv + 0.35 * r  # glint: up and to the subject's right
  c.paint(sl, c.cover(np.sqrt(gu * gu + gv * gv) - r * 0.18) * eye * 0.8, _GLINT)
  c.paint(sl, c.cover(np.maximum(np.abs(d_eye) - idp.lid * 0.5, v)), _LID)  # upper lid line
  crease = np.abs(_ellipse_sd(m, v + 0.012, idp.eye_w * 0.95, h * 1.3 + 0.02)) - 0.003
  c.paint(sl, c.cover(np.maximum(crease, v + 0.01)) * 0.35, idp.skin * 0.6)


def _draw_brows(c: _Canvas, idp: Identity, n: Nuisance, du: float):
  ru, rv = _curve_box(idp.brow_len, idp.brow_thick, idp.brow_arch)
  cv = idp.eye_v - idp.eye_h - idp.brow_gap - n.brow_raise
  p = c.pair(du, cv, idp.eye_u + 0.01, ru, rv + ru * 0.3)
  if p is not None:
    sl, m, v, _ = p
    d = _curve_sd(m, v, idp.brow_len, idp.brow_thick, -idp.brow_angle, idp.brow_arch, 0.6)
    c.paint(sl, c.cover(d) * 0.9, idp.brow_color)


def _draw_nose(c: _Canvas, idp: Identity, n: Nuisance, du: float):
  tip_v = idp.nose_len
  ndu = du * 1.6   # the nose stands out of the face, so it slides further under yaw
  side = -1.0 if n.light[0] > 0 else 1.0     # the bridge's shaded side faces away from the light
  _draw_curve(c, ndu + side * idp.nose_w * 0.55, (idp.eye_v + tip_v) / 2, (tip_v - idp.eye_v) / 2,
              0.02, math.pi / 2, 0.0, idp.skin * 0.72, 0.45, taper=0.8)
  # Tip, nostrils and alar creases share one box.
  sl = c.box(ndu, tip_v, idp.nose_w * 1.8, 0.06)
  if sl is None:
    return
  u, v = c.uv(sl, ndu, tip_v)
  c.paint(sl, _blob(u, v - 0.015, idp.nose_w * 0.9, 0.03) * 0.4, idp.skin * 0.7)
  c.paint(sl, _blob(u, v + 0.02, idp.nose_w * 0.45, 0.03) * 0.5, _rgb(idp.skin * 1.12))
  m = np.abs(u)
  nostrils = _ellipse_sd(m - idp.nose_w * 0.45, v - 0.01, idp.nostril * 1.3, idp.nostril * 0.8)
  c.paint(sl, c.cover(nostrils) * 0.85, idp.skin * 0.35)
  ala = _curve_sd(m - idp.nose_w * 0.75, v + 0.005, 0.03, 0.007, math.pi / 2 + 0.5, 4.0)
  c.paint(sl, c.cover(ala) * 0.5, idp.skin * 0.6)


def _draw_mouth(c: _Canvas, idp: Identity, n: Nuisance, du: float):
  cu, cv = du * 1.2, idp.mouth_v
  w = idp.mouth_w * (1.0 + 0.12 * n.smile)
  gap = 0.045 * n.mouth_open
  sl = c.box(cu, cv, w + 0.02, idp.lip_up + idp.lip_low + gap + 0.05)
  if sl is None:
    return
  u, v = c.uv(sl, cu, cv)
  r = _clip(u * (1.0 / w), -1.0, 1.0)
  env = np.sqrt(1.0 - r * r)
  # The mouth line: corners up with a smile; the resting curve is part of the identity.
  line = (-0.05 * (0.35 * n.smile + idp.mouth_curve)) * r * r
  out = np.abs(u) - w
  top, bottom = line - (gap * 0.3) * env, line + (gap * 0.7) * env
  bow = 1.0 - 0.15 * np.cos(r * (2 * math.pi))       # Cupid's bow
  upper = np.maximum(np.maximum(top - idp.lip_up * env * bow - v, v - top), out)
  lower = np.maximum(np.maximum(bottom - v, v - bottom - idp.lip_low * env), out)
  inner = np.maximum(np.maximum(top - v, v - bottom), out)
  if gap > 0:
    c.paint(sl, c.cover(inner), _MOUTH_INSIDE)
  c.paint(sl, c.cover(upper), idp.lip_color * 0.92)
  c.paint(sl, c.cover(lower), idp.lip_color)
  parting = np.maximum(np.abs(v - line) - 0.004 - gap * env * 0.5, out)
  c.paint(sl, c.cover(parting) * 0.8, idp.lip_color * 0.45)
  c.paint(sl, _blob(u, v - (idp.lip_low + gap + 0.02), w * 0.5, 0.015) * 0.35, idp.skin * 0.7)


def _draw_beard(c: _Canvas, idp: Identity, du: float):
  if idp.beard == 0:
    return
  sl = c.box(0, idp.head_b * 0.5, idp.head_a, idp.head_b * 0.55)
  if sl is None:
    return
  u, v = c.uv(sl)
  head = _head_sd(idp, u, v)
  mu, mv = u - du * 1.2, v - idp.mouth_v
  mouth = _ellipse_sd(mu, mv, idp.mouth_w + 0.01, idp.lip_up + 0.02)
  if idp.beard == 1:    # moustache: a band above the upper lip
    d = np.maximum(np.maximum(np.abs(mv + idp.lip_up + 0.03) - 0.025,
                              np.abs(mu) - idp.mouth_w - 0.02), head)
  elif idp.beard == 2:  # full beard: the lower face below the cheeks, except the lips
    cheek_line = idp.nose_len + 0.06 + 0.3 * (1.0 - np.abs(u) * (1.0 / idp.head_a))
    d = np.maximum(np.maximum(head, cheek_line - v), -mouth)
  else:                 # goatee: chin and around the mouth
    d = np.maximum(np.maximum(_ellipse_sd(mu, mv - 0.1, idp.mouth_w * 0.55, 0.15), head), -mouth)
  alpha = c.cover(d) * idp.beard_alpha
  c.paint(sl, alpha, idp.hair * 0.9)
  c.modulate(sl, alpha, _hair_texture(idp, u * 1.5, v, 0.2))


def _draw_glasses(c: _Canvas, idp: Identity, du: float):
  if idp.glasses == 0:
    return
  ra, rb = idp.glasses_r
  t = idp.glasses_thick
  cv = idp.eye_v + 0.01
  p = c.pair(du, cv, idp.eye_u, ra + t + 0.18, rb + t)
  if p is None:
    return
  sl, m, v, _ = p
  if idp.glasses == 1:
    d = _ellipse_sd(m, v, ra, rb)
  else:  # a rectangle with rounded corners
    qu, qv = np.abs(m) - (ra - 0.03), np.abs(v) - (rb - 0.03)
    d = (np.sqrt(np.maximum(qu, 0.0) ** 2 + np.maximum(qv, 0.0) ** 2)
         + np.minimum(np.maximum(qu, qv), 0.0) - 0.03)
  c.paint(sl, c.cover(d) * 0.12, _LENS)
  frame = np.abs(d) - t * 0.5
  temple = _curve_sd(m - (ra + 0.08), v + rb * 0.3, 0.09, t * 0.8, 0.0, 0.0)  # arm toward the ear
  bridge = _curve_sd(m + idp.eye_u, v + 0.02, max(idp.eye_u - ra, 0.02) + 0.01, t * 0.8, 0.0, 1.5)
  c.paint(sl, c.cover(np.minimum(np.minimum(frame, temple), bridge)), idp.glasses_color)


def _draw_marks(c: _Canvas, idp: Identity, du: float):
  """Blush, forehead wrinkles, chin dimple, blemishes, freckles, a scar and moles."""
  p = c.pair(du, 0.12, idp.head_a * 0.55, 0.24, 0.16)
  if p is not None and idp.cheek_alpha > 0.02:
    sl, m, v, _ = p
    c.paint(sl, _blob(m, v, 0.12, 0.08) * idp.cheek_alpha, _rgb(idp.skin * (1.0, 0.6, 0.6)))
  for wv, bend in idp.wrinkles.tolist():
    _draw_curve(c, du * 0.5, wv, idp.head_a * 0.45, 0.008, 0.0, bend, idp.skin * 0.75, 0.5, 0.7)
  if idp.dimple > 0:
    _draw_curve(c, du, idp.head_b * 0.85, 0.02, 0.01, math.pi / 2, 0.0, idp.skin * 0.7, idp.dimple)
  _draw_dots(c, idp.dots, du)
  if idp.scar:
    u0, v0, u1, v1, w = idp.scar
    _draw_curve(c, (u0 + u1) / 2 + du, (v0 + v1) / 2, math.hypot(u1 - u0, v1 - v0) / 2, w,
                math.atan2(v1 - v0, u1 - u0), 0.0, _rgb(idp.skin * (1.1, 0.85, 0.85)), 0.8, 0.9)


def _apply_light(c: _Canvas, idp: Identity, n: Nuisance):
  """Shade the person as a lit ellipsoid; the background keeps only the camera's white balance."""
  nu = _clip(c.u * (1.0 / (idp.head_a * 1.2)), -1.0, 1.0)
  nv = _clip(c.v * (1.0 / (idp.head_b * 1.2)), -1.0, 1.0)
  shade = (n.ambient - 1.0) + n.light[0] * nu + n.light[1] * nv
  shade *= c.fg
  shade += 1.0
  c.img *= shade
  c.img *= n.gains


def render_face(identity: int, image: int, *, seed: int = 0, size: int = 128) -> np.ndarray:
  """One synthetic face: uint8 [size, size, 3], identical for the same (seed, identity, image)."""
  identity, image, seed, size = int(identity), int(image), int(seed), int(size)
  if image < 0:
    raise ValueError(f'image must be >= 0, got {image}')
  idp = identity_params(identity, seed)
  n = nuisance_params(identity, image, seed, size)
  c = _Canvas(size, n)
  du = 0.015 * n.yaw          # under yaw the features slide sideways; the outline only narrows
  _draw_back_hair(c, idp)
  _draw_body(c, idp, n)
  _draw_ears(c, idp, du)
  _draw_head(c, idp)
  _draw_marks(c, idp, du)
  _draw_beard(c, idp, du)
  _draw_front_hair(c, idp)
  _draw_eyes(c, idp, n, du)
  _draw_brows(c, idp, n, du)
  _draw_nose(c, idp, n, du)
  _draw_mouth(c, idp, n, du)
  _draw_glasses(c, idp, du)
  _apply_light(c, idp, n)
  oy, ox = n.noise_offset
  img = c.img
  img += _noise_bank(size)[:, oy:oy + size, ox:ox + size] * np.float32(n.noise)
  _clip(np.rint(img, out=img), 0.0, 255.0, out=img)
  out = np.empty((size, size, 3), np.uint8)
  np.copyto(out.transpose(2, 0, 1), img, casting='unsafe')
  return out


class SyntheticFaces(FaceSource):
  """`num_identities` procedural identities x `images_per_identity` images, rendered on demand.

  Identities are `identity_offset .. identity_offset + num_identities - 1`: two sources with
  non-overlapping ranges (e.g. offset 0 for training, 100000 for evaluation) share no identity.
  """

  name = 'synthetic'

  def __init__(self, num_identities: int, images_per_identity: int, *, seed: int = 0,
               identity_offset: int = 0, image_size: int = 128, max_bad_fraction: float = 0.0):
    if num_identities < 1 or images_per_identity < 1:
      raise ValueError(
          f'need >= 1 identity and image, got {num_identities} x {images_per_identity}')
    if identity_offset < 0:
      raise ValueError(f'identity_offset must be >= 0, got {identity_offset}')
    self.seed = int(seed)
    self.identity_offset = int(identity_offset)
    self.images_per_identity = int(images_per_identity)
    self.image_size = int(image_size)
    records = [Record(path='', label=i, identity=f'synth-{self.identity_offset + i:06d}',
                      meta={'image': j})
               for i in range(num_identities) for j in range(images_per_identity)]
    super().__init__(records, max_bad_fraction)

  def load_image(self, record: Record) -> np.ndarray:
    return render_face(self.identity_offset + record.label, record.meta['image'], seed=self.seed,
                       size=self.image_size)

  def image_key(self, record: Record) -> str:
    # No file: the rendering's inputs name the image.
    return (f'synthetic:seed={self.seed}:size={self.image_size}:'
            f'{self.identity_offset + record.label}/{record.meta["image"]}')

  def __repr__(self) -> str:
    return (f'SyntheticFaces(seed={self.seed}, identity_offset={self.identity_offset}, '
            f'num_identities={self.num_identities}, '
            f'images_per_identity={self.images_per_identity}, image_size={self.image_size})')
