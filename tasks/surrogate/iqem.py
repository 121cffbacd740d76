"""The Image Quality Enhancement Module of FESF: a small unpaired GAN per site, then a second IHM pass.

``G`` maps surrogates ``S`` towards the host domain ``K`` (CycleGAN notation; no cycle term here: ``G`` is
residual and starts as the identity, and an L1 term ``|G(s) - s|`` keeps it near its input). ``D`` is a small
PatchGAN on hosts. Losses are least squares (LSGAN, Mao et al. 2017):
``L_D = ½ E[(D(k) - 1)²] + ½ E[D(G(s))²]``, ``L_G = ½ E[(D(G(s)) - 1)²] + λ E|G(s) - s|``. After training,
:func:`enhance_and_rehide` applies ``G`` and puts the first pass's low-frequency amplitude
``(1 - β)|H| + β|X|`` back onto ``G``'s output with the IHM (:func:`tasks.surrogate.kernels.hide`, ``G(s)`` as
the host, β = 1 on the surrogate), so the low frequencies still carry exactly β of the private amplitude while
the phase and the rest follow ``G``.

Plain torch; all randomness from one seeded ``torch.Generator``; the caller names the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.surrogate import IqemConfig
from tasks.errors import InvalidInputError
from tasks.surrogate.kernels import check_strengths, hide

CHECKPOINT_FORMAT = "fedscan-iqem-v1"


def _init(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=0.2, nonlinearity="leaky_relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Residual conv net ``G(s) = s + f(s)``; ``f``'s last layer starts at zero, so ``G`` starts as the identity.

    Input and output ``(batch, 1, ny, nx)`` float32, any size; dilations 1, 2, 4 give a 15-pixel receptive field.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, padding_mode="reflect"),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, padding_mode="reflect"),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=4, dilation=4, padding_mode="reflect"),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 1, 3, padding=1, padding_mode="reflect"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Discriminator(nn.Module):
    """PatchGAN: one real/fake score per ~22-pixel patch, ``(batch, 1, ny/4, nx/4)``."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class IqemResult:
    """A trained generator and the loss of every step (``d``: discriminator, ``g_adv``, ``g_content``)."""

    generator: Generator
    losses: dict[str, list[float]] = field(default_factory=dict)


def _stack(name: str, a: npt.ArrayLike | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, dtype=np.float32))  # a copy
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] == 0:
        raise InvalidInputError(f"{name} must be (n, ny, nx) with n >= 1, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    return t[:, None]


def train_iqem(
    surrogates: npt.ArrayLike | torch.Tensor,
    hosts: npt.ArrayLike | torch.Tensor,
    *,
    config: IqemConfig,
    device: torch.device,
    checkpoint_path: str | Path | None = None,
) -> IqemResult:
    """Train ``G: S → K`` and ``D`` on one site's surrogates and its hosts.

    Parameters
    ----------
    surrogates : array_like
        ``(n, ny, nx)`` the site's first-pass surrogates (dimensionless range).
    hosts : array_like
        ``(m, ny, nx)`` or ``(ny, nx)``: the public hosts the site used (the domain ``K``), same size.
    config : IqemConfig
        Steps, batch size, learning rate, width, content weight, seed.
    device : torch.device
    checkpoint_path : str or Path, optional
        Where to ``torch.save`` the trained generator (see :func:`load_generator`).

    Returns
    -------
    IqemResult
    """
    s = _stack("surrogates", surrogates, device)
    k = _stack("hosts", hosts, device)
    if s.shape[-2:] != k.shape[-2:]:
        raise InvalidInputError(f"host size {tuple(k.shape[-2:])} differs from surrogate size {tuple(s.shape[-2:])}")
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    g_net, d_net = Generator(config.channels), Discriminator(config.channels)
    _init(g_net, gen)
    _init(d_net, gen)
    last = g_net.body[-1]
    assert isinstance(last, nn.Conv2d)
    nn.init.zeros_(last.weight)  # G starts as the identity
    g_net.to(device).train()
    d_net.to(device).train()
    opt_g = torch.optim.Adam(g_net.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_net.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    losses: dict[str, list[float]] = {"d": [], "g_adv": [], "g_content": []}
    bs = config.batch_size
    for _ in range(config.steps):
        si = torch.randint(s.shape[0], (bs,), generator=gen).to(device)
        ki = torch.randint(k.shape[0], (bs,), generator=gen).to(device)
        real, src = k[ki], s[si]
        fake = g_net(src)
        d_loss = 0.5 * ((d_net(real) - 1.0) ** 2).mean() + 0.5 * (d_net(fake.detach()) ** 2).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        adv = 0.5 * ((d_net(fake) - 1.0) ** 2).mean()
        content = (fake - src).abs().mean()
        g_loss = adv + config.content_weight * content
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        losses["d"].append(d_loss.detach().item())
        losses["g_adv"].append(adv.detach().item())
        losses["g_content"].append(content.detach().item())
    g_net.eval()
    if checkpoint_path is not None:
        save_generator(g_net, checkpoint_path, steps=config.steps)
    return IqemResult(generator=g_net, losses=losses)


def save_generator(generator: Generator, path: str | Path, *, steps: int = 0) -> Path:
    """``torch.save`` the generator's weights and width to ``path`` (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "channels": generator.channels, "steps": steps, "state": state}, p)
    return p


def load_generator(path: str | Path, *, device: torch.device) -> Generator:
    """The generator saved by :func:`save_generator`, in eval mode on ``device``."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no IQEM checkpoint at {path}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInputError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    g = Generator(int(payload["channels"]))
    g.load_state_dict(payload["state"])
    return g.to(device).eval()


def enhance(surrogates: torch.Tensor, generator: Generator, *, batch_size: int = 64) -> torch.Tensor:
    """``G(s)`` for ``(n, ny, nx)`` surrogates, in batches, on the generator's device (float32)."""
    if surrogates.ndim != 3:
        raise InvalidInputError(f"surrogates must be (n, ny, nx), got shape {tuple(surrogates.shape)}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    device = next(generator.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, surrogates.shape[0], batch_size):
            chunk = surrogates[i : i + batch_size].to(device=device, dtype=torch.float32)
            out.append(generator(chunk[:, None])[:, 0])
    if not out:
        return surrogates.new_zeros(surrogates.shape, dtype=torch.float32)
    return torch.cat(out).to(surrogates.device)


def enhance_and_rehide(
    private: torch.Tensor, surrogates: torch.Tensor, generator: Generator, *, alpha: float, beta: float
) -> torch.Tensor:
    """The IQEM output: ``G(s)`` with the first-pass surrogate's low-frequency amplitude put back (second IHM pass).

    Inside the mask the result's amplitude is ``|S| = (1 - β)|H| + β|X|`` (β of the private amplitude, exactly as
    after the first pass) with ``G(s)``'s phase; outside it is ``G(s)``. That is ``hide(s, G(s), alpha, beta=1)``.
    Re-hiding the *private* image into ``G(s)`` with ratio β instead (the earlier implementation) compounds the
    share: ``G(s)`` already carries ``β|X|``, so the private share became ``1 - (1 - β)²`` (0.75 at β = 0.5) and
    the surrogate moved *away* from the host, the opposite of what the module is for.

    ``private`` is only checked for shape (the private amplitude arrives through ``surrogates``); ``beta`` is
    validated and documents the share carried.
    """
    if private.shape != surrogates.shape:
        raise InvalidInputError(f"private {tuple(private.shape)} and surrogates {tuple(surrogates.shape)} differ")
    check_strengths(alpha=alpha, beta=beta)
    return hide(surrogates, enhance(surrogates, generator), alpha=alpha, beta=1.0)
