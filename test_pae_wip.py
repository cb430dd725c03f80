import math
import os

import lpips as lpips_pkg
import pytest
import torch
import torch.nn.functional as F

import losses
import model

LPIPS_LIN = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return model.build_pae(preset="tiny")


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    return losses.LPIPS(pretrained=False, lin_weights=LPIPS_LIN)


def test_pae_paper_parameter_counts():
    with torch.device("meta"):
        pae = model.build_pae(pretrained=False)  # DINOv2-L + decoder L, SPEC §4.5
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    table = {name: round(count(getattr(pae, name)) / 1e6, 2) for name in ("dam", "projector", "deprojector", "decoder")}
    assert table == {"dam": 103.50, "projector": 4.49, "deprojector": 4.49, "decoder": 304.15}
    total = sum(p.numel() for p in pae.trainable_parameters())
    assert abs(total / 416.63e6 - 1) < 0.01
    assert count(pae.vfm) == 0 and abs(sum(p.numel() for p in pae.vfm.parameters()) / 303.2e6 - 1) < 0.01
    assert pae.vfm.grid == 16 and pae.image_size == 256 and pae.decoder.patch == 16


def test_pae_init_identity_sphere_and_frozen_vfm(lpips_net):
    pae, images = _tiny(), _images()
    vfm_tokens = pae.vfm(images)
    assert not vfm_tokens.requires_grad and vfm_tokens.shape == (4, 64, 64)  # 8x8 grid, class token dropped
    h_z = pae.dam(pae.vfm.preprocess(images), vfm_tokens)
    torch.testing.assert_close(h_z, F.layer_norm(vfm_tokens, (64,)), rtol=0, atol=1e-6)  # zero-init SFT
    latent = pae.encode(images)
    assert latent.shape == (4, 32, 8, 8)
    assert (latent.norm(dim=1) / math.sqrt(32) - 1).abs().max() < 1e-4
    vfm_before = {k: v.clone() for k, v in pae.vfm.net.state_dict().items()}
    trainable = pae.trainable_parameters()
    assert not any(p is q for p in trainable for q in pae.vfm.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    total, _ = losses.pae_loss(pae(images, (42.5, 85.0)), images, lpips_net, model.build_refiner(64, "tiny"),
                               model.PatchDiscriminator(16))
    total.backward()
    opt.step()
    assert all(p.grad is None for p in pae.vfm.parameters())
    assert all(torch.equal(v, vfm_before[k]) for k, v in pae.vfm.net.state_dict().items())
    assert pae.dam.sft.weight.grad.abs().sum() > 0  # the modulation does learn


def test_mcr_rotation_angles_and_shared_direction():
    latent = model.sphere(torch.randn(3, 32, 4, 4))
    z_m, z_l = model.mcr_rotate(latent, (42.5, 85.0))
    for z, theta in ((z_m, 42.5), (z_l, 85.0)):
        torch.testing.assert_close(z.norm(dim=1), latent.norm(dim=1), rtol=0, atol=1e-4)
        cos = F.cosine_similarity(z, latent, dim=1).clamp(-1, 1)
        assert (torch.rad2deg(torch.acos(cos.double())) - theta).abs().max() < 1e-3
    d_m = (z_m - math.cos(math.radians(42.5)) * latent) / math.sin(math.radians(42.5))
    d_l = (z_l - math.cos(math.radians(85.0)) * latent) / math.sin(math.radians(85.0))
    torch.testing.assert_close(d_m, d_l, rtol=0, atol=1e-4)  # one shared direction for both angles


def test_mcr_cascade_stops_gradient_at_targets(lpips_net):
    recon, x_m, x_l = (torch.rand(2, 3, 32, 32, requires_grad=True) for _ in range(3))
    losses.mcr_loss(recon, [x_m, x_l], lpips_net).backward()
    assert recon.grad is None  # the clean decoding is only ever a target
    grad_m = x_m.grad.clone()
    x_m.grad = None
    (losses.l1_lpips(x_m, recon.detach(), lpips_net).sum() / 2).backward()
    torch.testing.assert_close(grad_m, x_m.grad)  # x_m gets no gradient from being x_l's target
    assert x_l.grad.abs().sum() > 0


def test_ssr_and_scr_values():
    z = torch.randn(2, 16, 32)
    basis = torch.linalg.qr(torch.randn(64, 32))[0]  # (64, 32), orthonormal columns
    assert losses.ssr_loss(z, z @ basis.T) < 1e-10  # equal Gram, different widths
    rotation = torch.linalg.qr(torch.randn(32, 32))[0]
    target = torch.randn(2, 16, 64)
    torch.testing.assert_close(losses.ssr_loss(z @ rotation, target), losses.ssr_loss(z, target))
    assert losses.ssr_loss(z, target) > 0.01
    assert losses.scr_loss(z, 3 * z).abs() < 1e-6
    torch.testing.assert_close(losses.scr_loss(z, -z), torch.tensor(4.0))  # 2 per term: pooled + per token


def test_hinge_and_discriminator():
    assert losses.hinge_d_loss(torch.ones(4), -torch.ones(4)) == 0
    assert losses.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 2
    assert losses.hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), 0.5)) == 1.5
    logits = model.PatchDiscriminator(16)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 3 stride-2 layers then two stride-1 4x4 convs: 64 -> 8 -> 7 -> 6


def test_lpips_matches_reference_package(lpips_net):
    torch.manual_seed(1)
    ref = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # random VGG16 + shipped v0.1 lin layers
    vgg = {}
    for i in range(1, 6):
        vgg.update(getattr(ref.net, f"slice{i}").state_dict())  # keys keep torchvision's feature indices
    lpips_net.vgg.load_state_dict(vgg)
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    ours = lpips_net(x, y)
    assert ours.shape == (3,)
    assert (ours - ref(x, y).flatten()).abs().max() < 1e-5
    assert lpips_net(x, x).abs().max() < 1e-7


def test_structural_target_preserves_constants_and_follows_edges():
    B, g, W = 1, 4, 8
    images = torch.zeros(B, 3, 64, 64)
    images[..., 32:] = 1  # left half black, right half white: the edge lies between token columns 1 and 2
    constant = torch.randn(1, 1, W).expand(B, g * g, W)
    for mode in ("bilateral", "bilinear"):
        torch.testing.assert_close(model.structural_target(images, constant, mode), constant, rtol=0, atol=1e-5)
    side = torch.tensor([-1.0, -1, 1, 1]).repeat(g).view(1, g * g, 1).expand(B, -1, W)  # -1 left, +1 right
    bilateral = model.structural_target(images, side, "bilateral", lowpass=0)
    bilinear = model.structural_target(images, side, "bilinear", lowpass=0)
    assert (bilateral * side).min() > (bilinear * side).min() + 0.05  # the guide keeps the two sides apart
    assert (model.structural_target(images, side, "bilateral") * side).min() < (bilateral * side).min()  # blur


def test_refiner_targets_and_loss():
    torch.manual_seed(0)
    refiner = model.build_refiner(64, "tiny")
    vfm_tokens = torch.randn(2, 16, 64)
    z_t = refiner.target(vfm_tokens)
    assert z_t.shape == (2, 16, 32) and (z_t.norm(dim=-1) / math.sqrt(32) - 1).abs().max() < 1e-4
    assert refiner.reconstruct(z_t).shape == (2, 16, 64)
    loss, parts = losses.refine_loss(refiner, vfm_tokens, vfm_tokens, gram_weight=2.0)
    torch.testing.assert_close(loss, parts["rec"] + 2.0 * parts["gram"])
    assert model.build_refiner(**refiner.refiner_args) is not None


def test_checkpoint_roundtrip_without_vfm_weights(tmp_path):
    pae = _tiny(seed=3)
    images = _images()
    assert not any(k.startswith("vfm.") for k in pae.state_dict())
    path = str(tmp_path / "ae.pt")
    model.save_checkpoint(path, "pae", pae, {"preset": "tiny"}, 7, pae_args=pae.pae_args)
    torch.manual_seed(123)  # a different global RNG state must not change the tiny VFM
    loaded = model.pae_from_checkpoint(path)
    with torch.no_grad():
        latent = pae.encode(images)
        torch.testing.assert_close(loaded.encode(images), latent, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(latent), pae.decode(latent), rtol=0, atol=0)
    with pytest.raises(SystemExit, match="'pae' checkpoint"):
        model.save_checkpoint(path, "dit", pae, {}, 0)
        model.pae_from_checkpoint(path)


def test_tiny_pae_loss_falls(lpips_net):
    pae, images = _tiny(), _images(4)
    torch.manual_seed(0)
    refiner, disc = model.build_refiner(64, "tiny").requires_grad_(False), model.PatchDiscriminator(16)
    opt = torch.optim.AdamW(pae.trainable_parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        total, parts = losses.pae_loss(pae(images, (42.5, 85.0)), images, lpips_net, refiner, disc)
        assert set(parts) == {"l1", "lpips", "gan", "ssr", "mcr", "scr"}
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5


def test_diagnostics_gsq_and_lpc(lpips_net):
    labels = torch.arange(4).repeat_interleave(5)
    centres = torch.randn(4, 32, 1, 1) * 10
    latents = centres[labels] + torch.randn(20, 32, 2, 2)
    assert losses.gsq(latents, labels) == 1.0
    assert losses.gsq(latents, labels[torch.randperm(20, generator=torch.Generator().manual_seed(0))]) < 0.6
    latent = model.sphere(torch.randn(2, 32, 4, 4))
    constant_decoder = lambda z: torch.full((len(z), 3, 32, 32), 0.5)
    assert losses.lpc(constant_decoder, latent, lpips_net).abs().max() < 1e-7
    pae = _tiny()
    score = losses.lpc(pae.decode, latent.expand(2, -1, 8, 8).contiguous(), lpips_net)
    assert score.shape == (2,) and (score > 0).all()
