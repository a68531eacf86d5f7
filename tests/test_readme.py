"""The README's first Python block runs as written (a newcomer copies it first)."""
import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_the_first_example_runs_and_learns(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the construction's "moved onto the manifold" notice
        exec(compile(block, str(README), "exec"), scope)
    printed = capsys.readouterr().out
    assert "0.weight" in printed and "Stiefel" in printed and "AdamW fallback" in printed  # describe()
    assert scope["loss"].item() < 2.0  # it learns (ln 10 ≈ 2.3 at the start)
    assert "duality_gap" in scope["optimizer"].last_step_stats["2.weight"]
