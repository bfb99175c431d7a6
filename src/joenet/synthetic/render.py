# long: one scene, drawn by small private functions that each place one kind of object; split
# up, their shared geometry helpers would need a third module for no reader's benefit.
"""Render the synthetic FIB-SEM-like scene: raw, nuclei and mitochondria, all in memory.

Scene, in isotropic voxels: polygonal cells (a warped 3D Voronoi tessellation whose faces are dark
membranes), a few large nuclei (ellipsoids with granular chromatin, a nucleolus and a dark
envelope), many mitochondria (capsules with a dark outer membrane and bright cristae stripes
across the long axis) and unlabelled dark distractors (lipid-droplet-like blobs and vesicles), so a
model has to learn shape and texture rather than "dark means mito". Everything is 3D, so objects
continue across z and a z split of the volume is meaningful.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

Shape3 = tuple[int, int, int]
ObjectBox = tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]]

# Voxels between a nucleus and its neighbours' (and the cell faces around it): room for the
# envelope and a band of cytoplasm, as in HeLa FIB-SEM, so no face cuts a nucleus.
NUCLEUS_CLEARANCE = 30
# Placement attempts: objects are drawn until a volume fraction is reached; a crowded volume
# rejects most draws, and these caps end the loop there (more tries add nothing measurable).
NUCLEUS_ATTEMPTS = 60
MITO_ATTEMPTS = 4000
# Voronoi seeds drawn per seed kept (most are rejected for crowding a nucleus).
SEED_DRAWS_PER_CELL = 20


def render_synthetic_volume(shape: Shape3, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the synthetic volume in memory.

    Args:
        shape: Volume shape ``(z, y, x)`` in voxels.
        seed: Seed of the generator.

    Returns:
        ``(raw, nuclei, mito)``, uint8 arrays of ``shape``; the labels are 0/1 and disjoint.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    # Object sizes are in voxels, capped so that small test volumes still hold a whole nucleus.
    extent = min(shape[1:])

    nuclei = np.zeros(shape, dtype=bool)
    nuclei_geo = _place_nuclei(rng, nuclei, r_max=min(110.0, 0.3 * extent))
    boundary = _membrane_distance(rng, shape, nuclei_geo, spacing=min(100.0, 0.5 * extent))

    img = 162.0 + 16.0 * _fractal_noise(rng, shape, (32, 8), (1.0, 0.7))
    speckle = _fractal_noise(rng, shape, (2,), (1.0,))
    img -= 60.0 * np.clip(speckle - 1.0, 0.0, 1.0)  # ribosome-like dark granules
    img -= 110.0 * np.exp(-((boundary / 1.8) ** 2))  # membranes: thin dark lines along cell faces
    del speckle

    mito = np.zeros(shape, dtype=bool)
    occupied = nuclei.copy()
    _place_mito(rng, img, mito, occupied, boundary, max_half_length=0.25 * extent)
    _place_distractors(rng, img, occupied, boundary)
    for geo in nuclei_geo:
        _render_nucleus(rng, img, geo)
    del boundary, occupied

    img = ndimage.gaussian_filter(img, sigma=(0.8, 1.0, 1.0), truncate=3.0)
    # Shot-noise-like: the noise grows with the signal, as for counted backscattered electrons.
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.sqrt(np.maximum(img, 1.0))
    img += noise
    del noise
    raw = np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8)
    return raw, nuclei.view(np.uint8), mito.view(np.uint8)


def _place_nuclei(rng: np.random.Generator, nuclei: np.ndarray, r_max: float) -> list[dict]:
    """Add random, slightly irregular ellipsoids until a target fraction; return their geometry."""
    shape = nuclei.shape
    target = rng.uniform(0.12, 0.2) * nuclei.size
    count = 0
    geos: list[dict] = []
    for _ in range(NUCLEUS_ATTEMPTS):
        if count >= target:
            break
        radii = r_max * rng.uniform(0.7, 1.0) * rng.uniform(0.7, 1.0, size=3)
        center = rng.uniform(0.0, 1.0, size=3) * shape
        center[0] = rng.uniform(-0.3 * radii.max(), shape[0] + 0.3 * radii.max())
        # Each nucleus seeds its own Voronoi cell; this gap keeps cell faces out of the nucleus.
        if any(
            np.linalg.norm(center - g["center"])
            < 2 * max(radii.max(), g["radii"].max()) + NUCLEUS_CLEARANCE
            for g in geos
        ):
            continue
        rot = _random_rotation(rng)
        half = np.sqrt((rot**2 * radii[:, None] ** 2).sum(axis=0)) * 1.1
        box = _box(center, half, shape)
        if box is None:
            continue
        sl, (dz, dy, dx) = box
        local = [(rot[k, 0] * dz + rot[k, 1] * dy + rot[k, 2] * dx) / radii[k] for k in range(3)]
        q = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        # A smooth radial wobble makes the outline irregular instead of a perfect ellipse.
        q *= 1.0 + 0.05 * _fractal_noise(rng, q.shape, (24,), (1.0,))
        inside = q <= 1.0
        added = int((inside & ~nuclei[sl]).sum())
        if count and count + added > 0.25 * nuclei.size:
            continue  # one more large nucleus would overshoot the realistic range
        count += added
        nuclei[sl] |= inside
        geos.append({"center": center, "radii": radii, "box": box, "q": q})
    return geos


def _membrane_distance(
    rng: np.random.Generator, shape: Shape3, nuclei_geo: list[dict], spacing: float
) -> np.ndarray:
    """Distance (voxels) to the nearest face of a warped 3D Voronoi tessellation."""
    lo, hi = np.full(3, -spacing), np.array(shape) + spacing
    centers = np.array([g["center"] for g in nuclei_geo]).reshape(-1, 3)
    clearance = np.array([2 * g["radii"].max() + NUCLEUS_CLEARANCE for g in nuclei_geo])
    n_target = int(np.prod(hi - lo) / spacing**3 * 1.5)
    points = np.empty((0, 3))
    for candidate in rng.uniform(lo, hi, size=(SEED_DRAWS_PER_CELL * n_target, 3)):
        if len(points) >= n_target:
            break
        if (np.linalg.norm(centers - candidate, axis=1) < clearance).any():
            continue
        if (np.linalg.norm(points - candidate, axis=1) < 0.6 * spacing).any():
            continue
        points = np.vstack([points, candidate])
    points = np.vstack([centers, points])
    if len(points) < 2:
        return np.full(shape, np.inf, dtype=np.float32)

    # The two nearest seeds are found on a coarse grid only; the distance to their bisector plane
    # is linear, so evaluating it exactly at full resolution gives sharp, unbroken membranes.
    factor = (2, 4, 4)
    coarse = [np.arange(0, s, f) + (f - 1) / 2 for s, f in zip(shape, factor, strict=True)]
    grid = np.stack(np.meshgrid(*coarse, indexing="ij"), axis=-1).reshape(-1, 3)
    _, nearest = cKDTree(points).query(grid, k=2)
    a, b = nearest.min(axis=1), nearest.max(axis=1)
    pairs, pair_id = np.unique(a * len(points) + b, return_inverse=True)
    pa, pb = points[pairs // len(points)], points[pairs % len(points)]
    normal = (pb - pa) / np.linalg.norm(pb - pa, axis=1, keepdims=True)
    plane = np.concatenate([normal, -(normal * (pa + pb) / 2).sum(axis=1, keepdims=True)], axis=1)
    plane = plane.astype(np.float32)
    pair_id = pair_id.reshape([len(c) for c in coarse])
    for axis, f in enumerate(factor):
        pair_id = np.repeat(pair_id, f, axis=axis)
    pair_id = pair_id[: shape[0], : shape[1], : shape[2]]

    z, y, x = (np.arange(s, dtype=np.float32) for s in shape)
    dist = z[:, None, None] * plane[pair_id, 0]
    dist += y[None, :, None] * plane[pair_id, 1]
    dist += x[None, None, :] * plane[pair_id, 2]
    dist += plane[pair_id, 3]
    # Moving each face along its normal by a smooth field bends the flat faces into curved ones.
    dist += 9.0 * _fractal_noise(rng, shape, (40,), (1.0,))
    return np.abs(dist, out=dist)


def _place_mito(
    rng: np.random.Generator,
    img: np.ndarray,
    mito: np.ndarray,
    occupied: np.ndarray,
    boundary: np.ndarray,
    max_half_length: float,
) -> None:
    """Add capsule-shaped mitochondria inside cells until a target fraction is reached."""
    shape = np.array(img.shape)
    target = rng.uniform(0.04, 0.07) * img.size
    count = 0
    for _ in range(MITO_ATTEMPTS):
        if count >= target:
            break
        radius = rng.uniform(6.5, 12.0)
        half_len = min(radius * rng.uniform(0.3, 4.5), max_half_length)
        axis = _random_unit(rng)
        axis[0] *= rng.uniform(0.2, 1.0)  # favour lying in-plane, so long profiles are common
        axis /= np.linalg.norm(axis)
        center = rng.uniform(0, 1, size=3) * shape
        # Cheap point checks first: most candidates land in a nucleus or on a membrane.
        ends = np.clip(
            np.rint([center, center - half_len * axis, center + half_len * axis]), 0, shape - 1
        ).astype(int)
        if occupied[tuple(ends.T)].any() or (boundary[tuple(ends.T)] < radius).any():
            continue
        box = _box(center, np.abs(axis) * half_len + radius + 1, shape)
        if box is None:
            continue
        sl, offsets = box
        depth, along = _capsule_depth(offsets, axis, half_len, radius)
        # Keep a gap to nuclei and other objects and never cross a cell membrane.
        if (occupied[sl] & (depth > -3)).any() or (boundary[sl][depth > -1] < 3).any():
            continue
        inside = depth >= 0
        # Cristae: bright bands across the long axis, slightly wavy, inside the outer membrane.
        wobble = 1.5 * _fractal_noise(rng, depth.shape, (6,), (1.0,)) if depth.size > 0 else 0
        phase = 2 * np.pi * along / rng.uniform(8.0, 12.0) + wobble + rng.uniform(0, 2 * np.pi)
        cristae = np.clip((np.cos(phase) - 0.2) * 2.0, 0.0, 1.0)
        value = 92.0 + 65.0 * cristae * np.clip((depth - 2.5) / 1.5, 0.0, 1.0)
        value = np.where(depth < 2.3, 50.0, value)  # outer membrane
        img[sl][inside] = value[inside]
        mito[sl] |= inside
        occupied[sl] |= inside
        count += int(inside.sum())


def _place_distractors(
    rng: np.random.Generator, img: np.ndarray, occupied: np.ndarray, boundary: np.ndarray
) -> None:
    """Add unlabelled dark look-alikes: lipid-droplet-like blobs, ER-like tubules, vesicles."""
    shape = np.array(img.shape)
    # (radius range, half-length range in radii, voxel fraction, rim value, lumen value range)
    kinds = (
        ((4.0, 10.0), (0.0, 0.3), 0.008, 65.0, (80.0, 110.0)),  # as dark as mito matrix
        ((1.5, 2.5), (2.0, 8.0), 0.004, 85.0, (85.0, 95.0)),  # thin and dark, but no cristae
        ((2.0, 4.5), (0.0, 0.0), 0.004, 70.0, (170.0, 190.0)),  # clear vesicles, dark rim
    )
    for (r_lo, r_hi), (l_lo, l_hi), fraction, rim, (v_lo, v_hi) in kinds:
        r_mean, l_mean = (r_lo + r_hi) / 2, (l_lo + l_hi) / 2
        volume = np.pi * r_mean**2 * (4 / 3 * r_mean + 2 * l_mean * r_mean)
        for _ in range(int(fraction * img.size / volume)):
            radius = rng.uniform(r_lo, r_hi)
            half_len = radius * rng.uniform(l_lo, l_hi)
            axis = _random_unit(rng)
            center = rng.uniform(0, 1, size=3) * shape
            box = _box(center, np.abs(axis) * half_len + radius + 1, shape)
            if box is None:
                continue
            sl, offsets = box
            depth, _ = _capsule_depth(offsets, axis, half_len, radius)
            inside = depth >= 0
            if (occupied[sl] & (depth > -2)).any() or (boundary[sl][inside] < 2).any():
                continue
            value = np.where(depth < 1.3, rim, rng.uniform(v_lo, v_hi))
            img[sl][inside] = np.broadcast_to(value, inside.shape)[inside]
            occupied[sl] |= inside


def _render_nucleus(rng: np.random.Generator, img: np.ndarray, geo: dict) -> None:
    """Paint one nucleus: granular chromatin, peripheral heterochromatin, nucleolus, envelope."""
    sl, (dz, dy, dx) = geo["box"]
    q = geo["q"]
    inside = q <= 1.0
    # Radial distance to the surface; close to the normal distance for these mild ellipsoids.
    depth = np.sqrt(dz**2 + dy**2 + dx**2) * (1.0 / np.maximum(q, 1e-3) - 1.0)
    value = 178.0 + 14.0 * _fractal_noise(rng, q.shape, (2,), (1.0,))
    clumps = _fractal_noise(rng, q.shape, (8,), (1.0,))
    # Heterochromatin: dark clumps, mostly lining the envelope as in most interphase nuclei.
    hetero = np.clip(clumps + 0.2 - 0.08 * depth, 0.0, 1.0) + np.clip(clumps - 1.4, 0.0, 1.0)
    value -= 60.0 * np.minimum(hetero, 1.0)
    r_nucleolus = 0.28 * geo["radii"].min()
    shift = rng.uniform(-0.35, 0.35, size=3) * geo["radii"]
    d_nucleolus = np.sqrt((dz - shift[0]) ** 2 + (dy - shift[1]) ** 2 + (dx - shift[2]) ** 2)
    d_nucleolus *= 1.0 + 0.15 * clumps
    value = np.where(d_nucleolus < r_nucleolus, value - 70.0, value)
    value = np.where(depth < 3.0, 62.0, value)  # nuclear envelope
    img[sl][inside] = value[inside]


def _capsule_depth(
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    axis: np.ndarray,
    half_len: float,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Depth inside a capsule (negative outside) and the coordinate along its axis."""
    dz, dy, dx = offsets
    along = axis[0] * dz + axis[1] * dy + axis[2] * dx
    t = np.clip(along, -half_len, half_len)
    sq = dz**2 + dy**2 + dx**2 - 2 * t * along + t**2
    return radius - np.sqrt(np.maximum(sq, 0.0)), along


def _fractal_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    factors: tuple[int, ...],
    weights: tuple[float, ...],
) -> np.ndarray:
    """Smooth noise of about unit variance: a sum of noise grids spaced ``factors`` voxels apart.

    Coarse grids are added up at the finest grid's resolution and upsampled to ``shape`` once,
    which is what keeps the default volume within a few seconds.
    """
    finest = min(factors)
    fine_shape = tuple(-(-s // finest) + 2 for s in shape)
    total = np.zeros(fine_shape, dtype=np.float32)
    for factor, weight in zip(factors, weights, strict=True):
        step = factor // finest
        grid = rng.standard_normal(tuple(-(-s // step) + 2 for s in fine_shape), dtype=np.float32)
        # Smoothing before linear upsampling hides the grid; rescale back to unit variance.
        grid = ndimage.gaussian_filter(grid, 1.0, mode="wrap")
        grid /= grid.std() + 1e-6
        total += weight * _upsample(grid, step, fine_shape)
    total /= np.sqrt(sum(w**2 for w in weights))
    return _upsample(total, finest, shape)


def _upsample(grid: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation by an integer factor, cropped to ``shape``."""
    for axis, size in enumerate(shape):
        if factor == 1:
            grid = grid[(slice(None),) * axis + (slice(0, size),)]
            continue
        pos = (np.arange(size, dtype=np.float32) + 0.5) / factor
        i0 = np.minimum(pos.astype(np.int64), grid.shape[axis] - 2)
        w = (pos - i0).reshape((-1,) + (1,) * (grid.ndim - axis - 1))
        low = np.take(grid, i0, axis=axis)
        high = np.take(grid, i0 + 1, axis=axis)
        high -= low
        high *= w
        low += high
        grid = low
    return grid


def _box(center: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> ObjectBox | None:
    """Bounding box of an object clipped to the volume, with broadcastable offsets to its centre."""
    lo = np.maximum(np.floor(center - half).astype(int), 0)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    if (hi <= lo).any():
        return None
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    dz = (np.arange(lo[0], hi[0]) - center[0])[:, None, None]
    dy = (np.arange(lo[1], hi[1]) - center[1])[None, :, None]
    dx = (np.arange(lo[2], hi[2]) - center[2])[None, None, :]
    return sl, (dz, dy, dx)  # type: ignore[return-value]


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))  # sign fix makes the rotation uniformly distributed


def check_shape(shape: Shape3) -> Shape3:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ints (z, y, x), got {shape}")
    if min(shape[1:]) < 32:
        raise ValueError(f"y and x must be at least 32 voxels to hold a nucleus, got {shape}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))
