"""bpfree: backpropagation-free learning rules that plug into ordinary PyTorch models.

The names below load on first use (PEP 562), so `import bpfree` and the `bpfree` command's
help do not pay for importing torch; `bpfree.apply_rule` imports it when first touched.
"""
__all__ = ["RuleHandle", "apply_rule", "list_layer_rules", "list_rules"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from bpfree import rules
        return getattr(rules, name)
    raise AttributeError(f"module 'bpfree' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
