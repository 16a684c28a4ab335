"""examples/quickstart.ipynb runs top to bottom on CPU (nbclient, a real ipykernel) and shows its plots.

The notebook is executed in a temporary working directory (its `output_dir` is relative), with a time limit; the
test checks that no cell raised, that the two matplotlib figures were rendered inline as PNGs, that the savings
were printed, and that the model card was written.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")
TIMEOUT_S = 240  # whole-notebook budget on a busy 2-core machine (about a minute when idle)


def _outputs(cell) -> list:
    return cell.get("outputs", []) if cell.cell_type == "code" else []


def test_quickstart_notebook_runs_and_plots(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    # The kernel is a fresh process that inherits this one's environment, including the MASTER_ADDR / MASTER_PORT /
    # RANK / WORLD_SIZE a colocated engine built here earlier set: give it a port of its own (the old one is taken,
    # EADDRINUSE), and keep an address (with RANK set, torch's env:// rendezvous requires one).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    client = nbclient.NotebookClient(
        notebook,
        timeout=TIMEOUT_S,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    assert elapsed < TIMEOUT_S, elapsed

    outputs = [out for cell in notebook.cells for out in _outputs(cell)]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert len(images) == 2  # the reward curve and the savings plot
    assert all(len(out["data"]["image/png"]) > 1000 for out in images)  # base64 PNGs with content

    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stdout")
    assert "methods on: ['selection_history', 'skip_zero_advantage', 'old_logprobs_from_loss']" in text
    # The history skip needs revisits (6 steps x 16 prompts over 256 prompts: few or none), so it may skip nothing.
    skipped = re.search(r"prompts skipped before generation: (\d+) \((\d+) rollouts never generated\)", text)
    assert skipped and int(skipped.group(2)) == 4 * int(skipped.group(1))  # G = 4 rollouts per skipped prompt
    zero_adv = re.search(
        r"policy-pass tokens saved: +(\d+) \((\d+) zero-advantage rollouts skipped the loss; (\d+) rollouts needed "
        r"no old-log-prob pass\)",
        text,
    )
    assert zero_adv and int(zero_adv.group(1)) > 0 and int(zero_adv.group(2)) > 0
    assert int(zero_adv.group(3)) == 6 * 64  # every rollout of the 6 steps: the loss's forward gave the ratio
    # The last cell rendered the card's efficiency section; the card itself is on disk in the working dir.
    markdown = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert markdown and markdown[-1].startswith("## Efficiency methods")
    card = (tmp_path / "quickstart-output" / "README.md").read_text(encoding="utf-8")
    assert "## Efficiency methods" in card and "(arXiv:2604.28020)" in card
