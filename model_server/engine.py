"""The model work itself, run on the executor's model thread only.

Generation is a decode loop written out (not `model.generate`) so that every row stops on its own:
at `<end_of_utterance>`, at a stop string, at its token limit, when cancelled or past its deadline,
and so that rows can join and leave between steps (`RunningBatch`): `prefill` starts rows, `step`
advances every row by one token, `RunningBatch.join` merges newly prefilled rows into a running
batch. A finished row leaves at once (its KV cache rows are dropped), so it neither waits for nor
slows down the others. Each row keeps its own decoding settings and random stream.

Each model call returns what happened (`StepOutcome`: the text deltas of the step, the rows that finished
and why, and the batch that still runs); the executor applies it. Rows are never called back, except that
`Row.on_step` hears of every step as a sign of life (the watchdog's progress, inside beam search too).

Image features go through the vision tower and the perceiver once per image: the result is kept in
a `VisionCache` by the image's content, so a picture asked about again, in a later turn or another
request, is not encoded again.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from model_server.config import ModelConfig
from model_server.encoding import encode, encode_texts, preprocess_images
from model_server.loading import LoadedModel, gpu_memory
from model_server.prompt import prompt_text
from model_server.running_batch import RowState, RunningBatch, new_cache, new_generator
from model_server.streaming import TextAssembler, cut_at_stop
from model_server.types import FinishReason, GenerationParams, Prompt
from model_server.vision_cache import VisionCache, VisionCacheStats, image_key

DEFAULT_VISION_CACHE_BYTES = ModelConfig.vision_cache_mb * 2**20


@dataclass(eq=False)
class Row:
    """One request inside a batch, as the engine sees it."""

    prompt: Prompt
    deadline: float
    """`time.monotonic()` after which the row stops with TIMEOUT."""
    cancelled: threading.Event
    key: int = 0
    """The caller's id for the request (the executor's request id)."""
    sent: str = ""
    """Text already streamed by an earlier attempt (after an out-of-memory split)."""
    first_token_at: float | None = None
    done: bool = False
    generated: list[int] = field(default_factory=list)
    on_step: Callable[[], None] | None = None
    """Called after every model step that reaches this row: the executor's watchdog counts it as progress."""


@dataclass(frozen=True)
class Finished:
    """A row that ended in this step."""

    row: Row
    text: str
    """The whole answer (the row's deltas, and those of an earlier attempt, concatenate to it)."""
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None


@dataclass
class StepOutcome:
    """What one model call did: in order, each row's new text, then the rows that ended."""

    batch: RunningBatch | None
    """The rows still running, to pass to the next `step`; None when none is left."""
    deltas: list[tuple[Row, str]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class _StepReport(StoppingCriteria):
    """Never stops `model.generate`; reports each of its steps to the rows (beam search is not streamed)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: object = None, **kwargs: object) -> torch.BoolTensor:
        for row in self.rows:
            if row.on_step is not None:
                row.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def model_identity(loaded: LoadedModel) -> Hashable:
    """Part of every vision cache key: the model's name, architecture, exact config and dtype."""
    config = loaded.model.config.to_json_string(use_diff=False)
    return loaded.name, loaded.architecture, hashlib.sha256(config.encode()).hexdigest()[:16], str(loaded.dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class LocalEngine:
    """Generation and scoring with an in-process transformers model."""

    def __init__(self, loaded: LoadedModel, *, vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        # On the model's device once: indexing with a list would copy it there at every step.
        self._bad_ids = torch.tensor([ids[0] for ids in loaded.bad_words_ids], dtype=torch.long, device=loaded.device)
        self._stop_ids = set(loaded.stop_token_ids)
        self.vision_cache = VisionCache(vision_cache_bytes)
        self.identity = model_identity(loaded)
        config = self.model.config
        vision = config.vision_config
        if config.use_resampler:
            # The perceiver's output is what the cross-attention layers read: cache that, skip both.
            self._feature_arg = "perceiver_embeddings"
            self._feature_shape = (config.perceiver_config.resampler_n_latents, vision.embed_dim)
        else:
            self._feature_arg = "image_encoder_embeddings"
            self._feature_shape = ((vision.image_size // vision.patch_size) ** 2 + 1, vision.embed_dim)

    @classmethod
    def for_config(cls, loaded: LoadedModel, config: ModelConfig) -> LocalEngine:
        return cls(loaded, vision_cache_bytes=config.vision_cache_mb * 2**20)

    # -- model calls (one place, so tests can inject faults here) --------------------------------
    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def vision_cache_stats(self) -> VisionCacheStats:
        return self.vision_cache.stats()

    def memory(self) -> dict[str, int]:
        """Bytes of tensors allocated on each GPU (`loading.gpu_memory`)."""
        return gpu_memory()

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    # -- image features --------------------------------------------------------------------------
    def _image_features(self, images: Sequence[Sequence[Image.Image]], slots: int) -> torch.Tensor:
        """(rows, slots, latents, hidden): each row's image features in order, zero in unused slots.

        Images found in the vision cache are not preprocessed or encoded again; the others go through
        the vision tower (and the perceiver) together, once each even when a batch repeats one.
        """
        loaded = self.loaded
        out = torch.zeros(len(images), max(slots, 1), *self._feature_shape, device=loaded.device, dtype=loaded.dtype)
        found: dict[Hashable, torch.Tensor] = {}
        missing: dict[Hashable, Image.Image] = {}
        places: list[tuple[int, int, Hashable]] = []
        for r, row_images in enumerate(images):
            for k, image in enumerate(row_images):
                key: Hashable = (self.identity, image_key(image))  # another model's features never match
                places.append((r, k, key))
                if key in found or key in missing:
                    continue
                cached = self.vision_cache.get(key)
                if cached is None:
                    missing[key] = image
                else:
                    found[key] = cached
        if missing:
            pixels = preprocess_images(self.processor, list(missing.values())).to(loaded.device, loaded.dtype)
            hidden = self.model.model.vision_model(pixel_values=pixels).last_hidden_state
            if self.model.config.use_resampler:
                hidden = self.model.model.perceiver_resampler(hidden)
            for new_key, features in zip(missing, hidden, strict=True):
                found[new_key] = features.clone()  # its own storage: the cache must not pin the whole batch
                self.vision_cache.put(new_key, found[new_key])
        for r, k, place in places:
            out[r, k] = found[place]
        return out

    # -- free generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, rows: Sequence[Row], after_step: Callable[[StepOutcome], None]) -> None:
        """Run `rows` together to their ends (no row joins on the way); `after_step` gets each call's outcome."""
        outcome = self.prefill(rows)
        after_step(outcome)
        while outcome.batch is not None:
            outcome = self.step(outcome.batch)
            after_step(outcome)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> StepOutcome:
        """Read the prompts, pick each row's first token (the outcome's batch is None if every row finished)."""
        prompts = [r.prompt for r in rows]
        enc = encode(self.processor, prompts, pixels=False).to(self.loaded.device, self.loaded.dtype)
        features = self._image_features([p.images for p in prompts], enc.image_attention_mask.shape[-1])
        cache = new_cache(self.model.config)
        out = self.forward(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, image_attention_mask=enc.image_attention_mask,
            cache=cache, use_cache=True, logits_to_keep=1, **{self._feature_arg: features.flatten(0, 1)},
        )
        states = []
        for i, row in enumerate(rows):
            params = row.prompt.params
            length = enc.prompt_lengths[i]
            states.append(RowState(
                row=row,
                assembler=TextAssembler(self._decode, params.stop_strings, row.sent, incremental=True),
                prompt_ids=enc.input_ids[i, -length:].tolist() if params.repetition_penalty != 1.0 else [],
                prompt_length=length,
                generator=new_generator(self.loaded.device, params.seed) if params.decoding == "sample" else None,
            ))
        batch = RunningBatch(
            states=states, cache=cache, attention=enc.attention_mask,
            image_mask=enc.image_attention_mask[:, -1:, :], features=features,
            next_tokens=enc.input_ids.new_zeros(len(rows)),
        )
        return self._advance(batch, out.logits[:, -1, :])

    @torch.inference_mode()
    def step(self, batch: RunningBatch) -> StepOutcome:
        """Feed every row its newest token and pick the next (the outcome's batch is None when no row is left)."""
        attention = torch.cat([batch.attention, batch.attention.new_ones(len(batch), 1)], dim=1)
        out = self.forward(
            input_ids=batch.next_tokens[:, None], attention_mask=attention, image_attention_mask=batch.image_mask,
            cache=batch.cache, use_cache=True, **{self._feature_arg: batch.features.flatten(0, 1)},
        )
        batch.attention = attention
        return self._advance(batch, out.logits[:, -1, :])

    def _advance(self, batch: RunningBatch, logits: torch.Tensor) -> StepOutcome:
        next_tokens = self._choose(logits.float(), batch.states)
        tokens = next_tokens.tolist()
        now = time.monotonic()
        keep: list[int] = []
        outcome = StepOutcome(batch=None)
        for pos, state in enumerate(batch.states):
            row = state.row
            row.first_token_at = row.first_token_at or now
            reason = self._step_row(row, state.assembler, tokens[pos], now, outcome)
            if reason is None:
                keep.append(pos)
            else:
                self._finish(row, state.assembler, reason, state.prompt_length, outcome)
        if not keep:
            return outcome
        batch.next_tokens = next_tokens
        if len(keep) < len(batch):
            batch.keep(keep)
        outcome.batch = batch
        return outcome

    def _step_row(self, row: Row, assembler: TextAssembler, token: int, now: float,
                  outcome: StepOutcome) -> FinishReason | None:
        if row.on_step is not None:
            row.on_step()
        if token in self._stop_ids:
            return FinishReason.END_OF_UTTERANCE
        row.generated.append(token)
        delta = assembler.add(token)
        if delta:
            outcome.deltas.append((row, delta))
        if assembler.stopped:
            return FinishReason.STOP_STRING
        if row.cancelled.is_set():
            return FinishReason.CANCELLED
        if now > row.deadline:
            return FinishReason.TIMEOUT
        if len(row.generated) >= row.prompt.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, row: Row, assembler: TextAssembler, reason: FinishReason, prompt_tokens: int,
                outcome: StepOutcome) -> None:
        if reason is not FinishReason.STOP_STRING:
            tail = assembler.finish()
            if tail:
                outcome.deltas.append((row, tail))
        row.done = True
        outcome.finished.append(Finished(row, assembler.text, reason, prompt_tokens, len(row.generated),
                                         row.first_token_at))

    def _choose(self, logits: torch.Tensor, states: Sequence[RowState]) -> torch.Tensor:
        """Each row's next token by its own settings: greedy, or sampled from its own random stream."""
        logits[:, self._bad_ids] = -math.inf
        for r, state in enumerate(states):
            penalty = state.row.prompt.params.repetition_penalty
            if penalty != 1.0:
                seen = torch.tensor(sorted(set(state.prompt_ids) | set(state.row.generated)), device=logits.device)
                values = logits[r, seen]
                logits[r, seen] = torch.where(values > 0, values / penalty, values * penalty)
        tokens = logits.argmax(dim=-1)
        for r, state in enumerate(states):
            if state.generator is not None:
                tokens[r] = self._sample(logits[r], state.row.prompt.params, state.generator)
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(logits / max(params.temperature, 1e-5), dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator)[0]

    # -- beam search (the guide's story) -----------------------------------------------------------
    @torch.inference_mode()
    def beam_search(self, rows: Sequence[Row]) -> StepOutcome:
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
        outcome = StepOutcome(batch=None)
        for i, row in enumerate(rows):
            self._finish_whole(row, out[i, enc.input_ids.shape[1]:].tolist(), enc.prompt_lengths[i], outcome)
        return outcome

    def _finish_whole(self, row: Row, ids: list[int], prompt_tokens: int, outcome: StepOutcome) -> None:
        """A row whose whole answer came back at once (beam search): cut at its stops, hand it over finished."""
        stop_ids = set(self.loaded.stop_token_ids)
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
            outcome.deltas.append((row, text[len(row.sent):]))
        row.done = True
        outcome.finished.append(Finished(row, text, reason, prompt_tokens, len(ids), row.first_token_at))

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
            enc = encode_texts(self.processor, texts, [prompt.images] * len(part), pixels=False)
            enc = enc.to(self.loaded.device, self.loaded.dtype)
            features = self._image_features([prompt.images] * len(part), enc.image_attention_mask.shape[-1])
            logits = self.forward(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                image_attention_mask=enc.image_attention_mask, **{self._feature_arg: features.flatten(0, 1)},
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


def engine_for(loaded: LoadedModel, config: ModelConfig) -> LocalEngine:
    """The engine of `loaded`'s architecture: this one for IDEFICS v1, `families.engine` for the newer ones."""
    if loaded.architecture == "idefics":
        return LocalEngine.for_config(loaded, config)
    from model_server.families.engine import FamilyEngine

    return FamilyEngine.for_config(loaded, config)
