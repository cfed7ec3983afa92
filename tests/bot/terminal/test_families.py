"""Every terminal command on tiny Idefics2, Idefics3 and SmolVLM checkpoints, through the real entry point."""

from __future__ import annotations

from tests.bot.terminal.test_commands import chat, run, workdir  # noqa: F401  (workdir is a fixture)


def test_guide_tasks_on_each_architecture(workdir, capsys, family_paths, architecture):  # noqa: F811
    model = str(family_paths[architecture])
    code, out, err = run(capsys, "caption", "--model", model, "photo.png", "photo2.png")
    assert code == 0, err
    assert out.startswith("photo.png: ") and "\nphoto2.png: " in out
    assert f"model ready: {architecture}" in err  # the start-up log names the architecture
    code, out, err = run(capsys, "caption", "--model", model, "photo.png", "--prompt", "This is an image of ")
    assert code == 0 and out.startswith("This is an image of"), err
    code, out, err = run(capsys, "ask", "--model", model, "photo.png", "What is in the picture?")
    assert code == 0 and out.strip(), err
    code, out, err = run(capsys, "classify", "--model", model, "photo.png", "--categories", "animals, cars, office")
    assert code == 0, err
    lines = out.strip().splitlines()
    percents = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in lines]
    assert len(lines) == 3 and percents == sorted(percents, reverse=True) and abs(sum(percents) - 100) < 0.5
    code, out, err = run(capsys, "story", "--model", model, "photo.png")
    assert code == 0, err
    code, out, err = run(capsys, "fewshot", "--model", model, "photo.png", "--example", "photo2.png",
                         "An image of a tower.")
    assert code == 0 and out.strip(), err


def test_dry_run_shows_the_chat_template(workdir, capsys, family_paths, architecture):  # noqa: F811
    code, out, err = run(capsys, "ask", "--model", str(family_paths[architecture]), "--dry-run", "photo.png",
                         "Why <global-img>?")
    assert code == 0, err
    # `<global-img>` is a token of Idefics3 and SmolVLM only: broken there, plain text for Idefics2.
    start, tag = ("", "<global-img>") if architecture == "idefics2" else ("<|im_start|>", "<\u200bglobal-img>")
    assert out == (f"{start}User: Instruction: Provide an answer to the question. Use the image to answer.\n"
                   f"<image>Question: Why {tag}? Answer:<end_of_utterance>\nAssistant:\n")
    assert "loading" not in err


def test_chat_on_each_architecture(workdir, capsys, monkeypatch, family_paths, architecture):  # noqa: F811
    model = str(family_paths[architecture])
    code, out, err = chat(capsys, monkeypatch, ["hello", "/image photo.png", "what is this?", "/quit"],
                          "--model", model, "--show-prompt")
    assert code == 0, err
    assert out.startswith(("<|im_start|>User: hello<end_of_utterance>\nAssistant:\n",
                           "User: hello<end_of_utterance>\nAssistant:\n"))
    second = out.split("User:<image>")[0]
    # The second prompt holds the first exchange, then the image and the question.
    assert "User: hello<end_of_utterance>\nAssistant: " in second
    assert "User:<image>what is this?<end_of_utterance>\nAssistant:" in out
