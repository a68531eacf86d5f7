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


def test_the_lora_and_opd_example_runs_as_written(tmp_path, monkeypatch):
    """The post-training block, with pretrain() swapped for small random models (the real
    recipes take minutes; their results are the benchmarks'): every name and call in it works."""
    import modman.toy
    from modman.toy import TinyCausalLM, tasks

    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in block if "from modman.opd import" in b)
    vocab = tasks.addition(3).tokenizer.vocab_size
    monkeypatch.setattr(modman.toy, "pretrain", lambda name: TinyCausalLM(vocab, 32, 2, 4, 32, seed=len(name)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, str(README), "exec"), scope)
    assert (tmp_path / "runs/adapter/adapter_model.safetensors").is_file()
    assert scope["trainer"].step_count == 100 and (tmp_path / "runs/opd.pt").is_file()
