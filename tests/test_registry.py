import json
import subprocess
import sys
import textwrap

import pytest
import torch

import mixres
from mixres import ConfigError, Configurable, MixresError, Registry, UnknownNameError
from mixres.registry import REGISTRIES


def test_every_kind_has_the_same_api():
    for kind in ("fusion", "projector", "pathway", "encoder"):
        for verb in ("register_{}", "register_{}_preset", "list_{}s"):
            assert callable(getattr(mixres, verb.format(kind)))
    for kind in ("fusion", "projector", "pathway"):
        assert callable(getattr(mixres, f"create_{kind}"))
    assert set(REGISTRIES) >= {"fusion", "projector", "pathway", "encoder"}


def test_list_fusions_shows_mr_adapter_and_final():
    assert {"mr_adapter", "mr_final"} <= set(mixres.list_fusions())
    assert mixres.list_fusions("mr_a*") == ["mr_adapter", "mr_adapter_paper"]
    assert mixres.list_fusions("nothing*") == []


def _widget_registry():
    reg = Registry("widget_test")

    @reg.register("plain")
    class Plain(Configurable, torch.nn.Module):
        def __init__(self, width: int = 4, *, depth: int = 1):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)

    return reg, Plain


def test_duplicate_registration_is_an_error_unless_override():
    reg, Plain = _widget_registry()
    with pytest.raises(MixresError, match="'plain' is already registered; pass override=True"):
        reg.register("plain")(type("Other", (Configurable, torch.nn.Module), {}))
    reg.register("plain", override=True)(type("Other", (Configurable, torch.nn.Module), {}))
    assert reg.get_class("plain").__name__ == "Other"
    with pytest.raises(MixresError, match="already registered"):
        mixres.register_fusion("mr_adapter")(type("X", (mixres.Fusion,), {}))
    REGISTRIES.pop("widget_test")


def test_unknown_name_is_a_key_error_with_close_matches():
    with pytest.raises(KeyError, match="unknown fusion 'mr_adaptor'; did you mean 'mr_adapter'"):
        mixres.create_fusion("mr_adaptor", low_dim=4, high_dim=4)
    with pytest.raises(UnknownNameError, match="unknown projector 'zzz'"):
        mixres.create_projector("zzz")


def test_presets_merge_overrides_and_keep_none():
    reg, Plain = _widget_registry()
    reg.register_preset("wide", {"name": "plain", "width": 16})
    assert reg.create("wide").config == {"kind": "widget_test", "name": "plain", "width": 16, "depth": 1}
    assert reg.create("wide", width=8).config["width"] == 8
    assert reg.resolve("wide", depth=None)["depth"] is None  # None is a value: passed on, not dropped
    assert reg.is_preset("wide") and not reg.is_preset("plain")
    with pytest.raises(ConfigError, match="'name'"):
        reg.register_preset("bad", {"width": 3})
    with pytest.raises(ConfigError, match="JSON"):
        reg.register_preset("bad", {"name": "plain", "width": object()})
    REGISTRIES.pop("widget_test")


def test_register_rejects_non_configurable():
    reg, _ = _widget_registry()
    with pytest.raises(TypeError, match="Configurable"):
        reg.register("f")(lambda: None)
    REGISTRIES.pop("widget_test")


@pytest.mark.parametrize(
    "config, error, match",
    [
        ([1, 2], TypeError, "has to be a dict"),
        ({"name": "mr_adapter"}, ConfigError, r"missing \['kind'\]"),
        ({"kind": "gizmo", "name": "x"}, ConfigError, "kind 'gizmo' is unknown"),
        ({"kind": "fusion", "name": "nope"}, KeyError, "unknown fusion 'nope'"),
        ({"kind": "fusion", "name": "mr_adapter", "low_dim": 4}, ConfigError, "needs argument"),
        ({"kind": "fusion", "name": "mr_adapter", "low_dim": 4, "high_dim": 4, "colour": 1}, ConfigError, "no argument.*colour"),
        ({"kind": "fusion", "name": "mr_adapter", "low_dim": 4, "high_dim": 4, "gate": 3}, ValueError, "gate has to be one of"),
    ],
)
def test_malformed_configs(config, error, match):
    with pytest.raises(error, match=match):
        mixres.build(config)


def test_every_registered_module_round_trips():
    """One loop over every fusion and projector: build, config is JSON, rebuild, same keys."""
    for kind, kwargs in (("fusion", dict(low_dim=8, high_dim=6)), ("projector", dict(in_dim=8, out_dim=8))):
        reg = REGISTRIES[kind]
        for name in reg.list():
            try:
                m = reg.create(name, **kwargs)
            except ConfigError:
                continue  # fusions of another signature are covered by their own tests
            cfg = json.loads(json.dumps(m.config))
            again = mixres.build(cfg)
            assert again.config == m.config
            assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
            assert repr(m)


def test_import_is_light():
    code = "import sys, mixres; mixres.list_fusions(); print([m for m in ('transformers', 'open_clip', 'timm') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plugin_entry_point(tmp_path):
    """A tiny distribution registers a fusion through the entry-point group mixres.plugins."""
    pkg = tmp_path / "mixres_demo_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import mixres

        @mixres.register_fusion("demo_add")
        class DemoAdd(mixres.Fusion):
            """Adds the pooled map to every token."""
            def __init__(self, low_dim: int, high_dim: int):
                super().__init__(low_dim, high_dim)

            def forward(self, tokens, grid, map):
                self.check_inputs(tokens, grid, map)
                return tokens + map.mean(dim=(2, 3)).unsqueeze(1)
    '''))
    dist = tmp_path / "mixres_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mixres-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mixres.plugins]\ndemo = mixres_demo_plugin\n")
    code = textwrap.dedent('''
        import sys, torch, mixres
        sys.path.insert(0, sys.argv[1])
        assert "demo_add" in mixres.list_fusions(), mixres.list_fusions()
        m = mixres.create_fusion("demo_add", low_dim=3, high_dim=3)
        assert m.config == {"kind": "fusion", "name": "demo_add", "low_dim": 3, "high_dim": 3}
        out = m(torch.zeros(1, 4, 3), (2, 2), torch.ones(1, 3, 2, 2))
        assert torch.equal(out, torch.ones(1, 4, 3))
        print("ok")
    ''')
    # the plugin must be on sys.path before the first look-up, which loads plugins lazily
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_broken_plugin_warns_and_mixres_still_works(tmp_path):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mixres.plugins]\nbroken = no_such_module_xyz\n")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import warnings, mixres; warnings.simplefilter('error')\n" \
           "try:\n    mixres.list_fusions()\nexcept UserWarning as w:\n    print(w)"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert "plugin 'broken'" in res.stdout, res.stderr
