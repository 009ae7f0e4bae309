"""The colab/ notebooks run top to bottom (quick settings) and match their generator.

Each notebook is executed with nbclient in a fresh kernel after `QUICK = True` and a temporary
WORKDIR are appended to its `parameters`-tagged cell; any failing cell raises
CellExecutionError. The kernel must be this interpreter (the venv with micle-tf installed):
a cell prepended by the test checks `sys.prefix`.
"""
import importlib.util
import json
import os
import sys
import time

import pytest

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = ["01_quickstart_ph2.ipynb", "02_bring_your_own_data.ipynb",
             "03_serve_exported_model.ipynb"]


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  os.path.join(COLAB, "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_match_generator():
    rendered = _generator().render_all()
    assert sorted(rendered) == sorted(NOTEBOOKS)
    for name, text in rendered.items():
        with open(os.path.join(COLAB, name), encoding="utf-8") as f:
            assert f.read() == text, f"{name} is stale: run python colab/make_notebooks.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "QUICK" in tagged[0].source and "WORKDIR" in tagged[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, name


def _kernel_name(tmp_path, monkeypatch):
    """'python3' when it resolves to this interpreter (ipykernel's native kernel, or a
    kernelspec whose argv[0] is `python`, which jupyter_client maps to sys.executable);
    otherwise a kernelspec written under tmp_path that runs sys.executable."""
    from jupyter_client.kernelspec import KernelSpecManager
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        exe = spec.argv[0]
        if exe in ("python", "python3") or os.path.realpath(exe) == os.path.realpath(
                sys.executable):
            return "python3"
    except Exception:  # noqa: BLE001 - no such kernelspec: write one below
        pass
    kernel_dir = tmp_path / "jupyter" / "kernels" / "micle-test"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "micle-tf test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(tmp_path / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]))
    return "micle-test"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    workdir = tmp_path / "run"
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += ("\n\n# injected by tests/test_notebooks.py\n"
                      f"QUICK = True\nWORKDIR = {str(workdir)!r}\n")
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    kernel = _kernel_name(tmp_path, monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.time()
    client.execute()  # raises CellExecutionError naming the failing cell
    print(f"{name}: executed in {time.time() - start:.0f} s")
    assert workdir.is_dir() and any(workdir.iterdir())
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
