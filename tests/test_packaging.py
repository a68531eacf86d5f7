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


def test_subpackages_are_attributes_of_modman_on_first_use():
    """``import modman; modman.modular.budget(model)`` (the README's spelling) raised AttributeError
    in a fresh process unless something had imported modman.modular first; every listed subpackage
    is reachable, none is imported by ``import modman`` alone beyond the core."""
    import subprocess
    import sys

    code = ("import sys, modman\n"
            "lazy = ('modular', 'diagnostics', 'lora', 'opd', 'toy', 'data', 'experiments')\n"
            "print(sorted(n for n in lazy if f'modman.{n}' in sys.modules))\n"
            "print(all(getattr(modman, n).__name__ == f'modman.{n}' for n in lazy + ('kernels', 'manifolds')))\n"
            "print(callable(modman.modular.budget), 'modular' in dir(modman))\n"
            "try:\n    modman.nothing\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).parent).stdout.splitlines()
    assert out == ["[]", "True", "True True", "module 'modman' has no attribute 'nothing'"], out
