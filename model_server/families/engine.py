"""`FamilyEngine`: generation and scoring for Idefics2, Idefics3 and SmolVLM, batched as IDEFICS v1 is.

The decode loop, row bookkeeping, sampling and stop rules are `engine.LocalEngine`'s; what differs is how a
prompt becomes the model's input. Each prompt is rendered with the processor's chat template (`render`), and the
processor expands every `<image>` into the image's run of tokens. The embeddings of those tokens are replaced
by the image's features (vision encoder + connector), computed once per image and kept in the vision cache under
the model's identity and the image's content. After prefill only text tokens are fed, so rows join and leave
the running batch between steps (continuous batching): rows are left padded, and positions are passed explicitly
from the attention mask's running sum, so padding never shifts a row (batched output equals one at a time).

Beam search goes through `model.generate`, one request at a time (the guide's story; not streamed).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from model_server.engine import (
    DEFAULT_VISION_CACHE_BYTES,
    LocalEngine,
    Row,
    StepOutcome,
    _StepReport,
    model_identity,
)
from model_server.errors import PromptError
from model_server.loading import LoadedModel
from model_server.running_batch import RowState, RunningBatch, new_cache, new_generator
from model_server.streaming import TextAssembler
from model_server.types import Prompt
from model_server.vision_cache import VisionCache, image_key


class FamilyEngine(LocalEngine):
    """A `LocalEngine` for the chat-template models (see the module doc)."""

    def __init__(self, loaded: LoadedModel, *, vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES,
                 vision_cache: VisionCache | None = None) -> None:
        if loaded.facts is None:
            raise ValueError("FamilyEngine needs a model loaded by model_server.families.loading")
        self.facts = loaded.facts
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._bad_ids = torch.tensor([ids[0] for ids in loaded.bad_words_ids], dtype=torch.long, device=loaded.device)
        self._stop_ids = set(loaded.stop_token_ids)
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache(vision_cache_bytes)
        self.identity = model_identity(loaded)
        self._image_token_id = int(self.model.config.image_token_id)
        self._pad_id = int(self.tokenizer.pad_token_id)

    # -- prompts to inputs -----------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """The text the processor reads (each image one `<image>`): also what `--show-prompt` prints."""
        return self.facts.display(prompt)

    def _ids(self, text: str, images: Sequence[Image.Image]) -> list[int]:
        """The processor's token ids for `text`, each `<image>` expanded for its image."""
        encoded = self.processor(text=[text], images=[list(images)] if images else None)
        return [int(i) for i in encoded["input_ids"][0]]

    def _features(self, image: Image.Image) -> torch.Tensor:
        """(tokens, hidden): the embeddings that replace the image's `<image>` tokens, from the cache if there."""
        key = (self.identity, image_key(image))
        cached = self.vision_cache.get(key)
        if cached is not None:
            return cached
        pixels = self.processor.image_processor([[image]], return_tensors="pt")
        values = pixels["pixel_values"].to(self.loaded.device, self.loaded.dtype)
        mask = pixels.get("pixel_attention_mask")
        out = self.model.model.get_image_features(
            pixel_values=values, pixel_attention_mask=None if mask is None else mask.to(self.loaded.device))
        features: torch.Tensor = out.pooler_output[0].clone()  # its own storage: the cache must not pin the batch
        self.vision_cache.put(key, features)
        return features

    def _inputs(self, ids: Sequence[list[int]], images: Sequence[Sequence[Image.Image]],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, attention mask, positions, and the embeddings with every image's features in place."""
        width = max(len(row) for row in ids)
        device = self.loaded.device
        input_ids = torch.full((len(ids), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, width - len(row):] = torch.tensor(row)
            attention[r, width - len(row):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        embeds = self.model.get_input_embeddings()(input_ids)
        found: dict[Hashable, torch.Tensor] = {}
        parts = []
        for row_images in images:
            for image in row_images:
                key = image_key(image)
                if key not in found:
                    found[key] = self._features(image)
                parts.append(found[key])
        slots = input_ids == self._image_token_id
        if parts:
            features = torch.cat(parts).to(embeds.dtype)
            if int(slots.sum()) != features.shape[0]:
                raise PromptError(detail=f"{int(slots.sum())} image tokens for {features.shape[0]} image features")
            embeds = embeds.masked_scatter(slots[..., None], features)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention, positions, embeds

    # -- free generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> StepOutcome:
        prompts = [r.prompt for r in rows]
        ids = [self._ids(self.render(p), p.images) for p in prompts]
        input_ids, attention, positions, embeds = self._inputs(ids, [p.images for p in prompts])
        cache = new_cache(self.model.config)
        out = self.forward(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, cache=cache,
                           use_cache=True, logits_to_keep=1)
        states = []
        for row, row_ids in zip(rows, ids, strict=True):
            params = row.prompt.params
            states.append(RowState(
                row=row,
                assembler=TextAssembler(self._decode, params.stop_strings, row.sent, incremental=True),
                prompt_ids=row_ids if params.repetition_penalty != 1.0 else [],
                prompt_length=len(row_ids),
                generator=new_generator(self.loaded.device, params.seed) if params.decoding == "sample" else None,
            ))
        n = len(rows)
        batch = RunningBatch(
            states=states, cache=cache, attention=attention,
            # Images are read at prefill only: no image tensors travel with the batch.
            image_mask=attention.new_zeros(n, 1, 1), features=embeds.new_zeros(n, 1, 1, 1),
            next_tokens=input_ids.new_zeros(n),
        )
        return self._advance(batch, out.logits[:, -1, :])

    @torch.inference_mode()
    def step(self, batch: RunningBatch) -> StepOutcome:
        attention = torch.cat([batch.attention, batch.attention.new_ones(len(batch), 1)], dim=1)
        positions = attention.sum(dim=1, keepdim=True) - 1
        out = self.forward(input_ids=batch.next_tokens[:, None], attention_mask=attention, position_ids=positions,
                           cache=batch.cache, use_cache=True)
        batch.attention = attention
        return self._advance(batch, out.logits[:, -1, :])

    # -- beam search -----------------------------------------------------------------------------
    @torch.inference_mode()
    def beam_search(self, rows: Sequence[Row]) -> StepOutcome:
        """`model.generate` with beams, one row at a time (its own image path; not streamed)."""
        outcome = StepOutcome(batch=None)
        for row in rows:
            self._beam_row(row, outcome)
        return outcome

    def _beam_row(self, row: Row, outcome: StepOutcome) -> None:
        params = row.prompt.params
        images = row.prompt.images
        enc = self.processor(text=[self.render(row.prompt)], images=[images] if images else None,
                             return_tensors="pt")
        inputs: dict[str, Any] = {k: v.to(self.loaded.device) for k, v in enc.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        width = inputs["input_ids"].shape[1]
        out = self.model.generate(
            **inputs, num_beams=params.num_beams, do_sample=False, max_new_tokens=params.max_new_tokens,
            bad_words_ids=self.loaded.bad_words_ids or None, eos_token_id=list(self.loaded.stop_token_ids),
            pad_token_id=self._pad_id, repetition_penalty=params.repetition_penalty,
            stopping_criteria=StoppingCriteriaList([_StepReport([row])]),
        )
        self._finish_whole(row, out[0, width:].tolist(), width, outcome)

    # -- rank classification ---------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: Prompt, continuations: Sequence[str], chunk: int) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens right after the rendered prompt."""
        base = self.render(prompt)
        images = prompt.images
        base_ids = self._ids(base, images)
        scores: list[float] = []
        for start in range(0, len(continuations), chunk):
            part = continuations[start:start + chunk]
            ids = [self._ids(f"{base} {c}", images) for c in part]
            _, attention, positions, embeds = self._inputs(ids, [images] * len(part))
            logits = self.forward(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            width = attention.shape[1]
            for r, row in enumerate(ids):
                # From the first token where the full text leaves the prompt's (a merge across the boundary).
                common = next((k for k, (a, b) in enumerate(zip(row, base_ids, strict=False)) if a != b),
                              min(len(row), len(base_ids)))
                common = max(1, min(common, len(row) - 1))
                offset = width - len(row)
                scores.append(sum(float(logprobs[r, offset + k - 1, row[k]]) for k in range(common, len(row))))
        return scores
