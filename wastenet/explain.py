"""Where the network looked: Grad-CAM of a class and CBAM's last spatial attention.

Torch, numpy and Pillow only, so that the service can call it on a loaded version's
model. ``explain`` runs one forward and one backward to the last feature map of a model
in eval mode; it changes no parameter, ``requires_grad`` flag or ``.grad``, leaves no hook
behind, and records only the forward of the calling thread, so other threads may use the
same model meanwhile. Grad-CAM (Selvaraju et al., ICCV 2017): the feature maps that enter
the global pooling, weighted by the spatially averaged gradient of the class score,
summed over channels, ReLU, scaled to [0, 1] per image.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from wastenet.nets.cbam import CBAM
from wastenet.schema import Preprocessing


@dataclass(frozen=True)
class Explanation:
    """One image's explanation. Maps are small (the last feature map's size, e.g. 7x7 at
    224 px for ResNet) float32 arrays, row 0 at the top of the network's input.

    - ``cam``: Grad-CAM of ``class_index``, scaled to [0, 1] (all zero when no location
      speaks for the class).
    - ``attention``: the spatial gate Ms of the network's last CBAM, as the gate values
      (0..1, not rescaled); None for a network without CBAM.
    - ``probabilities``: softmax over every class, float32 (the same forward pass).
    """

    class_index: int
    probability: float
    predicted_index: int
    cam: np.ndarray
    attention: np.ndarray | None
    probabilities: np.ndarray | None = None


def _last_cbam(model: nn.Module) -> CBAM | None:
    modules = [m for m in model.modules() if isinstance(m, CBAM)]
    return modules[-1] if modules else None


def _targets(classes: int | Sequence[int] | None, logits: Tensor) -> Tensor:
    n, num_classes = logits.shape
    if classes is None:
        return logits.argmax(dim=1)
    wanted = [classes] * n if isinstance(classes, int) else list(classes)
    if len(wanted) != n:
        raise ValueError(f"{len(wanted)} classes given for {n} images")
    bad = [c for c in wanted if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class index {bad[0]} is out of range 0..{num_classes - 1}")
    return torch.tensor(wanted, device=logits.device)


def _scaled(maps: Tensor) -> np.ndarray:
    """(N, h, w) -> float32 array with each map divided by its maximum (zeros stay zeros)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    out: np.ndarray = (maps / peak).float().cpu().numpy()
    return out


def explain(
    model: nn.Module, images: Tensor, classes: int | Sequence[int] | None = None
) -> list[Explanation]:
    """Grad-CAM of the predicted class (or of ``classes``: one index for all images or one
    per image) and the last CBAM's spatial attention, for a normalised batch (N, 3, H, W).

    ``model`` is a network from ``wastenet.nets.build_model`` (its global pooling layer is
    ``model.avgpool``) in eval mode: in training mode BatchNorm would change its statistics.
    """
    if model.training:
        raise ValueError("explain needs the model in eval mode (model.eval())")
    pool = getattr(model, "avgpool", None)
    if not isinstance(pool, nn.Module):
        raise TypeError(f"{type(model).__name__} has no avgpool layer to take Grad-CAM before")
    owner = threading.get_ident()
    seen: dict[str, Tensor] = {}

    def keep_features(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if threading.get_ident() == owner:
            seen["features"] = args[0]

    def keep_attention(_module: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
        if threading.get_ident() == owner:
            seen["attention"] = out.detach()

    handles = [pool.register_forward_pre_hook(keep_features)]
    cbam = _last_cbam(model)
    if cbam is not None:
        handles.append(cbam.spatial_gate.sigmoid.register_forward_hook(keep_attention))
    param = next(model.parameters())
    # The input requires grad so that the features do even when every parameter is frozen;
    # autograd.grad computes only what leads to the features and fills no .grad.
    x = images.detach().to(param.device, param.dtype).requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(x)
            if "features" not in seen:
                raise TypeError(f"{type(model).__name__}.forward does not use its avgpool layer")
            targets = _targets(classes, logits)
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, seen["features"])
    finally:
        for handle in handles:
            handle.remove()
    features = seen["features"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = _scaled(torch.relu((weights * features).sum(dim=1)))
    probs = logits.detach().float().softmax(dim=1)
    all_probs = probs.cpu().numpy()
    attention = seen.get("attention")
    return [
        Explanation(
            class_index=int(targets[i]),
            probability=float(probs[i, targets[i]]),
            predicted_index=int(probs[i].argmax()),
            cam=cams[i],
            attention=None if attention is None else attention[i, 0].float().cpu().numpy(),
            probabilities=all_probs[i],
        )
        for i in range(len(images))
    ]


# ------------------------------------------------------------------------- rendering


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3) on a blue-cyan-yellow-red scale."""
    v = np.clip(heatmap, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue peak at high, middle, low
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay(
    image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, rescale: bool = True
) -> Image.Image:
    """``heatmap`` (any small size) stretched over ``image`` (bilinear), coloured, blended.

    ``rescale`` maps the heatmap's own minimum..maximum to the full colour scale (for
    gate maps whose values differ little); otherwise values are read as 0..1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if rescale:
        low, high = float(heat.min()), float(heat.max())
        heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    grey = Image.fromarray(np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    stretched = np.asarray(grey.resize(image.size, Image.Resampling.BILINEAR), np.float32)
    colours = Image.fromarray(colorize(stretched / 255.0), "RGB")
    return Image.blend(image.convert("RGB"), colours, alpha)


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> bytes:
    """``overlay`` as PNG bytes (e.g. for an HTTP response)."""
    buffer = io.BytesIO()
    overlay(image, heatmap, alpha).save(buffer, format="PNG")
    return buffer.getvalue()


def input_image(tensor: Tensor, preprocessing: Preprocessing) -> Image.Image:
    """The normalised network input (3, H, W) back as the RGB image the network saw."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu() * std + mean).clamp(0.0, 1.0)
    array = (pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, "RGB")
