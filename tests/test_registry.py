"""The method registry: decorator, duplicates, plug-ins appearing in the API, match and CLI."""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

import knowmri as km
from knowmri.methods.base import Method, Params, get_method, list_methods, register_method, unregister_method

PLUGIN = textwrap.dedent(
    '''
    """A third-party method defined in its own module."""
    from dataclasses import dataclass

    from knowmri.methods.base import Method, Params, register_method


    @dataclass
    class EchoParams(Params):
        repeat: int = 1


    @register_method
    class Echo(Method):
        name = "echo_plugin"
        title = "Echo"
        path = ("External", "Plug-in")
        requires_keys = ("prompt", "label")
        Params = EchoParams

        def run(self, model, sample, params, ctx):
            result = self.new_result(params)
            result.summary = sample["prompt"] * params.repeat
            return result
    '''
)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "echo_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    unregister_method("echo_plugin")
    sys.modules.pop("echo_plugin_mod", None)


def test_plugin_module_appears_in_methods_and_match(plugin_dir):
    import echo_plugin_mod  # noqa: F401  (registering is the import's only effect)

    assert "echo_plugin" in [m["name"] for m in km.methods()]
    matches = {m.name: m for m in km.match(km.Sample(prompt="hi"))}
    assert not matches["echo_plugin"].eligible
    assert matches["echo_plugin"].reasons == ["needs the key 'label'"]
    assert {m.name: m for m in km.match(km.Sample(prompt="hi", label="joy"))}["echo_plugin"].eligible


def test_plugin_appears_in_cli_via_env(plugin_dir):
    env = dict(os.environ, PYTHONPATH=str(plugin_dir), KNOWMRI_PLUGINS="echo_plugin_mod")
    out = subprocess.run([sys.executable, "-m", "knowmri", "methods"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "echo_plugin" in out.stdout


def test_duplicate_names_are_refused_unless_replace():
    @dataclass
    class P(Params):
        pass

    class A(Method):
        name = "dup_test"
        title = "A"
        path = ("X",)
        Params = P

    class B(Method):
        name = "dup_test"
        title = "B"
        path = ("X",)
        Params = P

    try:
        register_method(A)
        with pytest.raises(ValueError, match="already registered"):
            register_method(B)
        register_method(B, replace=True)
        assert type(get_method("dup_test")) is B
    finally:
        unregister_method("dup_test")


def test_registration_needs_name_and_dataclass_params():
    class NoName(Method):
        title = "x"
        path = ("X",)

    with pytest.raises(ValueError, match="name"):
        register_method(NoName)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_every_method_declares_its_contract():
    names = [cls.name for cls in list_methods()]
    assert len(names) == len(set(names))
    for cls in list_methods():
        info = cls.info()
        assert info["path"] and info["path"][0] in ("External", "Internal")
        assert "prompt" in info["requires_keys"]
        for field in info["params"]:
            assert {"name", "type", "default"} <= set(field)


def test_params_from_dict_coerces_and_rejects():
    cls = get_method("logit_lens").Params
    assert cls.from_dict({"top_k": "7"}).top_k == 7
    with pytest.raises(ValueError, match="unknown parameter"):
        cls.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="must be of type int"):
        cls.from_dict({"top_k": "many"})
    with pytest.raises(ValueError, match="between"):
        cls.from_dict({"top_k": 0})


def test_non_finite_floats_are_refused_for_every_method():
    for cls in list_methods():
        for field in cls.Params.schema():
            for bad in (float("nan"), float("inf"), float("-inf"), "nan", "-Infinity"):
                if isinstance(bad, str) and field["type"] != "float":
                    continue  # a text parameter may well read "nan"
                with pytest.raises(ValueError, match="finite"):
                    cls.Params.from_dict({field["name"]: bad})
    with pytest.raises(ValueError, match="finite"):
        get_method("causal_tracing").Params.from_dict({"kinds": ["hidden", float("nan")]})
