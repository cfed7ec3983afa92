"""The model work itself, run on the executor's model thread only.

`LocalEngine.generate` is a decode loop written out (not `model.generate`) so that every row stops on
its own: at `<end_of_utterance>`, at a stop string, at its token limit, when cancelled or past its
deadline. A finished row leaves the batch at once (its KV cache rows are dropped), so it neither
waits for nor slows down the others. Image features go through the vision tower and the perceiver
once per batch, not once per token.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from model_server.encoding import EncodedBatch, encode, encode_texts
from model_server.loading import LoadedModel
from model_server.prompt import prompt_text
from model_server.streaming import TextAssembler, cut_at_stop
from model_server.types import FinishReason, Prompt


@dataclass
class Row:
    """One request inside a batch, as the engine sees it."""

    prompt: Prompt
    deadline: float
    """`time.monotonic()` after which the row stops with TIMEOUT."""
    cancelled: threading.Event
    on_delta: Callable[[str], None]
    on_done: Callable[[str, FinishReason, int, int, float | None], None]
    """Called once: (text, finish reason, prompt tokens, completion tokens, first token time)."""
    sent: str = ""
    """Text already streamed by an earlier attempt (after an out-of-memory split)."""
    first_token_at: float | None = None
    done: bool = False
    generated: list[int] = field(default_factory=list)
    on_step: Callable[[], None] | None = None
    """Called after every model step that reaches this row: the executor's watchdog counts it as progress."""


class _StepReport(StoppingCriteria):
    """Never stops `model.generate`; reports each of its steps to the rows (beam search is not streamed)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: object = None, **kwargs: object) -> torch.BoolTensor:
        for row in self.rows:
            if row.on_step is not None:
                row.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class LocalEngine:
    """Generation and scoring with an in-process transformers model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._bad_ids = [ids[0] for ids in loaded.bad_words_ids]

    # -- model calls (one place, so tests can inject faults here) --------------------------------
    def forward(self, **kwargs):
        return self.model(**kwargs)

    def free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _image_features(self, enc: EncodedBatch) -> tuple[str, torch.Tensor]:
        """Vision tower (+ perceiver) once per batch: (argument name, (batch, images, latents, hidden))."""
        inner = self.model.model
        batch, images = enc.pixel_values.shape[:2]
        hidden = inner.vision_model(pixel_values=enc.pixel_values.flatten(0, 1)).last_hidden_state
        if self.model.config.use_resampler:
            hidden = inner.perceiver_resampler(hidden)
            name = "perceiver_embeddings"
        else:
            name = "image_encoder_embeddings"
        return name, hidden.view(batch, images, *hidden.shape[1:])

    # -- free generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, rows: Sequence[Row]) -> None:
        enc = encode(self.processor, [r.prompt for r in rows]).to(self.loaded.device, self.loaded.dtype)
        stop_ids = set(self.loaded.stop_token_ids)
        assemblers = [TextAssembler(self._decode, r.prompt.params.stop_strings, r.sent) for r in rows]
        generators = [self._generator(r.prompt.params.seed) for r in rows]
        prompt_ids = [enc.input_ids[i, -enc.prompt_lengths[i]:].tolist() for i in range(len(rows))]

        feature_arg, features = self._image_features(enc)
        cache = DynamicCache(config=self.model.config)
        attention = enc.attention_mask
        image_mask = enc.image_attention_mask
        out = self.forward(
            input_ids=enc.input_ids, attention_mask=attention, image_attention_mask=image_mask,
            cache=cache, use_cache=True, logits_to_keep=1, **{feature_arg: features.flatten(0, 1)},
        )
        image_mask = image_mask[:, -1:, :]
        active = list(range(len(rows)))
        while True:
            logits = out.logits[:, -1, :].float()
            next_tokens = self._choose(logits, [rows[i] for i in active], [prompt_ids[i] for i in active],
                                       [generators[i] for i in active])
            now = time.monotonic()
            keep: list[int] = []
            for pos, i in enumerate(active):
                row, token = rows[i], int(next_tokens[pos])
                row.first_token_at = row.first_token_at or now
                reason = self._step_row(row, assemblers[i], token, stop_ids, now)
                if reason is None:
                    keep.append(pos)
                else:
                    self._finish(row, assemblers[i], reason, enc.prompt_lengths[i])
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=attention.device)
                cache.batch_select_indices(index)
                attention, image_mask, features = attention[index], image_mask[index], features[index]
                next_tokens = next_tokens[index]
                active = [active[p] for p in keep]
            attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
            out = self.forward(
                input_ids=next_tokens[:, None], attention_mask=attention, image_attention_mask=image_mask,
                cache=cache, use_cache=True, **{feature_arg: features.flatten(0, 1)},
            )

    def _step_row(self, row: Row, assembler: TextAssembler, token: int, stop_ids: set[int],
                  now: float) -> FinishReason | None:
        if row.on_step is not None:
            row.on_step()
        if token in stop_ids:
            return FinishReason.END_OF_UTTERANCE
        row.generated.append(token)
        delta = assembler.add(token)
        if delta:
            row.on_delta(delta)
        if assembler.stopped:
            return FinishReason.STOP_STRING
        if row.cancelled.is_set():
            return FinishReason.CANCELLED
        if now > row.deadline:
            return FinishReason.TIMEOUT
        if len(row.generated) >= row.prompt.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, row: Row, assembler: TextAssembler, reason: FinishReason, prompt_tokens: int) -> None:
        if reason is not FinishReason.STOP_STRING:
            tail = assembler.finish()
            if tail:
                row.on_delta(tail)
        row.done = True
        row.on_done(assembler.text, reason, prompt_tokens, len(row.generated), row.first_token_at)

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.loaded.device)
        gen.manual_seed(seed if seed is not None else random.randrange(2**31))
        return gen

    def _choose(self, logits: torch.Tensor, rows: Sequence[Row], prompt_ids: Sequence[list[int]],
                generators: Sequence[torch.Generator]) -> torch.Tensor:
        params = rows[0].prompt.params
        logits[:, self._bad_ids] = -math.inf
        if params.repetition_penalty != 1.0:
            for r, row in enumerate(rows):
                seen = torch.tensor(sorted(set(prompt_ids[r]) | set(row.generated)), device=logits.device)
                values = logits[r, seen]
                logits[r, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                              values * params.repetition_penalty)
        if params.decoding != "sample":
            return logits.argmax(dim=-1)
        logits = logits / max(params.temperature, 1e-5)
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(len(rows))])

    # -- beam search (the guide's story) -----------------------------------------------------------
    @torch.inference_mode()
    def beam_search(self, rows: Sequence[Row]) -> None:
        """Beam search through `model.generate`: not streamed, the answer arrives in one piece."""
        params = rows[0].prompt.params
        enc = encode(self.processor, [r.prompt for r in rows]).to(self.loaded.device, self.loaded.dtype)
        out = self.model.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=enc.pixel_values,
            image_attention_mask=enc.image_attention_mask, num_beams=params.num_beams, do_sample=False,
            max_new_tokens=max(r.prompt.params.max_new_tokens for r in rows),
            bad_words_ids=self.loaded.bad_words_ids, eos_token_id=list(self.loaded.stop_token_ids),
            pad_token_id=self.tokenizer.pad_token_id, repetition_penalty=params.repetition_penalty,
            stopping_criteria=StoppingCriteriaList([_StepReport(rows)]),
        )
        stop_ids = set(self.loaded.stop_token_ids)
        for i, row in enumerate(rows):
            ids = out[i, enc.input_ids.shape[1]:].tolist()
            reason = FinishReason.LENGTH
            for n, token in enumerate(ids):
                if token in stop_ids:
                    ids, reason = ids[:n], FinishReason.END_OF_UTTERANCE
                    break
            ids = ids[: row.prompt.params.max_new_tokens]
            text, stopped = cut_at_stop(self._decode(ids), row.prompt.params.stop_strings)
            text = text.strip()
            if stopped:
                reason = FinishReason.STOP_STRING
            row.first_token_at = time.monotonic()
            row.generated = ids
            if text[len(row.sent):]:
                row.on_delta(text[len(row.sent):])
            row.done = True
            row.on_done(text, reason, enc.prompt_lengths[i], len(ids), row.first_token_at)

    # -- rank classification ---------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: Prompt, continuations: Sequence[str], chunk: int) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens right after `prompt`."""
        base = prompt_text(prompt.items, bos=self.tokenizer.bos_token)
        base_ids = self.tokenizer(base, add_special_tokens=False).input_ids
        scores: list[float] = []
        for start in range(0, len(continuations), chunk):
            part = continuations[start:start + chunk]
            texts = [base + " " + c for c in part]
            enc = encode_texts(self.processor, texts, [prompt.images] * len(part))
            enc = enc.to(self.loaded.device, self.loaded.dtype)
            feature_arg, features = self._image_features(enc)
            logits = self.forward(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                image_attention_mask=enc.image_attention_mask, **{feature_arg: features.flatten(0, 1)},
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            width = enc.input_ids.shape[1]
            for r in range(len(part)):
                length = enc.prompt_lengths[r]
                ids = enc.input_ids[r, width - length:].tolist()
                # Score from the first token where the full text's tokens leave the prompt's: a
                # tokenizer may merge across the boundary, and then that merged token is scored too.
                common = next((k for k, (a, b) in enumerate(zip(ids, base_ids, strict=False)) if a != b),
                              min(len(ids), len(base_ids)))
                common = max(1, min(common, length - 1))
                total = 0.0
                for k in range(common, length):
                    pos = width - length + k
                    total += float(logprobs[r, pos - 1, ids[k]])
                scores.append(total)
        return scores
