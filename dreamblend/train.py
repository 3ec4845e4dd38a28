"""DreamBlend: blend an early (underfit) and a late (overfit) fine-tuning checkpoint at inference.

Citation: Shwetha Ram, Tal Neiman, Qianli Feng, Andrew Stuart, Son Tran, Trishul Chilimbi.
"DreamBlend: Advancing Personalized Fine-tuning of Text-to-Image Diffusion Models", WACV 2025,
arXiv:2411.19390. Only the abstract, the Fig. 1 caption and the first lines of the introduction
could be read. The algorithm below is OUR RECONSTRUCTION [R] on top of the pix2pix-zero
cross-attention-guidance recipe (Parmar et al. 2023) and diffusers' DreamBooth script; the
numbering (A1), (B1), (C1), (D1)-(D3) is the one of our notes (shared/papers/dreamblend.md), not
the paper's.

The idea: fine-tuning a text-to-image diffusion model on a few photos of one subject (DreamBooth)
moves along a trade-off. Early checkpoints still obey the prompt ("on a teal background") and vary
their layouts, but the subject looks generic; late checkpoints render the subject faithfully but
ignore the context words, because every token's cross-attention collapses onto the subject.
DreamBlend keeps both checkpoints: it generates a reference image with the early one, recording its
cross-attention maps, and then generates with the late one, nudging the latent at each denoising
step so that the late model's cross-attention maps match the early model's. Optionally (--invert)
the late model starts from the DDIM inversion of the early image; in this miniature that pulls the
result back to the early image, so it is off by default. In the miniature the blend restores
prompt fidelity but lands on, not above, the checkpoints' trade-off curve (see the README).

Notation (notes -> code):
    theta_s          ckpts[s]          UNet weights after s fine-tuning steps
    s_e, s_l         early_step, steps early (underfit) and late (overfit) checkpoint
    P                prompt ids        (B, N) token ids, e.g. "a sks square on teal"
    z_t              z                 (B, C, H, W) noisy sample (pixels in the toy)
    A_{t,l}          maps[l]           (B*heads, H_l*W_l, N) cross-attention probabilities
    A^ref_{t,l}      ref_maps[i][l]    maps recorded from the early checkpoint at step i
    lambda           guidance_lr       step size of the latent update (D2)
    w                cfg_scale         classifier-free guidance scale (D3)
    alpha_bar_t      alpha_bar         cumulative product of the noise schedule
    v                v                 v-prediction target sqrt(ab) eps - sqrt(1-ab) x0
Dimensions: B batch, C channels, H/W image side, N text tokens, D text width.

What the miniature simplifies: 16x16 RGB pixel-space images of a coloured shape on a coloured
background instead of 512px latents of Stable Diffusion; a 2-layer CLIP text encoder and a 0.25 M
parameter UNet pre-trained here in a minute; pixel statistics instead of DINO / CLIP / LPIPS.

Run:   python dreamblend/train.py          (about 1-2 minutes on 2 CPU cores, cached re-run less)
Ends:  a table `method | prompt-fid | subject-fid | diversity` with rows for the checkpoints,
       DreamBlend and its two ablations (with DDIM inversion, inversion only with lambda = 0).
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from tqdm import tqdm

FOLDER = "dreamblend"


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu, or cuda (toy or --pretrained)"})
    steps: int = field(default=400, metadata={"help": "DreamBooth fine-tuning steps = late "
                                                       "checkpoint s_l (paper: not found)"})
    pre_steps: int = field(default=400, metadata={"help": "pre-training steps of the toy model"})
    pre_batch: int = field(default=32, metadata={"help": "pre-training batch size"})
    pre_lr: float = field(default=1e-3, metadata={"help": "pre-training learning rate"})
    ft_lr: float = field(default=5e-4, metadata={"help": "fine-tuning learning rate "
                                                        "(DreamBooth SD: 5e-6)"})
    n_instance: int = field(default=4, metadata={"help": "photos of the personal subject"})
    n_class: int = field(default=8, metadata={"help": "class images for prior preservation"})
    prior_weight: float = field(default=1.0, metadata={"help": "lambda_prior of (A1)"})
    checkpoints: str = field(default="0,20,50,100,200", metadata={
        "help": "comma list of fine-tuning steps kept as checkpoints (the last step is added)"})
    early_step: int = field(default=20, metadata={"help": "early checkpoint s_e (must be listed)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps (paper setting: 50)"})
    # DEVIATION: CFG 1.5, not 7.5: larger scales over-saturated the tiny model's backgrounds.
    cfg_scale: float = field(default=1.5, metadata={"help": "classifier-free guidance w (SD: 7.5)"})
    guidance_lr: float = field(default=1.0, metadata={"help": "lambda, latent step of (D2) "
                                                             "(pix2pix-zero: 0.1)"})
    guided_steps: int = field(default=20, metadata={"help": "guide the first K DDIM steps"})
    invert: bool = field(default=False, metadata={
        "help": "start the late model from the DDIM inversion of the early image (C1)"})
    eval_seeds: int = field(default=6, metadata={"help": "samples per evaluation prompt"})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})
    pretrained: str = field(default="", metadata={
        "help": "real scale: a Stable Diffusion name/path for from_pretrained (needs cuda)"})
    instance_dir: str = field(default="", metadata={"help": "real scale: folder of subject photos"})
    instance_prompt: str = field(default="a photo of sks dog", metadata={
        "help": "real scale: instance prompt"})
    class_prompt: str = field(default="a photo of a dog", metadata={
        "help": "real scale: class prompt for prior preservation"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=6, pre_steps=8, pre_batch=8, checkpoints="0,2", early_step=2, n_class=4,
             sample_steps=4, guided_steps=4, eval_seeds=2, log_every=2)
DEVICES = ("cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line on stderr and exit code 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> Config:
    p = _Parser(prog=f"{FOLDER}/train.py", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                           choices=DEVICES if f.name == "device" else None)
    cfg = Config(**vars(p.parse_args(argv)))
    for name in ("steps", "pre_steps", "pre_batch", "n_instance", "n_class", "sample_steps",
                 "eval_seeds", "log_every"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("guidance_lr", "prior_weight", "guided_steps"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    try:
        ckpt_steps(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def ckpt_steps(cfg: Config) -> list[int]:
    """The sorted fine-tuning steps kept as checkpoints (always 0, s_e and the last step)."""
    try:
        steps = {int(s) for s in cfg.checkpoints.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"--checkpoints must be integers, got {cfg.checkpoints!r}") from None
    steps |= {0, cfg.early_step, cfg.steps}
    if min(steps) < 0 or max(steps) > cfg.steps:
        raise ValueError(f"--checkpoints and --early-step must lie in [0, --steps={cfg.steps}]")
    return sorted(steps)


# %% 3. Seeding
def set_seed(seed: int) -> torch.Generator:
    """PLUMBING: seed torch/numpy/random; data and noise also draw from an explicit Generator."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# %% 4. Toy data: coloured shapes on coloured backgrounds, and one personal subject
# PLUMBING: a 14-token vocabulary; a prompt is "a {colour} {shape} on {bg}", right-padded with 0.
VOCAB = ["<pad>", "a", "square", "circle", "on", "sks",
         "red", "blue", "yellow", "white", "gray", "teal", "purple", "orange"]
TOK = {w: i for i, w in enumerate(VOCAB)}
N_TOKENS = 5
OBJ_COLOURS = {"red": (1, -1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1), "white": (1, 1, 1)}
BG_COLOURS = {"gray": (0, 0, 0), "teal": (-1, 0.4, 0.4), "purple": (0.4, -1, 0.6),
              "orange": (1, 0.1, -0.9)}
SIDE = 16
EVAL_BGS = ("teal", "purple", "orange")  # never seen together with "sks"


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Whitespace tokenizer. Returns (B, N) int64 ids, right-padded with <pad>=0."""
    ids = torch.zeros(len(prompts), N_TOKENS, dtype=torch.long)  # (B, N)
    for b, p in enumerate(prompts):
        words = p.split()[:N_TOKENS]
        ids[b, :len(words)] = torch.tensor([TOK[w] for w in words])
    return ids


def render(shape: str, colour, bg, size: int, cx: int, cy: int, checker=False) -> torch.Tensor:
    """One 16x16 image in [-1, 1]. colour/bg are RGB triples. Returns (3, 16, 16)."""
    img = torch.tensor(bg, dtype=torch.float32)[:, None, None].repeat(1, SIDE, SIDE)  # (3, H, W)
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")  # (H, W)
    if shape == "square":
        mask = ((xx - cx + 0.5).abs() * 2 < size) & ((yy - cy + 0.5).abs() * 2 < size)  # (H, W)
    else:
        mask = ((xx - cx + 0.5) ** 2 + (yy - cy + 0.5) ** 2) <= (size / 2) ** 2  # (H, W)
    if checker:
        # the subject: black/white 2-px checks, phase anchored at the square's corner
        phase = (((xx - (cx - size // 2)) // 2 + (yy - (cy - size // 2)) // 2) % 2) * 2 - 1
        fill = phase.float()[None].repeat(3, 1, 1)  # (3, H, W)
    else:
        fill = torch.tensor(colour, dtype=torch.float32)[:, None, None].expand(3, SIDE, SIDE)
    return torch.where(mask[None], fill, img)  # (3, H, W)


def make_base_batch(n: int, gen: torch.Generator, drop_p=0.3):
    """Pre-training data: n random shapes. Colour or background words are dropped with prob drop_p
    (the image keeps a random one), so the model also knows short class prompts like "a square".
    Returns images (n, 3, 16, 16) and token ids (n, N)."""
    imgs, prompts = [], []
    cols, bgs = list(OBJ_COLOURS), list(BG_COLOURS)
    for _ in range(n):
        r = torch.randint(0, 10_000, (6,), generator=gen).tolist()
        shape = ("square", "circle")[r[0] % 2]
        col, bg = cols[r[1] % 4], bgs[r[2] % 4]
        size = (6, 8)[r[3] % 2]
        cx, cy = 8 + (r[4] % 5) - 2, 8 + (r[5] % 5) - 2
        imgs.append(render(shape, OBJ_COLOURS[col], BG_COLOURS[bg], size, cx, cy))
        drop = torch.rand(2, generator=gen)
        # DEVIATION: random word dropping, so the class prompt "a square" is meaningful
        words = ["a"] + ([] if drop[0] < drop_p else [col]) + [shape]
        words += [] if drop[1] < drop_p else ["on", bg]
        prompts.append(" ".join(words))
    return torch.stack(imgs), tokenize(prompts)  # (n, 3, H, W), (n, N)


def make_subject(n: int, gen: torch.Generator) -> torch.Tensor:
    """The personal subject: an 8-px checkerboard square on gray, centre +-1 px. (n, 3, 16, 16)."""
    out = []
    for _ in range(n):
        dx, dy = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
        out.append(render("square", None, BG_COLOURS["gray"], 8, 8 + dx, 8 + dy, checker=True))
    return torch.stack(out)  # (n, 3, H, W)


# %% 5. Models: a tiny CLIP text encoder and a tiny UNet2DConditionModel (built from configs)
def build_models(device="cpu"):
    """Returns (text_encoder, unet, train_scheduler, sample_scheduler), freshly initialised."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=N_TOKENS, pad_token_id=0,
        bos_token_id=1, eos_token_id=0)).to(device)
    unet = build_unet().to(device)
    # DEVIATION: v-prediction (SD 1.x: eps); with eps the tiny model ignored the prompt (notes).
    sched_kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                    prediction_type="v_prediction")
    return (text_encoder, unet, DDPMScheduler(**sched_kw),
            DDIMScheduler(clip_sample=True, **sched_kw))


def build_unet():
    """The toy UNet: cross-attention (attn2) only at 8x8 and in the middle block."""
    from diffusers import UNet2DConditionModel
    # DEVIATION: no cross-attention at 16x16; attention over 256 queries dominated CPU step time.
    return UNet2DConditionModel(
        sample_size=SIDE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)


# %% 6. The paper's core (reconstructed [R]) as pure functions
class AttnStore:
    """PLUMBING: where the storing processors put the cross-attention maps of one UNet call."""

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}

    def clear(self):
        self.maps = {}


class StoringAttnProcessor:
    """diffusers' AttnProcessor logic (explicit softmax via attn.get_attention_scores), plus: the
    cross-attention probabilities (B*heads, H*W, N) are kept in `store.maps[name]`. Self-attention
    (encoder_hidden_states is None) is computed the same way but never stored."""

    def __init__(self, store: AttnStore, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        batch, seq_len, _ = ctx.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        if is_cross and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.head_to_batch_dim(attn.to_k(ctx))  # (B*heads, N, d)
        v = attn.head_to_batch_dim(attn.to_v(ctx))  # (B*heads, N, d)
        # A = softmax(Q K^T / sqrt(d))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B*heads, HW, N)
        if is_cross:
            self.store.maps[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, v))  # (B, HW, C)
        out = attn.to_out[1](attn.to_out[0](out))  # (B, HW, C)
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_store(unet) -> AttnStore:
    """Swap every attention processor of `unet` for a StoringAttnProcessor; return the store."""
    store = AttnStore()
    unet.set_attn_processor({n: StoringAttnProcessor(store, n) for n in unet.attn_processors})
    return store


def v_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v-prediction target v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0, per sample. (B, C, H, W)."""
    ab = scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    # (A1) target for v-prediction: v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def dreambooth_loss(pred, target, n_instance: int, prior_weight: float) -> torch.Tensor:
    """(A1): L = mse(pred_inst, target_inst) + lambda_prior * mse(pred_prior, target_prior).

    pred/target: (B, C, H, W) with the first n_instance rows the instance images and the rest the
    class (prior) images, as diffusers' train_dreambooth.py concatenates them."""
    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: the DreamBooth loss (A1): instance MSE plus lambda_prior times the prior MSE.
    inst = F.mse_loss(pred[:n_instance], target[:n_instance])
    if n_instance == len(pred):
        return inst
    prior = F.mse_loss(pred[n_instance:], target[n_instance:])
    # (A1): L = L_instance + lambda_prior * L_prior
    loss = inst + prior_weight * prior
    # END SOLUTION
    return loss


def attention_loss(maps: dict, ref_maps: dict, batch: int, token_w=None) -> torch.Tensor:
    """(D1) [R]: L_t = sum_l || A_{t,l} - A^ref_{t,l} ||_F^2, per sample.

    maps/ref_maps: layer name -> (B*heads, HW, N). The squared error is summed over (HW, N) and
    averaged over heads, as pix2pix-zero does, but kept per sample (pix2pix-zero averages over the
    batch too), so the step on one sample does not depend on the batch size. token_w: optional
    (N,) weights on the token axis (1 = guided, 0 = free); None guides every token. Returns (B,)."""
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: compute the per-sample cross-attention guidance loss (D1), summed over layers.
    total = 0.0
    for name, ref in ref_maps.items():
        a = maps[name]
        # (D1) [R]: squared difference of the late model's and the reference maps
        sq = (a - ref.to(a.device)) ** 2  # (B*heads, HW, N)
        if token_w is not None:
            sq = sq * token_w.to(a.device)  # (B*heads, HW, N)
        # ||.||_F^2 over (HW, N), then the mean over heads of each sample
        d = sq.sum((1, 2))  # (B*heads,)
        total = total + d.view(batch, -1).mean(1)  # (B,)
    # END SOLUTION
    return total


def unet_v(unet, z, t, emb):
    """The v-prediction of `unet` at step t. z (B, C, H, W), emb (B, N, D) -> (B, C, H, W)."""
    tt = torch.full((len(z),), int(t), device=z.device, dtype=torch.long)  # (B,)
    return unet(z, tt, encoder_hidden_states=emb).sample


def guidance_step(unet, store: AttnStore, z, t, emb, ref_maps: dict, lam: float, token_w=None):
    """(D2) [R]: z_t <- z_t - lambda * grad_{z_t} L_t(z_t). Only the latent gets a gradient.

    Returns the updated latent (detached) and the loss before the step (B,)."""
    x = z.detach().requires_grad_(True)  # fresh leaf (B, C, H, W)
    with torch.enable_grad():
        store.clear()
        unet_v(unet, x, t, emb)
        loss = attention_loss(store.maps, ref_maps, len(x), token_w)  # (B,)
        (grad,) = torch.autograd.grad(loss.sum(), x)  # (B, C, H, W); params get no .grad
    store.clear()
    # (D2) [R]: one SGD step on the latent, z_t <- z_t - lambda * grad_{z_t} L_t
    return (x - lam * grad).detach(), loss.detach()


def v_to_x0_eps(z, v, ab):
    """v-parametrisation: x0 = sqrt(ab) z - sqrt(1-ab) v, eps = sqrt(1-ab) z + sqrt(ab) v."""
    return ab.sqrt() * z - (1 - ab).sqrt() * v, (1 - ab).sqrt() * z + ab.sqrt() * v


@torch.no_grad()
def sample(unet, store, sched, z_T, emb, emb_null, cfg_scale, ref_maps=None, lam=0.0,
           guided_steps=0, record=False, token_w=None):
    """DDIM sampling with classifier-free guidance, optionally cross-attention guided.

    z_T (B, C, H, W); emb / emb_null (B, N, D) text embeddings of P and of the empty prompt;
    ref_maps: list over DDIM steps of {layer: (B*heads, HW, N)} (B1-B2), used for the first
    `guided_steps` steps with step size `lam` (D1-D2). Returns (z_0, recorded maps or None,
    list of guidance losses per guided step)."""
    z, recorded, losses = z_T.clone(), [] if record else None, []
    for i, t in enumerate(sched.timesteps):
        # PAPER [R]: before each denoising step we move the latent so that the late model's
        # cross-attention maps at this step look like the early model's maps at the same step.
        if ref_maps is not None and lam > 0 and i < guided_steps:
            z, loss = guidance_step(unet, store, z, t, emb, ref_maps[i], lam, token_w)
            losses.append(loss)
        store.clear()
        v_c = unet_v(unet, z, t, emb)  # (B, C, H, W)
        if record:
            # (B2): the conditional branch's cross-attention maps at this step, on the CPU
            recorded.append({k: m.detach().cpu() for k, m in store.maps.items()})
        store.clear()
        if cfg_scale != 1.0:
            v_u = unet_v(unet, z, t, emb_null)  # (B, C, H, W)
            # (D3): v_hat = v(z, null) + w (v(z, P) - v(z, null))
            v_hat = v_u + cfg_scale * (v_c - v_u)
        else:
            v_hat = v_c
        z = sched.step(v_hat, t, z).prev_sample  # (B, C, H, W), DDIM eta = 0
    return z, recorded, losses


@torch.no_grad()
def ddim_invert(unet, sched, x0, emb):
    """(C1) [R]: deterministic DDIM inversion with guidance 1 (conditional branch only).

    DDIM sampling moves z from level t_{i+1} down to t_i with the model evaluated at t_{i+1}; we
    run it upwards, evaluating the model at the latent's current level t_i (the usual first-order
    approximation). The clean image is taken as level t = 0. x0 (B, C, H, W) -> z_T (B, C, H, W),
    where T is the first timestep of `sched.timesteps`."""
    ab = sched.alphas_cumprod.to(x0.device)
    ts = sched.timesteps.tolist()[::-1]  # ascending, e.g. [0, 50, ..., 950]
    z = x0.clone()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = unet_v(unet, z, t_cur, emb)  # (B, C, H, W)
        x0_hat, eps_hat = v_to_x0_eps(z, v, ab[t_cur])
        # DDIM update, upwards: z_{t_next} = sqrt(ab) x0_hat + sqrt(1 - ab) eps_hat
        z = ab[t_next].sqrt() * x0_hat + (1 - ab[t_next]).sqrt() * eps_hat  # (B, C, H, W)
    return z


# %% 6b. Toy metrics (stand-ins for CLIP-T, DINO / CLIP-I and LPIPS diversity)
def prompt_fidelity(imgs: torch.Tensor, bgs: list[str]) -> float:
    """Toy CLIP-T: the median colour of the 1-px border, snapped to the nearest background colour,
    equals the requested one. imgs (B, 3, 16, 16). Returns accuracy."""
    border = torch.cat([imgs[:, :, 0, :], imgs[:, :, -1, :], imgs[:, :, 1:-1, 0],
                        imgs[:, :, 1:-1, -1]], dim=2)  # (B, 3, 60)
    med = border.median(dim=2).values  # (B, 3)
    pal = torch.tensor(list(BG_COLOURS.values()))  # (4, 3)
    nearest = torch.cdist(med.float().cpu(), pal).argmin(1)  # (B,)
    want = torch.tensor([list(BG_COLOURS).index(b) for b in bgs])  # (B,)
    return float((nearest == want).float().mean())


def subject_fidelity(imgs: torch.Tensor) -> float:
    """Toy DINO: max over 3x3 crop offsets (the subject moves +-1 px) and the 4 checker phases of
    |Pearson correlation| between the grey 8x8 crop and the +-1 checker template; mean over
    images. imgs (B, 3, 16, 16)."""
    grey = imgs.float().cpu().mean(1)  # (B, H, W)
    crops = torch.stack([grey[:, oy:oy + 8, ox:ox + 8].reshape(len(imgs), -1)
                         for oy in (3, 4, 5) for ox in (3, 4, 5)], 1)  # (B, 9, 64)
    yy, xx = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    full = ((xx // 2 + yy // 2) % 2).float() * 2 - 1  # (10, 10)
    templ = torch.stack([full[dy:dy + 8, dx:dx + 8].reshape(-1)
                         for dy in (0, 1) for dx in (0, 1)])  # (4, 64)
    c = crops - crops.mean(2, keepdim=True)  # (B, 9, 64)
    tc = templ - templ.mean(1, keepdim=True)  # (4, 64)
    corr = (c @ tc.T) / (c.norm(dim=2, keepdim=True) * tc.norm(dim=1) + 1e-8)  # (B, 9, 4)
    return float(corr.abs().flatten(1).max(1).values.mean())


def diversity(imgs: torch.Tensor) -> float:
    """Toy LPIPS diversity: mean pairwise L2 between 4x4 average-pooled images. (B, 3, 16, 16)."""
    pooled = F.avg_pool2d(imgs.float().cpu(), 4).reshape(len(imgs), -1)  # (B, 48)
    d = torch.cdist(pooled, pooled)  # (B, B)
    n = len(imgs)
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


# %% 7. Training: pre-train (cached), DreamBooth fine-tune with checkpoints, DreamBlend, evaluate
def encode(text_encoder, ids):
    """Token ids (B, N) -> CLIP hidden states (B, N, D), no grad (the encoder is frozen here)."""
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device)).last_hidden_state


def pretrain(cfg, text_encoder, unet, sched, gen, device):
    """Pre-train text encoder + UNet on random shapes (v-prediction, 10% empty prompts for CFG).
    Cached in <out_dir>/pretrained_toy.pt, keyed by the knobs that change it."""
    key = dict(seed=cfg.seed, pre_steps=cfg.pre_steps, pre_batch=cfg.pre_batch, pre_lr=cfg.pre_lr)
    cache = Path(cfg.out_dir) / "pretrained_toy.pt"
    if cache.is_file():
        blob = torch.load(cache, map_location=device)
        if blob.get("key") == key:
            text_encoder.load_state_dict(blob["text_encoder"])
            unet.load_state_dict(blob["unet"])
            print(f"pre-training: loaded the cached toy model from {cache}")
            return blob["losses"], True
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pre_lr)
    losses = []
    for step in tqdm(range(cfg.pre_steps), desc="pre-train", leave=False):
        x0, ids = make_base_batch(cfg.pre_batch, gen)  # (B, 3, H, W), (B, N)
        drop = torch.rand(len(ids), generator=gen) < 0.1  # empty prompt for CFG
        ids[drop] = 0
        x0, ids = x0.to(device), ids.to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)  # (B, 3, H, W)
        t = torch.randint(0, 1000, (len(x0),), generator=gen).to(device)  # (B,)
        z = sched.add_noise(x0, eps, t)  # (B, 3, H, W)
        pred = unet(z, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, v_target(sched, x0, eps, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.pre_steps - 1:
            tqdm.write(f"pre-train step {step:4d} | loss {loss.item():.4f}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "text_encoder": text_encoder.state_dict(), "unet": unet.state_dict(),
                "losses": losses}, cache)
    return losses, False


def snapshot(module) -> dict:
    """An independent copy of a state dict (a checkpoint theta_s)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def finetune(cfg, unet, text_encoder, sched, inst_imgs, inst_emb, class_imgs, class_emb, gen,
             device):
    """(A1) DreamBooth: fine-tune the UNet only (text encoder frozen) on the instance images with
    prior preservation; keep a state-dict copy at every step in ckpt_steps(cfg).
    Returns ({step: state_dict}, losses)."""
    keep = ckpt_steps(cfg)
    ckpts = {0: snapshot(unet)}
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.ft_lr)
    n_inst = len(inst_imgs)
    x_all = torch.cat([inst_imgs, class_imgs]).to(device)  # (B_i + B_c, 3, H, W)
    emb_all = torch.cat([inst_emb.expand(n_inst, -1, -1),
                         class_emb.expand(len(class_imgs), -1, -1)])  # (B, N, D)
    losses = []
    for step in tqdm(range(1, cfg.steps + 1), desc="fine-tune", leave=False):
        eps = torch.randn(x_all.shape, generator=gen).to(device)  # (B, 3, H, W)
        t = torch.randint(0, 1000, (len(x_all),), generator=gen).to(device)  # (B,)
        z = sched.add_noise(x_all, eps, t)  # (B, 3, H, W)
        pred = unet(z, t, encoder_hidden_states=emb_all).sample  # (B, 3, H, W)
        # v-prediction target, as scheduler.get_velocity computes it
        loss = dreambooth_loss(pred, v_target(sched, x_all, eps, t), n_inst, cfg.prior_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step in keep:
            ckpts[step] = snapshot(unet)
        if step % cfg.log_every == 0 or step == cfg.steps:
            tqdm.write(f"fine-tune step {step:4d} | loss {loss.item():.4f}")
    unet.eval()
    return ckpts, losses


def load_unet(state: dict, device):
    """A fresh UNet holding checkpoint `state`, frozen, with storing processors installed."""
    unet = build_unet().to(device)
    unet.load_state_dict(state)
    unet.requires_grad_(False).eval()
    return unet, install_store(unet)


def dreamblend(early, late, sched, z_T, emb, emb_null, cfg_scale, lam, guided_steps,
               invert=True, token_w=None):
    """The whole DreamBlend inference [R]. early/late: (unet, store) pairs.

    (B1-B2) sample the reference with the early checkpoint, recording its cross-attention maps;
    (C1) DDIM-invert the reference with the late checkpoint (if invert), else reuse z_T;
    (D1-D3) sample with the late checkpoint, guided towards the reference maps.
    Returns (reference image, blended image, guidance losses), images (B, C, H, W)."""
    # PAPER [R]: (B1-B2) the early checkpoint draws a prompt-faithful reference and we keep its
    # cross-attention maps, one dict per DDIM step (conditional branch only).
    ref, ref_maps, _ = sample(*early, sched, z_T, emb, emb_null, cfg_scale, record=True)
    # DEVIATION: (C1) is optional and off by default: in this toy a DDIM round trip through the
    # late model nearly reproduces the early image, which cancels the late model's subject.
    start = ddim_invert(late[0], sched, ref, emb) if invert else z_T
    # PAPER [R]: (D1-D3) the late checkpoint denoises, guided towards the reference maps.
    out, _, losses = sample(*late, sched, start, emb, emb_null, cfg_scale, ref_maps=ref_maps,
                            lam=lam, guided_steps=guided_steps, token_w=token_w)
    return ref, out, losses


def evaluate(imgs: torch.Tensor, bgs: list[str], n_per_prompt: int) -> dict:
    """Toy metrics for one method. imgs (P*S, 3, H, W), grouped by prompt."""
    groups = imgs.split(n_per_prompt)
    return {"prompt_fid": prompt_fidelity(imgs, bgs), "subject_fid": subject_fidelity(imgs),
            "diversity": float(np.mean([diversity(g) for g in groups]))}


def train(cfg: Config) -> dict:
    """Pre-train (or load), fine-tune with checkpoints, run every sampler, write summary + plot."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t0 = time.time()
    device = torch.device(cfg.device)
    gen = set_seed(cfg.seed)
    text_encoder, unet, train_sched, sample_sched = build_models(device)
    sample_sched.set_timesteps(cfg.sample_steps)

    # PLUMBING: stage 0, the "pre-trained text-to-image model".
    pre_losses, cached = pretrain(cfg, text_encoder, unet, train_sched, gen, device)
    text_encoder.requires_grad_(False).eval()
    unet.eval()
    # PLUMBING: a fresh stream for everything after pre-training, so a cached run draws the same
    # fine-tuning noise and evaluation seeds as an uncached one.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    emb_null = encode(text_encoder, tokenize([""]))  # (1, N, D)

    # PAPER: stage A, DreamBooth on 4 photos of the subject with prior preservation. The class
    # images come from the frozen base model and the class prompt, as in train_dreambooth.py.
    inst_imgs = make_subject(cfg.n_instance, gen)  # (4, 3, H, W)
    inst_emb = encode(text_encoder, tokenize(["a sks square"]))  # (1, N, D)
    class_emb = encode(text_encoder, tokenize(["a square"]))  # (1, N, D)
    base = (unet, install_store(unet))
    z_cls = torch.randn((cfg.n_class, 3, SIDE, SIDE), generator=gen).to(device)
    class_imgs, _, _ = sample(*base, sample_sched, z_cls, class_emb.expand(cfg.n_class, -1, -1),
                              emb_null.expand(cfg.n_class, -1, -1), cfg.cfg_scale)
    unet.set_attn_processor(AttnProcessor())  # plain explicit-softmax processor for training
    ckpts, ft_losses = finetune(cfg, unet, text_encoder, train_sched, inst_imgs, inst_emb,
                                class_imgs.clamp(-1, 1), class_emb, gen, device)

    # PLUMBING: evaluation prompts "a sks square on {teal, purple, orange}", same noise everywhere.
    S = cfg.eval_seeds
    bgs = [bg for bg in EVAL_BGS for _ in range(S)]
    emb = encode(text_encoder, tokenize([f"a sks square on {bg}" for bg in bgs]))  # (P*S, N, D)
    null = emb_null.expand(len(bgs), -1, -1)  # (P*S, N, D)
    z_T = torch.randn((S, 3, SIDE, SIDE), generator=gen).repeat(len(EVAL_BGS), 1, 1, 1).to(device)
    models = {s: load_unet(st, device) for s, st in ckpts.items()}
    rows, images = {}, {}
    for s in tqdm(sorted(models), desc="sample ckpts", leave=False):
        img, _, _ = sample(*models[s], sample_sched, z_T, emb, null, cfg.cfg_scale)
        images[f"ckpt {s}"] = img.clamp(-1, 1)
    E, L = models[cfg.early_step], models[cfg.steps]
    blend = f"DreamBlend E={cfg.early_step} L={cfg.steps}"
    other = "with" if not cfg.invert else "without"
    variants = {  # name: (lambda, invert)
        blend: (cfg.guidance_lr, cfg.invert),
        f"  ablation: {other} DDIM inversion": (cfg.guidance_lr, not cfg.invert),
        "  ablation: inversion only (lambda=0)": (0.0, True),
    }
    g_losses = {}
    for name, (lam, inv) in tqdm(variants.items(), desc="DreamBlend", leave=False):
        _, img, losses = dreamblend(E, L, sample_sched, z_T, emb, null, cfg.cfg_scale, lam,
                                    cfg.guided_steps, invert=inv)
        images[name] = img.clamp(-1, 1)
        g_losses[name] = [float(x.mean()) for x in losses]
    for name, img in images.items():
        rows[name] = evaluate(img, bgs, S)

    # PLUMBING: results table, summary.json, plot.
    early, late = f"ckpt {cfg.early_step}", f"ckpt {cfg.steps}"
    print(f"\n| {'method':42s} | prompt-fid | subject-fid | diversity |")
    print(f"|{'-' * 44}|------------|-------------|-----------|")
    for name, m in rows.items():
        print(f"| {name:42s} | {m['prompt_fid']:10.2f} | {m['subject_fid']:11.3f} "
              f"| {m['diversity']:9.3f} |")
    metrics = {f"{k}/{n.strip()}": v for n, m in rows.items() for k, v in m.items()}
    metrics["pretrain_final_loss"] = float(np.mean(pre_losses[-10:]))
    metrics["finetune_final_loss"] = float(np.mean(ft_losses[-10:]))
    metrics["pretrain_cached"] = float(cached)

    def row(metric, key, base_name):
        return {"metric": metric, "higher_is_better": True,
                "method": {"name": "DreamBlend", "value": rows[blend][key]},
                "baseline": {"name": base_name.replace("ckpt", "checkpoint"),
                             "value": rows[base_name][key]}}

    # the intermediate checkpoint nearest a quarter of the fine-tuning run (ckpt 100 by default)
    mid = sorted((c for c in ckpt_steps(cfg) if cfg.early_step < c < cfg.steps),
                 key=lambda c: abs(c - cfg.steps // 4))[:1]
    headline = [row("subject fidelity (toy DINO)", "subject_fid", early),
                row("prompt fidelity (toy CLIP-T)", "prompt_fid", late),
                row("diversity (toy LPIPS)", "diversity", late)]
    if mid:  # above the trade-off curve: beats an intermediate checkpoint on subject fidelity
        headline.append(row("subject fidelity (toy DINO)", "subject_fid", f"ckpt {mid[0]}"))
    summary = {"folder": FOLDER, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
               "wall_seconds": time.time() - t0, "metrics": metrics, "headline": headline}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(images, ft_losses, pre_losses, out / "dreamblend_grid.png")
    print(f"wall {summary['wall_seconds']:.1f} s; wrote {out / 'summary.json'} and "
          f"{out / 'dreamblend_grid.png'}")
    return {"history": {"pretrain_loss": pre_losses, "finetune_loss": ft_losses,
                        "guidance_loss": g_losses},
            "metrics": metrics, "rows": rows, "summary": summary}


# %% 8. Plot
def plot(images: dict, ft_losses, pre_losses, path):
    """Grid: rows = checkpoints and DreamBlend variants, columns = prompts x seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(images)
    ncol = len(images[names[0]])
    fig, axes = plt.subplots(len(names), ncol, figsize=(0.9 * ncol + 2.6, 0.95 * len(names)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(ncol):
            ax = axes[r][c]
            ax.imshow(((images[name][c].cpu().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name.strip().replace("ablation: ", ""), rotation=0, ha="right",
                              va="center", fontsize=7)
    per = ncol // len(EVAL_BGS)
    for i, bg in enumerate(EVAL_BGS):
        axes[0][i * per].set_title(f"'a sks square on {bg}'", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# %% 9. Real scale (GPU, Stable Diffusion): the same functions on latents. Not run in this repo.
def real_scale(cfg: Config):
    """DreamBooth + DreamBlend on a real Stable Diffusion checkpoint (512 px, latents 4x64x64).

    Uses the same dreambooth_loss / install_store / sample / ddim_invert / guidance functions."""
    if not torch.cuda.is_available():
        raise SystemExit("train.py: error: --device cuda was requested but CUDA is not available")
    if not cfg.instance_dir or not Path(cfg.instance_dir).is_dir():
        raise SystemExit(f"train.py: error: --instance-dir {cfg.instance_dir!r} is not a folder")
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import load_image
    try:
        pipe = StableDiffusionPipeline.from_pretrained(cfg.pretrained, safety_checker=None)
    except Exception as e:  # offline, wrong name, missing files: one line
        raise SystemExit(f"train.py: error: could not load {cfg.pretrained!r} with "
                         f"from_pretrained (needs network access or a local copy): "
                         f"{type(e).__name__}") from None
    dev = torch.device("cuda")
    pipe.to(dev)
    vae, te, tok = pipe.vae, pipe.text_encoder, pipe.tokenizer
    train_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)

    def emb_of(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(dev)  # (B, 77)
        with torch.no_grad():
            return te(ids)[0]  # (B, 77, 768)

    def to_latent(x):
        with torch.no_grad():
            return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor

    files = sorted(p for p in Path(cfg.instance_dir).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"train.py: error: no .jpg/.png images in {cfg.instance_dir}")
    imgs = torch.stack([torch.from_numpy(np.asarray(load_image(str(f)).resize((512, 512)),
                                                    dtype=np.float32)).permute(2, 0, 1)
                        for f in files]) / 127.5 - 1  # (B, 3, 512, 512)
    inst_lat = to_latent(imgs.to(dev))  # (B, 4, 64, 64)
    with torch.no_grad():
        cls = pipe([cfg.class_prompt] * 8, num_inference_steps=50, output_type="latent").images
    unet = pipe.unet
    unet.requires_grad_(True).train()
    keep = {200: None, 1200: None}  # early / late checkpoints (notes: HF DreamBooth study)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6)
    x_all = torch.cat([inst_lat, cls])  # (B_i + 8, 4, 64, 64)
    emb_all = torch.cat([emb_of([cfg.instance_prompt] * len(inst_lat)),
                         emb_of([cfg.class_prompt] * len(cls))])  # (B, 77, 768)
    for step in tqdm(range(1, 1201), desc="DreamBooth"):
        eps = torch.randn_like(x_all)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (len(x_all),), device=dev)
        pred = unet(train_sched.add_noise(x_all, eps, t), t, encoder_hidden_states=emb_all).sample
        target = (v_target(train_sched, x_all, eps, t)
                  if train_sched.config.prediction_type == "v_prediction" else eps)
        loss = dreambooth_loss(pred, target, len(inst_lat), cfg.prior_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in keep:
            keep[step] = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    # DEVIATION: the sampler above assumes v-prediction; SD 1.5 predicts eps, so we convert eps to
    # v before the DDIM step by passing a v-prediction DDIM scheduler built from the same config.
    sched = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    sched.set_timesteps(50)

    def as_v_unet(state):
        u = UNet2DConditionModel.from_config(unet.config).to(dev)
        u.load_state_dict(state)
        u.requires_grad_(False).eval()
        if pipe.scheduler.config.prediction_type == "v_prediction":
            return u, install_store(u)
        inner, ab = u, sched.alphas_cumprod.to(dev)

        class EpsToV(torch.nn.Module):
            def forward(self, z, t, encoder_hidden_states):
                eps_ = inner(z, t, encoder_hidden_states=encoder_hidden_states).sample
                a = ab[t].view(-1, 1, 1, 1)
                x0 = (z - (1 - a).sqrt() * eps_) / a.sqrt()
                return type("O", (), {"sample": a.sqrt() * eps_ - (1 - a).sqrt() * x0})()
        return EpsToV(), install_store(inner)

    early, late = as_v_unet(keep[200]), as_v_unet(keep[1200])
    prompts = [cfg.instance_prompt + " on the beach"] * 4
    e, n = emb_of(prompts), emb_of([""] * len(prompts))
    z_T = torch.randn((len(prompts), 4, 64, 64), device=dev)
    _, lat, _ = dreamblend(early, late, sched, z_T, e, n, 7.5, 0.1, 50, invert=True)
    with torch.no_grad():
        out = vae.decode(lat / vae.config.scaling_factor).sample  # (B, 3, 512, 512)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(out.cpu(), Path(cfg.out_dir) / "dreamblend_real.pt")
    print(f"wrote {Path(cfg.out_dir) / 'dreamblend_real.pt'}")


# %% 10. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(1)  # measured: one thread is faster for this tiny model
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: error: --device cuda was requested but CUDA is not available")
    if cfg.pretrained:
        if cfg.device != "cuda":
            raise SystemExit("train.py: error: --pretrained (real scale) needs --device cuda")
        return real_scale(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
