"""One registry for every learning rule; importing the rule modules (named by rule id)
registers them."""
from bpfree.rules.base import (Rule, RuleHandle, apply_rule, get_rule_class, list_layer_rules, list_rules,
                               register_rule)
from bpfree.rules import fa, kp_wm, dfa, backman, lfp, lfnn, lfnn_heads, tp_dtp_lra  # noqa: F401  (registration)

__all__ = ["Rule", "RuleHandle", "apply_rule", "get_rule_class", "list_layer_rules", "list_rules", "register_rule"]
