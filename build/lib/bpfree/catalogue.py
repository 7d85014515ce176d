"""A snapshot of the registries (rules, models, datasets) for the command line.

`bpfree list` answers from this file without importing torch (about 0.1 s instead of 2-5 s).
It is generated from the registries themselves, `python -m bpfree.catalogue`, and a test
(tests/test_cli.py) fails when it no longer equals what the registries say, so it cannot
drift from the code.
"""
from __future__ import annotations

import json
from pathlib import Path

CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")


def _first_line(doc: str | None) -> str:
    return next(iter((doc or "").strip().splitlines()), "")


def build() -> dict:
    """The catalogue as the registries define it now (imports torch)."""
    from bpfree.data.sources import get_source, list_datasets
    from bpfree.models import list_models, model_options
    from bpfree.rules import get_rule_class, list_rules

    return {
        "rules": [{"name": name, "granularity": get_rule_class(name).granularity,
                   "options": ", ".join(f"{k}={v!r}" for k, v in get_rule_class(name).defaults.items()),
                   "what": _first_line(get_rule_class(name).__doc__)} for name in list_rules()],
        "models": [{"name": name, "options": ", ".join(f"{k}={v!r}" for k, v in model_options(name).items())}
                   for name in list_models()],
        "datasets": [{"name": name, "kind": get_source(name).kind, "description": get_source(name).description}
                     for name in list_datasets()],
    }


def render(catalogue: dict) -> str:
    return json.dumps(catalogue, indent=1, ensure_ascii=False) + "\n"


def load() -> dict:
    return json.loads(CATALOGUE_FILE.read_text())


if __name__ == "__main__":
    CATALOGUE_FILE.write_text(render(build()))
    print(f"wrote {CATALOGUE_FILE}")
