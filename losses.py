"""
PAE reference implementation: every loss.

Sections (each marked with a banner):
  1. flow matching       timestep sampling and the velocity loss of the DiT
  2. LPIPS               VGG16 + the v0.1 linear calibration layers
  3. tokenizer losses    the structural target H_ref; GAN, SSR, MCR, SCR, the total PAE loss; the refine loss
  4. diagnostics         LPC, GSQ, SSC and eRank of a latent space, SSIM of reconstructions
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

from model import fail, file_digest, notice

# -----------------------------------------------------------------------------
# 1. flow matching. t = 0 is noise, t = 1 is data: x_t = t*x1 + (1-t)*x0, v = x1 - x0.


def shift_time(t, shift):
    """t <- s*t / (1 + (s-1)*t): s < 1 moves time towards noise (0 -> 0, 1 -> 1, monotone)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n, shift=0.7, generator=None, device="cpu"):
    """Logit-normal t = sigmoid(u), u ~ N(0, 1), then shifted with s = 0.7 (released LightningDiT config)."""
    u = torch.randn(n, generator=generator, device=device)
    return shift_time(torch.sigmoid(u), shift)


def flow_matching_loss(velocity_pred, velocity):
    """MSE(v_hat, v) + mean(1 - cos(v_hat, v)), cosine along channels at every position; weights 1:1."""
    velocity_pred, velocity = velocity_pred.float(), velocity.float()
    mse = (velocity_pred - velocity).pow(2).mean()
    cos = 1 - F.cosine_similarity(velocity_pred, velocity, dim=1).mean()
    return mse + cos


# -----------------------------------------------------------------------------
# 2. LPIPS: VGG16 features, unit-normalised per position, squared difference, v0.1 linear layers

LPIPS_LIN_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"
LPIPS_LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"  # the v0.1 file, 7,289 bytes
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af"  # torchvision names its files by the leading digits of their SHA-256, and checks those
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]  # torchvision's


def _load_weights(path, url, sha256, flag, what):
    """A weight file as a state dict, never unpickling code (weights_only=True): the local `path`, or the torch
    hub cache's copy of `url` (downloaded once) whose SHA-256 must start with `sha256`."""
    if not path:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(url, path, progress=False)
            except Exception as e:
                fail(f"the {what} could not be downloaded ({type(e).__name__}); download {url} once on a machine "
                     f"with internet access into {os.path.dirname(path)} or pass its path with {flag}")
        digest = file_digest(path)
        if not digest.startswith(sha256):
            fail(f"{path} is not the published {what} file (SHA-256 {digest[:16]}..., expected {sha256[:16]}...); "
                 f"delete it so it is downloaded again, or pass a verified copy with {flag}")
    elif not os.path.isfile(path):
        fail(f"{flag} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} cannot be loaded as plain weights ({type(e).__name__}); it is not the {what} file, and a "
             f"file that needs more than a weights-only load is refused")


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018, v0.1, VGG16) of images in [-1, 1] -> (B,). Frozen; gradients flow only
    to the inputs. pretrained=False: random VGG16 (CPU tests), and lin_weights if given, else uniform 1/C."""

    def __init__(self, pretrained=True, vgg_weights=None, lin_weights=None):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_LAYERS:  # same module indices as torchvision's vgg16().features, so its weights load
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.vgg = nn.Sequential(*layers)
        for m in self.vgg:
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, for the random (tiny) case
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.lins = nn.ModuleList([nn.Conv2d(ch, 1, 1, bias=False) for ch in (64, 128, 256, 512, 512)])
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1 / lin.in_channels)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if pretrained or vgg_weights:
            state = _load_weights(vgg_weights, VGG16_URL, VGG16_SHA256, "--lpips_vgg_weights", "VGG16 ImageNet weights")
            self.vgg.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        else:
            notice("LPIPS: random VGG16 weights (no pretrained weights requested): distances are not calibrated")
        if pretrained or lin_weights:
            state = _load_weights(lin_weights, LPIPS_LIN_URL, LPIPS_LIN_SHA256, "--lpips_lin_weights",
                                  "LPIPS v0.1 linear layers")
            if any(f"lin{i}.model.1.weight" not in state for i in range(5)):
                fail("the LPIPS linear-layer file lacks the lin<i>.model.1.weight tensors; it is not the v0.1 vgg.pth")
            self.lins.load_state_dict({f"{i}.weight": state[f"lin{i}.model.1.weight"] for i in range(5)})
        self.requires_grad_(False).eval()

    def train(self, mode=True):  # frozen: always in eval mode
        return super().train(False)

    def features(self, images):
        """Unit-normalised (along channels) VGG16 features at the five LPIPS taps."""
        h, start, feats = (images - self.shift) / self.scale, 0, []
        for tap in self.taps:
            h = self.vgg[start:tap + 1](h)
            start = tap + 1
            feats.append(h.float() / (h.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x, y):  # two VGG passes: the backward then skips a target that needs no gradient
        return sum(lin((fx - fy) ** 2).mean((1, 2, 3)) for lin, fx, fy in zip(self.lins, self.features(x),
                                                                              self.features(y)))  # (B,)


# -----------------------------------------------------------------------------
# 3. tokenizer losses; latent tokens are (B, N, 32), pixels in [-1, 1], every loss in fp32


# the structural target H_ref of SSR and of the refine stage's Gram term


def _joint_bilateral_up(features, guide, sigma_spatial=0.5, sigma_range=0.1, radius=1):
    """Joint bilateral up-sampling (Kopf et al. 2007): features (B, C, g, g) -> (B, C, R, R), each pixel a mean of
    its (2r+1)^2 nearest tokens weighted by spatial distance (in tokens) and colour distance of the guide image
    (B, 3, R, R) in [0, 1] to the guide's mean colour under each token. sigma_spatial 0.5 tokens makes the 3 x 3
    window's cut negligible (weight 0.01 at its edge)  [our reading]."""
    g, R = features.shape[-1], guide.shape[-1]
    s = R // g
    guide_low = F.adaptive_avg_pool2d(guide, g)
    pos = (torch.arange(R, device=guide.device) + 0.5) / s - 0.5  # pixel centres in token units
    cell = torch.div(torch.arange(R, device=guide.device), s, rounding_mode="floor")
    pad = lambda x: F.pad(x, (radius,) * 4)
    feats, colours, valid = pad(features), pad(guide_low), pad(torch.ones(1, 1, g, g, device=guide.device))
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    up = lambda x, dy, dx: x[..., cell[:, None] + radius + dy, cell[None, :] + radius + dx]  # nearest, shifted
    log_weights = torch.stack([
        up(valid, dy, dx).log()  # -inf outside the grid; the centre token is always inside
        - ((pos[:, None] - cell[:, None] - dy) ** 2 + (pos[None, :] - cell[None, :] - dx) ** 2)
        / (2 * sigma_spatial ** 2)
        - (guide - up(colours, dy, dx)).pow(2).sum(1, keepdim=True) / (2 * sigma_range ** 2) for dy, dx in offsets])
    weights = torch.softmax(log_weights, dim=0)  # normalised in log space: no 0/0 when every exp underflows
    return sum(w * up(feats, dy, dx) for w, (dy, dx) in zip(weights, offsets))


def _structural_mixing(images01, g, upsample, lowpass, sigmas):
    """(b, N, N) matrix taking the g x g tokens to H_ref for each image (see structural_target)."""
    b, N, s = len(images01), g * g, max(1, images01.shape[-1] // g)  # s: pixels per token
    guide = F.interpolate(images01, size=s * g, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    eye = torch.eye(N, device=images01.device).view(1, N, g, g).expand(b, -1, -1, -1)
    if upsample == "bilateral":
        up = _joint_bilateral_up(eye, guide, *sigmas)
    else:
        up = F.interpolate(eye, size=s * g, mode="bilinear", align_corners=False)
    if lowpass > 0:  # separable Gaussian blur, sigma = lowpass tokens = lowpass * s pixels
        sigma = lowpass * s
        taps = torch.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, device=up.device, dtype=up.dtype)
        kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).repeat(N, 1, 1, 1)  # (N, 1, 1, k), one filter per channel
        k = kernel.shape[-1] // 2
        up = F.conv2d(F.pad(up, (k, k, 0, 0), mode="replicate"), kernel, groups=N)
        up = F.conv2d(F.pad(up, (0, 0, k, k), mode="replicate"), kernel.transpose(-1, -2), groups=N)
    down = F.interpolate(up, size=g, mode="bilinear", align_corners=False)  # (b, N_in, g, g)
    return down.flatten(2).transpose(1, 2)  # (b, N_out, N_in)


@torch.no_grad()
def structural_target(images01, vfm_tokens, upsample="bilateral", lowpass=0.4, sigmas=(0.5, 0.1)):
    """H_ref (B, N, W): VFM tokens up-sampled to the image resolution (256 px: 16 px per token) guided
    by the image, low-pass filtered, bilinear down to the token grid. The low-pass is a Gaussian blur with sigma =
    lowpass tokens (0.4 * 16 = 6.4 px at 256 px). The whole map is linear in the tokens, so we push the identity
    through it once per image, giving an (N, N) mixing matrix, and apply that to the tokens."""
    if upsample not in ("bilateral", "bilinear"):
        fail(f"unknown up-sampling {upsample!r}; valid: bilateral, bilinear")
    g = math.isqrt(vfm_tokens.shape[1])
    with torch.autocast(vfm_tokens.device.type, enabled=False):  # a target: fp32 throughout
        if upsample == "bilinear":  # no image guidance: one matrix for every image, computed once per shape
            key = (g, tuple(images01.shape[-2:]), lowpass, str(images01.device))
            if key not in _BILINEAR_MIXING:
                _BILINEAR_MIXING[key] = _structural_mixing(images01[:1].float(), g, upsample, lowpass, sigmas)[0]
            return _BILINEAR_MIXING[key] @ vfm_tokens.float()
        mixing = [_structural_mixing(chunk, g, upsample, lowpass, sigmas) for chunk in images01.float().split(8)]
        return torch.cat(mixing) @ vfm_tokens.float()  # chunks of 8 images bound memory: (8, N, 256, 256)


_BILINEAR_MIXING = {}  # (grid, image size, lowpass, device) -> (N, N)


def hinge_d_loss(real_logits, fake_logits):
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def gram(tokens):
    """(B, N, C) -> (B, N, N) cosine similarities of the tokens, in fp32 even under autocast."""
    with torch.autocast(tokens.device.type, enabled=False):
        tokens = F.normalize(tokens.float(), dim=-1)
        return tokens @ tokens.transpose(1, 2)


def ssr_loss(latent_tokens, target_tokens):
    """Spatial structure: mean((G_z - G_T)^2) over the N x N entries; any channel widths."""
    return (gram(latent_tokens) - gram(target_tokens)).pow(2).mean()


def scr_loss(latent_tokens, target_tokens, mode="full"):
    """Semantic consistency: (1 - cos(GAP(z), GAP(Z_T))) + mean_i(1 - cos(z_i, Z_T,i)); 0 aligned, 4 opposite.
    mode: full (both terms, the paper's), pooled (the first only) or patch (the second only)."""
    z, t = latent_tokens.float(), target_tokens.float()
    pooled = 1 - F.cosine_similarity(z.mean(1), t.mean(1), dim=-1).mean() if mode != "patch" else 0
    return pooled + ((1 - F.cosine_similarity(z, t, dim=-1)).mean() if mode != "pooled" else 0)


def l1_lpips(pred, target, lpips_net):
    """[L1 + LPIPS] per image (B,), images in [-1, 1]; L1 alone when lpips_net is None."""
    l1 = (pred.float() - target.float()).abs().mean((1, 2, 3))
    return l1 if lpips_net is None else l1 + lpips_net(pred.float(), target.float())


def mcr_loss(recon, rotated, lpips_net):
    """Cascaded manifold continuity: each rotated decoding matches the next-less-perturbed one, which is
    detached: [L1 + LPIPS](x_m, sg(x_r)) + [L1 + LPIPS](x_l, sg(x_m)). Images in [-1, 1]; one LPIPS pass."""
    targets = [recon.detach()] + [x.detach() for x in rotated[:-1]]
    return l1_lpips(torch.cat(rotated), torch.cat(targets), lpips_net).sum() / len(recon)


def pae_loss(out, images01, lpips_net, refiner=None, disc=None, l1=1.0, lpips=1.0, gan=0.5, ssr=0.2, mcr=0.5,
             scr=1.0, kl=0.0, h_ref=None, ssr_target="h_ref", scr_mode="full"):
    """Total tokenizer loss from out = pae(images01, thetas_deg) -> (total, parts: the unweighted terms, detached).
    GAN only with a discriminator (after disc_start); SCR needs the frozen P_t (refiner.target); a zero weight skips
    its term (lpips=0 inside MCR too). h_ref: structural_target's settings; ssr_target: h_ref, or z_t (the paper's
    equation); kl: the weight of out["kl"] (the kl ablation)."""
    x, recon = images01.float() * 2 - 1, out["recon"].float() * 2 - 1
    parts = {"l1": (recon - x).abs().mean()}
    if lpips:
        parts["lpips"] = lpips_net(recon, x).mean()
    if gan and disc is not None:
        parts["gan"] = -disc(recon).float().mean()
    latent_tokens = out["latent"].flatten(2).transpose(1, 2)  # (B, N, 32)
    if (scr or ssr and ssr_target == "z_t") and refiner is None:
        fail("the SCR loss (and SSR against Z_T) needs the target network P_t: pass the refine-stage checkpoint")
    with torch.no_grad():
        z_t = refiner.target(out["vfm_tokens"]) if refiner is not None else None  # (B, N, 32)
    if ssr:
        target = z_t if ssr_target == "z_t" else structural_target(images01, out["vfm_tokens"], **(h_ref or {}))
        parts["ssr"] = ssr_loss(latent_tokens, target)
    if mcr:
        if not out["rotated"]:
            fail("the MCR loss needs the rotated decodings: call pae(images, thetas_deg=(42.5, 85.0))")
        parts["mcr"] = mcr_loss(recon, [r.float() * 2 - 1 for r in out["rotated"]], lpips_net if lpips else None)
    if scr:
        parts["scr"] = scr_loss(latent_tokens, z_t, scr_mode)
    if kl:
        parts["kl"] = out["kl"].mean()
    weights = {"l1": l1, "lpips": lpips, "gan": gan, "ssr": ssr, "mcr": mcr, "scr": scr, "kl": kl}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


def refine_loss(refiner, vfm_tokens, H_ref, gram_weight):
    """L_refine = ||Q_t(P_t(H)) - H||^2 (mean) + gram_weight * mean((Gram(Z_T) - Gram(H_ref))^2); refiner(tokens)
    -> (Z_T, H_hat), so a DDP wrapper of the refiner syncs its gradients."""
    z_t, h_hat = refiner(vfm_tokens)
    rec = (h_hat.float() - vfm_tokens.float()).pow(2).mean()
    structure = ssr_loss(z_t, H_ref)
    return rec + gram_weight * structure, {"rec": rec.detach(), "gram": structure.detach()}


# -----------------------------------------------------------------------------
# 4. latent-space diagnostics


@torch.no_grad()
def lpc(decode, latent, lpips_net, rhos=(0.1, 0.5, 1.0, 2.0), generator=None):
    """Local perceptual continuity (lower is better): sum_rho w_rho E[(LPIPS(D(z+eps u), D(z)) + LPIPS(D(z-eps u),
    D(z))) / 2], eps = rho ||z||, u a random unit direction per latent, w_rho ∝ 1/rho normalised. -> (B,)."""
    B = len(latent)
    clean = decode(latent) * 2 - 1
    u = torch.randn(latent.shape, generator=generator, device=latent.device)
    u = u / u.flatten(1).norm(dim=1).view(B, 1, 1, 1)
    z_norm = latent.flatten(1).norm(dim=1).view(B, 1, 1, 1)
    weights = torch.tensor([1 / r for r in rhos])
    score = 0
    for rho, w in zip(rhos, weights / weights.sum()):
        shifted = decode(torch.cat([latent + rho * z_norm * u, latent - rho * z_norm * u])) * 2 - 1
        score = score + w * lpips_net(shifted, torch.cat([clean, clean])).view(2, B).mean(0)
    return score


@torch.no_grad()
def ssim(x, y, window=11, sigma=1.5):
    """SSIM (Wang et al. 2004) per image (B,) of images in [0, 1]: Gaussian window of 11 taps with sigma 1.5,
    C1 = 0.01^2, C2 = 0.03^2, population (co)variances, averaged over the valid region and the channels; equal to
    skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)."""
    x, y = x.float(), y.float()
    taps = torch.arange(window, device=x.device, dtype=torch.float32) - window // 2
    g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean((1, 2, 3))


@torch.no_grad()
def gsq(pooled, labels, classes_per_draw=100, draws=5, seed=0):
    """Global semantic quality (higher is better) of pooled latents (M, C) with labels (M,): centred, L2-normalised,
    the fraction whose leave-one-out cosine nearest neighbour has the same label. The paper's protocol: `draws`
    draws of classes_per_draw random classes when there are more classes, else all of them once. -> (mean, std)."""
    classes, rng, scores = labels.unique(), np.random.default_rng(seed), []
    for _ in range(draws if len(classes) > classes_per_draw else 1):
        keep = torch.isin(labels, classes[torch.from_numpy(rng.permutation(len(classes))[:classes_per_draw])])
        x = F.normalize(pooled[keep].float() - pooled[keep].float().mean(0), dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        scores.append((labels[keep][sim.argmax(1)] == labels[keep]).float().mean().item())
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def ssc(latents, masks, sigma=0.1, clusters=0):
    """Spatial structure coherence (higher is better): latents (B, C, H, W), object labels (B, H', W') -> mean NMI
    in [0, 1]. Per image: l2-normalised tokens, affinity exp(<z_i, z_j> / sigma), zero diagonal; normalised spectral
    clustering (Ng, Jordan, Weiss) into `clusters` (0: the image's object count); NMI I(y; c) / sqrt(H(y) H(c))
    against the labels down-sampled (nearest) to the token grid. Single-object images are left out (all: NaN)."""
    tokens = F.normalize(latents.double().flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
    labels = F.interpolate(masks[:, None].double(), size=latents.shape[-2:], mode="nearest").flatten(1)  # (B, N)
    scores = []
    for z, y in zip(tokens, labels):
        y = y.unique(return_inverse=True)[1]
        k = clusters or int(y.max()) + 1
        if y.max() == 0:
            continue
        affinity = torch.exp(z @ z.T / sigma).fill_diagonal_(0)
        scale = affinity.sum(1).rsqrt()
        embedding = F.normalize(torch.linalg.eigh(scale[:, None] * affinity * scale)[1][:, -k:], dim=1)  # top k
        assign = torch.from_numpy(kmeans2(embedding.numpy(), k, minit="++", seed=0)[1]).long()  # k-means, seeded
        joint = torch.zeros(int(y.max()) + 1, k, dtype=torch.float64).index_put_(
            (y, assign), torch.ones(len(y), dtype=torch.float64), accumulate=True) / len(y)
        p_y, p_c = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
        entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
        info = (joint[joint > 0] * (joint / (p_y * p_c))[joint > 0].log()).sum()
        scores.append((info / (entropy(p_y) * entropy(p_c)).sqrt().clamp_min(1e-12)).item())
    return float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def erank(features):
    """Effective rank of features (N, C) over C, in (0, 1]: exp of the entropy of the normalised singular values."""
    s = torch.linalg.svdvals(features.double())
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * p.log()).sum()) / features.shape[1])
