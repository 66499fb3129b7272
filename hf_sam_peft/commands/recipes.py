"""`hf-sam-peft recipes`: the recipes shipped inside the package: list them, print one, or say where it is.

Why: installed from a wheel, the recipes live in site-packages. `train`, `study` and the dataset key of a
recipe take them by name; `recipes show NAME > my.yaml` starts a copy of one's own, and `recipes path NAME`
gives a file to tools that need one (`accelerate launch --config_file "$(hf-sam-peft recipes path
accelerate/cpu_ddp)"`).
"""

from __future__ import annotations

import argparse

# how each kind is used, for the listing's headings
USES = {
    "training": "training recipes: hf-sam-peft train NAME",
    "datasets": "dataset recipes: 'dataset: NAME' in a training recipe or study (NAME without datasets/)",
    "studies": "studies: hf-sam-peft study NAME (NAME without studies/)",
    "accelerate": "accelerate configs: accelerate launch --config_file \"$(hf-sam-peft recipes path NAME)\" "
    "-m hf_sam_peft.train RECIPE",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the packaged recipes (training, datasets, studies, accelerate); show or locate one",
        description=(
            "The recipes shipped inside the package: training recipes (hf-sam-peft train NAME), dataset recipes "
            "(datasets/NAME), studies (studies/NAME) and accelerate configs (accelerate/NAME). Without an action: "
            "list them with a line each. 'show NAME' prints one (start your own copy with "
            "'hf-sam-peft recipes show livecell > my.yaml'); 'path NAME' prints where it is. A relative data root "
            "in a packaged dataset recipe is relative to the working directory."
        ),
    )
    actions = parser.add_subparsers(title="actions", metavar="<action>", dest="action")
    show = actions.add_parser("show", help="print a recipe's YAML", description="Print a packaged recipe's YAML.")
    show.add_argument(
        "name", metavar="NAME", help="a name as listed, e.g. livecell, datasets/livecell, accelerate/cpu_ddp"
    )
    path = actions.add_parser("path", help="print a recipe's file path", description="Print a packaged recipe's path.")
    path.add_argument("name", metavar="NAME", help="a name as listed, e.g. accelerate/cpu_ddp")
    parser.set_defaults(func=run)


def format_listing() -> str:
    """Every packaged recipe under its kind's heading, with its one-line description."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data.recipes import RECIPES_DIR, find_any_recipe, list_recipes, recipe_summary

    lines = []
    for kind, names in list_recipes().items():
        if not names:  # an installation without that kind's folder: no empty heading
            continue
        width = max(len(n) for n in names)
        lines.append(USES[kind])
        for name in names:
            # rstrip: a recipe without a description would leave the padding as trailing spaces
            lines.append(f"  {name.ljust(width)}  {recipe_summary(find_any_recipe(name))}".rstrip())
        lines.append("")
    lines.append(f"(in {RECIPES_DIR}; copy one: hf-sam-peft recipes show NAME > my.yaml)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data.recipes import find_any_recipe

    if args.action is None:
        print(format_listing())
    elif args.action == "show":
        # end="": the file's own last newline is kept as is, so `show NAME > my.yaml` is a byte-for-byte copy
        print(find_any_recipe(args.name).read_text(encoding="utf-8"), end="")
    else:
        print(find_any_recipe(args.name))
    return 0
