"""The Flamingo module: frozen vision tower -> perceiver -> gated cross-attention inside a frozen causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..spec import CrossAttnSpec, PerceiverSpec
from .cross_attention import FlamingoLayer, GatedCrossAttentionBlock, MediaContext, MediaSlot, build_media_context, media_context, should_add_cross_attention
from .embeddings import NewTokenEmbeddings
from .inputs import check_batch, single_frame
from .loss import ChunkedLMLoss, causal_lm_loss, group_means, mean_loss, position_losses
from .language import forward_arg_names, get_by_path, hidden_size, set_by_path
from .packing import PackedLayout
from .perceiver import PerceiverResampler
from .vision import encode_patch_tokens



@dataclass
class FlamingoOutput:
    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]  # None when the loss was computed in chunks or compiled (`set_loss_chunking`, target loss)
    group_losses: Optional[dict[str, torch.Tensor]] = None  # packed batches: the loss of each dataset's rows


@dataclass(frozen=True)
class TokenIds:
    media: int
    eoc: int
    pad: int
    new: tuple[int, ...]  # every id served by the decoupled tables


def host_counts(num_images) -> Optional[torch.Tensor]:
    """Per-row image counts as a host tensor (given as ints or a tensor)."""
    if num_images is None or torch.is_tensor(num_images):
        return num_images
    return torch.tensor(num_images, dtype=torch.long)


def segment_causal_mask(config, embeds: torch.Tensor, attention_mask: Optional[torch.Tensor], segment_ids: torch.Tensor) -> torch.Tensor:
    """The LM's own 4D causal + padding mask (transformers' `create_causal_mask`, in its attention kernel's
    convention: bool True=attend, or additive float) with attention kept inside each segment; an LM takes a 4D mask
    as it is."""
    from transformers.masking_utils import create_causal_mask

    # the cache positionally: transformers renamed that parameter (past_key_values up to 5.17 at least, cache by 5.24)
    base = create_causal_mask(config, embeds, attention_mask, None, allow_is_causal_skip=False)
    if not isinstance(base, torch.Tensor) or base.ndim != 4:
        raise ValueError(
            f"engine.fuse_datasets: the LM's attention ({config._attn_implementation}) does not take a 4D mask; use "
            f"model.lm.attention sdpa or eager, or set engine.fuse_datasets: false"
        )
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)  # [B, 1, L, L]
    return base & same if base.dtype == torch.bool else base.masked_fill(~same, torch.finfo(base.dtype).min)


class Flamingo(nn.Module):
    """`forward(pixel_values [B,T,3,H,W], input_ids, attention_mask, labels=None, num_images=None) -> FlamingoOutput`."""

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_encoder: nn.Module,
        *,
        vis_dim: int,
        decoder_layers_attr: str,
        token_ids: TokenIds,
        vocab_size: int,
        perceiver: PerceiverSpec = PerceiverSpec(),
        cross_attn: CrossAttnSpec = CrossAttnSpec(),
        freeze_new_token_embeddings: bool = False,
        init_new_tokens: bool = True,
    ):
        super().__init__()
        if not cross_attn.only_attend_immediate_media:
            raise ValueError("model.cross_attn.only_attend_immediate_media: only true is supported (the original's only mode)")
        self.vision_encoder = vision_encoder
        self.lang_encoder = lang_encoder
        self.decoder_layers_attr = decoder_layers_attr
        self.media_token_id, self.eoc_token_id, self.pad_token_id = token_ids.media, token_ids.eoc, token_ids.pad
        self.token_ids = token_ids
        self.vis_dim, self.lang_dim = vis_dim, hidden_size(lang_encoder)
        self.perceiver = PerceiverResampler(
            dim=vis_dim, depth=perceiver.depth, dim_head=perceiver.dim_head, heads=perceiver.heads,
            num_latents=perceiver.num_latents, ff_mult=perceiver.ff_mult,
        )
        self._media = MediaSlot()
        self._wrap_decoder_layers(cross_attn)
        base_in, base_out = lang_encoder.get_input_embeddings(), lang_encoder.get_output_embeddings()
        if base_out is None:
            raise ValueError(f"{type(lang_encoder).__name__} has no output embeddings module (get_output_embeddings() is None)")
        self.new_tokens = NewTokenEmbeddings(
            token_ids.new, base_out.weight.shape[0], vocab_size, self.lang_dim, tied=base_out.weight is base_in.weight,
            trainable_ids=(token_ids.media, token_ids.eoc),
        )
        if init_new_tokens:
            self.new_tokens.init_from(base_in, base_out)
        self._lm_args = forward_arg_names(lang_encoder.base_model)
        if "inputs_embeds" not in self._lm_args:
            raise ValueError(
                f"model.lm: {type(lang_encoder).__name__}.base_model ({type(lang_encoder.base_model).__name__}) does not take "
                f"inputs_embeds, which the decoupled new-token embeddings need; use the transformers-native class for "
                f"this family (MosaicGPT and MPT releases are built natively without trust_remote_code)"
            )
        self.chunked_loss = ChunkedLMLoss()  # used when set_loss_chunking gave it a size
        self.loss_compiled = False  # compile_parts(["loss"])
        self.apply_freezing(freeze_new_token_embeddings)

    # ------------------------------------------------------------------------------------------------ building
    def _wrap_decoder_layers(self, spec: CrossAttnSpec) -> None:
        layers = get_by_path(self.lang_encoder, self.decoder_layers_attr)
        wrapped = [
            FlamingoLayer(
                GatedCrossAttentionBlock(dim=self.lang_dim, dim_visual=self.vis_dim, dim_head=spec.dim_head, heads=spec.heads, ff_mult=spec.ff_mult)
                if should_add_cross_attention(i, spec.every_n_layers) else None,
                layer,
                self._media,
            )
            for i, layer in enumerate(layers)
        ]
        set_by_path(self.lang_encoder, self.decoder_layers_attr, nn.ModuleList(wrapped))

    def apply_freezing(self, freeze_new_token_embeddings: bool) -> None:
        """Trainable: perceiver, cross-attention blocks, new-token tables (unless frozen). Everything else frozen."""
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for block in self.cross_attention_blocks():
            block.requires_grad_(True)
        self.new_tokens.requires_grad_(not freeze_new_token_embeddings)

    def flamingo_layers(self) -> list[FlamingoLayer]:
        return list(get_by_path(self.lang_encoder, self.decoder_layers_attr))

    def cross_attention_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [l.gated_cross_attn_layer for l in self.flamingo_layers() if l.gated_cross_attn_layer is not None]

    def set_loss_chunking(self, chunk_tokens: int) -> None:
        """With labels, compute the LM head + loss over chunks of this many positions (0: all at once); the
        output's logits are then None (engine.loss_chunk_tokens)."""
        self.chunked_loss.chunk_tokens = int(chunk_tokens)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each FlamingoLayer (cross-attention + decoder layer) in backward."""
        for layer in self.flamingo_layers():
            layer.activation_checkpointing = enabled

    def compile_cross_attention(self, **compile_kwargs) -> None:
        """`torch.compile` each gated cross-attention block in place."""
        for block in self.cross_attention_blocks():
            block.compile(**compile_kwargs)

    def compile_parts(self, targets: Sequence[str], **compile_kwargs) -> None:
        """`torch.compile` in place (engine.compile): `cross_attn` blocks, `lm_layers` (each FlamingoLayer's block +
        decoder layer as one graph; supersedes cross_attn), `perceiver`, `vision`, `loss` (`_head_losses`: the
        logits' combination, fp32 upcast and cross-entropy, forward and backward, fused; the output's logits are
        then None)."""
        unknown = set(targets) - {"cross_attn", "lm_layers", "perceiver", "vision", "loss"}
        if unknown:
            raise ValueError(f"engine.compile_targets: unknown {sorted(unknown)}")
        if "lm_layers" in targets:
            for layer in self.flamingo_layers():
                layer.compile_body(**compile_kwargs)
        elif "cross_attn" in targets:
            self.compile_cross_attention(**compile_kwargs)
        if "perceiver" in targets:
            self.perceiver.compile(**compile_kwargs)
        if "vision" in targets:
            self.vision_encoder.compile(**compile_kwargs)
        if "loss" in targets:
            self._head_losses = torch.compile(self._head_losses, **compile_kwargs)
            self.loss_compiled = True

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        self.vision_encoder.eval()  # frozen; never in train mode
        return self

    # ------------------------------------------------------------------------------------------------- forward
    def encode_images(self, pixel_values: torch.Tensor, num_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, 3, H, W] -> latents [B, T, n, D]; with `num_images` [B] only real images are encoded (others stay 0).

        Keep `num_images` on the CPU (as the loaders yield it): the real-image indices are then found without a
        device sync.
        """
        pixel_values = single_frame(pixel_values)
        b, t = pixel_values.shape[:2]
        images = pixel_values.flatten(0, 1)
        if num_images is None:
            return self._resample(images).unflatten(0, (b, t))
        real = (torch.arange(t, device=num_images.device) < num_images[:, None]).flatten().nonzero().squeeze(1)
        real = real.to(pixel_values.device, non_blocking=True)
        return self.encode_into_slots(images.index_select(0, real), real, b * t).unflatten(0, (b, t))

    def encode_into_slots(self, images: torch.Tensor, slots: torch.Tensor, total_slots: int) -> torch.Tensor:
        """Images [N, 3, H, W] -> latents [total_slots, n, D]: image i's at `slots[i]`, zeros elsewhere."""
        # shapes from ints: under ZeRO-3 a parameter read outside its own module's forward is an empty partition
        latents = images.new_zeros(total_slots, self.perceiver.num_latents, self.vis_dim, dtype=self.perceiver.latents.dtype)
        if images.shape[0]:
            latents = latents.index_copy(0, slots, self._resample(images).to(latents.dtype))
        return latents

    def _resample(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, n, D]: frozen tower (no autograd), then the perceiver."""
        return self.perceiver(encode_patch_tokens(self.vision_encoder, images).to(self.perceiver.latents.dtype))

    def run_lm(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], media: MediaContext, *, cache=None, position_ids=None, use_cache: bool = False, segment_ids: Optional[torch.Tensor] = None):
        """Run the LM body with `media` set for its FlamingoLayers; returns (last hidden state, cache). With
        `segment_ids` [B, L] attention stays within each segment (packed rows)."""
        embeds = self.new_tokens.embed(input_ids, self.lang_encoder.get_input_embeddings())
        if segment_ids is not None:
            attention_mask = segment_causal_mask(self.lang_encoder.config, embeds, attention_mask, segment_ids)
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=use_cache)
        if cache is not None:
            kwargs["cache" if "cache" in self._lm_args else "past_key_values"] = cache
        if position_ids is not None and "position_ids" in self._lm_args:
            kwargs["position_ids"] = position_ids
        self._media.current = media
        try:
            out = self.lang_encoder.base_model(**kwargs)
        finally:
            self._media.current = None
        if not use_cache:
            return out.last_hidden_state, None
        return out.last_hidden_state, (out["cache"] if "cache" in out else out.get("past_key_values"))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.new_tokens.logits(hidden, self.lang_encoder.get_output_embeddings())

    def _loss_chunked(self, hidden: torch.Tensor) -> bool:
        return 0 < self.chunked_loss.chunk_tokens < hidden.shape[0] * hidden.shape[1]

    def _fused_head_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, L] fp32 losses per position through the compiled `_head_losses` (the head's matmuls stay outside it,
        where DeepSpeed's hooks see the head module run)."""
        return self._head_losses(*self.new_tokens.logit_parts(hidden, self.lang_encoder.get_output_embeddings()), labels)

    def _head_losses(self, base: torch.Tensor, new: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`position_losses` of the logits combined from the head's two parts. Eager, the combination, its fp32 copy
        and the log-softmax each pass over the [tokens, vocab] logits and the fp32 log-softmax is kept for backward;
        compiled (target `loss`), forward and backward fuse into a few passes that keep only the bf16 parts."""
        return position_losses(self.new_tokens.combine(base, new), labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        num_images: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        layout: Optional[PackedLayout] = None,
    ) -> FlamingoOutput:
        """`num_images`: real images per row, best on the host (a tensor or ints: DDP and FSDP move tensor arguments
        to the GPU, and reading a device tensor's counts would wait for the device). With `layout` (a batch from
        `packing.pack_datasets`): `pixel_values` are its images [N, 3, H, W] and the output has each dataset's loss
        in `group_losses` (`loss` is None)."""
        if layout is not None:
            return self._forward_packed(pixel_values, input_ids, attention_mask, labels, layout)
        num_images = host_counts(num_images)
        check_batch(pixel_values, input_ids, attention_mask, labels, num_images)
        latents = self.encode_images(pixel_values, num_images)
        media = build_media_context(latents, input_ids, self.media_token_id, num_images)
        hidden, _ = self.run_lm(input_ids, attention_mask, media)
        if labels is None:
            return FlamingoOutput(loss=None, logits=self.compute_logits(hidden))
        if self._loss_chunked(hidden):
            return FlamingoOutput(loss=self.chunked_loss(hidden, labels, self.compute_logits), logits=None)
        if self.loss_compiled:
            return FlamingoOutput(loss=mean_loss(self._fused_head_losses(hidden, labels), labels), logits=None)
        logits = self.compute_logits(hidden)
        return FlamingoOutput(loss=causal_lm_loss(logits, labels), logits=logits)

    def packing_problem(self, length: int) -> Optional[str]:
        """Why this LM cannot run packed rows of `length` tokens (engine.fuse_datasets), or None."""
        config, name = self.lang_encoder.config, type(self.lang_encoder).__name__
        if "position_ids" not in self._lm_args and getattr(config, "model_type", None) != "mpt":  # MPT: ALiBi, relative
            return f"{name} takes no position_ids, so packed rows would shift its positions"
        window = getattr(config, "sliding_window", None)
        sliding = getattr(config, "use_sliding_window", True) is not False
        if getattr(config, "layer_types", None) is not None:  # e.g. Qwen2: only the layers typed so slide
            sliding = "sliding_attention" in config.layer_types
        if window and sliding and window < length:
            return (f"{name} attends through a sliding window of {window} tokens, shorter than the packed rows "
                    f"({length}); the one 4D mask a packed pass gives every layer cannot carry it")
        return None

    def _forward_packed(self, images, input_ids, attention_mask, labels, layout: PackedLayout) -> FlamingoOutput:
        b, length = input_ids.shape
        if labels is None or images.ndim != 4 or layout.text_time.shape != (b, length):
            raise ValueError(
                f"a packed batch needs images [N, 3, H, W], labels and a layout of input_ids' shape {(b, length)}; got "
                f"images {tuple(images.shape)}, labels {None if labels is None else tuple(labels.shape)}, layout {tuple(layout.text_time.shape)}"
            )
        problem = self.packing_problem(length)
        if problem:
            raise ValueError(f"engine.fuse_datasets: {problem}; set engine.fuse_datasets: false for this LM")
        slots = layout.slots_per_row
        latents = self.encode_into_slots(images, layout.image_slots, b * slots).unflatten(0, (b, slots))
        media = media_context(latents, layout.text_time, layout.has_media)
        hidden, _ = self.run_lm(input_ids, attention_mask, media, position_ids=layout.position_ids, segment_ids=layout.segment_ids)
        if self._loss_chunked(hidden):
            logits, per_position = None, self.chunked_loss(hidden, labels, self.compute_logits, per_position=True)
        elif self.loss_compiled:
            logits, per_position = None, self._fused_head_losses(hidden, labels)
        else:
            logits = self.compute_logits(hidden)
            per_position = position_losses(logits, labels)
        return FlamingoOutput(loss=None, logits=logits, group_losses=group_means(per_position, labels, layout.groups))

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        eos_token_id: Optional[int] = None,
        num_images: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search with a KV cache; prompts must be left-padded. Returns prompt + new tokens."""
        from .generation import beam_search, greedy_search

        eos = self.eoc_token_id if eos_token_id is None else eos_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        num_images = host_counts(num_images)
        check_batch(pixel_values, input_ids, attention_mask, None, num_images)
        latents = self.encode_images(pixel_values, num_images)
        if num_beams == 1:
            return greedy_search(self, latents, input_ids, attention_mask, num_images, max_new_tokens, eos)
        return beam_search(self, latents, input_ids, attention_mask, num_images, max_new_tokens, eos, num_beams, length_penalty)

    # --------------------------------------------------------------------------------------------- state dicts
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the perceiver, cross-attention blocks and new-token tables (frozen or not), in our key layout."""
        keep = ("perceiver.", "new_tokens.")
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith(keep) or ".gated_cross_attn_layer." in k:
                out[k] = v
        return out

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what `trainable_state_dict` wrote; any missing or unexpected key is an error."""
        expected = set(self.trainable_state_dict())
        got = set(state_dict)
        if got != expected:
            raise KeyError(
                f"trainable state dict mismatch: missing {sorted(expected - got)[:10]}, unexpected {sorted(got - expected)[:10]}"
            )
        result = self.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys {result.unexpected_keys[:10]}")
