"""Switching the plugin on and telling a rank who it is; the vLLM versions it accepts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidp.errors import SidpError
from sidp.vllm_plugin import compat, settings

ON = {settings.GROUP: "g", settings.RANK: "1", settings.SIZE: "2"}


def test_off_without_a_group():
    assert not settings.enabled({settings.RANK: "0", settings.SIZE: "2"})
    assert settings.enabled(ON)


def test_defaults_and_choices():
    assert settings.from_env(ON) == settings.Settings("g", 1, 2)
    chosen = settings.from_env(
        {**ON, settings.PARTS: "attn,mlp", settings.PLACEMENT: "contiguous", settings.TIMEOUT: "30"}
    )
    assert (chosen.parts, chosen.placement, chosen.timeout_s) == (
        frozenset({"mlp", "attn"}),
        "contiguous",
        30.0,
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({settings.RANK: None}, "SIDP_VLLM_RANK must be"),
        ({settings.RANK: "2"}, "a rank below it"),
        ({settings.SIZE: "two"}, "not a whole number"),
        ({settings.PARTS: "mlp,embed"}, "pools mlp and attn only"),
        ({settings.PARTS: "ffn"}, "comma-separated choice"),
        ({settings.PLACEMENT: "random"}, "round_robin, contiguous"),
        ({settings.TIMEOUT: "0"}, "above 0"),
    ],
)
def test_bad_settings_say_what_to_fix(change, says):
    environ = {k: v for k, v in {**ON, **change}.items() if v is not None}
    with pytest.raises(SidpError, match=says):
        settings.from_env(environ)


def test_only_the_tested_vllm_runs():
    compat.check_version("0.32.0")
    compat.check_version("0.32.0+cpu")
    for other in ("0.31.1", "0.32.1", "0.33.0"):
        with pytest.raises(SidpError, match=f"tested on vLLM 0.32.0 only, and this is vLLM {other}"):
            compat.check_version(other)


def test_register_does_nothing_when_off():
    """Off, the entry point imports nothing of vLLM's or of the plugin's working parts."""
    code = (
        "import sys; from sidp.vllm_plugin import register; register(); "
        "print(sorted(m for m in sys.modules if m.startswith(('vllm', 'sidp.vllm_plugin.'))))"
    )
    env = {k: v for k, v in os.environ.items() if k != settings.GROUP}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['sidp.vllm_plugin.settings']"


ON_CHECK = """
import sys, vllm
from vllm.model_executor import offloader
from sidp.errors import SidpError
from sidp.vllm_plugin import register
version, vllm.__version__ = vllm.__version__, "0.31.0"
try:
    register()
except SidpError as error:
    print("refused:", error)
vllm.__version__ = version
register()
print("installed for rank", offloader.create_offloader.sidp_settings.rank)
print("runner imported:", "vllm.v1.worker.cpu_model_runner" in sys.modules)
"""


def test_register_when_on_refuses_another_vllm_and_otherwise_installs_lightly():
    """On, the entry point refuses an untested vLLM; on the tested one it replaces vLLM's offloader factory
    and imports no model runner (the front end and engine processes of a rank stay as they were)."""
    env = {**os.environ, **ON}
    done = subprocess.run(
        [sys.executable, "-c", ON_CHECK], env=env, capture_output=True, text=True, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(
        "refused: sidp's vLLM plugin is tested on vLLM 0.32.0 only, and this is vLLM 0.31.0"
    )
    assert lines[1:] == ["installed for rank 1", "runner imported: False"]
