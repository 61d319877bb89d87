"""The third-party IA3 method (examples/plugtune-ia3): its own tests through the kit, and
installed with pip (not editable) as a real distribution, trained from a recipe by the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from installs import install_into, installed_here, process_env
from plugtune.testing import recipe_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugtune-ia3"
DIST = "plugtune-ia3"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example into a folder of its own (tests/installs.py), not the shared
    environment: the processes of these tests find it on their ``PYTHONPATH``. Returns the folder."""
    if installed_here(DIST):
        pytest.skip(f"{DIST} is already installed here; a second copy would register its plugin twice")
    return install_into(tmp_path_factory.mktemp("ia3"), EXAMPLE)


def _env(site: Path) -> dict[str, str]:
    return process_env(site, PLUGTUNE_STRICT_PLUGINS="1")


def test_installed_ia3_is_listed_and_trains_from_a_recipe(installed: Path, tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "plugtune.cli", "plugins", "--json"], cwd=tmp_path, env=_env(installed),
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["plugins"]}
    assert rows["ia3"]["distribution"] == DIST

    recipe = recipe_dict(tiny_llama, tiny_data, method={"name": "example_ia3", "options": {}}, evaluators=["loss"],
                         output={"dir": str(tmp_path / "adapter")})
    recipe["training"].update(max_steps=4, learning_rate=5e-2)
    path = tmp_path / "ia3.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "plugtune.cli", "run", str(path), "--quiet"], cwd=tmp_path, env=_env(installed),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "adapter" / "plugtune.json").read_text())
    assert manifest["method"]["name"] == "example_ia3"
    assert manifest["method"]["distribution"] == DIST
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"


def test_the_installed_example_passes_its_own_kit_tests(installed: Path, tmp_path: Path) -> None:
    """The example's own tests, as its author runs them, against the pip-installed
    distribution (a copy of the tests folder, so nothing imports the source tree): the
    plugin comes in through its entry point, every contract passes (mixed batches with LoRA
    rows, LoRA in both load orders included), nothing is xfailed."""
    tests = shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    env = {k: v for k, v in _env(installed).items() if k != "PLUGTUNE_STRICT_PLUGINS"}
    where = subprocess.run([sys.executable, "-c", "import plugtune_ia3; print(plugtune_ia3.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and str(EXAMPLE) not in where.stdout, where.stdout + where.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                             str(tests)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "xfail" not in result.stdout and " passed" in result.stdout, result.stdout[-1000:]


def _train(system: object, recipe: dict, path: Path) -> Path:
    import plugtune

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return Path(plugtune.run(path, plugins=system, show_progress=False).adapter_dir)


def test_installed_ia3_serves_one_batch_with_lora_rows(installed: Path, tmp_path: Path, tiny_llama: Path,
                                                        tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``plugtune serve`` (the app, in-process on a free port) with an installed-IA3 adapter
    and a LoRA adapter on one AdapterHost, loaded in either order: completions for IA3,
    LoRA and base rows queued into one batch each give what their adapter gives alone."""
    import importlib

    import httpx

    from plugtune.kernel.registry import build_plugin_system, set_plugin_system
    from plugtune.serving.host import AdapterHost
    from plugtune.serving.server import Service, create_app, running
    from test_server import alone, run_as_one_batch

    monkeypatch.syspath_prepend(str(installed))  # this process finds the example where its subprocesses do
    importlib.invalidate_caches()
    system = build_plugin_system()
    set_plugin_system(system)
    try:
        assert system.get("method", "example_ia3").plugin.distribution == DIST
        root = tmp_path / "adapters"
        ia3 = recipe_dict(tiny_llama, tiny_data, method={"name": "example_ia3", "options": {}}, evaluators=["loss"],
                          output={"dir": str(root / "ia3")}, name="ia3")
        ia3["training"].update(max_steps=4, learning_rate=5e-2)
        lora = recipe_dict(tiny_llama, tiny_data, evaluators=["loss"], output={"dir": str(root / "lora")}, name="lora")
        lora["training"].update(max_steps=4)
        folders = {"ia3": _train(system, ia3, tmp_path / "ia3.yaml"), "lora": _train(system, lora, tmp_path / "lora.yaml")}
        prompts = ["question : what is the colour of the sky ? answer :", "question : what is the colour of the sun ? answer :",
                   "question : what is the colour of the grass ? answer :"]
        cases = [("ia3", prompts[0]), ("lora", prompts[0]), ("base", prompts[1]), ("ia3", prompts[2]), ("lora", prompts[1])]
        for order in (("ia3", "lora"), ("lora", "ia3")):
            host = AdapterHost.from_adapters(*(folders[n] for n in order), plugins=system, device="cpu")
            host.use(None)
            expected = [alone(host, p, None if m == "base" else m, 6)[0] for m, p in cases]
            assert len(set(expected)) > 1, "the adapters and the base all say the same; the test would prove nothing"
            service = Service(host, adapters_root=root, max_batch=8, base_name="tiny-llama")
            results: list = [None] * len(cases)
            with running(create_app(service)) as url:
                def ask(i: int) -> None:
                    model, prompt = cases[i]
                    with httpx.Client(base_url=url, timeout=120) as c:
                        results[i] = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                                     "temperature": 0}).json()

                batches = service.worker.batches
                run_as_one_batch(service, [lambda i=i: ask(i) for i in range(len(cases))])
                assert service.worker.batches == batches + 1 and service.worker.largest_batch >= len(cases), order
            got = [body["choices"][0]["text"] for body in results]
            assert got == expected, f"load order {order}: one batch gave {got}, each adapter alone {expected}"
    finally:
        set_plugin_system(None)
