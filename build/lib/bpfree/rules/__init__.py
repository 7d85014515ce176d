"""One registry for every learning rule; importing the family modules registers them."""
from bpfree.rules.base import (Rule, RuleHandle, apply_rule, get_rule_class, list_layer_rules, list_rules,
                               register_rule)
from bpfree.rules import feedback_alignment, weight_transport, direct_feedback, multi_agent, relevance, leader_follower, target_propagation  # noqa: F401  (registration)
from bpfree.rules import leader_heads  # noqa: F401  (registration)

__all__ = ["Rule", "RuleHandle", "apply_rule", "get_rule_class", "list_layer_rules", "list_rules", "register_rule"]
