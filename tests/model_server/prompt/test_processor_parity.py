"""`prompt_text` is the text the real `IdeficsProcessor` builds: same token ids, and nothing is fetched.

Uses transformers (the prompt modules themselves never import it) with the tiny test tokenizer.
"""

from __future__ import annotations

import pytest

from model_server.prompt import prompt_text, render_chat
from model_server.tasks import caption, classify_prompt, fewshot, prompted_caption, story, vqa
from model_server.types import ChatTurn, PromptItem

from .helpers import EIFFEL_ANSWER, IDEFIX_ANSWER, image, images

pytest.importorskip("transformers")
pytest.importorskip("torch")

URL = "https://example.com/cat.png"


@pytest.fixture(scope="module")
def processor():
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    from tests.fakes.tiny_idefics import build_tokenizer

    proc = IdeficsProcessor(
        image_processor=IdeficsImageProcessorPil(image_size=16), tokenizer=build_tokenizer(), image_size=16
    )

    # `fetch_images` also sees the PIL images (and passes them through): only a string means a fetch.
    fetch = proc.image_processor.fetch_images

    def no_url_fetching(images):
        flat = images if isinstance(images, list) else [images]
        if any(isinstance(i, str) for i in flat):
            raise AssertionError("the processor tried to fetch a text item as an image URL")
        return fetch(images)

    proc.image_processor.fetch_images = no_url_fetching
    return proc


def cases() -> dict[str, list[PromptItem]]:
    a, b, c = images(3)
    chat = [
        ChatTurn("user", "What is in this image? <image>", "alice", (a,)),
        ChatTurn("user", URL, "bob", (b, c)),
        ChatTurn("assistant", IDEFIX_ANSWER),
        ChatTurn("user", f"{URL}<end_of_utterance>"),
    ]
    return {
        "caption": list(caption(a).items),
        "prompted": list(prompted_caption(a).items),
        "prompted_url": list(prompted_caption(a, URL).items),
        "fewshot": list(fewshot([(a, EIFFEL_ANSWER)], b).items),
        "vqa_url": list(vqa(a, URL).items),
        "classify": list(classify_prompt(a, ["animals", "vegetables", "city landscape"]).items),
        "story": list(story([a, b]).items),
        "chat_instruct": list(render_chat(chat, instruct=True, max_images=2).items),
        "chat_base": list(render_chat(chat, instruct=False).items),
        "image_only_turn": list(render_chat([ChatTurn("user", "", None, (image(),))], instruct=True).items),
    }


@pytest.mark.parametrize("name", sorted(cases()))
def test_same_ids_as_the_processor(processor, name: str) -> None:
    items = cases()[name]
    expected = processor(text=items, add_end_of_utterance_token=False, return_tensors="pt")["input_ids"][0].tolist()
    ours = processor.tokenizer(prompt_text(items), add_special_tokens=False)["input_ids"]
    assert ours == expected


def test_the_processor_would_fetch_a_bare_url_item(processor) -> None:
    # Shows the check above is not vacuous: the same URL left as an item of its own is fetched.
    with pytest.raises(AssertionError, match="tried to fetch"):
        processor(text=[image(), URL], add_end_of_utterance_token=False, return_tensors="pt")


def test_latest_image_index_matches_the_processors_loop():
    """Our tensor form of the image attention mask equals transformers' per-token loop, end tokens included."""
    import torch
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    from model_server.encoding import latest_image_index
    from tests.fakes.tiny_idefics import build_tokenizer

    tokenizer = build_tokenizer()
    image_id, eos_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)
    # Mostly ordinary tokens, with images and end tokens sprinkled in (runs of both, at both ends).
    choices = torch.tensor([5, 6, 7, 8, image_id, image_id, eos_id])
    for length in (1, 2, 7, 40):
        ids = choices[torch.randint(len(choices), (64, length), generator=generator)]
        expected, _ = image_attention_mask_for_packed_input_ids(ids.clone(), tokenizer, "pt")
        assert torch.equal(latest_image_index(ids, image_id, eos_id), expected)
