"""The README's library example runs as written (it is the first code a user copies)."""
import re

from conftest import REPO


def test_use_a_rule_example_runs(capsys):
    """The quickstart: a rule on torchvision's ResNet-18 and on an nn.TransformerEncoder, the
    conversion report, a few steps, the alignment diagnostics."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use a rule on your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "{'Conv2d': 20, 'Linear': 1}" in out
    assert "rule 'kp': converted Conv2d: 20, Linear: 1;" in out and "bn1.weight" in out
    assert "rule 'fa': converted Linear: 7, MultiheadAttention.in_proj: 2;" in out
    assert "layers.0.self_attn.in_proj_weight" in out and "layers.1.norm2.bias" in out
    assert out.count("{'") >= 3  # the counts, then the update-gradient and weight-feedback angles
