"""Privacy and utility of FESF surrogates, measured (docs/methods.md §3): plain torch, seeded, CPU-sized.

Privacy
    * :func:`image_metrics`: PSNR / SSIM (``skimage.metrics``) between each surrogate and its private slice.
    * :func:`train_regressor` + :func:`predict`: the inversion attack, a small U-Net trained on *public*
      (image, surrogate) pairs (:func:`public_ct_like_images`: random-ellipse body phantoms and pydicom's public
      ``CT_small.dcm``, neither used by any site) and applied to a site's surrogates. The same network trained on
      (image, image) pairs is the unprotected baseline; its per-step loss (``history``) shows convergence.
    * :func:`identify_hosts`: which pool host a surrogate was made from. Outside the mask a surrogate *is* its
      host, so a public pool is searchable; the secret of a ``fixed`` host is at most ``log2(pool size)`` bits.

Utility
    * :class:`LesionClassifier` / :func:`train_classifier` / :func:`auc_score`: the same small CNN trained
      and tested on plaintext and on surrogates; AUC from the Mann–Whitney rank statistic.
      :func:`classify_per_seed` gives one AUC per seed, so plaintext and surrogate runs pair by seed.

Figures
    * :func:`draw_tradeoff_png`: the privacy–utility curve with Pillow (matplotlib is not installed): numbered
      points with CI bars, the plaintext line and the utility target, a legend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tasks.errors import InvalidInputError
from tasks.surrogate.kernels import low_frequency_mask

FloatArray = npt.NDArray[np.float32]


# ---- metrics -----------------------------------------------------------------------------------------
def image_metrics(reference: npt.ArrayLike, test: npt.ArrayLike, *, data_range: float = 1.0) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM over slices of ``(n, ny, nx)`` stacks (``skimage.metrics``)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape or ref.ndim != 3:
        raise InvalidInputError(f"reference {ref.shape} and test {out.shape} must be equal (n, ny, nx) stacks")
    psnr = [peak_signal_noise_ratio(r, t, data_range=data_range) for r, t in zip(ref, out, strict=True)]
    ssim = [structural_similarity(r, t, data_range=data_range) for r, t in zip(ref, out, strict=True)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def auc_score(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ROC AUC as the Mann–Whitney statistic ``U / (n_pos n_neg)`` with mid-ranks for ties."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise InvalidInputError(f"scores {s.shape} and labels {y.shape} must be equal 1-D arrays")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InvalidInputError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (0 for a single value)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise InvalidInputError("mean_ci needs at least one value")
    if v.size == 1:
        return float(v[0]), 0.0
    half = float(t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean()), half


# ---- public attacker data ----------------------------------------------------------------------------
def _ct_small_unit() -> npt.NDArray[np.float64]:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if not isinstance(path, str):
        raise InvalidInputError("pydicom's public test file CT_small.dcm is not available")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return (hu + 1000.0) / 2000.0


def public_ct_like_images(n: int, shape: tuple[int, int], *, rng: np.random.Generator) -> FloatArray:
    """``(n, ny, nx)`` public CT-like slices in the common range (air 0, water 0.5, +1000 HU 1).

    Half are random body phantoms (an ellipse of soft tissue with a fat rim, organs of ±100 HU, bone), half
    randomly rotated, scaled and shifted crops of pydicom's public ``CT_small.dcm``. No site data.
    """
    import scipy.ndimage as ndi
    import skimage.transform

    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    yy = (yy - (ny - 1) / 2) / (ny / 2)
    xx = (xx - (nx - 1) / 2) / (nx / 2)
    ct = _ct_small_unit()
    out = np.empty((n, ny, nx), dtype=np.float32)
    for i in range(n):
        if i % 2 == 0:
            img = np.zeros((ny, nx))
            a, b = rng.uniform(0.6, 0.95), rng.uniform(0.45, 0.8)
            cy, cx = rng.uniform(-0.1, 0.1, size=2)
            body = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
            img[body <= 1] = 0.5 - 0.05  # fat rim
            img[body <= 0.8] = 0.52
            for _ in range(rng.integers(3, 9)):
                ra, rb = rng.uniform(0.05, 0.3, size=2)
                oy, ox = rng.uniform(-0.5, 0.5, size=2)
                th = rng.uniform(0, np.pi)
                u = (xx - ox) * np.cos(th) + (yy - oy) * np.sin(th)
                v = -(xx - ox) * np.sin(th) + (yy - oy) * np.cos(th)
                inside = ((u / ra) ** 2 + (v / rb) ** 2 <= 1) & (body <= 0.8)
                img[inside] = rng.choice([0.47, 0.5, 0.55, 0.56, 0.8, 0.95, 0.0])
            img = ndi.gaussian_filter(img, rng.uniform(0.3, 1.0))
        else:
            scale = rng.uniform(0.8, 1.3)
            rot = skimage.transform.rotate(ct, rng.uniform(-180, 180), mode="constant", cval=0.0)
            crop = round(min(ct.shape) / scale)
            top = rng.integers(0, max(1, ct.shape[0] - crop + 1))
            left = rng.integers(0, max(1, ct.shape[1] - crop + 1))
            patch = rot[top : top + crop, left : left + crop]
            img = skimage.transform.resize(patch, shape, order=1, anti_aliasing=True)
            if rng.random() < 0.5:
                img = img[:, ::-1]
        out[i] = img
    return out


# ---- host identification -----------------------------------------------------------------------------
def identify_hosts(surrogates: npt.ArrayLike, pool: npt.ArrayLike, *, alpha: float) -> npt.NDArray[np.int64]:
    """Index of the pool host whose frequencies outside the mask are closest to each surrogate's.

    Parameters
    ----------
    surrogates : array_like
        ``(n, ny, nx)``.
    pool : array_like
        ``(m, ny, nx)`` candidate hosts (the public pool at the slices' size).
    alpha : float
        The mask of the hiding (the attacker knows the public configuration).
    """
    s = np.fft.fft2(np.asarray(surrogates, dtype=np.float64))
    p = np.fft.fft2(np.asarray(pool, dtype=np.float64))
    keep = ~low_frequency_mask(s.shape[-2:], alpha=alpha)
    sv, pv = s[:, keep], p[:, keep]
    dist = (np.abs(sv) ** 2).sum(1)[:, None] + (np.abs(pv) ** 2).sum(1)[None] - 2 * np.real(sv @ pv.conj().T)
    return np.argmin(dist, axis=1).astype(np.int64)


# ---- networks ----------------------------------------------------------------------------------------
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    """Two-level U-Net, ``(b, 1, ny, nx) → (b, 1, ny, nx)``; ``ny, nx`` divisible by 4."""

    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        c = channels
        self.enc1, self.enc2, self.mid = _block(1, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), _block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), _block(2 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return x + self.out(d1)


class LesionClassifier(nn.Module):
    """Small CNN: three conv stages with max-pooling, global average pooling, one logit."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1),
            nn.BatchNorm2d(4 * c),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))[:, 0]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser steps, batch size, learning rate, seed and device of one small training run."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 0
    device: str = "cpu"


def _tensor(a: npt.ArrayLike, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))[:, None].to(device)


def train_regressor(
    inputs: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    settings: TrainSettings,
    history: list[float] | None = None,
) -> UNet:
    """A U-Net trained with L1 loss to map ``inputs`` to ``targets`` (both ``(n, ny, nx)``).

    ``history``, when given, receives the training batch's L1 loss of every step (``settings.steps`` values,
    appended in order): a caller shows with it that the attack has converged.
    """
    device = torch.device(settings.device)
    x, y = _tensor(inputs, device), _tensor(targets, device)
    if x.shape != y.shape:
        raise InvalidInputError(f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} differ")
    gen = torch.Generator().manual_seed(settings.seed)
    net = _seeded(UNet(), (nn.Conv2d, nn.ConvTranspose2d), gen)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    for _ in range(settings.steps):
        idx = torch.randint(x.shape[0], (settings.batch_size,), generator=gen).to(device)
        loss = (net(x[idx]) - y[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if history is not None:
            history.append(float(loss.detach()))
    return net.eval()


_Net = TypeVar("_Net", bound=nn.Module)


def _seeded(
    net: _Net, layers: tuple[type[nn.Conv2d] | type[nn.ConvTranspose2d] | type[nn.Linear], ...], gen: torch.Generator
) -> _Net:
    """``net`` with the weights of its ``layers`` drawn from ``gen`` (Kaiming uniform, ReLU gain), biases zero."""
    for m in net.modules():
        if isinstance(m, layers):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def predict(net: nn.Module, inputs: npt.ArrayLike, *, batch_size: int = 64) -> FloatArray:
    """Apply a trained network to ``(n, ny, nx)`` inputs in batches."""
    device = next(net.parameters()).device
    x = _tensor(inputs, device)
    with torch.inference_mode():
        out = torch.cat([net(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    return out.reshape(out.shape[0], *out.shape[-2:]).cpu().numpy() if out.ndim == 4 else out.cpu().numpy()


def train_classifier(images: npt.ArrayLike, labels: npt.ArrayLike, *, settings: TrainSettings) -> LesionClassifier:
    """The lesion classifier trained with class-balanced BCE on ``(n, ny, nx)`` images and 0/1 labels.

    Inputs are standardised per image (zero mean, unit standard deviation) inside the training data's
    statistics, the same for plaintext and surrogates.
    """
    device = torch.device(settings.device)
    x = _tensor(_standardise(images), device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32)).to(device)
    if y.shape[0] != x.shape[0]:
        raise InvalidInputError(f"{x.shape[0]} images but {y.shape[0]} labels")
    gen = torch.Generator().manual_seed(settings.seed)
    net = _seeded(LesionClassifier(), (nn.Conv2d, nn.Linear), gen)
    net.to(device).train()
    pos = float(y.mean())
    weight = torch.tensor((1 - pos) / max(pos, 1e-6), device=device)
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    for _ in range(settings.steps):
        idx = torch.randint(x.shape[0], (settings.batch_size,), generator=gen).to(device)
        xb = x[idx]
        flip = torch.rand(xb.shape[0], generator=gen).to(device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = nn.functional.binary_cross_entropy_with_logits(net(xb), y[idx], pos_weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def _standardise(images: npt.ArrayLike) -> FloatArray:
    x = np.asarray(images, dtype=np.float32)
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def classifier_scores(net: LesionClassifier, images: npt.ArrayLike) -> FloatArray:
    """Logits of the classifier for ``(n, ny, nx)`` images."""
    return predict(net, _standardise(images))


def classify_per_seed(
    train: tuple[npt.ArrayLike, npt.ArrayLike],
    test: tuple[npt.ArrayLike, npt.ArrayLike],
    *,
    seeds: Sequence[int],
    settings: TrainSettings,
) -> tuple[list[float], list[float]]:
    """Test AUC and accuracy (logit > 0) of one classifier per seed, in the order of ``seeds``.

    The same seed gives the same initial weights and batch order, so two calls with the same seeds on different
    images (plaintext and surrogates) are paired: their per-seed differences have a much smaller spread.
    """
    aucs, accs = [], []
    y_test = np.asarray(test[1]).astype(bool)
    for seed in seeds:
        net = train_classifier(*train, settings=TrainSettings(**{**settings.__dict__, "seed": seed}))
        s = classifier_scores(net, test[0])
        aucs.append(auc_score(s, y_test))
        accs.append(float(((s > 0) == y_test).mean()))
    return aucs, accs


def classify(
    train: tuple[npt.ArrayLike, npt.ArrayLike],
    test: tuple[npt.ArrayLike, npt.ArrayLike],
    *,
    seeds: Sequence[int],
    settings: TrainSettings,
) -> dict[str, float]:
    """Train on ``train = (images, labels)`` once per seed; AUC and accuracy on ``test`` with 95 % CIs."""
    aucs, accs = classify_per_seed(train, test, seeds=seeds, settings=settings)
    auc, auc_ci = mean_ci(aucs)
    acc, acc_ci = mean_ci(accs)
    return {"auc": auc, "auc_ci95": auc_ci, "accuracy": acc, "accuracy_ci95": acc_ci}


# ---- figure -----------------------------------------------------------------------------------------
def draw_tradeoff_png(
    points: Sequence[dict[str, float]],
    path: str | Path,
    *,
    x_key: str = "attack_psnr_db",
    y_key: str = "auc",
    y_error_key: str = "auc_ci95",
    label_keys: tuple[str, str] = ("alpha", "beta"),
    reference: dict[str, float] | None = None,
    utility_bound: float = 0.03,
    privacy_bound_db: float = 10.0,
    note: str | None = None,
    size: tuple[int, int] = (960, 520),
) -> Path:
    """Utility (y) against attacker PSNR (x) for a sweep, drawn with Pillow; returns the path.

    Points are numbered and listed in a legend on the right (their labels would overlap); a point that carries
    ``y_error_key`` gets a vertical error bar of that half-width. ``reference`` (the plaintext run: ``y_key`` and
    ``x_key`` of the unprotected attack) adds a solid line at its utility, a dashed line ``utility_bound`` below
    it (the utility target) and, in the legend, the unprotected attack PSNR and the privacy bound
    ``privacy_bound_db`` below it; a dashed vertical line marks that bound when it falls inside the x range.
    ``note`` (lines split at newlines) is written under the legend.
    """
    from PIL import Image, ImageDraw

    if not points:
        raise InvalidInputError("no sweep points to draw")
    w, h = size
    legend_w = 330
    left, right, top, bottom = 70, legend_w + 20, 30, 60
    errs = [float(p.get(y_error_key, 0.0)) for p in points]
    xs = [p[x_key] for p in points]
    ys = [p[y_key] - e for p, e in zip(points, errs, strict=True)] + [
        p[y_key] + e for p, e in zip(points, errs, strict=True)
    ]
    if reference:
        ys += [reference[y_key], reference[y_key] - utility_bound]
    x0, x1 = min(xs) - 1.0, max(xs) + 1.0
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    def dashed(a: tuple[float, float], b: tuple[float, float], colour: str) -> None:
        n = 40
        for k in range(0, n, 2):
            d.line(
                [
                    (a[0] + (b[0] - a[0]) * k / n, a[1] + (b[1] - a[1]) * k / n),
                    (a[0] + (b[0] - a[0]) * (k + 1) / n, a[1] + (b[1] - a[1]) * (k + 1) / n),
                ],
                fill=colour,
                width=1,
            )

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        xv, yv = x0 + k * (x1 - x0) / 5, y0 + k * (y1 - y0) / 5
        gx, _ = px(xv, y0)
        _, gy = px(x0, yv)
        d.text((gx - 12, h - bottom + 5), f"{xv:.1f}", fill="black")
        d.text((5, gy - 6), f"{yv:.3f}", fill="black")
    d.text((left + 60, h - 25), f"{x_key} (lower = more private)", fill="black")
    d.text((5, 5), f"{y_key} (higher = more useful)", fill="black")
    lx, ly = w - legend_w, top
    if reference:
        ref_y = reference[y_key]
        d.line([px(x0, ref_y), px(x1, ref_y)], fill="crimson", width=2)
        dashed(px(x0, ref_y - utility_bound), px(x1, ref_y - utility_bound), "crimson")
        bound_x = reference[x_key] - privacy_bound_db
        if x0 <= bound_x <= x1:
            dashed(px(bound_x, y0), px(bound_x, y1), "darkgreen")
        for line, colour in (
            (f"plaintext {y_key} {ref_y:.3f} (solid)", "crimson"),
            (f"target: >= {ref_y - utility_bound:.3f} (dashed)", "crimson"),
            (f"unprotected attack {reference[x_key]:.1f} dB", "darkgreen"),
            (f"target: attack <= {bound_x:.1f} dB", "darkgreen"),
        ):
            d.text((lx, ly), line, fill=colour)
            ly += 14
        ly += 6
    for i, (p, e) in enumerate(zip(points, errs, strict=True), start=1):
        cx, cy = px(p[x_key], p[y_key])
        if e > 0:
            _, ya = px(p[x_key], p[y_key] - e)
            _, yb = px(p[x_key], p[y_key] + e)
            d.line([(cx, ya), (cx, yb)], fill="lightsteelblue", width=1)
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill="royalblue")
        d.text((cx + 6, cy - 6), str(i), fill="black")
        label = " ".join(f"{k}={p[k]:g}" for k in label_keys)
        ci = f" ±{e:.3f}" if e > 0 else ""
        d.text((lx, ly), f"{i}: {label}  {y_key} {p[y_key]:.3f}{ci}  {p[x_key]:.1f} dB", fill="black")
        ly += 14
    for line in (note or "").splitlines():
        d.text((lx, ly + 6), line, fill="dimgray")
        ly += 14
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
