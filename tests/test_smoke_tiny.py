import plugtune
from plugtune.adapters import read_manifest


def test_tiny_causal_run(make_recipe):
    path = make_recipe()
    result = plugtune.run(path, show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    assert read_manifest(result.adapter_dir).method.name == "lora"


def test_tiny_classification_run(make_recipe):
    path = make_recipe(classification=True)
    result = plugtune.run(path, show_progress=False)
    assert result.after["loss"] < result.before["loss"]
