"""bpfree: backpropagation-free learning rules that plug into ordinary PyTorch models."""
from bpfree.rules import RuleHandle, apply_rule, list_layer_rules, list_rules

__all__ = ["RuleHandle", "apply_rule", "list_layer_rules", "list_rules"]
__version__ = "0.1.0"
