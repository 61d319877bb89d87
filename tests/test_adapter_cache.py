"""The adapter cache on the tiny Llama: adapters loaded on first use from a root, least
recently used evicted past ``max_adapters``, pinned and in-use ones never, outputs after an
eviction and reload equal to the first load's, paths that leave the root refused, unknown
names answered with the closest ones, counters and events, prefetched reads used."""

from __future__ import annotations

import shutil
import threading

import pytest

from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE, Adapter
from plugtune.data.tasks import build_task
from plugtune.kernel.errors import AdapterError
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.serving.cache import AdapterCache, AdapterPathError, CacheFullError
from plugtune.serving.host import AdapterHost

TASK = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
PROMPTS = ["what is the colour of the sky ?", "what is the colour of the grass ?"]
NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def base_host(tiny_llama):
    return AdapterHost.from_base(str(tiny_llama), TASK)


@pytest.fixture(scope="module")
def source(tmp_path_factory, base_host):
    """Four random LoRA adapters, large enough to change the greedy output."""
    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(NAMES, start=1):
        random_lora_adapter(folder / name, base_host.base, TASK, r=4, seed=seed, scale=0.5)
    return folder


@pytest.fixture
def root(tmp_path, source):
    root = tmp_path / "root"
    shutil.copytree(source, root)
    return root


@pytest.fixture
def host(base_host):
    """The shared base with no adapters, given back bare after each test."""
    yield base_host
    for name in list(base_host.adapters):
        base_host.unload(name)
    base_host.use(None)


def generate(host, name):
    return host.generate(PROMPTS, name, max_new_tokens=6)


def test_available_lists_adapter_folders_under_safe_names(host, root, tmp_path):
    (root / "notes").mkdir()  # no manifest
    (root / "README.txt").write_text("not an adapter")
    shutil.copytree(root / "alpha", root / ".hidden")
    shutil.copytree(root / "alpha", tmp_path / "outside")
    (root / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    cache = AdapterCache(host, root)
    assert cache.available() == NAMES[:1] + ["beta", "delta", "gamma"]
    assert AdapterCache(host, tmp_path / "missing").available() == []


def test_least_recently_used_is_evicted(host, root):
    cache = AdapterCache(host, root, max_adapters=2)
    events = []
    cache.on_event(lambda kind, name: events.append((kind, name)))
    assert cache.ensure("alpha") == "alpha" and cache.ensure("beta") == "beta"
    assert cache.resident() == ["alpha", "beta"]
    cache.ensure("alpha")  # touched: beta is now the least recently used
    assert cache.resident() == ["beta", "alpha"]
    cache.ensure("gamma")
    assert cache.resident() == ["alpha", "gamma"] and set(host.adapters) == {"alpha", "gamma"}
    cache.ensure("delta")
    assert cache.resident() == ["gamma", "delta"] and set(host.adapters) == {"gamma", "delta"}
    assert (cache.loads, cache.evictions) == (4, 2)
    assert events == [("load", "alpha"), ("load", "beta"), ("evict", "beta"), ("load", "gamma"),
                      ("evict", "alpha"), ("load", "delta")]


def test_outputs_after_eviction_and_reload_equal_the_first_load(host, root):
    bare = generate(host, None)
    cache = AdapterCache(host, root, max_adapters=1)
    cache.ensure("alpha")
    first = generate(host, "alpha")
    assert first != bare  # the adapter changes the answer
    cache.ensure("beta")
    assert "alpha" not in host.adapters
    assert generate(host, "beta") not in (first, bare)
    cache.ensure("alpha")
    assert generate(host, "alpha") == first
    assert generate(host, None) == bare  # eviction gave the base back untouched


def test_pinned_adapters_are_never_evicted(host, root):
    host.load(root / "alpha")  # named on the command line: the host holds it before the cache
    cache = AdapterCache(host, root, max_adapters=3, pinned=["alpha", "beta"])  # beta: loaded now
    assert cache.resident() == ["alpha", "beta"] and cache.loads == 1
    for name in ("gamma", "delta", "gamma", "delta"):
        cache.ensure(name)
        assert {"alpha", "beta", name} == set(host.adapters)
    assert cache.evictions == 3


def test_more_pinned_than_max_is_refused_at_start(host, root):
    with pytest.raises(AdapterError, match=r"3 adapters are pinned \(alpha, beta, gamma\) but --max-adapters is 2; "
                                           "raise it to at least 3"):
        AdapterCache(host, root, max_adapters=2, pinned=["alpha", "beta", "gamma"])
    assert host.adapters == {}
    with pytest.raises(AdapterError, match="at least 1"):
        AdapterCache(host, root, max_adapters=0)


def test_adapters_in_use_are_never_evicted(host, root):
    cache = AdapterCache(host, root, max_adapters=2)
    cache.ensure("alpha")
    cache.ensure("beta")
    cache.ensure("gamma", in_use={"alpha"})  # alpha is older but running: beta goes
    assert cache.resident() == ["alpha", "gamma"]
    with pytest.raises(CacheFullError, match=r"cannot load adapter 'delta': all 2 resident adapters are pinned or in "
                                             r"use \(--max-adapters 2\); retry when running requests finish"):
        cache.ensure("delta", in_use=["alpha", "gamma"])
    assert cache.resident() == ["alpha", "gamma"] and (cache.loads, cache.evictions) == (3, 1)
    host.use("gamma")  # the host's active adapter counts as in use
    cache.ensure("delta", in_use=[])
    assert cache.resident() == ["gamma", "delta"]


def test_a_refused_load_evicts_nothing(host, root, tmp_path):
    other = AdapterHost.from_base(str(tmp_path_base(tmp_path)), TASK)
    random_lora_adapter(root / "foreign", other.base, TASK, r=2, seed=9)
    cache = AdapterCache(host, root, max_adapters=1)
    cache.ensure("alpha")
    with pytest.raises(AdapterError, match="was trained on base"):
        cache.ensure("foreign")
    assert cache.resident() == ["alpha"] and cache.evictions == 0


def tmp_path_base(tmp_path):
    from plugtune.testing import build_tiny_llama

    return build_tiny_llama(tmp_path / "other-base", seed=7)


def test_names_that_leave_the_root_are_refused(host, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "alpha", outside)
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    planted = root / "planted"
    shutil.copytree(root / "alpha", planted)
    (planted / WEIGHTS_FILE).unlink()
    (planted / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    cache = AdapterCache(host, root)
    for name in ("../outside", str(outside), "alpha/../../outside", "/etc", ".hidden", "a" * 65, "bad\x00"):
        with pytest.raises(AdapterPathError, match="is not an adapter name") as err:
            cache.ensure(name)
        assert err.value.status == 400
    with pytest.raises(AdapterPathError, match=f"adapter path 'sneaky' is outside the adapters root {root}") as err:
        cache.ensure("sneaky")
    assert err.value.status == 403
    with pytest.raises(AdapterPathError, match=f"adapter path 'planted': {WEIGHTS_FILE} links outside the adapters "
                                               f"root {root}; copy the file") as err:
        cache.ensure("planted")
    assert err.value.status == 403
    assert host.adapters == {} and cache.loads == 0


def test_an_unknown_name_lists_the_closest(host, root):
    cache = AdapterCache(host, root)
    with pytest.raises(AdapterPathError) as err:
        cache.ensure("gama")
    assert str(err.value) == (f"no adapter 'gama' under {root}; did you mean 'gamma'? "
                              "(available: alpha, beta, delta, gamma)")
    assert err.value.status == 404
    with pytest.raises(AdapterPathError, match=r"no adapter 'zzz' under .* \(available: alpha, beta, delta, gamma\)$"):
        cache.ensure("zzz")
    (root / "notes").mkdir()
    with pytest.raises(AdapterError, match=f"{MANIFEST_FILE} is missing"):  # a folder, but no adapter
        cache.ensure("notes")


def test_a_prefetched_read_is_used(host, root):
    cache = AdapterCache(host, root, max_adapters=1)
    assert not cache.ready("beta")
    read = cache.prefetch("beta")
    assert cache.prefetch("beta") is read  # one read per name
    assert isinstance(read.result(timeout=30), Adapter)
    assert cache.ready("beta")
    shutil.rmtree(root / "beta")  # ensure() cannot have read the files: they are gone
    cache.ensure("alpha")
    cache.ensure("beta")
    assert cache.resident() == ["beta"]
    cache.ensure("alpha")
    with pytest.raises(AdapterPathError, match="no adapter 'beta'"):  # the read was used up
        cache.ensure("beta")
    assert cache.prefetch("alpha").result() is None  # resident: nothing to read
    errors = cache.prefetch("missing").exception(timeout=30)
    assert isinstance(errors, AdapterPathError) and errors.status == 404


def test_a_full_cache_keeps_the_read_for_the_retry(host, root):
    cache = AdapterCache(host, root, max_adapters=1)
    cache.ensure("alpha")
    with pytest.raises(CacheFullError):
        cache.ensure("beta", in_use={"alpha"})
    shutil.rmtree(root / "beta")
    assert cache.ready("beta")
    assert cache.ensure("beta") == "beta"


def test_the_cache_follows_the_hosts_own_loads_and_unloads(host, root):
    cache = AdapterCache(host, root, max_adapters=2)
    cache.ensure("alpha")
    host.load(root / "beta")  # loaded beside the cache: it will not evict it
    assert cache.resident() == ["alpha", "beta"]
    cache.ensure("gamma")
    assert cache.resident() == ["beta", "gamma"]
    host.unload("gamma")
    assert cache.resident() == ["beta"]
    cache.ensure("gamma")
    assert cache.loads == 3


def test_other_threads_list_and_prefetch_while_loading(host, root):
    cache = AdapterCache(host, root, max_adapters=2)
    stop, seen, errors = threading.Event(), [], []

    def watch():
        try:
            while not stop.is_set():
                seen.append(len(cache.resident()))
                cache.available()
                cache.prefetch(NAMES[len(seen) % 4])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for name in NAMES * 3:
            cache.ensure(name)
    finally:
        stop.set()
        thread.join(30)
    # One over the bound at most, for the moment between attaching the new one and evicting.
    assert not errors and max(seen) <= 3 and len(cache.resident()) == 2
    assert cache.loads == 12 and cache.evictions == 10
