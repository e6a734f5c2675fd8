"""The shared skeleton of EDSR and RCAN, with BasicSR's parameter names.

Both networks are ``conv_first -> body -> conv_after_body -> (+ global skip)
-> upsample -> conv_last`` around a mean shift: the input RGB in [0, 1] has the
DIV2K mean subtracted and is scaled to 0..255 (``img_range``), as BasicSR's
archs and the public checkpoints expect. Only the blocks of ``body`` differ,
so the subclasses build ``body`` and this class does everything else,
including the feature taps of the FACD definition (docs/models.md, "Feature taps").
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from ..checks import check_int, check_real, check_scale

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
class Upsample(nn.Sequential):
    """Sub-pixel upsampler: one conv + PixelShuffle(2) per factor 2, or one conv + PixelShuffle(3).

    Its children are numbered as BasicSR's ``Upsample`` (convs at 0, 2, ...),
    which is also EDSR-PyTorch's ``tail.0`` numbering.
    """

    def __init__(self, scale: int, num_feat: int):
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        super().__init__(*layers)


class ResidualSRNetwork(nn.Module):
    """Base of :class:`EDSR` and :class:`RCAN`; subclasses set ``arch`` and build ``self.body``.

    Tap names are module names whose output is a tap: ``"conv_first"``,
    ``"body.<i>"`` (the output of body block / group ``i``, 0-based) and
    ``"conv_after_body"`` (the body's closing conv, before the global skip).
    An int ``i`` in ``taps`` means ``"body.<i>"``.
    """

    arch: str = ""

    def __init__(self, *, scale: int, num_feat: int, taps, num_in_ch: int, num_out_ch: int,
                 img_range: float, rgb_mean: Sequence[float], preset: str | None):
        super().__init__()
        self.scale = check_scale("scale", scale)
        self.num_feat = check_int("num_feat", num_feat, 1)
        self.num_in_ch = check_int("num_in_ch", num_in_ch, 1)
        self.num_out_ch = check_int("num_out_ch", num_out_ch, 1)
        self.img_range = check_real("img_range", img_range, 0.0, least_inclusive=False)
        rgb_mean = tuple(float(m) for m in rgb_mean)
        if len(rgb_mean) != num_in_ch or num_in_ch != num_out_ch:
            raise ValueError(f"rgb_mean needs one value per channel and num_in_ch == num_out_ch, got "
                             f"rgb_mean={rgb_mean}, num_in_ch={num_in_ch}, num_out_ch={num_out_ch}")
        self.rgb_mean = rgb_mean
        self.preset = preset
        # Not persistent: BasicSR keeps the mean out of the state dict, and so do we.
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = self.make_body()
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = Upsample(self.scale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.taps = self._resolve_taps(self.default_taps() if taps is None else taps)

    def make_body(self) -> nn.Sequential:
        raise NotImplementedError

    def default_taps(self) -> tuple[int, ...]:
        """Body indices of the two inner taps (the third is ``conv_after_body``)."""
        raise NotImplementedError

    def body_kwargs(self) -> dict:
        """The body's constructor arguments, for :meth:`config`."""
        raise NotImplementedError

    def _resolve_taps(self, taps) -> tuple[str, ...]:
        if isinstance(taps, (str, numbers.Integral)):
            taps = (taps,)
        valid = ["conv_first"] + [f"body.{i}" for i in range(len(self.body))] + ["conv_after_body"]
        names = []
        for tap in taps:
            name = f"body.{int(tap)}" if isinstance(tap, numbers.Integral) and not isinstance(tap, bool) else tap
            if name not in valid:
                raise ValueError(f"taps: {tap!r} is not a tap of this {self.arch} (valid: conv_first, body.0 .. "
                                 f"body.{len(self.body) - 1} or 0 .. {len(self.body) - 1}, conv_after_body)")
            names.append(name)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"taps must be a non-empty list without repeats, got {list(taps)}")
        return tuple(names)

    def config(self) -> dict:
        """Everything needed to rebuild this model: ``from_config(model.config())``."""
        return {"arch": self.arch, "scale": self.scale, "num_feat": self.num_feat, **self.body_kwargs(),
                "taps": list(self.taps), "num_in_ch": self.num_in_ch, "num_out_ch": self.num_out_ch,
                "img_range": self.img_range, "rgb_mean": list(self.rgb_mean), "preset": self.preset}

    def store_for_autocast(self, dtype: torch.dtype) -> None:
        """Keep the weights autocast would cast to ``dtype`` at every forward in ``dtype`` already (a frozen
        network's, that nothing updates): the same outputs under autocast, without the casts. The output
        layer keeps float32, as :meth:`forward` runs it."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and name != "conv_last":
                module.to(dtype)

    def forward(self, x: Tensor, return_features: bool = False):
        """x: (B, 3, h, w) float RGB in [0, 1].

        Returns sr (B, 3, h*scale, w*scale), or ``(sr, [f_1, ..., f_J])`` with
        ``return_features=True``, f_j (B, num_feat, h, w) in the order of ``taps``.
        """
        mean = self.mean.to(x.dtype)
        shallow = self.conv_first((x - mean) * self.img_range)
        if return_features:
            deep, features = self._body_with_taps(shallow)
        else:
            deep = self.conv_after_body(self.body(shallow))
        upsampled = self.upsample(deep + shallow)
        # The output layer in its weights' precision (float32) under autocast: in bfloat16 its 0..255-scale output would be rounded to
        # steps of 1 (8 significant bits), 0.07 dB of the demo teacher's held-out PSNR, for ~1% of the forward.
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(upsampled.dtype, self.conv_last.weight.dtype)
            sr = self.conv_last(upsampled.to(dtype)) / self.img_range + mean.to(dtype)
        return (sr, features) if return_features else sr

    def _body_with_taps(self, shallow: Tensor) -> tuple[Tensor, list[Tensor]]:
        tapped = {"conv_first": shallow}
        h = shallow
        for i, block in enumerate(self.body):
            h = block(h)
            tapped[f"body.{i}"] = h
        h = self.conv_after_body(h)
        tapped["conv_after_body"] = h
        return h, [tapped[name] for name in self.taps]
