"""The test check of a search's answer: the recommended plan's model (fine-tuned by the search) and the dense
model fine-tuned alike, evaluated on the held-out items BEFORE the search's validation slice, with the paired
bootstrap 95% interval of the drop. Usage: python experiments/choosing_how_much/test_items.py SEARCH_OUT"""
import json
import sys
from pathlib import Path

from gradpruner.evaluation.evaluate import evaluate
from gradpruner.evaluation.stats import paired_bootstrap, paired_scores


def main(out: Path) -> None:
    res = json.loads((out / "search.json").read_text())
    k, task, n_test = res["recommended"], res["task"], res["slice"]["offset"]
    if k is None:
        print("no recommendation: nothing to test")
        return
    folders = {"dense": Path(res["dense_ft"]["run"]) / "dense_ft",
               f"k={k}": Path(next(p for p in res["finetuned"] if p["k"] == k)["run"]) / "pruned_ft"}
    evals = {}
    for name, folder in folders.items():
        path = out / f"test_{name}.json"
        if not path.is_file():
            evaluate(str(folder), task=task, limit=n_test, item_scores=True, out=path)
        evals[name] = json.loads(path.read_text())
    d, lo, hi = paired_bootstrap(*paired_scores(evals["dense"], evals[f"k={k}"]))
    tol = res["search"]["max_drop"]
    print(f"| model | test accuracy (items 0..{n_test - 1}, n = {evals['dense']['n']}) |\n|---|---|")
    print(f"| dense, fine-tuned alike | {evals['dense']['value']:.3f} |")
    print(f"| {k} of {res['num_layers']} layers removed (the search's answer) | {evals[f'k={k}']['value']:.3f} |")
    print(f"\ndrop on the test items: {d:+.3f}, paired 95% interval [{lo:+.3f}, {hi:+.3f}]; tolerance {tol}; "
          f"validation drop {next(p for p in res['finetuned'] if p['k'] == k)['drop']:+.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
