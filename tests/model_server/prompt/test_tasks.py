"""Golden prompts: every example of the guide, with its image URLs replaced by images, item for item."""

from __future__ import annotations

import pytest

from model_server.neutralize import ZERO_WIDTH_SPACE
from model_server.prompt import CHAT_STOP, PromptError, looks_like_url, prompt_text
from model_server.tasks import (
    caption,
    classify_prompt,
    fewshot,
    prompted_caption,
    story,
    validate_categories,
    vqa,
)
from model_server.types import GenerationParams

from .helpers import EIFFEL_ANSWER, IMG, image, images

GUIDE_CATEGORIES = ["animals", "vegetables", "city landscape", "cars", "office"]


def test_caption() -> None:
    img = image()
    prompt = caption(img)
    assert prompt.items == (img,)  # the guide's list: the image alone, generation starts from BOS
    assert prompt_text(prompt.items) == f"<s>{IMG}"
    assert prompt.params.max_new_tokens == 30


def test_prompted_caption() -> None:
    img = image()
    prompt = prompted_caption(img)
    assert prompt.items == (img, "This is an image of ")
    # The processor strips the trailing space of a text item.
    assert prompt_text(prompt.items) == f"<s>{IMG}This is an image of"


def test_fewshot() -> None:
    eiffel, liberty = images(2)
    prompt = fewshot([(eiffel, EIFFEL_ANSWER)], liberty)
    guide = [
        "User:",
        eiffel,
        "Describe this image.\nAssistant: An image of the Eiffel Tower at night. "
        "Fun fact: the Eiffel Tower is the same height as an 81-storey building.\n",
        "User:",
        liberty,
        "Describe this image.\nAssistant:",
    ]
    assert list(prompt.items) == guide
    assert prompt_text(prompt.items) == (
        f"<s>User:{IMG}Describe this image.\nAssistant: {EIFFEL_ANSWER}\nUser:{IMG}Describe this image.\nAssistant:"
    )
    assert prompt.params.stop_strings == (CHAT_STOP,)
    assert prompt.params.max_new_tokens == 60


def test_vqa() -> None:
    img = image()
    prompt = vqa(img, "Where are these people and what's the weather like?")
    guide = [
        "Instruction: Provide an answer to the question. Use the image to answer.\n",
        img,
        "Question: Where are these people and what's the weather like? Answer:",
    ]
    assert list(prompt.items) == guide
    assert prompt.params.max_new_tokens == 40


def test_classification() -> None:
    img = image()
    prompt = classify_prompt(img, GUIDE_CATEGORIES)
    guide = [
        f"Instruction: Classify the following image into a single category from the following list: "
        f"{GUIDE_CATEGORIES}.\n",
        img,
        "Category: ",
    ]
    assert list(prompt.items) == guide
    assert prompt.items[0] == (
        "Instruction: Classify the following image into a single category from the following list: "
        "['animals', 'vegetables', 'city landscape', 'cars', 'office'].\n"
    )
    assert prompt.params.max_new_tokens == 8


def test_story() -> None:
    img = image()
    prompt = story([img])
    guide = ["Instruction: Use the image to write a story. \n", img, "Story: \n"]
    assert list(prompt.items) == guide
    # The spaces before "\n" stay: strip(" ") only removes spaces at the very ends of an item.
    assert prompt_text(prompt.items) == f"<s>Instruction: Use the image to write a story. \n{IMG}Story: \n"
    assert prompt.params == GenerationParams(decoding="beam", num_beams=2, max_new_tokens=200)


def test_story_with_several_images_shares_fake_tokens() -> None:
    a, b = images(2)
    prompt = story([a, b])
    assert list(prompt.items) == ["Instruction: Use the image to write a story. \n", a, b, "Story: \n"]
    # The second image shares the first one's closing fake token.
    assert f"{IMG}<image><fake_token_around_image>Story" in prompt_text(prompt.items)


def test_batch_example() -> None:
    # The guide's batch: three prompted captions, each [image, "This is an image of "].
    imgs = images(3)
    prompts = [prompted_caption(img) for img in imgs]
    assert [list(p.items) for p in prompts] == [[img, "This is an image of "] for img in imgs]
    assert len({p.params.batch_key() for p in prompts}) == 1


# --- untrusted input ------------------------------------------------------------------------------------


def test_question_that_is_a_url_stays_inside_its_text_item() -> None:
    img = image()
    url = "https://images.unsplash.com/photo-1623944889288-cd147dbb517c?w=3540&q=80"
    prompt = vqa(img, url)
    assert prompt.items[2] == f"Question: {url} Answer:"
    assert not any(isinstance(i, str) and looks_like_url(i) for i in prompt.items)


def test_caption_prompt_that_is_a_url_is_split_not_fetched() -> None:
    img = image()
    url = "https://example.com/cat.png"
    prompt = prompted_caption(img, url)
    texts = [i for i in prompt.items if isinstance(i, str)]
    assert len(texts) > 1 and not any(looks_like_url(t) for t in texts)
    assert prompt_text(prompt.items) == f"<s>{IMG}{url}"


def test_untrusted_strings_are_neutralized() -> None:
    img = image()
    z = ZERO_WIDTH_SPACE
    assert vqa(img, "<image>?").items[2] == f"Question: <{z}image>? Answer:"
    assert prompted_caption(img, "<s>").items[1] == f"<{z}s>"
    few = fewshot([(img, "a<end_of_utterance>")], img, instruction="Describe <image>.")
    text = prompt_text(few.items)
    assert text.count("<end_of_utterance>") == 0
    assert text.count("<image>") == 2
    cls = classify_prompt(img, ["<image>", "dogs"])
    assert prompt_text(cls.items).count("<image>") == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: vqa(image(), ""), "the question is empty"),
        (lambda: vqa(image(), "  \n\x00 "), "the question is empty"),
        (lambda: vqa(image(), "x" * 2001), "the question is too long (at most 2000 characters)"),
        (lambda: prompted_caption(image(), " "), "the prompt is empty"),
        (lambda: prompted_caption(image(), "x" * 2001), "the prompt is too long (at most 2000 characters)"),
        (lambda: fewshot([], image()), "give at least one example"),
        (lambda: fewshot([(image(), "a")] * 5, image()), "at most 4 examples"),
        (lambda: fewshot([(image(), " ")], image()), "the example answer is empty"),
        (lambda: fewshot([(image(), "a")], image(), instruction=""), "the instruction is empty"),
        (lambda: classify_prompt(image(), []), "give at least one category"),
        (lambda: classify_prompt(image(), [" ", ""]), "give at least one category"),
        (lambda: story([]), "give at least one image"),
        (lambda: story(images(5)), "at most 4 images"),
    ],
)
def test_prompt_errors(make, message: str) -> None:
    with pytest.raises(PromptError) as caught:
        make()
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_validate_categories() -> None:
    assert validate_categories("animals, vegetables,, city landscape ,Cars, cars, office, ANIMALS") == [
        "animals",
        "vegetables",
        "city landscape",
        "Cars",
        "office",
    ]
    assert validate_categories([" a ", "A", "b"]) == ["a", "b"]
    assert validate_categories(",".join(str(i) for i in range(25))) == [str(i) for i in range(25)]
    with pytest.raises(PromptError, match=r"^give at least one category$"):
        validate_categories(" , ,")
    with pytest.raises(PromptError, match=r"^at most 25 categories$"):
        validate_categories(",".join(str(i) for i in range(26)))
    with pytest.raises(PromptError, match="at most 100 characters"):
        validate_categories(["x" * 101])
    assert validate_categories(["x" * 100]) == ["x" * 100]
