"""Gradient inversion: what one round's update lets the server rebuild of a site's images.

By default a site sends one plain SGD step with lr 1, so its update is minus the gradient of its batch's loss. The
server's view (:class:`ServerView`) is that gradient ("plain"), only the sample-weighted sum over the sites under
secure aggregation ("secure"), or the clipped, noised gradient under DP-SGD ("dp"). The attack is the strongest
this project runs on a CPU, a suite whose best result (closest to the originals) each setting reports:

- analytic recovery (:func:`analytic_recovery`), where the model begins with a dense layer on the flattened input:
  for one image a row's weight gradient over its bias gradient is the image (Phong et al. 2017); behind an imprint
  layer (:class:`ImprintModel`, Fowl et al. 2022) a batch's images come back one per bin, exactly, also from the
  sum under secure aggregation. fedbrain's registry models begin with a convolution, so it does not apply to them;
  a server could only ship such a layer if the sites ran its code (they run their installed registry and refuse
  weights that are not their own model's state dict: ``fedbrain.fl.site.to_torch_state``);
- inverting gradients (Geiping et al. 2020): Adam on the images to match the view's gradient by cosine, with a
  total-variation prior, known labels, several restarts over a grid of prior weights (the restart whose gradient
  matches best wins: the attacker never sees the originals);
- for one image, feature inversion: the classifier's weight gradient over its bias gradient is the image's pooled
  feature vector, exactly; an image optimised to give those features is scored and starts one restart of
  inverting gradients, and the label is read from the bias gradient's sign;
- a malicious server that keeps the registry's architecture (:func:`crafted_model`): it picks the job's image size
  and width so that the network ends at one pixel with a channel per pixel, and shifts every GroupNorm so that
  ReLUs rarely cut. Measured (16 px, width 8): the features' Jacobian has full rank (255 of 256: contrast is
  invisible) but is tiny (the shift passes the zero-padded borders and each GroupNorm rescales by them), so
  feature inversion did not recover the image; an exact space-to-depth construction (taps that never touch the
  padding, anchor channels per GroupNorm group) is not built.

Every reconstruction is scored (SSIM, PSNR) beside two no-information baselines: a flat image at the original's
mean brightness and another slice of the same site. The model is attacked in eval mode (no dropout): the attacker's
best case, as if it knew the dropout mask. GroupNorm makes every model of this family blind to an image's contrast
about mid-grey, so reconstructions are stretched to the full grey range (slices span black to white).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbrain.contract import TUMOUR_ANY, TUMOUR_CLASSES, Preprocessing
from fedbrain.training import partial_label_loss

VIEWS = ("plain", "secure", "dp")


@dataclass
class InversionConfig:
    iterations: int = 300  # Adam steps per restart of gradient matching
    restarts: int = 2  # random starts (one more from feature inversion when the view holds one image)
    lr: float = 0.1
    tv_weights: tuple[float, ...] = (1e-2, 1e-1)  # the prior's weight: restarts cycle through these
    feature_iterations: int = 300  # Adam steps of feature inversion (one image)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServerView:
    """One round as the server holds it: the gradient the update reveals, and what it knows of the images."""

    kind: str  # plain | secure | dp
    gradient: list[torch.Tensor]  # minus the update (lr 1), one tensor per trainable parameter
    labels: torch.Tensor  # every image's label in the view (a site's counts are sent each round)
    weights: torch.Tensor  # each image's weight in the summed loss
    shape: tuple[int, int, int] = (1, 128, 128)
    notes: dict = field(default_factory=dict)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def weighted_loss(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  pre: Preprocessing) -> torch.Tensor:
    """Σ_j w_j ℓ(x_j, y_j) with the training loss ℓ (partial labels: 4 = some tumour)."""
    logits = model(_normalise(x01, pre))
    return sum(w * partial_label_loss(logits[j:j + 1], labels[j:j + 1]) for j, w in enumerate(weights))


def _normalise(x01: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    mean = torch.tensor(pre.mean[:1], dtype=x01.dtype).view(1, 1, 1, 1)
    std = torch.tensor(pre.std[:1], dtype=x01.dtype).view(1, 1, 1, 1)
    x = (x01 - mean) / std
    return x.expand(-1, pre.channels, -1, -1) if pre.channels > 1 else x


def gradient(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, pre: Preprocessing,
             create_graph: bool = False) -> list[torch.Tensor]:
    """The gradient of the weighted loss over the model's trainable parameters."""
    loss = weighted_loss(model, x01, labels, weights, pre)
    return list(torch.autograd.grad(loss, _params(model), create_graph=create_graph))


def plain_view(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, pre: Preprocessing) -> ServerView:
    """One site's update in the clear: minus the gradient of its batch's mean loss."""
    model.eval()
    w = torch.full((len(labels),), 1.0 / len(labels))
    return ServerView("plain", [g.detach() for g in gradient(model, x01, labels, w, pre)], labels, w,
                      tuple(x01.shape[1:]))


def secure_view(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], samples: list[int],
                pre: Preprocessing) -> ServerView:
    """Secure aggregation: only Σ_sites n_site · update_site (sample-weighted, as the sites mask it). The images of
    every site are in the view, the target's first; the attacker knows each image's weight n_site / batch_site."""
    model.eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    w = torch.cat([torch.full((len(b[1]),), n / len(b[1])) for b, n in zip(batches, samples, strict=True)])
    return ServerView("secure", [g.detach() for g in gradient(model, x, y, w, pre)], y, w, tuple(x.shape[1:]),
                      {"sites": len(batches), "images_per_site": [len(b[1]) for b in batches]})


def dp_view(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, pre: Preprocessing, clip: float = 1.0,
            noise_multiplier: float = 1.0, seed: int = 0) -> ServerView:
    """DP-SGD: each image's gradient clipped to norm ``clip``, summed, Gaussian noise σ·clip added, over the batch."""
    model.eval()
    total = [torch.zeros_like(p) for p in _params(model)]
    one = torch.ones(1)
    for j in range(len(labels)):
        g = gradient(model, x01[j:j + 1], labels[j:j + 1], one, pre)
        scale = min(1.0, clip / (float(torch.sqrt(sum((t ** 2).sum() for t in g))) + 1e-12))
        total = [a + scale * t.detach() for a, t in zip(total, g, strict=True)]
    gen = torch.Generator().manual_seed(seed)
    noisy = [(a + noise_multiplier * clip * torch.randn(a.shape, generator=gen)) / len(labels) for a in total]
    w = torch.full((len(labels),), 1.0 / len(labels))
    return ServerView("dp", noisy, labels, w, tuple(x01.shape[1:]),
                      {"clip": clip, "noise_multiplier": noise_multiplier})


# ------------------------------------------------------------------ what one image's gradient gives away exactly

def classifier(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (the one that sees the pooled features)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to read features from")
    return linears[-1]


def _classifier_grads(model: nn.Module, view: ServerView) -> tuple[torch.Tensor, torch.Tensor]:
    head = classifier(model)
    index = {id(p): i for i, p in enumerate(_params(model))}
    return view.gradient[index[id(head.weight)]], view.gradient[index[id(head.bias)]]


def infer_label(bias_grad: torch.Tensor) -> int:
    """One image's label from the classifier's bias gradient p - y: the negative entries are its label's classes
    (all tumour classes: 'some tumour')."""
    negative = [c for c in range(len(bias_grad)) if bias_grad[c] < 0]
    if len(negative) == 1:
        return negative[0]
    if set(negative) == set(TUMOUR_CLASSES):
        return TUMOUR_ANY
    return int(torch.argmin(bias_grad))


def recover_features(model: nn.Module, view: ServerView) -> torch.Tensor:
    """One image's pooled feature vector: row c of the classifier's weight gradient over the bias gradient's c."""
    dw, db = _classifier_grads(model, view)
    c = int(torch.argmax(db.abs()))
    return dw[c] / db[c]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier sees (its input), by a forward hook."""
    seen = []
    handle = classifier(model).register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


# ------------------------------------------------------------------ the optimisation

def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _optimise(x: torch.Tensor, objective, iterations: int, lr: float) -> torch.Tensor:
    """Adam on the image (kept in [0, 1]), the learning rate cut by 10 at 3/8, 5/8 and 7/8 of the steps."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    cuts = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cuts, 0.1)
    for _ in range(iterations):
        opt.zero_grad()
        objective(x).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()


def gradient_distance(model: nn.Module, x01: torch.Tensor, view: ServerView, pre: Preprocessing,
                      create_graph: bool = False) -> torch.Tensor:
    """1 - cosine similarity between the candidate's gradient and the view's, over all parameters together."""
    g = gradient(model, x01, view.labels, view.weights, pre, create_graph=create_graph)
    dot = sum((a * b).sum() for a, b in zip(g, view.gradient, strict=True))
    na = torch.sqrt(sum((a ** 2).sum() for a in g))
    nb = torch.sqrt(sum((b ** 2).sum() for b in view.gradient))
    return 1 - dot / (na * nb + 1e-12)


def invert_features(model: nn.Module, features: torch.Tensor, shape: tuple[int, int, int], pre: Preprocessing,
                    cfg: InversionConfig, tv_weight: float) -> torch.Tensor:
    """An image whose pooled features match ``features`` (relative squared error + TV)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    target = features.detach().view(1, -1)

    def objective(x):
        f = pooled_features(model, _normalise(x, pre))
        return ((f - target) ** 2).sum() / ((target - target.mean()) ** 2).sum() + tv_weight * total_variation(x)

    return _optimise(torch.rand((1, *shape), generator=gen), objective, cfg.feature_iterations, cfg.lr)


def invert_gradient(model: nn.Module, view: ServerView, pre: Preprocessing, cfg: InversionConfig,
                    starts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """The restart whose gradient matches the view best (never judged against the originals)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(view.labels)
    inits = list(starts or []) + [torch.rand((n, *view.shape), generator=gen) for _ in range(cfg.restarts)]
    best, best_d, tried = None, float("inf"), []
    for i, x0 in enumerate(inits):
        tv = cfg.tv_weights[i % len(cfg.tv_weights)]
        x = _optimise(x0, lambda x, tv=tv: gradient_distance(model, x, view, pre, True) + tv * total_variation(x),
                      cfg.iterations, cfg.lr)
        d = float(gradient_distance(model, x, view, pre))
        tried.append({"start": "features" if i < len(starts or []) else "random", "tv_weight": tv,
                      "gradient_distance": d})
        if d < best_d:
            best, best_d = x, d
    return best, {"restarts": tried, "gradient_distance": best_d}


ATTACKS = ("analytic", "feature inversion", "inverting gradients")


class NotApplicable(ValueError):
    """An attack of the suite that the model or the view does not allow (the reason is its message)."""


def attack_suite(model: nn.Module, view: ServerView, pre: Preprocessing, cfg: InversionConfig) -> dict[str, dict]:
    """Every attack of the suite on one view: ``{name: {"reconstruction": images in [0, 1], "info": {...}}}``, or
    ``{name: {"not_applicable": why}}``. Optimised images are stretched to the full grey range."""
    out: dict[str, dict] = {}
    try:
        out["analytic"] = {"reconstruction": analytic_recovery(model, view, pre), "info": {}}
    except NotApplicable as exc:
        out["analytic"] = {"not_applicable": str(exc)}
    info: dict = {"view": view.kind, "images": len(view.labels), **view.notes}
    starts = []
    if len(view.labels) == 1:
        _, db = _classifier_grads(model, view)
        label = infer_label(db)
        info["label_inferred"] = label == int(view.labels[0])
        view = ServerView(view.kind, view.gradient, torch.tensor([label]), view.weights, view.shape, view.notes)
        starts = [invert_features(model, recover_features(model, view), view.shape, pre, cfg, cfg.tv_weights[0])]
        out["feature inversion"] = {"reconstruction": stretch(starts[0]), "info": dict(info)}
    else:
        out["feature inversion"] = {"not_applicable": f"{len(view.labels)} images in the view: the classifier's "
                                                      "gradient gives pooled features for one image only"}
    x, found = invert_gradient(model, view, pre, cfg, starts)
    out["inverting gradients"] = {"reconstruction": stretch(x), "info": {**info, **found}}
    return out


def stretch(x: torch.Tensor) -> torch.Tensor:
    """Each image min-max stretched to [0, 1] (the scale the model cannot see)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


# ------------------------------------------------------------------ a malicious server's model

def crafted_model(image_size: int, shift: float = 3.0) -> tuple[nn.Module, int]:
    """fedbrain_cnn_gn as a malicious server would send it: the width chosen (a job setting) so that the last stage
    keeps at least one channel per pixel at one pixel (``image_size`` ≤ 32), random weights, and every GroupNorm
    shifted by ``shift`` so that few ReLUs cut (see the module's note on how far this leaks). Returns the model and
    the width."""
    from fedbrain.models import create_model

    if image_size > 32:
        raise ValueError(f"the crafted model needs image_size <= 32 (the network's stride), not {image_size}")
    width = 1
    while 128 * width < image_size * image_size:  # stage 4's depthwise convolution: one channel per pixel
        width *= 2
    torch.manual_seed(0)
    model = create_model("fedbrain_cnn_gn", width=float(width))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.bias.fill_(shift)
    return model.eval(), width


# ------------------------------------------------------------------ a malicious server that ships its own layer

class ImprintModel(nn.Module):
    """``inner`` behind an imprint layer (Fowl et al. 2022, "Robbing the Fed"): a linear layer on the flattened input
    whose k rows all equal one measurement (the mean of the normalised input: brightness) and whose biases are minus
    ``thresholds`` (ascending), so bin i passes exactly the images brighter than threshold i. The bins' sum is added
    back to the input along a small fixed direction: the network still sees almost its input, and all bins of one
    image get the same gradient. Two neighbouring bins' gradients then differ by the one image between their
    thresholds (:func:`analytic_recovery`)."""

    def __init__(self, inner: nn.Module, input_shape: tuple[int, int, int], thresholds: torch.Tensor,
                 seed: int = 0) -> None:
        super().__init__()
        size = math.prod(input_shape)
        self.imprint = nn.Linear(size, len(thresholds))  # registered first: the first layer the input meets
        with torch.no_grad():
            self.imprint.weight.fill_(1.0 / size)
            self.imprint.bias.copy_(-thresholds)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("back", 1e-3 * torch.randn(size, generator=gen))
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bins = torch.relu(self.imprint(x.flatten(1)))
        return self.inner(x + (bins.sum(1, keepdim=True) * self.back).view_as(x))


def imprint_model(inner: nn.Module, reference01: torch.Tensor, pre: Preprocessing, bins: int = 128) -> ImprintModel:
    """The server's imprint model: thresholds at the quantiles of a normal law fitted to the measurement on
    ``reference01`` (public slices the server holds, at least 2), the lowest below any image's."""
    if len(reference01) < 2:
        raise ValueError(f"the imprint bins need at least 2 reference slices, not {len(reference01)}")
    m = _normalise(reference01, pre).flatten(1).mean(1)
    law = torch.distributions.Normal(m.mean(), m.std().clamp_min(1e-3))
    floor = _normalise(torch.zeros(1, *reference01.shape[1:]), pre).mean() - 1  # below an all-black image
    inner_q = law.icdf(torch.arange(1, bins) / bins)
    return ImprintModel(inner, (pre.channels, *reference01.shape[2:]), torch.cat([floor.view(1), inner_q])).eval()


def _first_layer(model: nn.Module) -> nn.Module:
    """The first module (in registration order) that holds weights of its own."""
    return next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), model)


def dense_input_layer(model: nn.Module, input_size: int) -> nn.Linear | None:
    """The model's first layer with weights when it is a linear layer on the whole flattened input, else None."""
    first = _first_layer(model)
    return first if isinstance(first, nn.Linear) and first.in_features == input_size else None


def analytic_recovery(model: nn.Module, view: ServerView, pre: Preprocessing) -> torch.Tensor:
    """Images read off the gradient of a dense input layer, in [0, 1], one per image of the view (mid-grey where
    none was found). One image (Phong et al. 2017): a row's weight gradient over its bias gradient is the input.
    An imprint layer (rows all equal): the difference of neighbouring bins' gradients, one image per bin."""
    size = pre.channels * math.prod(view.shape[1:])
    layer = dense_input_layer(model, size)
    if layer is None:
        raise NotApplicable(f"{type(model).__name__} has no dense layer on the flattened input (its first layer is "
                            f"a {type(_first_layer(model)).__name__})")
    index = {id(p): i for i, p in enumerate(_params(model))}
    dw, db = view.gradient[index[id(layer.weight)]], view.gradient[index[id(layer.bias)]]
    if torch.equal(layer.weight, layer.weight[:1].expand_as(layer.weight)):  # nested bins: take differences
        order = torch.argsort(layer.bias, descending=True)  # from the bin every image passes to the fewest
        dw, db = dw[order], db[order]
        dw, db = dw - torch.cat([dw[1:], torch.zeros_like(dw[:1])]), db - torch.cat([db[1:], torch.zeros_like(db[:1])])
        found = db.abs() > 1e-3 * db.abs().max()
    else:
        found = torch.arange(len(db)) == int(torch.argmax(db.abs()))
    x = (dw[found] / db[found, None]).view(-1, pre.channels, *view.shape[1:])[:, :1]
    mean, std = pre.mean[0], pre.std[0]
    x01 = (x * std + mean).clamp(0, 1)
    missing = len(view.labels) - len(x01)
    return torch.cat([x01, torch.full((max(missing, 0), *x01.shape[1:]), 0.5)]) if missing > 0 else x01


# ------------------------------------------------------------------ scoring

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, σ 1.5, data range 1) of each pair of ``(N, 1, H, W)``."""
    w = _gaussian_window(min(11, a.shape[-1]))
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a ** 2
    sbb = F.conv2d(b * b, w) - mu_b ** 2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1) of each pair."""
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def score(reconstruction: torch.Tensor, originals: torch.Tensor, other_slices: torch.Tensor) -> list[dict]:
    """Per original: the reconstruction that matches it best (one each, by SSIM), its SSIM and PSNR, and the
    baselines' (a flat image at the original's mean; another slice of the same site)."""
    from scipy.optimize import linear_sum_assignment

    n, m = len(originals), len(reconstruction)
    table = torch.stack([ssim(reconstruction, originals[i:i + 1].expand(m, -1, -1, -1)) for i in range(n)])
    rows, cols = linear_sum_assignment(-table.numpy())
    out = []
    for i, j in zip(rows, cols, strict=True):
        o, r = originals[i:i + 1], reconstruction[j:j + 1]
        flat = torch.full_like(o, float(o.mean()))
        other = other_slices[i:i + 1]
        row = {"image": int(i), "reconstruction": int(j), "ssim": float(ssim(r, o)), "psnr": float(psnr(r, o)),
               "flat_ssim": float(ssim(flat, o)), "flat_psnr": float(psnr(flat, o)),
               "other_slice_ssim": float(ssim(other, o)), "other_slice_psnr": float(psnr(other, o))}
        row["beats_baselines"] = bool(row["ssim"] > max(row["flat_ssim"], row["other_slice_ssim"])
                                      and row["psnr"] > max(row["flat_psnr"], row["other_slice_psnr"]))
        out.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return sorted(out, key=lambda r: r["image"])


def summary(rows: list[dict]) -> dict:
    """Means over the images, and whether any reconstruction beat both baselines on SSIM and PSNR."""
    keys = ("ssim", "psnr", "flat_ssim", "flat_psnr", "other_slice_ssim", "other_slice_psnr")
    return {**{k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys},
            "any_beats_baselines": any(r["beats_baselines"] for r in rows)}


def grid_image(originals: torch.Tensor, reconstruction: torch.Tensor, rows: list[dict]) -> np.ndarray:
    """uint8 picture: the originals on the top row, their matched reconstructions (``score``'s rows) below."""
    n, (h, w) = len(originals), originals.shape[-2:]
    canvas = np.full((2 * h + 2, n * (w + 2) - 2), 255, dtype=np.uint8)
    for k, r in enumerate(rows):
        canvas[:h, k * (w + 2):k * (w + 2) + w] = (originals[r["image"], 0].numpy() * 255).round()
        canvas[h + 2:, k * (w + 2):k * (w + 2) + w] = (reconstruction[r["reconstruction"], 0].numpy() * 255).round()
    return canvas




# ------------------------------------------------------------------ the audit of a run

SETTINGS = ("default", "one-image-untrained", "crafted", "imprint")
SETTING_NAMES = {"default": "the run's model", "one-image-untrained": "one image, untrained model",
                 "crafted": "crafted model (one pixel per channel)", "imprint": "crafted imprint model"}
CRAFTED_SIZE = 32  # the image size a malicious server sets for its crafted model
REFERENCE_SLICES = 32  # public slices a malicious server fits its imprint bins to (stood in for by another site's)


def _slices_of(site, start: int, stop: int, pre: Preprocessing, cache_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's training slices ``start:stop`` in [0, 1], and their labels."""
    from fedbrain.data.dataset import SliceDataset

    recs = site.splits.get("train", [])
    if len(recs) < stop:
        raise ValueError(f"site {site.name!r} has {len(recs)} training images: {stop} needed")
    ds = SliceDataset(recs[start:stop], pre, cache_dir=cache_dir)
    return torch.from_numpy(ds.images).float().div(255).unsqueeze(1), ds.targets


def _site_batch(site, n: int, pre: Preprocessing, cache_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A site's first ``n`` training slices in [0, 1], their labels, and ``n`` other slices of the same site."""
    x, y = _slices_of(site, 0, 2 * n, pre, cache_dir)
    return x[:n], y[:n], x[n:]


def _imprint_reference(sites: list, n: int, pre: Preprocessing, cache_dir) -> torch.Tensor:
    """Slices standing in for the public MRI a malicious server holds: the last site's, never the attacked batch
    nor its 'other slice' baseline."""
    site, start = sites[-1], (2 * n if len(sites) == 1 else 0)
    stop = min(len(site.splits.get("train", [])), start + REFERENCE_SLICES)
    return _slices_of(site, start, stop, pre, cache_dir)[0]


def _views(setting: str, model: nn.Module, sites: list, n: int, pre: Preprocessing, cache_dir) -> list:
    """(view, originals, other slices) for each view of a setting: the target is the first site. The run's model
    and the imprint model are also seen under secure aggregation."""
    x, y, other = _site_batch(sites[0], n, pre, cache_dir)
    out = [(plain_view(model, x, y, pre), x, other)]
    if setting in ("default", "imprint") and len(sites) > 1:
        batches = [(x, y)] + [_site_batch(s, n, pre, cache_dir)[:2] for s in sites[1:]]
        samples = [len(s.splits.get("train", [])) for s in sites]
        out.append((secure_view(model, batches, samples, pre), x, other))
    return out


def _setting_model(setting: str, model: nn.Module, card, images: int, sites: list, cfg: InversionConfig,
                   cache_dir) -> tuple[nn.Module, Preprocessing, int]:
    """The model the server sends in ``setting``, the preprocessing the sites apply, and the images per batch."""
    from fedbrain.models import create_model

    pre = card.preprocessing
    if setting == "one-image-untrained":
        torch.manual_seed(cfg.seed)
        return create_model(card.model, pretrained=False).eval(), pre, 1
    if setting == "crafted":
        return crafted_model(CRAFTED_SIZE)[0], Preprocessing(**{**pre.to_dict(), "image_size": CRAFTED_SIZE}), 1
    if setting == "imprint":
        return imprint_model(model.eval(), _imprint_reference(sites, images, pre, cache_dir), pre), pre, images
    return model, pre, images


def _scored_suite(model: nn.Module, view: ServerView, x: torch.Tensor, other: torch.Tensor, pre: Preprocessing,
                  cfg: InversionConfig) -> tuple[dict, str, torch.Tensor]:
    """Each attack of the suite scored against the originals, the best one's name (highest mean SSIM: the audit
    holds the originals and reports the worst case for the site) and its reconstruction."""
    suite, scored = attack_suite(model, view, pre, cfg), {}
    for name, a in suite.items():
        if "not_applicable" in a:
            scored[name] = {"not_applicable": a["not_applicable"]}
        else:
            rows = score(a["reconstruction"], x, other)
            scored[name] = {"attack": a["info"], "images_scored": rows, "summary": summary(rows)}
    best = max((n for n in scored if "summary" in scored[n]), key=lambda n: scored[n]["summary"]["ssim"])
    return scored, best, suite[best]["reconstruction"]


def audit_run(run, images: int = 1, setting: str = "default", cfg: InversionConfig | None = None,
              cache_dir=None, checkpoint=None) -> dict:
    """Attack one round of a run's federation (its best model, its sites' images) in one setting with the whole
    suite; the result is merged into ``evaluation/inversion.json`` beside a PNG of originals over the best attack's
    reconstructions per view."""
    from pathlib import Path

    from PIL import Image

    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.federation import Federation
    from fedbrain.runs import read_json, write_json

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, not {setting!r}")
    cfg = cfg or InversionConfig()
    checkpoint = Path(checkpoint or run.best)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run}: no global model to attack ({checkpoint.name} is missing)")
    model, card = load_checkpoint(checkpoint)
    sites = list(Federation.read(run).sites.values())
    model, pre, images = _setting_model(setting, model, card, images, sites, cfg, cache_dir)
    result = read_json(run.inversion_audit) or {}
    result.update({"run": run.name, "model": checkpoint.name, "model_name": card.model})
    run.evaluations.mkdir(parents=True, exist_ok=True)
    for view, x, other in _views(setting, model, sites, images, pre, cache_dir):
        scored, best, rec = _scored_suite(model, view, x, other, pre, cfg)
        key = f"{setting}-{images}-{view.kind}"
        png = run.evaluations / f"inversion-{key}.png"
        Image.fromarray(grid_image(x, rec, scored[best]["images_scored"])).save(png)
        result.setdefault("attacks", {})[key] = {
            "setting": setting, "setting_name": SETTING_NAMES[setting], "view": view.kind, "images": images,
            "site": sites[0].name, "image_size": pre.image_size, "config": cfg.to_dict(), "best_attack": best,
            **scored[best], "suite": scored, "png": png.name}
    write_json(run.inversion_audit, result)
    return result


def audit_table(result: dict) -> str:
    """One line per setting and view: the best attack's mean SSIM / PSNR beside the baselines', then each attack
    of the suite (or why it does not apply)."""
    lines = [f"{'setting / view / attack':46} {'SSIM':>6} {'flat':>6} {'other':>6} {'PSNR':>6} {'flat':>6} "
             f"{'other':>6}  leak"]
    for key, a in (result.get("attacks") or {}).items():
        lines.append(_table_line(f"{key} (best: {a.get('best_attack', '?')})", a["summary"]))
        for name, s in (a.get("suite") or {}).items():
            lines.append(f"  {name:44} not applicable: {s['not_applicable']}" if "not_applicable" in s
                         else _table_line(f"  {name}", s["summary"]))
    return "\n".join(lines)


def _table_line(label: str, s: dict) -> str:
    return (f"{label:46} {s['ssim']:6.3f} {s['flat_ssim']:6.3f} {s['other_slice_ssim']:6.3f} {s['psnr']:6.2f} "
            f"{s['flat_psnr']:6.2f} {s['other_slice_psnr']:6.2f}  {'yes' if s['any_beats_baselines'] else 'no'}")


__all__ = ["InversionConfig", "ServerView", "VIEWS", "ATTACKS", "NotApplicable", "plain_view", "secure_view",
           "dp_view", "infer_label", "recover_features", "pooled_features", "invert_features", "invert_gradient",
           "attack_suite", "crafted_model", "ImprintModel", "imprint_model", "dense_input_layer", "analytic_recovery",
           "ssim", "psnr", "score", "summary", "grid_image", "audit_run", "audit_table", "SETTINGS", "SETTING_NAMES"]
