"""The random forest's per-pixel features and its stratified training sample (``bench_training.py``'s
baseline): per band the normalised value, then per sigma a Gaussian, its gradient magnitude and the local
standard deviation."""

from __future__ import annotations

import numpy as np

SIGMAS = (1.0, 2.0, 4.0, 8.0)

__all__ = ["SIGMAS", "features", "stratified_sample"]


def features(x: np.ndarray, mean: np.ndarray, std: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-pixel features ``(rows * cols, n)``: per band the normalised value, then per sigma the Gaussian
    smoothing, the gradient magnitude (Sobel of the Gaussian) and the local standard deviation."""
    from scipy import ndimage as ndi

    feats = []
    for b, m, s in zip(x, mean, std, strict=True):
        z = np.where(valid, (b - m) / s, 0.0).astype(np.float32)  # nodata -> the mean
        feats.append(z)
        z2 = z * z
        for sigma in SIGMAS:
            g = ndi.gaussian_filter(z, sigma, mode="reflect")
            feats.append(g)
            feats.append(np.hypot(ndi.sobel(g, axis=0), ndi.sobel(g, axis=1)))
            var = ndi.gaussian_filter(z2, sigma, mode="reflect") - g * g
            feats.append(np.sqrt(np.maximum(var, 0.0)))
    return np.stack([f.reshape(-1) for f in feats], axis=1)


def stratified_sample(y: np.ndarray, n: int, rng: np.random.Generator, floor: int = 1000) -> np.ndarray:
    """Indices of at most about ``n`` of ``y``'s elements: each class keeps its share (at least ``floor``)."""
    if len(y) <= n:
        return np.arange(len(y))
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(len(idx), max(floor, int(round(n * len(idx) / len(y)))))
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))
