"""The guide's task prompts (seed/idefics-guide.txt), word for word, with their generation settings.

Each function checks and neutralizes its untrusted strings, then returns the processor's list exactly as the
guide writes it (with the guide's image URLs replaced by the images themselves). They serve base and instruct
checkpoints alike: the instruct models were tuned from the base ones and follow these prompts too.

Token lengths: the guide's `max_new_tokens` (10 for captions, 20 for VQA, 4 for classification, 30 for
few-shot) cut answers short in a chat; we give each some room, noted at each setting. Each user string is
capped at `MAX_TEXT_CHARS` (a Discord message's own limit) to keep task prompts short; the caller that holds
the tokenizer still checks the real count against the model's 2048 positions.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from model_server.errors import PromptError
from model_server.neutralize import neutralize
from model_server.prompt import CHAT_STOP, defuse_urls
from model_server.types import GenerationParams, Prompt, PromptItem

DEFAULT_CAPTION_PROMPT = "This is an image of "
DEFAULT_FEWSHOT_INSTRUCTION = "Describe this image."
VQA_INSTRUCTION = "Instruction: Provide an answer to the question. Use the image to answer.\n"
STORY_INSTRUCTION = "Instruction: Use the image to write a story. \n"
STORY_LEAD = "Story: \n"
CLASSIFY_INSTRUCTION = "Instruction: Classify the following image into a single category from the following list: "
CATEGORY_LEAD = "Category: "

MAX_TEXT_CHARS = 2000
"""Longest question, caption prompt, instruction or few-shot answer."""
MAX_CATEGORIES = 25
MAX_CATEGORY_CHARS = 100
MAX_EXAMPLES = 4
"""Few-shot examples; with the query image that makes 5 images, about the most IDEFICS keeps apart."""
MAX_STORY_IMAGES = 4

CAPTION_PARAMS = GenerationParams(max_new_tokens=30)
"""The guide uses 10, which stops mid-sentence on busy images."""
PROMPTED_CAPTION_PARAMS = GenerationParams(max_new_tokens=30)
FEWSHOT_PARAMS = GenerationParams(max_new_tokens=60, stop_strings=(CHAT_STOP,))
"""The guide uses 30; its answers ("An image of ... Fun fact: ...") need about 40. The base model goes on with
another "User:" turn of its own, hence the stop string."""
VQA_PARAMS = GenerationParams(max_new_tokens=40, stop_strings=("\nQuestion:", "\nInstruction:"))
"""The guide uses 20. The base model may go on with a made-up next question: it ends the answer."""
CLASSIFY_PARAMS = GenerationParams(max_new_tokens=8, stop_strings=("\n",))
"""The guide uses 4; 8 leaves room for two-word categories such as "city landscape"."""
STORY_PARAMS = GenerationParams(decoding="beam", num_beams=2, max_new_tokens=200)
"""As in the guide."""


def _clean(text: str, what: str, *, limit: int = MAX_TEXT_CHARS) -> str:
    """Neutralized, stripped, non-empty and not too long; `what` names the field in the user's message."""
    text = neutralize(text).strip()
    if not text:
        raise PromptError(f"the {what} is empty")
    if len(text) > limit:
        raise PromptError(f"the {what} is too long (at most {limit} characters)")
    return text


def _prompt(items: Sequence[PromptItem], params: GenerationParams) -> Prompt:
    # Items stay as the guide splits them; only text that could pass for an image URL (which the processor
    # would fetch) is split further, which leaves the prompt's text as it was.
    return Prompt(items=defuse_urls(items), params=params)


def caption(image: Image.Image) -> Prompt:
    """The image alone: the model writes a caption starting from the BOS token."""
    return Prompt(items=(image,), params=CAPTION_PARAMS)


def prompted_caption(image: Image.Image, prompt: str = DEFAULT_CAPTION_PROMPT) -> Prompt:
    """The image, then text for the model to continue ("This is an image of ")."""
    # Not `_clean`: the guide's trailing space is part of its prompt (the processor strips it anyway).
    text = neutralize(prompt)
    if not text.strip():
        raise PromptError("the prompt is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise PromptError(f"the prompt is too long (at most {MAX_TEXT_CHARS} characters)")
    return _prompt([image, text], PROMPTED_CAPTION_PARAMS)


def fewshot(
    examples: Sequence[tuple[Image.Image, str]],
    image: Image.Image,
    instruction: str = DEFAULT_FEWSHOT_INSTRUCTION,
) -> Prompt:
    """Worked examples (image, answer) in the guide's User/Assistant layout, then the image to answer."""
    if not examples:
        raise PromptError("give at least one example")
    if len(examples) > MAX_EXAMPLES:
        raise PromptError(f"at most {MAX_EXAMPLES} examples")
    instruction = _clean(instruction, "instruction")
    items: list[PromptItem] = []
    for example_image, answer in examples:
        answer = _clean(answer, "example answer")
        items += ["User:", example_image, f"{instruction}\nAssistant: {answer}\n"]
    items += ["User:", image, f"{instruction}\nAssistant:"]
    return _prompt(items, FEWSHOT_PARAMS)


def vqa(image: Image.Image, question: str) -> Prompt:
    """Visual question answering. The question always shares its item with "Question: " and " Answer:", so
    even a question that is a bare URL stays text."""
    question = _clean(question, "question")
    return _prompt([VQA_INSTRUCTION, image, f"Question: {question} Answer:"], VQA_PARAMS)


def validate_categories(raw: str | Sequence[str]) -> list[str]:
    """Categories from a comma-separated string (or a list): stripped, empty ones dropped, neutralized, and
    deduplicated ignoring case (the first spelling wins)."""
    pieces = raw.split(",") if isinstance(raw, str) else list(raw)
    out: list[str] = []
    seen: set[str] = set()
    for piece in pieces:
        # Line breaks would break the one-line list the model reads; a category is a phrase.
        name = " ".join(neutralize(piece).split())
        if not name:
            continue
        if len(name) > MAX_CATEGORY_CHARS:
            raise PromptError(f"a category is too long (at most {MAX_CATEGORY_CHARS} characters)")
        if name.casefold() in seen:
            continue
        seen.add(name.casefold())
        out.append(name)
    if not out:
        raise PromptError("give at least one category")
    if len(out) > MAX_CATEGORIES:
        raise PromptError(f"at most {MAX_CATEGORIES} categories")
    return out


def classify_prompt(image: Image.Image, categories: Sequence[str]) -> Prompt:
    """Classification into one of `categories`, listed as the guide does: a Python list repr."""
    names = validate_categories(categories)
    instruction = f"{CLASSIFY_INSTRUCTION}{names}.\n"
    return _prompt([instruction, image, CATEGORY_LEAD], CLASSIFY_PARAMS)


def story(images: Sequence[Image.Image]) -> Prompt:
    """An image-guided story, with the guide's beam search (2 beams, 200 new tokens)."""
    if not images:
        raise PromptError("give at least one image")
    if len(images) > MAX_STORY_IMAGES:
        raise PromptError(f"at most {MAX_STORY_IMAGES} images")
    return _prompt([STORY_INSTRUCTION, *images, STORY_LEAD], STORY_PARAMS)
