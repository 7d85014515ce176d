"""The README's library example runs as written (it is the first code a user copies)."""
import re

from conftest import REPO


def test_use_a_rule_example_runs():
    text = (REPO / "README.md").read_text()
    section = text.split("## Use a rule on your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
