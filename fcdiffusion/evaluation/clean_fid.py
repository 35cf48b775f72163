"""FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium") and
KID (Bińkowski et al. 2018, "Demystifying MMD GANs") as clean-fid computes them in its "clean" mode (Parmar et al.
2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"), the protocol pix2pix-Turbo reports.

Features are clean-fid's own: its image reader and "clean" resize (PIL bicubic on float32 channels to 299 x 299)
and its `InceptionV3W` wrapper of the TensorFlow FID Inception (TorchScript, 2048-d pool features), read from a
local file (clean-fid would download it to /tmp; here it never downloads). The figures follow clean-fid's
definitions: FID is the Fréchet distance of the Gaussians with numpy's mean and covariance (ddof 1), computed
exactly through the n x n matrix of the smaller set (tr sqrt(S1 S2) = sum of sqrt(eig(X1c S2 X1c^T / (n1 - 1)))
instead of scipy's 2048 x 2048 `sqrtm`, which takes a minute on a CPU); KID is clean-fid's estimator, the unbiased
MMD² of the cubic polynomial kernel (x.y / d + 1)^3 averaged over `KID_SUBSETS` subsets of
min(n1, n2, `KID_SUBSET_SIZE`) images of each set (drawn from a seeded generator; with two sets of one size up to
1000 images every subset is the whole set and the figure is exact). FID is biased upwards on small sets: compare
FIDs of equally many images, and read KID on small sets.

Intervals (`fcdiffusion.evaluation.bootstrap`) resample the results and keep the reference set fixed; KID's
interval is that of the whole-set unbiased MMD² (clean-fid's figure when both sets have one size up to 1000).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import get_files_features, get_folder_features
from cleanfid.inception_torchscript import InceptionV3W

CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_WEIGHTS = Path("models") / CLEAN_FID_FILE
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def inception_help() -> str:
    """Where clean-fid's Inception comes from and where it goes."""
    return f"FID/KID need clean-fid's Inception (TorchScript): download {inception_url}\n  -> {CLEAN_FID_WEIGHTS}"


def load_inception(weights: str | os.PathLike = CLEAN_FID_WEIGHTS, device: str | torch.device = "cpu") -> InceptionV3W:
    """clean-fid's `InceptionV3W` over the local TorchScript file `weights` (named as clean-fid names it)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"clean-fid Inception weights not found: {path}\n{inception_help()}")
    if path.name != CLEAN_FID_FILE:
        raise ValueError(f"clean-fid reads its Inception from a file named {CLEAN_FID_FILE}, got {path}")
    return InceptionV3W(os.fspath(path.parent), download=False).to(device).eval()


def file_features(paths: Sequence[str | os.PathLike], model: InceptionV3W, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """(N, 2048) clean-mode features of the image files."""
    return get_files_features([os.fspath(p) for p in paths], model=model, num_workers=0, batch_size=batch_size,
                              device=torch.device(device), mode="clean", verbose=False)


def folder_features(folder: str | os.PathLike, model: InceptionV3W, batch_size: int = 32,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """(N, 2048) clean-mode features of every image clean-fid finds under `folder` (recursively)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"FID reference folder not found: {folder}")
    features = get_folder_features(os.fspath(folder), model, num_workers=0, batch_size=batch_size,
                                   device=torch.device(device), mode="clean", verbose=False)
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 reference images, found {len(features)} in {folder}")
    return features


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


class Reference:
    """A reference set's features, with what every FID and KID against it reuses."""

    def __init__(self, features: np.ndarray):
        self.features = np.asarray(features, dtype=np.float64)
        self.mean = self.features.mean(0)
        self.cov = np.cov(self.features, rowvar=False)
        gram = self.kernel(self.features)
        n = len(self.features)
        self.self_term = (gram.sum() - np.trace(gram)) / (n * (n - 1))

    def kernel(self, x: np.ndarray) -> np.ndarray:
        """KID's kernel between x and the reference images: (len(x), len(reference))."""
        return (x @ self.features.T / x.shape[1] + 1) ** 3

    def fid(self, features: np.ndarray) -> float:
        """FID of `features` (N, d) against the reference."""
        x = np.asarray(features, dtype=np.float64)
        centred = x - x.mean(0)
        n, d = x.shape
        if n <= d:
            trace_sqrt = np.sqrt(np.linalg.eigvalsh(centred @ self.cov @ centred.T / (n - 1)).clip(min=0)).sum()
        else:
            root = _sqrt_psd(np.cov(x, rowvar=False))
            trace_sqrt = np.sqrt(np.linalg.eigvalsh(root @ self.cov @ root).clip(min=0)).sum()
        return float(((x.mean(0) - self.mean) ** 2).sum() + (centred ** 2).sum() / (n - 1) + np.trace(self.cov)
                     - 2 * trace_sqrt)

    def kid(self, features: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
            seed: int = 0) -> float:
        """clean-fid's KID of `features` against the reference (see the module docstring)."""
        x, y = np.asarray(features, dtype=np.float64), self.features
        m = min(len(x), len(y), subset_size)
        rng = np.random.default_rng(seed)
        if len(x) == len(y) == m:  # every subset is the whole set: all subsets give this one value
            subsets = 1
        total = 0.0
        for _ in range(subsets):
            a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
            within = (a @ a.T / a.shape[1] + 1) ** 3 + (b @ b.T / b.shape[1] + 1) ** 3
            across = (a @ b.T / a.shape[1] + 1) ** 3
            total += (within.sum() - np.trace(within)) / (m - 1) - 2 * across.sum() / m
        return float(total / subsets / m)

    def resampled_fid(self, features: np.ndarray) -> Callable[[np.ndarray], float]:
        """idx -> FID of features[idx] against the reference, from matrices computed once (for the bootstrap)."""
        x = np.asarray(features, dtype=np.float64)
        n, d = x.shape
        if n > d:
            return lambda idx: self.fid(x[idx])
        projected, gram = x @ self.cov @ x.T, x @ x.T

        def fid(idx: np.ndarray) -> float:
            centring = np.eye(n) - 1 / n
            p = centring @ projected[np.ix_(idx, idx)] @ centring
            own = np.trace(centring @ gram[np.ix_(idx, idx)] @ centring) / (n - 1)
            trace_sqrt = np.sqrt(np.linalg.eigvalsh(p / (n - 1)).clip(min=0)).sum()
            return float(((x[idx].mean(0) - self.mean) ** 2).sum() + own + np.trace(self.cov) - 2 * trace_sqrt)

        return fid

    def resampled_kid(self, features: np.ndarray) -> Callable[[np.ndarray], float]:
        """idx -> the whole-set unbiased MMD² of features[idx] against the reference (pairs of distinct positions;
        for the bootstrap)."""
        x = np.asarray(features, dtype=np.float64)
        n = len(x)
        within, across = (x @ x.T / x.shape[1] + 1) ** 3, self.kernel(x).mean(1)

        def kid(idx: np.ndarray) -> float:
            counts = np.bincount(idx, minlength=n).astype(np.float64)
            pairs = counts @ within @ counts - counts @ np.diag(within)
            return float(pairs / (n * (n - 1)) + self.self_term - 2 * counts @ across / n)

        return kid
