"""Reading the files one stage hands the next: scores.json and plan.json."""
from __future__ import annotations

from gradpruner.errors import GradPrunerError
from gradpruner.util.atomic import read_json


def read_scores(scores) -> dict:
    data = read_json(scores, "Scores file")
    if not isinstance(data, dict) or "layer_scores" not in data:
        raise GradPrunerError(f"Scores file {scores} has no layer_scores; make it with `gradpruner score`.")
    return data



def read_plan(path) -> dict:
    data = read_json(path, "Plan file")
    if not isinstance(data, dict):
        raise GradPrunerError(f"Plan file {path} holds a JSON {type(data).__name__}, not an object with num_layers, "
                              "keep and drop; fix it or make it with `gradpruner plan`.")
    return data


