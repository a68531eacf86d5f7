"""Every package directory ships: pyproject's explicit package list must name it."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"modman." + ".".join(p.parent.relative_to(ROOT / "modman").parts) if p.parent != ROOT / "modman"
             else "modman" for p in (ROOT / "modman").rglob("__init__.py")}
    found |= {"modman.kernels" + "".join("." + part for part in p.parent.relative_to(ROOT / "kernels").parts)
              for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed <= found, f"listed in pyproject but missing: {sorted(listed - found)}"


def test_importing_modman_does_not_import_the_compiler():
    """torch.compiler.disable at class definition imported torch._dynamo on `import modman`
    (~1.5 s on every import and CLI start); the eager wrapper of the step is made on first use."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, modman; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=pathlib.Path(__file__).parent)
    assert out.stdout.strip() == "False", out
