"""Text prompts for the normal and anomalous state of a category (docs/method.md#text-visual-fusion).

The first state of each list is the original RAML prompt ("flawless {category}" / "damaged
{category} with defects"); the others and the templates form a small ensemble in the style of
WinCLIP's compositional prompts. Each (state, template) pair is embedded separately and cached, so
stage two can attend over the individual prompts or average them.
"""

from __future__ import annotations

NORMAL_STATES = ("flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect")
ANOMALOUS_STATES = ("damaged {} with defects", "damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "{}.",
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {} for visual inspection.",
    "an industrial photo of a {}.",
)


def category_words(category: str) -> str:
    """``metal_nut`` → ``metal nut``: how a category is written in a prompt."""
    return category.replace("_", " ").strip()


def prompts_for(category: str) -> dict[str, list[str]]:
    """All normal and anomalous prompts of ``category``, state-major."""
    words = category_words(category)
    return {
        kind: [template.format(state.format(words)) for state in states for template in TEMPLATES]
        for kind, states in (("normal", NORMAL_STATES), ("anomalous", ANOMALOUS_STATES))
    }


def prompt_spec() -> dict:
    """The prompt recipe as recorded in a cache's fingerprint."""
    return {
        "normal_states": list(NORMAL_STATES),
        "anomalous_states": list(ANOMALOUS_STATES),
        "templates": list(TEMPLATES),
    }


def encode_prompts(backbone, category: str) -> dict:
    """The category's prompt embeddings by ``backbone``: {"normal": [P, D], "anomalous": [P, D]}."""
    return {kind: backbone.encode_texts(prompts) for kind, prompts in prompts_for(category).items()}
