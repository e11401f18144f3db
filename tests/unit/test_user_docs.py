"""What a new user reads: the README and the notebooks say one thing, and only about the project."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def cells(name: str) -> tuple[str, str]:
    """(markdown, code) of notebooks/NAME.ipynb."""
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    text = {kind: "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind)
            for kind in ("markdown", "code")}  # fmt: skip
    return text["markdown"], text["code"]


def test_kaggle_has_one_storage_recommendation_everywhere():
    markdown, code = cells("kaggle")
    storage_line = next(line for line in code.splitlines() if line.startswith("STORAGE ="))
    assert "hf://" in storage_line and "gdrive://" not in storage_line
    assert "HF_TOKEN" in markdown and "the Hub is the store to use" in markdown
    kaggle_readme = README.split("## On Kaggle", 1)[1].split("\n## ", 1)[0]
    assert 'STORAGE = "hf://' in kaggle_readme and "Relay's store is `hf://" in kaggle_readme
    assert "On Kaggle, use the Hugging Face Hub" in README
    assert "recommended for runs that span sessions" not in README  # the old rival recommendation


def test_user_facing_text_names_no_issue_numbers():
    texts = {p: p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md"),
                                        *(REPO / "notebooks").glob("*.ipynb")]}  # fmt: skip
    texts[REPO / "runner/costs.py"] = str(__import__("runner.costs").costs.STEP_S_PER_1024_EXAMPLE)  # relay plan
    found = {str(p): m for p, t in texts.items() for m in re.findall(r"\bissues? #?\d+", t, re.IGNORECASE)}
    assert not found


def test_the_quick_start_can_be_followed_literally():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "--run tiny-resume" in quick  # a resume needs a run that is not complete yet
    assert "3 minutes on a machine with 2 CPU cores" in quick
    assert "s per micro-batch of 1 image" in README and "what `relay plan` prints as s/step" in README


def test_the_readme_documents_your_own_images_and_which_file_for_which_tool():
    own = README.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    for words in (
        "metadata.jsonl",
        ".txt",
        "Hugging Face dataset",
        "/content/drive/MyDrive",
        "Held out for validation",
        "data.validation_count",
        "data.min_images",
        "after* the hold-out",
        'run="my-lora"',
    ):
        assert words in own, words
    assert "`RUN.kohya.safetensors` for ComfyUI and AUTOMATIC1111" in README
