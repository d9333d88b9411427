"""Small networks of the embedded models.

`DigitDiT` is the embedded image teacher: a class-conditional pixel-space DiT on 32x32 RGB digits.
It follows the rectified-flow / CONST convention that ComfyUI's flow models use:

    x_sigma = sigma * noise + (1 - sigma) * x0,     the network predicts v = noise - x0,

so `x0 = x_sigma - sigma * v`, exactly what the host's `CONST.calculate_denoised` computes. Every
sampler we write over `denoiser(x, sigma) -> x0` therefore serves this model and the host's flow
models alike.

Layers are built from an injectable `operations` namespace (`operations.Linear`,
`operations.LayerNorm`), defaulting to `torch.nn`. The host passes its own `comfy.ops` classes so
its weight casting, LoRA patching and low-VRAM offload apply to our model too; the core itself
never imports the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS  # index of the "no class" token used for classifier-free guidance
NUM_CLASS_TOKENS = NUM_DIGITS + 1


@dataclass(frozen=True)
class DigitDiTConfig:
    in_channels: int = 3
    image_size: int = 32
    patch_size: int = 4
    dim: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DigitDiTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DigitDiT config keys: {sorted(unknown)}")
        return cls(**values)


def class_conditioning(labels, dtype=torch.float32) -> torch.Tensor:
    """One-hot class weights [B, 1, 11] for digit labels 0..9, or NULL_CLASS (10) for unconditional.

    A weight vector rather than an index lets conditionings be averaged (the host's
    ConditioningAverage interpolates between digits) and batched like any cross-attention context.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels > NULL_CLASS)]
    if bad.numel():
        raise ValueError(
            f"digit class {int(bad[0])} is out of range: use 0..9, or {NULL_CLASS} for unconditional"
        )
    return F.one_hot(labels, NUM_CLASS_TOKENS).to(dtype).unsqueeze(1)


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of sigma in [0, 1] (scaled by 1000 so frequencies cover the range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid_h * grid_w, dim]; computed per size, so any
    multiple of the patch size runs (the model was trained at 32x32)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32, device=device),
        torch.arange(grid_w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * omega[None]
        out += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(out, dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the conditioning vector."""

    def __init__(self, dim, heads, mlp_ratio, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.qkv = operations.Linear(dim, 3 * dim, **kw)
        self.proj = operations.Linear(dim, dim, **kw)
        self.norm2 = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        hidden = int(dim * mlp_ratio)
        self.fc1 = operations.Linear(dim, hidden, **kw)
        self.fc2 = operations.Linear(hidden, dim, **kw)
        self.ada = operations.Linear(dim, 6 * dim, **kw)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))
        return x + gate2[:, None] * h


def adaln_zero_init(net: nn.Module, embedding: nn.Module, seed: int = 0) -> nn.Module:
    """DiT initialisation: small normal weights, zeroed adaLN gates and output (adaLN-Zero)."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
    with torch.no_grad():
        embedding.weight.normal_(0, 0.02, generator=gen)
        for block in net.blocks:
            block.ada.weight.zero_()
            block.ada.bias.zero_()
        for layer in (net.final_ada, net.final_proj):
            layer.weight.zero_()
            layer.bias.zero_()
    return net


class DigitDiT(nn.Module):
    """Class-conditional pixel-space DiT predicting the flow velocity v = noise - x0."""

    def __init__(self, config: DigitDiTConfig = DigitDiTConfig(), operations=nn, device=None, dtype=None):
        super().__init__()
        if config.dim % config.heads or config.dim % 4:
            raise ValueError("dim must be divisible by heads and by 4")
        self.config = config
        kw = {"device": device, "dtype": dtype}
        p, c, d = config.patch_size, config.in_channels, config.dim
        self.patch_embed = operations.Linear(p * p * c, d, **kw)
        self.time_mlp1 = operations.Linear(d, d, **kw)
        self.time_mlp2 = operations.Linear(d, d, **kw)
        self.class_embed = operations.Linear(NUM_CLASS_TOKENS, d, bias=False, **kw)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, config.mlp_ratio, operations, **kw) for _ in range(config.depth))
        self.final_norm = operations.LayerNorm(d, elementwise_affine=False, eps=1e-6, **kw)
        self.final_ada = operations.Linear(d, 2 * d, **kw)
        self.final_proj = operations.Linear(d, p * p * c, **kw)

    def init_weights(self, seed: int = 0):
        return adaln_zero_init(self, self.class_embed, seed)

    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens, h, w):
        b = tokens.shape[0]
        p, c = self.config.patch_size, self.config.in_channels
        x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] at noise level sigma [B] in [0, 1]; class_weights [B, 11] (one-hot or a mix)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"DigitDiT expects [B, {self.config.in_channels}, H, W] input, got {list(x.shape)}")
        if class_weights.ndim != 2 or class_weights.shape[-1] != NUM_CLASS_TOKENS:
            raise ValueError(
                f"DigitDiT expects class weights [B, {NUM_CLASS_TOKENS}] (digit 0..9 + unconditional), "
                f"got {list(class_weights.shape)}"
            )
        tokens, c = self.embed(x, sigma, class_weights)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c, x.shape[-2], x.shape[-1])

    def embed(self, x, sigma, class_weights):
        """Patch tokens with positions, and the conditioning vector (timestep + class)."""
        b, _, h, w = x.shape
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(b)
        p = self.config.patch_size
        tokens = self.patch_embed(self.patchify(x))
        tokens = tokens + sincos_2d(h // p, w // p, self.config.dim, device=x.device).to(tokens.dtype)
        t_emb = timestep_embedding(sigma, self.config.dim).to(tokens.dtype)
        c = self.time_mlp2(F.silu(self.time_mlp1(t_emb))) + self.class_embed(class_weights.to(tokens.dtype))
        return tokens, c

    def head(self, tokens, c, h, w):
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.unpatchify(self.final_proj(modulate(self.final_norm(tokens), shift, scale)), h, w)


def guided_denoiser(net: DigitDiT, class_weights: torch.Tensor, guidance: float = 1.0):
    """Wrap the velocity network as `denoiser(x, sigma) -> x0` (the k-diffusion calling convention).

    class_weights [B, 11] come from `class_conditioning(labels)[:, 0]`. With guidance != 1 the
    conditional and unconditional passes run as one batch:
    x0 = x0_uncond + guidance * (x0_cond - x0_uncond).
    """
    uncond = class_conditioning([NULL_CLASS] * class_weights.shape[0])[:, 0]

    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if guidance == 1.0:
            v = net(x, sigma, class_weights.to(x))
        else:
            v_cond, v_uncond = net(
                torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_weights, uncond]).to(x)
            ).chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        return x - sigma.reshape(-1, 1, 1, 1) * v

    return denoise


@torch.no_grad()
def sample_digits(net: DigitDiT, labels, steps: int = 32, guidance: float = 3.0, seed: int = 0, shift: float = 1.0,
                  sampler: str = "euler", batch: int = 256, callback=None) -> torch.Tensor:
    """Generate [N, 3, 32, 32] digits in -1..1; the noise depends only on the seed.
    `sampler` names a function of fastgen_core.sampling ("euler", "dpmpp_2m", ...)."""
    from . import sampling

    sample = getattr(sampling, f"sample_{sampler}", None)
    if sample is None:
        raise ValueError(f"unknown sampler {sampler!r}")
    return _sample_batches(net, labels, seed, guidance, sampling.flow_sigmas(steps, shift), sample, batch, callback)


def _sample_batches(net, labels, seed, guidance, sigmas, sample, batch, callback=None):
    labels = torch.as_tensor(labels).reshape(-1)
    size = net.config.image_size
    device = next(net.parameters()).device
    noise = torch.randn(len(labels), net.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(labels), batch):
        denoiser = guided_denoiser(net, class_conditioning(labels[i : i + batch])[:, 0].to(device), guidance)
        out.append(sample(denoiser, noise[i : i + batch].to(device), sigmas.to(device), callback=callback).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_with_recipe(net: DigitDiT, labels, recipe, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """Digits sampled the way the recipe says: a teacher's ODE solver over `steps`, or a DMD
    student's multistep sampling at its own timesteps (fresh noise from the seed's generator)."""
    from . import sampling

    if recipe.sampler in ("multistep_sde", "multistep_ode"):
        shift = recipe.shift or 1.0
        sigmas = sampling.sigmas_from_timesteps(recipe.timesteps, lambda t: sampling.flow_timestep_to_sigma(t, shift))
        generator = torch.Generator().manual_seed(seed + 1)
        noise = recipe.sampler.removeprefix("multistep_")

        def sample(denoiser, x, sigmas, callback=None):
            return sampling.sample_multistep(denoiser, x, sigmas, noise=noise, generator=generator, callback=callback)

        return _sample_batches(net, labels, seed, recipe.cfg, sigmas, sample, batch)
    return sample_digits(net, labels, steps=recipe.steps, guidance=recipe.cfg, seed=seed, shift=recipe.shift or 1.0,
                         sampler=recipe.sampler, batch=batch)


# ------------------------------------------------------------------ the causal world model (#7, #8)

NUM_ACTIONS = 7  # none, up, down, left, right, jump, and "no action given" (the CFG null action)


@dataclass(frozen=True)
class CausalWorldDiTConfig:
    """A block-causal video DiT: frames in chunks, each chunk attends to itself and the cached
    chunks before it; each frame has its own noise level and action."""

    in_channels: int = 3
    frame_size: int = 64
    patch_size: int = 8
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    actions: int = NUM_ACTIONS
    # What the network outputs. "x0", the clean frames: an 8x8x3 patch (192 values) does not fit
    # through a 128-wide token, so a velocity target (which carries the noise) cannot be met and a
    # model trained on it ignored its context (measured: x0 PSNR 10 dB when the answer was the
    # previous frame); predicting x0 learns to copy in a few hundred steps (JiT, Li & He 2025).
    # "velocity" (v = noise - x0) stays for models whose tokens are wider than their patches.
    prediction: str = "x0"
    # How each action moves the camera, (dx, dy) in pixels per frame, one pair per action (the null
    # action included), or None. When given, every token's rotary position also carries where it
    # lies in the world: its patch column / row plus the camera position the actions add up to
    # (camera-relative RoPE, as PRoPE / GTA encode camera poses). Attention then sees the same place
    # of the world at offset 0 in every frame however the view moved, and following the keys
    # becomes "look up the same place in the context". Measured (RESULTS.md, #8): with frame-only
    # positions the model ignored the keys after every training run we tried.
    camera_motion: tuple | None = None

    def __post_init__(self):
        if self.camera_motion is not None:
            motion = tuple(tuple(float(v) for v in pair) for pair in self.camera_motion)
            if len(motion) != self.actions or any(len(pair) != 2 for pair in motion):
                raise ValueError(f"camera_motion needs one (dx, dy) pair per action ({self.actions}), got {self.camera_motion!r}")
            object.__setattr__(self, "camera_motion", motion)

    def to_dict(self) -> dict:
        values = asdict(self)
        if values["camera_motion"] is None:
            del values["camera_motion"]  # files written before the field existed read the same
        return values

    @classmethod
    def from_dict(cls, values: dict) -> CausalWorldDiTConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CausalWorldDiT config keys: {sorted(unknown)}")
        return cls(**values)

    @property
    def tokens_per_frame(self) -> int:
        return (self.frame_size // self.patch_size) ** 2


def rotate_by_frame(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x [B, H, N, hd]; positions [N] (frame index) or [B, N, 3]
    (frame index, world column, world row: camera-relative RoPE; a quarter of the rotary pairs
    for the frame, the rest split between the two world axes).

    Only relative offsets reach the attention scores, so a rolling cache can renumber its frames
    (sink first, then the window) and re-base its world positions without changing any score.
    """
    half = x.shape[-1] // 2
    # angles in float32 (float64 for float64 models: the cached and full-sequence paths measure the
    # world from different origins, and must still agree to rounding)
    angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if positions.ndim == 1:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=angle_dtype, device=x.device) / half)
        angles = positions.to(angle_dtype)[:, None] * freqs[None]
    else:
        frame_pairs = max(1, half // 4)
        x_pairs = (half - frame_pairs) // 2
        y_pairs = half - frame_pairs - x_pairs
        frame_freqs = torch.exp(-math.log(1000.0) * torch.arange(frame_pairs, dtype=angle_dtype, device=x.device) / frame_pairs)

        def world_freqs(n):  # from 2 rad per patch (neighbours apart) to 0.05 (the whole window)
            return torch.exp(torch.linspace(math.log(2.0), math.log(0.05), n, dtype=angle_dtype, device=x.device))

        pos = positions.to(angle_dtype)
        angles = torch.cat([pos[..., 0:1] * frame_freqs, pos[..., 1:2] * world_freqs(x_pairs),
                            pos[..., 2:3] * world_freqs(y_pairs)], dim=-1)[:, None]  # [B, 1, N, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalBlock(nn.Module):
    """DiTBlock with per-token modulation and attention over [cached context, this chunk]."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, positions, context=None, mask=None):
        """x, c [B, N, D]; positions [N] frame positions of x; context = (k, v, positions) of the
        cached frames (un-rotated keys) or None; mask [N, N] for a full block-causal sequence.
        Returns (x, (k, v)) with this chunk's un-rotated keys and values, for the cache."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x) * (1 + scale1) + shift1).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        keys, values, key_positions = k, v, positions
        if context is not None:
            keys, values = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
            key_positions = torch.cat([context[2], positions], dim=-2 if positions.ndim == 3 else 0)
        attn = F.scaled_dot_product_attention(rotate_by_frame(q, positions), rotate_by_frame(keys, key_positions), values,
                                              attn_mask=mask)
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        x = x + gate2 * self.fc2(F.gelu(self.fc1(self.norm2(x) * (1 + scale2) + shift2), approximate="tanh"))
        return x, (k, v)


class CausalWorldDiT(nn.Module):
    """Action-conditioned block-causal pixel-space DiT predicting the clean frames (or the flow
    velocity, per `config.prediction`).

    `forward(x, sigma, actions, cache)` denoises one chunk x [B, C, F, H, W] with per-frame noise
    levels sigma [B, F] and actions [B, F], attending to the frames held in `cache` (a
    `fastgen_core.world.KVCache`); `forward_sequence` runs a whole sequence of chunks at once under
    the block-causal mask (training, and the reference the cached rollout must equal).
    """

    def __init__(self, config: CausalWorldDiTConfig = CausalWorldDiTConfig()):
        super().__init__()
        if config.dim % config.heads or config.dim % 4 or (config.dim // config.heads) % 2:
            raise ValueError("dim must be divisible by heads and by 4, with an even head size")
        if config.prediction not in ("x0", "velocity"):
            raise ValueError(f"prediction must be 'x0' or 'velocity', got {config.prediction!r}")
        self.config = config
        p, c, d = config.patch_size, config.in_channels, config.dim
        self.patch_embed = nn.Linear(p * p * c, d)
        self.time_mlp1 = nn.Linear(d, d)
        self.time_mlp2 = nn.Linear(d, d)
        self.action_embed = nn.Embedding(config.actions, d)
        self.blocks = nn.ModuleList(CausalBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final_proj = nn.Linear(d, p * p * c)
        if config.camera_motion is not None:  # in patches per frame; from the config, not the state dict
            self.register_buffer("camera_table", torch.tensor(config.camera_motion) / p, persistent=False)

    def init_weights(self, seed: int = 0):
        return adaln_zero_init(self, self.action_embed, seed)

    def _positions(self, actions, first_frame: int, frames: int):
        """Rotary positions of a chunk's tokens: [F*T] frame indices; with `camera_motion`,
        [B, F*T, 3] (frame, world column, world row), the world measured from the camera of the
        frame before the chunk (the cache re-bases its keys to that same origin)."""
        t = self.config.tokens_per_frame
        frame = (first_frame + torch.arange(frames, device=actions.device)).repeat_interleave(t)
        if self.config.camera_motion is None:
            return frame
        b, grid = actions.shape[0], self.config.frame_size // self.config.patch_size
        camera = self.camera_table[actions.reshape(b, frames)].cumsum(1)  # [B, F, 2]
        rows, cols = torch.meshgrid(torch.arange(grid, device=actions.device), torch.arange(grid, device=actions.device),
                                    indexing="ij")
        world_x = cols.reshape(1, 1, -1) + camera[..., 0:1]
        world_y = rows.reshape(1, 1, -1) + camera[..., 1:2]
        return torch.stack([frame.float().expand(b, -1), world_x.reshape(b, -1), world_y.reshape(b, -1)], dim=-1)

    def _tokens(self, x, sigma, actions):
        b, c, f, h, w = x.shape
        p, d = self.config.patch_size, self.config.dim
        if c != self.config.in_channels or h % p or w % p:
            raise ValueError(f"CausalWorldDiT expects [B, {self.config.in_channels}, F, H, W] with H, W multiples of {p}, "
                             f"got {list(x.shape)}")
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        tokens = self.patch_embed(frames.reshape(b, f, (h // p) * (w // p), p * p * c))
        tokens = tokens + sincos_2d(h // p, w // p, d, device=x.device).to(tokens.dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1, 1).expand(b, f) if sigma.numel() in (1, b) and sigma.ndim < 2 else sigma.reshape(b, f)
        t_emb = timestep_embedding(sigma.reshape(-1), d).to(tokens.dtype)
        cond = self.time_mlp2(F.silu(self.time_mlp1(t_emb))).view(b, f, d) + self.action_embed(actions.reshape(b, f))
        per_token = cond[:, :, None].expand(-1, -1, tokens.shape[2], -1)
        return tokens.reshape(b, -1, d), per_token.reshape(b, -1, d), cond

    def _head(self, tokens, cond, shape):
        b, c, f, h, w = shape
        p = self.config.patch_size
        shift, scale = self.final_ada(F.silu(cond)).chunk(2, dim=-1)  # per frame
        tokens = tokens.view(b, f, -1, self.config.dim)
        out = self.final_proj(self.final_norm(tokens) * (1 + scale[:, :, None]) + shift[:, :, None])
        out = out.view(b, f, h // p, w // p, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, c, f, h, w)

    def forward(self, x, sigma, actions, cache=None, write_cache: bool = False):
        """One chunk. With `write_cache`, this chunk's keys and values are appended to the cache
        (the rollout does that once per chunk, for the clean frames)."""
        b, _, f = x.shape[:3]
        tokens, per_token, cond = self._tokens(x, sigma, actions)
        first = cache.frames if cache is not None else 0
        positions = self._positions(actions, first, f)
        new_kv = []
        for i, block in enumerate(self.blocks):
            tokens, kv = block(tokens, per_token, positions, context=cache.context(i) if cache is not None else None)
            new_kv.append(kv)
        if write_cache:
            if positions.ndim == 3:
                cache.append(new_kv, f, positions=positions)
                # the next chunk measures the world from this chunk's last camera
                cache.move_origin(self.camera_table[actions.reshape(b, f)].sum(1))
            else:
                cache.append(new_kv, f)
        return self._head(tokens, cond, x.shape)

    def forward_sequence(self, x, sigma, actions, chunk_frames: int):
        """Frames [B, C, T, H, W] as chunks of `chunk_frames`, each attending to itself and the
        chunks before it (the block-causal mask), in one pass."""
        f = x.shape[2]
        tokens, per_token, cond = self._tokens(x, sigma, actions)
        frame = torch.arange(f, device=x.device).repeat_interleave(self.config.tokens_per_frame)
        chunk = frame // chunk_frames
        mask = chunk[None, :] <= chunk[:, None]
        positions = self._positions(actions, 0, f)
        for block in self.blocks:
            tokens, _ = block(tokens, per_token, positions, mask=mask)
        return self._head(tokens, cond, x.shape)
