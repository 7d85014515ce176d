"""Imports run one way: library <- harness <- report <- stages/CLI (architecture.md).

Read off the import statements (lazy ones inside functions included), so a report module
that starts training, or a rule that reads params, fails here rather than in review.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lower tiers never import higher ones. Every module of bpfree/ and stages/ must be placed.
TIERS = {
    "library": ["bpfree.rules", "bpfree.models", "bpfree.losses", "bpfree.data", "bpfree.diagnostics",
                "bpfree.distributed", "bpfree.layout", "bpfree.provenance", "bpfree.progress", "bpfree.pruning"],
    "harness": ["bpfree.config", "bpfree.spec", "bpfree.loop", "bpfree.record", "bpfree.runner", "bpfree.gpu_queue", "bpfree.launcher", "bpfree.tuning", "bpfree.training", "bpfree.continual", "bpfree.transfer", "bpfree.summary",
                "bpfree.benchmark", "bpfree.verify", "bpfree.pipelines"],
    "report": ["bpfree.claims", "bpfree.reporting", "bpfree.plots", "bpfree.catalogue"],
    "entry": ["bpfree.cli", "stages", "bpfree"],  # `bpfree` itself: the lazy package namespace
}
ORDER = list(TIERS)


def tier_of(module: str) -> str | None:
    matches = [(len(p), tier) for tier, prefixes in TIERS.items() for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1] if matches else None


def imported(text: str) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in out if m.split(".")[0] in ("bpfree", "stages")]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def violations(files: dict[str, str]) -> list[str]:
    """files: module name -> source text."""
    found = []
    for module, text in files.items():
        own = tier_of(module)
        for target, line in imported(text):
            theirs = tier_of(target)
            if target == "bpfree" or theirs is None:
                continue
            if ORDER.index(theirs) > ORDER.index(own):
                found.append(f"{module}:{line}: {own} imports {target} ({theirs})")
    return found


def sources():
    return sorted([*(REPO / "bpfree").rglob("*.py"), *(REPO / "stages").glob("*.py")])


def test_every_module_has_a_tier():
    assert [module_name(p) for p in sources() if tier_of(module_name(p)) is None] == []


def test_imports_run_one_way():
    assert violations({module_name(p): p.read_text() for p in sources()}) == []


def test_the_checker_sees_a_lazy_import_upward():
    probe = {"bpfree.rules.probe": "def f():\n    from bpfree.claims import load_claims\n",
             "bpfree.claims": "import bpfree.summary\nfrom stages import log\n"}
    assert violations(probe) == ["bpfree.rules.probe:2: library imports bpfree.claims (report)",
                                 "bpfree.rules.probe:2: library imports bpfree.claims.load_claims (report)",
                                 "bpfree.claims:2: report imports stages (entry)",
                                 "bpfree.claims:2: report imports stages.log (entry)"]


MAX_FUNCTION_LINES = 80


def long_functions(files: dict[str, str], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """module:function (lines) of every function or method longer than `limit` lines."""
    found = []
    for module, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{module}:{node.name} ({length} lines)")
    return found


def test_no_function_reads_longer_than_one_screen():
    """A function of bpfree/ or stages/ fits on one screen (architecture.md; issue 27)."""
    files = {module_name(p): p.read_text() for p in sources()}
    assert not long_functions(files), long_functions(files)
    probe = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert long_functions({"probe": probe}) == ["probe:f (81 lines)"]  # the check can fail
