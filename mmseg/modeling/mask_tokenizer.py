"""HiMT: a 1-D hierarchical mask tokenizer (after HiMTok), written from the paper's description.

A binary mask is resized to ``mask_size x mask_size`` and cut into patches. A ViT encoder runs over the patches
plus ``num_tokens`` learnable latents in a CAUSAL order: latent ``i`` sees every mask patch and latents
``0..i`` only, so early latents must carry the coarse shape on their own. Each latent is projected to
``code_dim``, L2-normalised and snapped to the nearest entry of an L2-normalised codebook (straight-through
estimator, commitment loss, dead codes revived from recent encoder outputs). The decoder rebuilds the mask
from the codes alone (no image): learned patch queries attend to the kept codes, a linear layer paints each
patch's pixels.

Training drops a random tail of the codes (keep ``1..K``), so any prefix decodes to a coarser mask.

API (masks are bool ``(H, W)`` of any size; logits are float ``(H, W)``):

- ``encode(mask, refine=C) -> ids (K,)``; ``refine``: decode-aware code choice (see :meth:`MaskTokenizer.refine_ids`)
- ``decode(ids, keep=k, size=(H, W)) -> logits``
- ``decode_soft(probs (B, K, V), keep=k, size=...) -> logits``, for a language model's token distributions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

CONFIG_FILE = "mask_tokenizer_config.json"
WEIGHTS_FILE = "mask_tokenizer.safetensors"
PIXEL_DECODERS = ("deconv", "residual")


@dataclass(frozen=True)
class MaskTokenizerConfig:
    mask_size: int = 128  # masks are resized to this square before encoding (SynthRef's own image size)
    patch_size: int = 16  # a power of two: the conv stem halves the size log2(patch_size) times
    width: int = 128
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 4
    num_tokens: int = 32  # K: tokens per mask
    codebook_size: int = 1024
    code_dim: int = 12
    commitment: float = 0.01
    bottleneck: int = 16  # channels per patch / per token in the dense patch<->token maps
    # "deconv": one transposed conv per 2x upsampling stage; "residual": each stage also has a residual 3x3 conv
    # block and the last stage a 3x3 conv at full resolution (sharper edges and thin parts; see PixelDecoder).
    pixel_decoder: str = "deconv"
    # Channel multiplier of the pixel decoder's up-sampling stages (its input stays ``width``). Tried because the
    # round-trip errors sit within a pixel of the boundary (~80% of them); 2x was 22% slower per step and no better
    # at equal time (14 one-core minutes: 0.784 vs 0.789 at 32 tokens). The encoder's code choice, not the painting,
    # turned out to be the limit (see ``MaskTokenizer.refine_ids``).
    pixel_scale: int = 1
    # ``encode``'s default for ``refine`` (0: nearest codes only). A property of the tokenizer as a model was trained
    # with it: the codes a HiMTok model learns to speak must be the codes this tokenizer's ``encode`` gives.
    refine_candidates: int = 0

    def __post_init__(self) -> None:
        if self.pixel_decoder not in PIXEL_DECODERS:
            raise ValueError(f"unknown pixel_decoder {self.pixel_decoder!r}; valid: {', '.join(PIXEL_DECODERS)}")
        if self.pixel_scale < 1:
            raise ValueError(f"pixel_scale must be a positive integer, got {self.pixel_scale}")
        if self.refine_candidates < 0:
            raise ValueError(f"refine_candidates must be >= 0, got {self.refine_candidates}")

    def with_overrides(self, items: list[str]) -> "MaskTokenizerConfig":
        """This config with ``KEY=VALUE`` items applied (values parse as JSON, else stay strings)."""
        names = {f.name for f in dataclasses.fields(self)}
        changes = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(f"tokenizer setting {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
            try:
                changes[key] = json.loads(raw)
            except json.JSONDecodeError:
                changes[key] = raw
        return dataclasses.replace(self, **changes)

    @property
    def grid(self) -> int:
        return self.mask_size // self.patch_size


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool mask pairs ``(N, H, W)`` -> ``(N,)``; 1 where both are empty."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def attention_bias(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool "may attend" mask ``(L, L)`` or ``(B*heads, L, L)`` -> the additive float mask (0 / -inf) that
    :class:`_Block` takes, built once per pass rather than once per layer.

    Why float, not nn.MultiheadAttention's own bool mask ("may NOT attend", the opposite of ours): in inference its
    fast path runs a bool mask through a masked softmax that took 43% of a batched decode on CPU; the float mask
    costs about what no mask does."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def prefix_level(position: int, num_tokens: int) -> int:
    """The shortest power-of-two prefix (capped at ``num_tokens``) that contains token ``position`` (0-based):
    0 -> 1, 1 -> 2, 2..3 -> 4, 4..7 -> 8, ..."""
    return min(1 << position.bit_length(), num_tokens)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``(grid*grid, width)`` (row-major patches), as in MAE.

    Why: with random learned positions the decoder must discover the 2-D layout before it can paint anything,
    which costs hundreds of steps; smooth fixed codes give neighbouring patches similar queries from step 0.
    """
    if width % 4:
        raise ValueError("width must be a multiple of 4 for 2-D sine-cosine positions")
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # (w/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * freqs[None]  # (N, w/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)  # (N, width)


def _conv_channels(width: int, stages: int) -> list[int]:
    """Channels after each stride-2 stage of the conv stem: doubling up to ``width`` (at least 8)."""
    return [max(8, width >> (stages - 1 - i)) for i in range(stages)]


class ConvStem(nn.Module):
    """``(B, 1, S, S)`` mask -> ``(B, N, width)`` patch features: log2(patch) stride-2 convs.

    Why not a linear patch embedding: on CPU budgets the tokenizer must learn in a few thousand steps, and a conv
    stem sees edges and sub-patch geometry from the first step (a linear embedding of a 16x16 patch has to learn
    all of that from scratch). A small conv autoencoder reaches 0.9 IoU in ~150 steps; the ViT-only one ~0.
    """

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        stages = patch.bit_length() - 1
        if 1 << stages != patch:
            raise ValueError("patch_size must be a power of two")
        chans, layers, prev = _conv_channels(width, stages), [], 3  # mask + (y, x) coordinate channels
        for c in chans:
            layers += [nn.Conv2d(prev, c, 4, 2, 1), nn.GroupNorm(min(8, c), c), nn.GELU()]
            prev = c
        self.net = nn.Sequential(*layers, nn.Conv2d(prev, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = x.shape
        # CoordConv: with coordinates as input channels the stem's features say WHERE the mask is, so even a
        # latent that averages all patches (attention at init) learns the object's position at once.
        ramp = torch.linspace(-1, 1, s, device=x.device, dtype=x.dtype)
        yy, xx = ramp[:, None].expand(s, s), ramp[None, :].expand(s, s)
        x = torch.cat([x, (x * yy).expand(b, 1, s, s), (x * xx).expand(b, 1, s, s)], dim=1)
        return self.net(x).flatten(2).transpose(1, 2)  # (B, N, width), row-major


class _ConvBlock(nn.Module):
    """Residual 3x3 conv + GroupNorm + GELU at constant resolution and width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.GroupNorm(min(8, channels), channels),
                                 nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class PixelDecoder(nn.Module):
    """``(B, N, width)`` decoded patch features -> ``(B, S, S)`` mask logits: log2(patch) stride-2 up-convs.

    ``residual``: a residual 3x3 conv block after each up-conv, and the last up-conv outputs features that a 3x3
    conv turns into logits. Why: a lone 4x4 transposed conv per stage paints each output pixel from at most 2x2
    inputs of the stage below, so an edge can only be placed where the coarse features already put it; measured
    on the deconv tokenizer (500 held-out masks), the errors are ~1 pixel all along the boundary (61 false
    positive and 37 false negative pixels per 656-pixel mask) and thin parts suffer most (star 0.76, cross 0.77,
    circle 0.93 IoU).
    """

    def __init__(self, width: int, patch: int, residual: bool = False, scale: int = 1) -> None:
        super().__init__()
        stages = patch.bit_length() - 1
        chans, layers, prev = [c * scale for c in _conv_channels(width, stages)[::-1]], [], width
        for c in chans[1:]:
            layers += [nn.ConvTranspose2d(prev, c, 4, 2, 1), nn.GroupNorm(min(8, c), c), nn.GELU()]
            if residual:
                layers.append(_ConvBlock(c))
            prev = c
        if residual:
            last = max(8, prev // 2)
            layers += [nn.ConvTranspose2d(prev, last, 4, 2, 1), nn.GELU(), _ConvBlock(last), nn.Conv2d(last, 1, 3, 1, 1)]
        else:
            layers.append(nn.ConvTranspose2d(prev, 1, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, grid: int) -> torch.Tensor:
        x = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], grid, grid)  # (B, width, g, g)
        return self.net(x)[:, 0]


class _Block(nn.Module):
    """Pre-norm transformer block with an optional additive attention mask (see :func:`attention_bias`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: an additive attention mask from :func:`attention_bias` (or None: everything attends)."""
        h = self.norm1(x)
        # Why MATH on CPU: at these sizes (~100 tokens, 32-dim heads) the CPU flash kernel's backward alone took 31%
        # of a training step; the plain matmul-softmax path makes a whole step ~20% faster.
        with sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext():
            x = x + self.attn(h, h, h, attn_mask=bias, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation on the unit sphere with a straight-through gradient.

    ``usage`` counts how often each code was picked since the last :meth:`revive_dead_codes`; codes picked fewer
    than ``dead_threshold`` times in that window are re-seeded from recent encoder outputs. (A slow moving average
    would take ~700 steps to call a code dead; by then the encoder has collapsed onto a handful of codes.)
    """

    def __init__(self, size: int, dim: int, commitment: float) -> None:
        super().__init__()
        self.commitment = commitment
        self.codebook = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("usage", torch.zeros(size))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z (B, K, d)`` -> ``(quantized (B, K, d), ids (B, K), loss)``."""
        z = F.normalize(z, dim=-1)
        codes = self.normalized_codebook()
        ids = (z @ codes.t()).argmax(-1)  # max cosine = min L2 distance on the sphere
        q = codes[ids]
        loss = F.mse_loss(q, z.detach()) + self.commitment * F.mse_loss(z, q.detach())
        if self.training:
            self.usage.add_(torch.bincount(ids.flatten(), minlength=codes.shape[0]).float())
        return z + (q - z).detach(), ids, loss

    @torch.no_grad()
    def revive_dead_codes(self, recent: torch.Tensor, dead_threshold: float = 1.0) -> int:
        """Re-seed codes used fewer than ``dead_threshold`` times since the last call from ``recent (N, d)``
        encoder outputs, and restart the count; returns how many were revived."""
        dead = (self.usage < dead_threshold).nonzero()[:, 0]
        self.usage.zero_()
        if dead.numel() == 0 or recent.numel() == 0:
            return 0
        picks = recent[torch.randint(0, recent.shape[0], (dead.numel(),), device=recent.device)]
        self.codebook.data[dead] = F.normalize(picks + 0.01 * torch.randn_like(picks), dim=-1)
        return int(dead.numel())


class MaskTokenizer(nn.Module):
    """Encoder + quantizer + decoder. See the module docstring for the contract."""

    def __init__(self, config: MaskTokenizerConfig) -> None:
        super().__init__()
        if config.mask_size % config.patch_size:
            raise ValueError("mask_size must be a multiple of patch_size")
        self.config = c = config
        n, k, w = c.grid * c.grid, c.num_tokens, c.width
        self.patch_embed = ConvStem(w, c.patch_size)
        self.register_buffer("fixed_pos", sincos_2d(c.grid, w), persistent=False)  # (N, w)
        self.patch_pos = nn.Parameter(torch.zeros(n, w))  # learned correction on top of fixed_pos
        self.latents = nn.Parameter(torch.randn(k, w) * 0.02)
        # Dense patch -> latent map (through a narrow ``bottleneck`` per patch and per latent). Why: with only
        # attention, a latent starts out averaging all 64 patches, a small object's 2 patches are diluted ~30x,
        # codes barely differ between masks and the decoder settles on "all background": measured, the output
        # varied ~1e-4 across masks after 60 steps and IoU stayed ~0 for 300 steps. A learned linear map from
        # every patch to every latent carries WHERE and WHAT from step 0 (0.6 IoU at 150 steps, no VQ), and
        # attention refines on top. Latent i's start depends on patches only, so the latent order stays causal.
        dc = c.bottleneck
        self.to_latents = nn.Sequential(nn.Linear(w, dc), nn.Flatten(1), nn.Linear(n * dc, k * dc),
                                        nn.Unflatten(1, (k, dc)), nn.Linear(dc, w))
        self.encoder = nn.ModuleList(_Block(w, c.heads) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(w)
        self.to_code = nn.Linear(w, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.commitment)
        self.from_code = nn.Linear(c.code_dim, w)
        self.token_pos = nn.Parameter(torch.randn(k, w) * 0.02)
        self.queries = nn.Parameter(torch.zeros(n, w))  # learned correction on top of fixed_pos
        # The mirror image: the kept tokens -> every patch query, densely (dropped tokens contribute zero).
        self.token_down = nn.Linear(w, dc)
        self.to_queries = nn.Sequential(nn.Flatten(1), nn.Linear(k * dc, n * dc), nn.Unflatten(1, (n, dc)),
                                        nn.Linear(dc, w))
        self.decoder = nn.ModuleList(_Block(w, c.heads) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(w)
        self.to_pixels = PixelDecoder(w, c.patch_size, residual=c.pixel_decoder == "residual",
                                      scale=c.pixel_scale)
        # Encoder attention: patches see patches; latent i sees all patches and latents 0..i.
        allowed = torch.ones(n + k, n + k, dtype=torch.bool)
        allowed[:n, n:] = False
        allowed[n:, n:] = torch.ones(k, k, dtype=torch.bool).tril()
        self.register_buffer("encoder_allowed", allowed, persistent=False)

    # -- geometry ---------------------------------------------------------------------------------------
    def _to_input(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` masks (bool or float) -> ``(B, mask_size, mask_size)`` float in [0, 1] (area resize)."""
        m = masks.float()[:, None]
        size = self.config.mask_size
        if m.shape[-2:] != (size, size):
            m = F.interpolate(m, size=(size, size), mode="area" if m.shape[-1] >= size else "bilinear",
                              align_corners=None if m.shape[-1] >= size else False)
        return m[:, 0].clamp(0, 1)

    # -- model ------------------------------------------------------------------------------------------
    def encode_latents(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` -> continuous latents ``(B, K, code_dim)`` before quantisation."""
        feats = self.patch_embed(self._to_input(masks)[:, None])  # (B, N, w)
        x = feats + self.fixed_pos + self.patch_pos
        b, n = x.shape[:2]
        start = self.latents + self.to_latents(feats)  # (B, K, w)
        h = torch.cat([x, start], dim=1)
        bias = attention_bias(self.encoder_allowed, h.dtype)
        for block in self.encoder:
            h = block(h, bias)
        return self.to_code(self.encoder_norm(h[:, n:]))

    def decode_codes(self, codes: torch.Tensor, keep: int | torch.Tensor | None = None,
                     size: tuple[int, int] | None = None) -> torch.Tensor:
        """Quantised codes ``(B, K, code_dim)`` -> mask logits ``(B, H, W)`` (``mask_size`` by default).

        ``keep``: use only the first ``keep`` codes (an int, or ``(B,)`` per row); the rest are masked out.
        """
        b, k = codes.shape[:2]
        dev = codes.device
        keep_t = torch.full((b,), k, device=dev) if keep is None else torch.as_tensor(keep, device=dev).reshape(-1).expand(b)
        if bool((keep_t < 1).any()) or bool((keep_t > k).any()):
            raise ValueError(f"keep must be in 1..{k}")
        kept = torch.arange(k, device=dev)[None] < keep_t[:, None]  # (B, K)
        tokens = self.from_code(codes) + self.token_pos[:k]  # (B, K, w)
        n = self.queries.shape[0]
        dense = self.to_queries(self.token_down(tokens) * kept[..., None])  # (B, N, w); dropped tokens give 0
        queries = self.fixed_pos + self.queries + dense  # (B, N, w)
        h = torch.cat([queries, tokens], dim=1)
        allowed = None  # every token kept: no mask at all
        if keep is not None and not bool(kept.all()):
            cols = torch.cat([torch.ones(b, n, dtype=torch.bool, device=dev), kept], dim=1)
            if bool((keep_t == keep_t[0]).all()):  # one prefix length for every row: one (L, L) mask serves all
                cols = cols[:1]
            allowed = cols[:, None, :] & cols[:, :, None] | torch.eye(n + k, dtype=torch.bool, device=dev)
            allowed = allowed[0] if len(allowed) == 1 else allowed.repeat_interleave(self.config.heads, dim=0)
        bias = attention_bias(allowed, h.dtype)
        for block in self.decoder:
            h = block(h, bias)
        logits = self.to_pixels(self.decoder_norm(h[:, :n]), self.config.grid)
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return logits

    def forward(self, masks: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training pass: ``(B, H, W)`` masks -> logits at ``mask_size``, ids and the VQ loss."""
        z = self.encode_latents(masks).float()
        # Under bf16 autocast the nearest-code search stays in fp32: bf16's 8-bit mantissa would tie the cosine
        # scores of neighbouring codes in a 1,024-code book and pick among them at random.
        with torch.autocast(z.device.type, enabled=False):
            q, ids, vq_loss = self.quantizer(z)
        return {"logits": self.decode_codes(q, keep).float(), "ids": ids, "vq_loss": vq_loss, "latents": z}

    # -- public API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, mask: np.ndarray | torch.Tensor, refine: int | None = None) -> torch.Tensor:
        """A bool mask ``(H, W)`` (or a batch ``(B, H, W)``) of any size -> code ids ``(K,)`` (or ``(B, K)``).

        ``refine``: candidates per token for :meth:`refine_ids` (0 or 1: the nearest codes as they are; ``None``:
        the config's ``refine_candidates``)."""
        m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        single = m.ndim == 2
        m = (m[None] if single else m).to(self.patch_pos.device)
        z = self.encode_latents(m).float()
        with torch.autocast(z.device.type, enabled=False):
            _, ids, _ = self.quantizer(z)
        candidates = self.config.refine_candidates if refine is None else refine
        if candidates > 1:
            ids = self.refine_ids(m > 0.5 if m.is_floating_point() else m.bool(), z, candidates)
        return ids[0] if single else ids

    @torch.no_grad()
    def refine_ids(self, masks: torch.Tensor, latents: torch.Tensor, candidates: int,
                   max_decodes: int = 256) -> torch.Tensor:
        """Decode-aware code choice (analysis by synthesis, as speech codecs pick excitations): ``masks (B, H, W)``
        bool, ``latents (B, K, code_dim)`` from :meth:`encode_latents` -> ids ``(B, K)``.

        Token by token, in order, each of the ``candidates`` codes nearest to that token's latent is tried and the
        one whose decode of the shortest power-of-two prefix containing the token (1, 2, 4, 8, 16, 32) overlaps the
        mask best (IoU in the mask's own frame) is kept; ties keep the nearer code. Why: nearest-code quantisation
        is blind to how the decoder reads a code, and measured on the committed tokenizer the decoder renders far
        better masks from codes a few neighbours away (64 held-out masks, 4 candidates: IoU at 8 / 16 / 32 tokens
        0.784 / 0.835 / 0.866 -> 0.850 / 0.888 / 0.912). Each choice keeps the current code when no candidate beats
        it, so a level's IoU never drops while its own tokens are chosen, and later levels cannot touch it (their
        tokens lie outside its prefix). No per-mask guarantee against the nearest codes, though: a level starts
        from the earlier levels' refined tokens, and on a rare mask those suit its longer prefix less than the
        nearest ones would. Cost: ``candidates`` decodes per token, in the caller's precision (under bf16 autocast
        about 2x faster on CPU; the guarantee above then holds for bf16 decodes).
        """
        book = self.quantizer.normalized_codebook()
        top = (F.normalize(latents.float(), dim=-1) @ book.t()).topk(candidates, dim=-1).indices  # (B, K, C)
        ids = top[..., 0].clone()
        b, k = ids.shape
        size = tuple(masks.shape[-2:])
        rows = max(1, max_decodes // candidates)  # masks per decode batch
        for i in range(k):
            keep = prefix_level(i, k)
            for lo in range(0, b, rows):
                part = slice(lo, min(b, lo + rows))
                n = ids[part].shape[0]
                trial = ids[part, None, :].repeat(1, candidates, 1)  # (n, C, K)
                trial[:, :, i] = top[part, i]
                logits = self.decode_codes(book[trial.flatten(0, 1)], keep=keep, size=size)  # (n*C, H, W)
                target = masks[part, None].expand(n, candidates, *size).flatten(0, 1)
                iou = mask_iou(logits > 0, target).view(n, candidates)
                ids[part] = trial[torch.arange(n, device=ids.device), iou.argmax(1)]
        return ids

    def codes_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``(..., K)`` -> normalised code vectors ``(..., K, code_dim)``."""
        return self.quantizer.normalized_codebook()[ids]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, keep: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Code ids ``(K,)`` or ``(B, K)`` -> mask logits ``(H, W)`` or ``(B, H, W)``; threshold at 0."""
        ids = torch.as_tensor(ids, device=self.patch_pos.device)
        single = ids.ndim == 1
        logits = self.decode_codes(self.codes_for(ids[None] if single else ids), keep, size)
        return logits[0] if single else logits

    def decode_soft(self, probs: torch.Tensor, keep: int | torch.Tensor | None = None,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
        """Token probabilities ``(B, K, V)`` -> mask logits: soft codes ``probs @ codebook`` decoded (differentiable)."""
        if probs.shape[-1] != self.config.codebook_size:
            raise ValueError(f"expected {self.config.codebook_size} code probabilities, got {probs.shape[-1]}")
        return self.decode_codes(probs @ self.quantizer.normalized_codebook(), keep, size)

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        save_model(self, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, expected: MaskTokenizerConfig | None = None) -> "MaskTokenizer":
        """Load a tokenizer folder. With ``expected``, a tokenizer whose codebook differs fails clearly."""
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a mask tokenizer folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = MaskTokenizerConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        if expected is not None and (config.codebook_size, config.code_dim, config.num_tokens) != (
            expected.codebook_size, expected.code_dim, expected.num_tokens
        ):
            raise ValueError(
                f"mask tokenizer in {folder} has {config.num_tokens} tokens over a {config.codebook_size}x"
                f"{config.code_dim} codebook, but the model expects {expected.num_tokens} tokens over "
                f"{expected.codebook_size}x{expected.code_dim}"
            )
        model = cls(config)
        try:
            missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
        except Exception as err:  # safetensors raises several types for corrupt files
            raise ValueError(f"cannot read mask tokenizer weights in {folder}: {err}") from None
        if missing or unexpected:
            raise ValueError(f"mask tokenizer weights in {folder} do not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return model.eval()
