"""Opt-in: run the exports of test_cli_megatron.py through Megatron-LM's *real* parse_args,
validate_args and TransformerConfig. Needs a Megatron-LM source tree:

    MEGATRON_LM=/path/to/Megatron-LM .venv/bin/python -m pytest -q tests/test_megatron_real.py

On a CPU machine, three Megatron modules that import triton kernels at load time are replaced by
empty stand-ins, and transformer-engine is taken as present (a GPU node has it); no rule is
skipped. Without MEGATRON_LM the test is skipped (the offline rule table in test_cli_megatron.py
always runs).
"""
import contextlib
import importlib.abc
import importlib.machinery
import io
import os
import sys
import types
import typing
from unittest import mock

import pytest

from test_cli_megatron import CASES, export

MEGATRON = os.environ.get("MEGATRON_LM")
pytestmark = pytest.mark.skipif(not MEGATRON, reason="set MEGATRON_LM to a Megatron-LM source tree")
TRITON_MODULES = ("megatron.core.transformer.moe.ops.paged_stash", "megatron.core.ssm.ops.common.causal_conv1d_varlen",
                  "megatron.core.ssm.ops.mamba2.batch_invariant_decode")


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if any(name == m or name.startswith(m + ".") for m in TRITON_MODULES):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: mock.MagicMock(name=attr)
        return module

    def exec_module(self, module):
        pass


@pytest.fixture(scope="module")
def megatron():
    sys.path.insert(0, MEGATRON)
    sys.meta_path.insert(0, _StandIns())
    if not hasattr(typing, "override"):  # Megatron-LM main needs Python 3.12's typing.override
        typing.override = lambda f: f
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer import transformer_config
    from megatron.training import arguments
    from megatron.training.argument_utils import core_transformer_config_from_args

    arguments.get_device_arch_version = lambda: 9  # Hopper
    arguments.is_te_min_version = transformer_config.is_te_min_version = lambda *a, **k: True
    rope_utils.fused_apply_rotary_pos_emb = lambda *a, **k: None
    return arguments, lambda args: core_transformer_config_from_args(args, TransformerConfig)


@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_accepts_the_export(megatron, case, monkeypatch):
    arguments, config = megatron
    job, plan, command = export(case)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    for name_value in command.env:
        monkeypatch.setenv(*name_value.split("=", 1))
    monkeypatch.setattr(sys, "argv", [command.script] + command.argv())
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a, **k: (9, 0))
    with contextlib.redirect_stdout(io.StringIO()):
        args = arguments.parse_args(ignore_unknown_args=False)
        args.world_size, args.rank = job.cluster.world, 0
        arguments.validate_args(args)
        config(args)
    assert args.data_parallel_size * plan.layout.tp * plan.layout.pp * plan.layout.cp == job.cluster.world
