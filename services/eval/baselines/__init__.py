"""Training-free baselines: the teacher pruned to every size of a family, to set the family's curve against.

- `naive`: the family's own plans with every student layer replaced by the teacher layer it was copied from.
- `shortgpt`: the layers of lowest Block Influence dropped (`shortgpt.py`).
- `laco`: consecutive layers merged by LaCo's layer collapse (`laco_search.py`).

Each is a recipe per size (pure data, `plans.py`), built into a module on demand (`build.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from services.errors import InvalidRequestError
from services.eval.baselines.build import build_model
from services.eval.baselines.calibration import CalibrationText
from services.eval.baselines.laco import laco_recipes
from services.eval.baselines.laco_search import LacoSettings
from services.eval.baselines.plans import Recipe, identity_recipe, is_referenced, naive_recipe, shortgpt_keep
from services.eval.baselines.shortgpt import block_influence
from services.family import Family
from services.family.assembly import make_template

BASELINES = ("naive", "shortgpt", "laco")
CALIBRATED = ("shortgpt", "laco")
LABELS = {"naive": "naively pruned teacher", "shortgpt": "ShortGPT (lowest Block Influence dropped)",
          "laco": "LaCo (layers merged)"}


def parse_baselines(spec: str) -> tuple[str, ...]:
    """"naive,shortgpt,laco" -> the names, each once, in the order given; unknown names are refused."""
    names = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise InvalidRequestError(f"unknown baseline {', '.join(map(repr, unknown))}; choose from "
                                  f"{', '.join(BASELINES)}", param="baselines")
    return names


def needs_calibration(names: Sequence[str]) -> bool:
    return any(name in CALIBRATED for name in names)


@dataclass
class Baseline:
    """A baseline's recipe per size and how it was made (recorded in the report)."""

    name: str
    recipes: dict[int, Recipe]
    details: dict = field(default_factory=dict)

    def model(self, family: Family, num_layers: int, template: nn.Module | None = None) -> nn.Module:
        return build_model(family, self.recipes[num_layers], template)

    def describe(self) -> dict:
        layers = {str(n): recipe_to_json(r) for n, r in self.recipes.items()}
        return {"label": LABELS[self.name], **self.details, "layers": layers}


def recipe_to_json(recipe: Recipe) -> list:
    """A referenced teacher layer as its index, a merged one as [[teacher layer, coefficient], ...]."""
    return [terms[0][0] if is_referenced(terms) else [list(t) for t in terms] for terms in recipe]


def prepare_baselines(names: Sequence[str], family: Family, calibration: CalibrationText | None,
                      laco: LacoSettings = LacoSettings()) -> dict[str, Baseline]:
    if needs_calibration(names) and calibration is None:
        raise InvalidRequestError(f"baselines {list(names)} need calibration text", param="calibration_data")
    made = {}
    for name in names:
        if name == "naive":
            made[name] = Baseline(name, {n: naive_recipe(family.layout, family.plan(n)) for n in family.sizes})
        elif name == "shortgpt":
            influence = block_influence(family.teacher, family.spec, calibration.chunks)
            recipes = {n: identity_recipe(shortgpt_keep(influence, n)) for n in family.sizes}
            made[name] = Baseline(name, recipes, {"block_influence": influence})
        else:
            results, similarity = laco_recipes(family, calibration.chunks, family.sizes,
                                               make_template(family.teacher, family.teacher), laco)
            made[name] = Baseline(name, {n: r.recipe for n, r in results.items()}, {
                "settings": asdict(laco), "similarity": {str(n): s for n, s in similarity.items()},
                "accepted_merges": {str(n): r.accepted for n, r in results.items()},
                "fallback_merges": {str(n): r.fallbacks for n, r in results.items()}})
    return made
